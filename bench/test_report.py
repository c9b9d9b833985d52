#!/usr/bin/env python3
"""Tests for bench/report.py on raw files made here (no root, no network): python3 bench/test_report.py"""
import io
import json
import os
import subprocess
import sys
import tempfile
import unittest
from contextlib import redirect_stdout

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import report  # noqa: E402

TCK = report.CLK_TCK


def iperf_tcp(gbps, seconds=10.0, retrans=3):
    nbytes = gbps * 1e9 / 8 * seconds
    return {"start": {"test_start": {"blksize": 131072}},
            "end": {"sum_sent": {"seconds": seconds, "bytes": nbytes, "bits_per_second": gbps * 1e9,
                                 "retransmits": retrans},
                    "sum_received": {"seconds": seconds, "bytes": nbytes, "bits_per_second": gbps * 1e9},
                    "sender_tcp_congestion": "bbr"}}


def iperf_udp(sent_pkts, got_pkts, seconds=10.0):
    return {"start": {"test_start": {"blksize": 64}},
            "end": {"sum_sent": {"seconds": seconds, "bytes": sent_pkts * 64, "packets": sent_pkts},
                    "sum_received": {"seconds": seconds, "bytes": got_pkts * 64, "packets": sent_pkts}}}


def ping_output(dst, rtts, start=1796137143.0, transmitted=None, interrupted=False, interval=0.012, extra=""):
    """ping -D -n output as iputils 20221126 prints it: one line per reply (None in rtts: no reply to that
    sequence number), then the summary."""
    lines = [f"PING {dst} ({dst}) 56(84) bytes of data."]
    got = [x for x in rtts if x is not None]
    for seq, rtt in enumerate(rtts, 1):
        if rtt is not None:
            t = start + seq * interval + rtt / 1000
            lines.append(f"[{t:.6f}] 64 bytes from {dst}: icmp_seq={seq} ttl=63 time={rtt:g} ms")
    sent = transmitted if transmitted is not None else len(rtts)
    loss = round(100 * (sent - len(got)) / sent) if sent else 0
    lines += ["", f"--- {dst} ping statistics ---",
              f"{sent} packets transmitted, {len(got)} received, {loss}% packet loss, time {int(sent * interval * 1000)}ms"]
    if got:
        avg = sum(got) / len(got)
        lines.append(f"rtt min/avg/max/mdev = {min(got):.3f}/{avg:.3f}/{max(got):.3f}/0.050 ms")
    out = "\n".join(lines) + "\n" + extra
    if interrupted:
        out += report.INTERRUPTED + "\n"
    return out


# recorded from bench/run (pod A -> pod B through flannel-udp), trimmed: idle, and during the 4-stream test
IDLE_RTTS = [0.31, 0.262, 0.281, 0.244, 0.301, 0.27, 0.255, 0.298, 0.266, 0.412,
             0.251, 0.277, 0.289, 0.262, 0.248, 0.305, 0.272, 0.259, 0.283, 0.9]
LOAD_RTTS = [3.91, 4.12, 6.34, 2.88, 4.45, 5.02, 15.4, 3.77, 4.21, 3.95]


def kv(**values):
    return "".join(f"{k} {v}\n" for k, v in values.items())


class RawFiles(unittest.TestCase):
    """A raw directory as bench/run leaves it, written by the test."""
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.raw = self.tmp.name
        with open(os.path.join(self.raw, "meta"), "w") as f:
            f.write(kv(time=10, runs=3, configs="vxlan flannel-udp peer", peer_name="flannel-c"))

    def tearDown(self):
        self.tmp.cleanup()

    def write(self, run, cfg, name, content):
        d = os.path.join(self.raw, f"run{run}", cfg)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, name), "w") as f:
            f.write(content if isinstance(content, str) else json.dumps(content))

    def good_run(self, run, cfg, gbps, fwd_ticks, overlay=True, load_ms=2.0):
        self.write(run, cfg, "cc", "bbr\n")
        self.write(run, cfg, "mtu", "mtu 1472\n")
        self.write(run, cfg, "ping.txt", ping_output("10.244.2.2", [0.1, 0.2, 0.3] * 6 + [0.2, 0.2]))
        # the 4-stream test runs from time 100 to 110 (tcp4.before/.after below); its ping replies come in between
        self.write(run, cfg, "ping-tcp4.txt", ping_output("10.244.2.2", [load_ms] * 50, start=100.5,
                                                          transmitted=52, interrupted=True))
        for test in ("tcp1", "tcp4"):
            self.write(run, cfg, test + ".json", iperf_tcp(gbps))
            self.write(run, cfg, test + ".before", kv(fwd_ticks=0, softirq=0, busy=0, time=100, rcvbuf_node_b=10, rcvbuf_app=0,
                                                      ofo_app=1000, reorder_cli=0, txdrop_node_a=0, txdrop_node_b=0))
            self.write(run, cfg, test + ".after", kv(fwd_ticks=fwd_ticks, softirq=TCK, busy=TCK * 4, time=110, rcvbuf_node_b=15,
                                                     rcvbuf_app=0, ofo_app=1000 + 40 * run, reorder_cli=run, txdrop_node_a=2,
                                                     txdrop_node_b=1))
        self.write(run, cfg, "udp.json", iperf_udp(1000000, 500000))
        self.write(run, cfg, "udp.before", kv(fwd_ticks=0, rcvbuf_node_b=0, rcvbuf_app=0, txdrop_node_a=0))
        self.write(run, cfg, "udp.after", kv(fwd_ticks=TCK * 5, rcvbuf_node_b=7, rcvbuf_app=3, txdrop_node_a=400))

    def result(self):
        out = io.StringIO()
        with redirect_stdout(out):
            sys.argv = ["report.py", "--json", self.raw]
            report.main()
        return json.loads(out.getvalue())


class ReportTests(RawFiles):
    def test_medians_rates_and_counter_deltas(self):
        for run, gbps in ((1, 1.0), (2, 3.0), (3, 2.0)):
            self.good_run(run, "flannel-udp", gbps, fwd_ticks=TCK * 10)
        m = self.result()["configs"]["flannel-udp"]["median"]
        self.assertAlmostEqual(m["tcp1_gbps"], 2.0)
        # two TCP tests of 2 Gbit/s x 10 s = 5 GB moved for 20 CPU seconds
        self.assertAlmostEqual(m["fwd_cpu_s_per_gb"], 20 / 5.0)
        self.assertAlmostEqual(m["udp_rx_kpps"], 50.0)
        self.assertAlmostEqual(m["udp_loss_pct"], 50.0)
        self.assertAlmostEqual(m["fwd_cpu_us_per_pkt"], 5 / 500000 * 1e6)
        self.assertEqual(m["rcvbuf_node_tcp"], 10)  # 5 per TCP test
        self.assertEqual(m["rcvbuf_node_udp"], 7)
        self.assertEqual(m["txdrop_send_udp"], 400)
        self.assertEqual(m["txdrop_tcp"], 6)
        self.assertAlmostEqual(m["ping_avg_ms"], 0.2)

    def test_four_stream_retransmits_out_of_order_segments_and_reorderings(self):
        for run in (1, 2, 3):
            self.good_run(run, "flannel-udp", 1.0, fwd_ticks=TCK)
            self.write(run, "flannel-udp", "tcp4.json", iperf_tcp(1.0, retrans=[50, 7, 9][run - 1]))
        c = self.result()["configs"]["flannel-udp"]
        self.assertEqual(c["median"]["tcp4_retrans"], 9)
        self.assertEqual([m["tcp4_ofo"] for m in c["per_run"]], [40, 80, 120], "the receiving pod's TCPOFOQueue delta")
        self.assertEqual(c["median"]["tcp4_ofo"], 80)
        self.assertEqual([m["tcp4_reorder"] for m in c["per_run"]], [1, 2, 3], "the sending pod's reorderings")
        self.assertNotIn("tcp1_ofo", c["per_run"][0], "counted for the 4-stream test only")
        # raw files from before the counter: no figure, not 0
        os.remove(os.path.join(self.raw, "run1", "flannel-udp", "tcp4.after"))
        first = self.result()["configs"]["flannel-udp"]["per_run"][0]
        self.assertNotIn("tcp4_ofo", first)
        self.assertNotIn("tcp4_reorder", first)

    def test_udp_rate_steps(self):
        with open(os.path.join(self.raw, "meta"), "a") as f:
            f.write("udp_pps 25,50\n")
        self.good_run(1, "flannel-udp", 1.0, fwd_ticks=TCK)
        self.write(1, "flannel-udp", "udp-25.json", iperf_udp(250000, 250000))
        self.write(1, "flannel-udp", "udp-50.json", iperf_udp(500000, 450000))
        m = self.result()["configs"]["flannel-udp"]["median"]
        self.assertAlmostEqual(m["udp25k_rx_kpps"], 25.0)
        self.assertAlmostEqual(m["udp25k_loss_pct"], 0.0)
        self.assertAlmostEqual(m["udp50k_rx_kpps"], 45.0)
        self.assertAlmostEqual(m["udp50k_loss_pct"], 10.0)

    def test_kernel_configuration_has_no_forwarder_cpu(self):
        self.good_run(1, "vxlan", 10.0, fwd_ticks=0)
        m = self.result()["configs"]["vxlan"]["median"]
        self.assertNotIn("fwd_cpu_s_per_gb", m)
        self.assertIn("softirq_s_per_gb", m)

    def test_tun_bound_is_a_forwarder_with_ratios(self):
        with open(os.path.join(self.raw, "meta"), "w") as f:
            f.write(kv(time=10, runs=1, cpus=2, configs="tun-bound flannel-udp"))
        self.good_run(1, "tun-bound", 4.0, fwd_ticks=TCK)
        self.good_run(1, "flannel-udp", 3.0, fwd_ticks=TCK)
        r = self.result()
        # two TCP tests of 4 Gbit/s x 10 s = 10 GB, for 1 s of forwarder CPU each
        self.assertAlmostEqual(r["configs"]["tun-bound"]["median"]["fwd_cpu_s_per_gb"], 0.2)
        self.assertAlmostEqual(r["ratios"]["tun-bound"]["tcp4_gbps"]["median"], 0.75)
        self.assertAlmostEqual(r["ratios"]["tun-bound"]["fwd_cpu_s_per_gb"]["median"], 4.0 / 3.0)
        # the machine was busy 4 s of the 10 s 4-stream test: 4 s for 5 GB, 4 s of 2 CPUs x 10 s
        self.assertAlmostEqual(r["configs"]["tun-bound"]["median"]["machine_cpu_s_per_gb"], 0.8)
        self.assertAlmostEqual(r["configs"]["tun-bound"]["median"]["machine_busy_pct"], 20.0)
        self.assertNotIn("host_steal_pct", r["configs"]["tun-bound"]["median"])  # raw files without the counter
        self.assertAlmostEqual(r["ratios"]["tun-bound"]["machine_cpu_s_per_gb"]["median"], 4.0 / 3.0)

    def test_wire_bound_is_a_forwarder_with_ratios(self):
        with open(os.path.join(self.raw, "meta"), "w") as f:
            f.write(kv(time=10, runs=1, cpus=2, configs="tun-bound wire-bound flannel-udp"))
        self.good_run(1, "tun-bound", 4.0, fwd_ticks=TCK)
        self.good_run(1, "wire-bound", 3.5, fwd_ticks=TCK)
        self.good_run(1, "flannel-udp", 3.0, fwd_ticks=TCK)
        r = self.result()
        # its forwarder CPU is measured (two tests of 3.5 Gbit/s x 10 s = 8.75 GB, 1 s of CPU each), and
        # flannel-udp gets a ratio over it as over tun-bound
        self.assertAlmostEqual(r["configs"]["wire-bound"]["median"]["fwd_cpu_s_per_gb"], 2.0 / 8.75)
        self.assertAlmostEqual(r["ratios"]["wire-bound"]["tcp4_gbps"]["median"], 3.0 / 3.5)
        self.assertAlmostEqual(r["ratios"]["tun-bound"]["tcp4_gbps"]["median"], 0.75)

    def test_lane_bound_and_its_variants_are_forwarders_with_ratios(self):
        with open(os.path.join(self.raw, "meta"), "w") as f:
            f.write(kv(time=10, runs=1, cpus=2, configs="lane-bound lane-bound-s50 lane-node-s50 lane-decide-s50 flannel-udp"))
        self.good_run(1, "lane-bound", 1.0, fwd_ticks=TCK)
        self.good_run(1, "lane-bound-s50", 1.0, fwd_ticks=TCK)
        self.good_run(1, "lane-node-s50", 1.0, fwd_ticks=TCK)
        self.good_run(1, "lane-decide-s50", 1.0, fwd_ticks=TCK)
        self.good_run(1, "flannel-udp", 3.0, fwd_ticks=TCK)
        r = self.result()
        # both have their forwarder CPU measured (two tests of 1 Gbit/s x 10 s = 2.5 GB, 1 s of CPU each), and
        # flannel-udp gets a ratio over each
        for cfg in ("lane-bound", "lane-bound-s50", "lane-node-s50", "lane-decide-s50"):
            self.assertAlmostEqual(r["configs"][cfg]["median"]["fwd_cpu_s_per_gb"], 2.0 / 2.5)
            self.assertAlmostEqual(r["ratios"][cfg]["tcp4_gbps"]["median"], 3.0)

    def test_host_steal_is_shown_and_not_counted_as_machine_cpu(self):
        with open(os.path.join(self.raw, "meta"), "w") as f:
            f.write(kv(time=10, runs=1, cpus=2, configs="flannel-udp"))
        self.good_run(1, "flannel-udp", 4.0, fwd_ticks=TCK)
        # of the 4 busy seconds of the 4-stream test, 1 was the hypervisor's (steal)
        self.write(1, "flannel-udp", "tcp4.before", kv(fwd_ticks=0, softirq=0, busy=0, steal=0, time=100))
        self.write(1, "flannel-udp", "tcp4.after", kv(fwd_ticks=TCK, softirq=TCK, busy=TCK * 4, steal=TCK, time=110))
        m = self.result()["configs"]["flannel-udp"]["median"]
        self.assertAlmostEqual(m["machine_cpu_s_per_gb"], 3 / 5.0)  # 3 s of work for 5 GB
        self.assertAlmostEqual(m["machine_busy_pct"], 15.0)        # 3 s of 2 CPUs x 10 s
        self.assertAlmostEqual(m["host_steal_pct"], 5.0)

    def test_check_fails_on_a_configuration_that_did_not_run(self):
        self.good_run(1, "vxlan", 10.0, fwd_ticks=0)
        self.good_run(1, "flannel-udp", 1.0, fwd_ticks=TCK)
        self.write(1, "peer", "failed", "setup failed: adapter exited 1\n")
        def check():
            return subprocess.run([sys.executable, report.__file__, "--check", self.raw], capture_output=True, text=True)
        out = check()
        self.assertEqual(out.returncode, 1)
        self.assertIn("flannel-c: setup failed: adapter exited 1", out.stdout)
        # runs=3 in the meta: one good run of three is not enough either
        self.assertIn("vxlan: 1 of 3 runs worked", out.stdout)
        with open(os.path.join(self.raw, "meta"), "w") as f:
            f.write(kv(time=1, runs=1, configs="vxlan flannel-udp"))
        out = check()
        self.assertEqual(out.returncode, 0, out.stdout)
        self.assertIn("every configuration ran: vxlan, flannel-udp", out.stdout)

    def test_failed_configuration_is_reported_and_others_kept(self):
        self.write(1, "peer", "failed", "setup failed: adapter exited 1\n")
        self.good_run(1, "flannel-udp", 1.0, fwd_ticks=TCK)
        self.write(2, "flannel-udp", "notes", "udp: iperf3 exited 124\n")
        self.write(2, "flannel-udp", "tcp1.json", {"error": "unable to connect to server"})
        r = self.result()["configs"]
        self.assertEqual(r["flannel-c"]["runs_ok"], 0)
        self.assertEqual(r["flannel-c"]["failures"], [{"run": 1, "error": "setup failed: adapter exited 1"}])
        self.assertEqual(r["flannel-udp"]["runs_ok"], 2)
        self.assertAlmostEqual(r["flannel-udp"]["median"]["tcp1_gbps"], 1.0)
        problems = [p["problem"] for p in r["flannel-udp"]["problems"]]
        self.assertIn("udp: iperf3 exited 124", problems)
        self.assertIn("tcp1: iperf3: unable to connect to server", problems)

    def test_table_marks_failed_and_not_applicable(self):
        self.write(1, "peer", "failed", "setup failed\n")
        self.good_run(1, "vxlan", 10.0, fwd_ticks=0)
        out = subprocess.run([sys.executable, report.__file__, self.raw], capture_output=True, text=True, check=True)
        line = next(x for x in out.stdout.splitlines() if x.startswith("forwarder CPU s/GB"))
        # vxlan: no forwarder; flannel-udp: never measured; flannel-c: failed
        self.assertEqual(line.split()[-3:], ["n/a", "-", "failed"])

    def test_memory_is_the_larger_node(self):
        self.good_run(1, "flannel-udp", 1.0, fwd_ticks=TCK)
        self.write(1, "flannel-udp", "memory", kv(hwm_kb_a=10240, rss_kb_a=9000, anon_kb_a=2048,
                                                  hwm_kb_b=20480, rss_kb_b=9000, anon_kb_b=1024))
        self.good_run(1, "vxlan", 10.0, fwd_ticks=0)
        self.write(1, "vxlan", "memory", kv(hwm_kb_a=0, rss_kb_a=0, anon_kb_a=0))  # no forwarder process
        r = self.result()["configs"]
        self.assertAlmostEqual(r["flannel-udp"]["median"]["fwd_peak_rss_mb"], 20.0)
        self.assertAlmostEqual(r["flannel-udp"]["median"]["fwd_anon_mb"], 2.0)
        self.assertNotIn("fwd_peak_rss_mb", r["vxlan"]["median"])

    def test_ratios_pair_runs_not_medians(self):
        # flannel-udp 1, 3, 2 Gbit/s against vxlan 2, 3, 8: per-run ratios 0.5, 1.0, 0.25 -> median 0.5,
        # where the ratio of the medians would be 2/3.
        for run, mine, theirs in ((1, 1.0, 2.0), (2, 3.0, 3.0), (3, 2.0, 8.0)):
            self.good_run(run, "flannel-udp", mine, fwd_ticks=TCK)
            self.good_run(run, "vxlan", theirs, fwd_ticks=0)
        # the peer worked in run 2 only: one ratio
        self.good_run(2, "peer", 0.25, fwd_ticks=TCK * 10)
        for run, cfg, hwm in ((2, "flannel-udp", 30720), (2, "peer", 1024)):
            self.write(run, cfg, "memory", kv(hwm_kb_a=hwm, hwm_kb_b=hwm))
        r = self.result()["ratios"]
        self.assertEqual(r["vxlan"]["tcp1_gbps"]["per_run"], [0.5, 1.0, 0.25])
        self.assertAlmostEqual(r["vxlan"]["tcp1_gbps"]["median"], 0.5)
        self.assertNotIn("fwd_cpu_s_per_gb", r["vxlan"])  # vxlan has no forwarder
        self.assertEqual(r["flannel-c"]["tcp4_gbps"]["per_run"], [12.0])
        # CPU per GB over the two TCP tests: flannel-udp 2 s for 7.5 GB, the peer 20 s for 0.625 GB
        self.assertAlmostEqual(r["flannel-c"]["fwd_cpu_s_per_gb"]["median"], (2 / 7.5) / (20 / 0.625))
        self.assertAlmostEqual(r["flannel-c"]["fwd_peak_rss_mb"]["median"], 30.0)
        out = subprocess.run([sys.executable, report.__file__, self.raw], capture_output=True, text=True, check=True)
        line = next(x for x in out.stdout.splitlines() if x.startswith("TCP 1 stream") and x.endswith("x"))
        self.assertEqual(line.split()[-3:], ["0.50x", "(0.25-1.00)", "12.00x"])


class PingTests(unittest.TestCase):
    def test_idle_median_p99_and_no_loss(self):
        f, problems = report.parse_ping(ping_output("10.244.2.2", IDLE_RTTS))
        self.assertEqual(problems, [])
        self.assertEqual(f["rtts"], IDLE_RTTS)
        self.assertAlmostEqual(f["median_ms"], (0.272 + 0.277) / 2)
        self.assertAlmostEqual(f["p99_ms"], 0.9)  # nearest rank: of 20, the largest
        self.assertEqual((f["transmitted"], f["lost"], f["loss_pct"]), (20, 0, 0.0))

    def test_p99_is_nearest_rank(self):
        vals = sorted(float(x) for x in range(1, 201))
        self.assertEqual(report.percentile(vals, 99), 198.0)
        self.assertEqual(report.percentile(vals, 50), 100.0)
        self.assertEqual(report.percentile([5.0], 99), 5.0)

    def test_loss_under_load_leaves_out_pings_in_flight_when_interrupted(self):
        # 12 sent; no reply to 4 and 8 (lost), nor to 11 and 12 (in flight when bench stopped ping)
        rtts = LOAD_RTTS[:3] + [None] + LOAD_RTTS[3:6] + [None] + LOAD_RTTS[6:8] + [None, None]
        f, problems = report.parse_ping(ping_output("10.244.2.2", rtts, interrupted=True))
        self.assertEqual(problems, [])
        self.assertEqual((f["transmitted"], f["received"], f["lost"]), (12, 8, 2))
        self.assertAlmostEqual(f["loss_pct"], 20.0)  # 2 of the 10 sent up to the last reply
        self.assertAlmostEqual(f["median_ms"], (4.12 + 4.45) / 2)
        self.assertAlmostEqual(f["p99_ms"], 15.4)
        # ping ended by its count (waiting -W 1 for the last replies): the tail is lost too
        f, _ = report.parse_ping(ping_output("10.244.2.2", rtts))
        self.assertEqual(f["lost"], 4)
        self.assertAlmostEqual(f["loss_pct"], 100 * 4 / 12)

    def test_every_ping_lost(self):
        f, problems = report.parse_ping(ping_output("10.244.2.2", [None] * 30, interrupted=True))
        self.assertEqual((f["lost"], f["loss_pct"]), (30, 100.0))
        self.assertNotIn("median_ms", f)
        self.assertEqual(problems, [])

    def test_duplicates_and_time_below_1ms(self):
        text = ping_output("10.244.2.2", [0.5, 0.7, 0.6])
        text = text.replace("icmp_seq=2 ttl=63 time=0.7 ms",
                            "icmp_seq=2 ttl=63 time=0.7 ms\n64 bytes from 10.244.2.2: icmp_seq=2 ttl=63 time=9 ms (DUP!)")
        text = text.replace("time=0.5 ms", "time<1 ms")
        f, _ = report.parse_ping(text)
        self.assertEqual(f["rtts"], [1.0, 0.7, 0.6])
        self.assertEqual(f["lost"], 0)

    def test_empty_and_garbled_output_give_no_figures(self):
        for text in ("", "ping: connect: Network is unreachable\n", "\x00\x01garbage 64 bytes icmp_seq=x\n"):
            f, problems = report.parse_ping(text)
            self.assertNotIn("median_ms", f)
            self.assertNotIn("loss_pct", f)
            self.assertEqual(len(problems), 1)
            self.assertIn("empty or garbled", problems[0])

    def test_truncated_output_keeps_rtts_but_no_loss(self):
        text = ping_output("10.244.2.2", LOAD_RTTS).split("\n\n")[0]  # cut before the summary
        f, problems = report.parse_ping(text)
        self.assertEqual(len(f["rtts"]), 10)
        self.assertNotIn("loss_pct", f)
        self.assertEqual(problems, ["no ping summary after 10 replies"])

    def test_summary_only_from_older_raw_files(self):
        f, problems = report.parse_ping("200 packets transmitted, 199 received, 0.5% packet loss, time 2000ms\n"
                                        "rtt min/avg/max/mdev = 0.100/0.200/0.300/0.050 ms\n")
        self.assertEqual((f["avg_ms"], f["mdev_ms"], f["loss_pct"]), (0.2, 0.05, 0.5))
        self.assertNotIn("median_ms", f)
        self.assertEqual(problems, [])


class LatencyRowTests(RawFiles):
    def check(self):
        return subprocess.run([sys.executable, report.__file__, "--check", self.raw], capture_output=True, text=True)

    def one_run_meta(self, configs):
        with open(os.path.join(self.raw, "meta"), "w") as f:
            f.write(kv(time=10, runs=1, configs=configs, peer_name="flannel-c"))

    def test_loaded_rows_and_ratios_for_every_configuration(self):
        self.one_run_meta("vxlan tun-bound flannel-udp peer")
        for cfg, ms in (("vxlan", 0.05), ("tun-bound", 1.0), ("flannel-udp", 4.0), ("peer", 3.2)):
            self.good_run(1, cfg, 1.0, fwd_ticks=TCK, load_ms=ms)
        self.write(1, "peer", "ping-tcp4.txt", ping_output("10.244.2.2", LOAD_RTTS[:5] + [None] + LOAD_RTTS[5:],
                                                            start=101, interrupted=True))
        r = self.result()
        for cfg, ms in (("vxlan", 0.05), ("tun-bound", 1.0), ("flannel-udp", 4.0)):
            m = r["configs"][cfg]["median"]
            self.assertAlmostEqual(m["ping_load_median_ms"], ms)
            self.assertAlmostEqual(m["ping_load_p99_ms"], ms)
            self.assertEqual(m["ping_load_loss_pct"], 0.0)  # 2 of 52 in flight at the end: not lost
            self.assertAlmostEqual(m["ping_idle_median_ms"], 0.2)
            self.assertAlmostEqual(m["ping_idle_p99_ms"], 0.3)
        peer = r["configs"]["flannel-c"]["median"]
        self.assertAlmostEqual(peer["ping_load_loss_pct"], 100 / 11)
        self.assertAlmostEqual(peer["ping_load_median_ms"], (4.12 + 4.21) / 2)
        self.assertAlmostEqual(r["ratios"]["vxlan"]["ping_load_median_ms"]["median"], 80.0)
        self.assertAlmostEqual(r["ratios"]["tun-bound"]["ping_load_p99_ms"]["median"], 4.0)
        self.assertAlmostEqual(r["ratios"]["flannel-c"]["ping_idle_p99_ms"]["median"], 1.0)
        self.assertAlmostEqual(r["ratios"]["flannel-c"]["ping_load_loss_pct"]["median_diff"], -100 / 11)
        out = subprocess.run([sys.executable, report.__file__, self.raw], capture_output=True, text=True, check=True)
        lines = out.stdout.splitlines()
        row = next(x for x in lines if x.startswith("ping under TCP 4 loss %"))
        self.assertEqual(row.split()[-4:], ["0.0", "0.0", "0.0", "9.1"])
        row = next(x for x in lines if x.startswith("ping idle p99 ms"))
        self.assertEqual(row.split()[-4:], ["0.300"] * 4)
        row = next(x for x in lines if x.startswith("ping under TCP 4 median") and x.endswith("x"))
        self.assertEqual(row.split()[-3:], ["80.00x", "4.00x", "0.96x"])
        row = next(x for x in lines if x.startswith("ping under TCP 4 loss, points"))
        self.assertEqual(row.split()[-3:], ["+0.0", "+0.0", "-9.1"])
        self.assertEqual(self.check().returncode, 0)

    def test_check_requires_latency_figures(self):
        self.one_run_meta("vxlan flannel-udp")
        self.good_run(1, "vxlan", 10.0, fwd_ticks=0)
        self.good_run(1, "flannel-udp", 1.0, fwd_ticks=TCK)
        self.assertEqual(self.check().returncode, 0)
        os.remove(os.path.join(self.raw, "run1", "flannel-udp", "ping-tcp4.txt"))
        self.write(1, "vxlan", "ping.txt", "")
        out = self.check()
        self.assertEqual(out.returncode, 1)
        self.assertIn("flannel-udp: run 1: no ping under TCP 4 median/p99; no ping loss under TCP 4", out.stdout)
        self.assertIn("vxlan: run 1: no idle ping median/p99", out.stdout)

    def test_check_refuses_garbled_all_lost_short_or_unloaded_pings(self):
        self.one_run_meta("flannel-udp")
        self.good_run(1, "flannel-udp", 1.0, fwd_ticks=TCK)
        cases = [
            ("garbled", "PING 10.244.2.2 \x00\x00 wrong\n", "no ping under TCP 4 median/p99; no ping loss"),
            ("every ping lost", ping_output("10.244.2.2", [None] * 40, start=101), "no ping under TCP 4 median/p99"),
            ("too few", ping_output("10.244.2.2", [3.0] * 4, start=101, interrupted=True), "only 4 pings sent"),
            # replies at 111-112: after the 4-stream test had ended (tcp4.after time 110)
            ("after the load", ping_output("10.244.2.2", [3.0] * 50, start=111.0, interval=0.02),
             "50 ping replies under TCP 4 came outside the test"),
        ]
        for what, text, why in cases:
            with self.subTest(what):
                self.write(1, "flannel-udp", "ping-tcp4.txt", text)
                out = self.check()
                self.assertEqual(out.returncode, 1, out.stdout)
                self.assertIn(why, out.stdout)


if __name__ == "__main__":
    unittest.main()
