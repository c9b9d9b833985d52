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


def kv(**values):
    return "".join(f"{k} {v}\n" for k, v in values.items())


class ReportTests(unittest.TestCase):
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

    def good_run(self, run, cfg, gbps, fwd_ticks, overlay=True):
        self.write(run, cfg, "cc", "bbr\n")
        self.write(run, cfg, "mtu", "mtu 1472\n")
        self.write(run, cfg, "ping.txt", "200 packets transmitted, 200 received, 0% packet loss, time 2000ms\n"
                                         "rtt min/avg/max/mdev = 0.100/0.200/0.300/0.050 ms\n")
        for test in ("tcp1", "tcp4"):
            self.write(run, cfg, test + ".json", iperf_tcp(gbps))
            self.write(run, cfg, test + ".before", kv(fwd_ticks=0, softirq=0, busy=0, time=100, rcvbuf_node_b=10, rcvbuf_app=0,
                                                      txdrop_node_a=0, txdrop_node_b=0))
            self.write(run, cfg, test + ".after", kv(fwd_ticks=fwd_ticks, softirq=TCK, busy=TCK * 4, time=110, rcvbuf_node_b=15,
                                                     rcvbuf_app=0, txdrop_node_a=2, txdrop_node_b=1))
        self.write(run, cfg, "udp.json", iperf_udp(1000000, 500000))
        self.write(run, cfg, "udp.before", kv(fwd_ticks=0, rcvbuf_node_b=0, rcvbuf_app=0, txdrop_node_a=0))
        self.write(run, cfg, "udp.after", kv(fwd_ticks=TCK * 5, rcvbuf_node_b=7, rcvbuf_app=3, txdrop_node_a=400))

    def result(self):
        out = io.StringIO()
        with redirect_stdout(out):
            sys.argv = ["report.py", "--json", self.raw]
            report.main()
        return json.loads(out.getvalue())

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
        self.assertAlmostEqual(r["ratios"]["tun-bound"]["machine_cpu_s_per_gb"]["median"], 4.0 / 3.0)

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


if __name__ == "__main__":
    unittest.main()
