#!/usr/bin/env python3
"""Turn bench/run's raw files into medians: a table (default) or JSON (--json); or, with --check, exit 1 unless
every configuration worked in every run (for a smoke run).

Raw layout (written by bench/run):
    meta                         "key value" lines: time, runs, kernel, configs, ...
    runN/CONFIG/failed           present if the configuration could not be set up or reached
    runN/CONFIG/notes            anything that went wrong in a single test
    runN/CONFIG/cc, mtu          congestion control in the client namespace, client MTU
    runN/CONFIG/ping.txt         ping -D -n output at idle: one line per reply, then the summary
    runN/CONFIG/ping-tcp4.txt    the same during the 4-stream TCP test; a last line "bench: ping interrupted at the
                                 end of the load" when bench/run stopped it (SIGINT) as iperf3 ended
    runN/CONFIG/T.json           iperf3 -J output for T in tcp1, tcp4, udp
    runN/CONFIG/T.before/.after  counter snapshots around T ("key value" lines, see snapshot() in bench/run)
    runN/CONFIG/queues-tcp4.txt  raw only: qdisc and UDP socket queues in each node, sampled every second of tcp4
    runN/CONFIG/memory           forwarder memory per node after the tests, kB (configurations with a forwarder)
    runN/CONFIG/status-*.json    flannel-udp status --json after the tests (flannel-udp only)
"""
import json
import math
import os
import re
import statistics
import sys

CLK_TCK = os.sysconf("SC_CLK_TCK")
GB = 1e9

# (key, label, format) in table order; a None label starts a section.
ROWS = [
    ("tcp1_gbps", "TCP 1 stream  Gbit/s", "{:.2f}"),
    ("tcp4_gbps", "TCP 4 streams Gbit/s", "{:.2f}"),
    ("tcp1_retrans", "TCP 1 stream  retransmits", "{:.0f}"),
    ("tcp4_retrans", "TCP 4 streams retransmits", "{:.0f}"),
    ("tcp4_ofo", "TCP 4 streams out of order", "{:.0f}"),
    ("tcp4_reorder", "TCP 4 streams reorderings", "{:.0f}"),
    ("udp_rx_kpps", "UDP 64 B received kpps", "{:.1f}"),
    ("udp_tx_kpps", "UDP 64 B sent kpps", "{:.1f}"),
    ("udp_loss_pct", "UDP 64 B loss %", "{:.1f}"),
    ("ping_avg_ms", "ping avg ms", "{:.3f}"),
    ("ping_mdev_ms", "ping mdev ms", "{:.3f}"),
    ("ping_idle_median_ms", "ping idle median ms", "{:.3f}"),
    ("ping_idle_p99_ms", "ping idle p99 ms", "{:.3f}"),
    ("ping_load_median_ms", "ping under TCP 4 median ms", "{:.3f}"),
    ("ping_load_p99_ms", "ping under TCP 4 p99 ms", "{:.3f}"),
    ("ping_load_loss_pct", "ping under TCP 4 loss %", "{:.1f}"),
    ("fwd_cpu_s_per_gb", "forwarder CPU s/GB (TCP)", "{:.2f}"),
    ("fwd_cpu_us_per_pkt", "forwarder CPU us/pkt (UDP)", "{:.2f}"),
    ("fwd_peak_rss_mb", "forwarder peak RSS MB (node)", "{:.1f}"),
    ("fwd_anon_mb", "forwarder anon RSS MB (node)", "{:.1f}"),
    ("machine_cpu_s_per_gb", "machine CPU s/GB (TCP 4)", "{:.2f}"),
    ("machine_busy_pct", "machine busy % (TCP 4)", "{:.0f}"),
    ("host_steal_pct", "host steal % (TCP 4)", "{:.0f}"),
    ("softirq_s_per_gb", "softirq s/GB (TCP, machine)", "{:.2f}"),
    ("rcvbuf_node_udp", "RcvbufErrors recv node (UDP)", "{:.0f}"),
    ("rcvbuf_node_tcp", "RcvbufErrors recv node (TCP)", "{:.0f}"),
    ("rcvbuf_app_udp", "RcvbufErrors iperf3 recv (UDP)", "{:.0f}"),
    ("txdrop_send_udp", "tx_dropped send dev (UDP)", "{:.0f}"),
    ("txdrop_tcp", "tx_dropped both devs (TCP)", "{:.0f}"),
]

# configurations whose forwarding runs in processes in the node namespaces (CPU and memory are measured)
FORWARDERS = ("tun-bound", "wire-bound", "lane-bound", "flannel-udp", "peer")

# flannel-udp's figures divided by another configuration's from the same run: (key, label) in table order.
RATIO_SUBJECT = "flannel-udp"
RATIOS = [
    ("tcp1_gbps", "TCP 1 stream"),
    ("tcp4_gbps", "TCP 4 streams"),
    ("udp_rx_kpps", "UDP 64 B received"),
    ("ping_idle_median_ms", "ping idle median"),
    ("ping_idle_p99_ms", "ping idle p99"),
    ("ping_load_median_ms", "ping under TCP 4 median"),
    ("ping_load_p99_ms", "ping under TCP 4 p99"),
    ("fwd_cpu_s_per_gb", "forwarder CPU per GB"),
    ("machine_cpu_s_per_gb", "machine CPU per GB"),
    ("fwd_peak_rss_mb", "forwarder peak RSS"),
    ("fwd_anon_mb", "forwarder anon RSS"),
]
# figures where a ratio says nothing when the other configuration's is 0: flannel-udp's minus theirs, per run,
# shown in the ratio table as a signed difference (key, label, unit).
DIFFS = [
    ("ping_load_loss_pct", "ping under TCP 4 loss", "points"),
]
INTERRUPTED = "bench: ping interrupted at the end of the load"


def read_kv(path):
    out = {}
    try:
        with open(path) as f:
            for line in f:
                parts = line.split(None, 1)
                if len(parts) == 2:
                    out[parts[0]] = parts[1].strip()
    except OSError:
        pass
    return out


def read_text(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def delta(before, after, key):
    try:
        return float(after[key]) - float(before[key])
    except (KeyError, ValueError):
        return None


def counters(d, test):
    return read_kv(os.path.join(d, test + ".before")), read_kv(os.path.join(d, test + ".after"))


def udp_test(d, test):
    """Received kpps and loss % of one 64-byte UDP test, plus the counters around it; {} if it did not run."""
    j = read_json(os.path.join(d, test + ".json"))
    if not j or "sum_received" not in j.get("end", {}):
        return {}
    recv, sent = j["end"]["sum_received"], j["end"]["sum_sent"]
    length = j.get("start", {}).get("test_start", {}).get("blksize") or 64
    got = recv["bytes"] / length  # packets that reached the receiver
    out = {"got": got,
           "rx_kpps": got / (recv["seconds"] or 1) / 1e3,
           "tx_kpps": sent["packets"] / (sent["seconds"] or 1) / 1e3}
    if sent["packets"]:
        out["loss_pct"] = 100.0 * (1 - got / sent["packets"])
    return out


def percentile(sorted_vals, p):
    """Nearest-rank percentile of an ascending list: the smallest value with at least p % of the values at or
    below it (for 20 samples, p99 is the largest)."""
    return sorted_vals[max(0, math.ceil(p / 100.0 * len(sorted_vals)) - 1)]


REPLY = re.compile(r"^(?:\[(\d+\.\d+)\] )?\d+ bytes from [^:]+: icmp_seq=(\d+) .*?time[=<]([\d.]+) ms(.*)$")


def parse_ping(text):
    """Per-packet ping output (`ping -D -n`, or older `ping -q` summaries) -> (figures, problems).
    figures: rtts (ms, one per answered sequence number, in order), times (reply timestamps, where -D gave them),
    transmitted, received, lost, loss_pct, avg_ms and mdev_ms (from the summary), median_ms, p99_ms.
    Loss counts the pings sent that got no reply; when bench/run interrupted ping at the end of the load, the pings
    after the last reply were still in flight and are left out of the count (replies come back in order)."""
    out, problems = {}, []
    text = text or ""
    seqs, rtts, times = set(), [], []
    for line in text.splitlines():
        r = REPLY.match(line.strip())
        if not r or "DUP!" in r.group(4):
            continue
        seq = int(r.group(2))
        if seq in seqs:
            continue
        seqs.add(seq)
        rtts.append(float(r.group(3)))
        if r.group(1):
            times.append(float(r.group(1)))
    summary = re.search(r"(\d+) packets transmitted, (\d+) received", text)
    rtt = re.search(r"= [\d.]+/([\d.]+)/[\d.]+/([\d.]+) ms", text)
    if rtt:
        out["avg_ms"], out["mdev_ms"] = float(rtt.group(1)), float(rtt.group(2))
    if not summary:
        problems.append("no ping summary" + (f" after {len(rtts)} replies" if rtts else " (empty or garbled output)"))
    else:
        transmitted, received = int(summary.group(1)), int(summary.group(2))
        out["transmitted"], out["received"] = transmitted, received
        if rtts and received != len(rtts):
            problems.append(f"ping summary says {received} replies, {len(rtts)} reply lines read")
        if rtts or received == 0:
            counted = transmitted
            if INTERRUPTED in text and seqs:
                counted = min(transmitted, max(seqs))
            if counted > 0:
                out["lost"] = counted - len([x for x in seqs if x <= counted])
                out["loss_pct"] = 100.0 * out["lost"] / counted
        else:  # a summary only (ping -q, raw files from before per-packet output): its own loss figure
            loss = re.search(r"([\d.]+)% packet loss", text)
            if loss:
                out["loss_pct"] = float(loss.group(1))
    if rtts:
        s = sorted(rtts)
        out["rtts"], out["median_ms"], out["p99_ms"] = rtts, statistics.median(s), percentile(s, 99)
        if times:
            out["times"] = times
    return out, problems


def one_run(d, has_forwarder, has_overlay, udp_pps=(), cpus=None):
    """Metrics of one configuration in one run, plus the problems seen; None values are left out."""
    m, problems = {}, []
    notes = read_text(os.path.join(d, "notes"))
    if notes and notes.strip():
        problems += [line for line in notes.strip().splitlines() if line.strip()]

    idle_text = read_text(os.path.join(d, "ping.txt"))
    if idle_text is not None:
        idle, p = parse_ping(idle_text)
        problems += ["idle ping: " + x for x in p]
        m["ping_avg_ms"], m["ping_mdev_ms"] = idle.get("avg_ms"), idle.get("mdev_ms")
        m["ping_loss_pct"] = idle.get("loss_pct")
        m["ping_idle_median_ms"], m["ping_idle_p99_ms"] = idle.get("median_ms"), idle.get("p99_ms")
        m["ping_idle_replies"] = len(idle.get("rtts", []))
    load_text = read_text(os.path.join(d, "ping-tcp4.txt"))
    if load_text is not None:
        load, p = parse_ping(load_text)
        problems += ["ping under TCP 4: " + x for x in p]
        m["ping_load_median_ms"], m["ping_load_p99_ms"] = load.get("median_ms"), load.get("p99_ms")
        m["ping_load_loss_pct"], m["ping_load_lost"] = load.get("loss_pct"), load.get("lost")
        m["ping_load_sent"], m["ping_load_replies"] = load.get("transmitted"), len(load.get("rtts", []))
        b, a = counters(d, "tcp4")
        try:
            start, end = float(b["time"]), float(a["time"])
        except (KeyError, ValueError):
            start = end = None
        if start is not None and load.get("times"):
            # replies outside the 4-stream test (between the counter snapshots around it) were not under load
            m["ping_load_outside"] = sum(1 for t in load["times"] if not start <= t <= end)

    tcp_bytes, tcp_fwd, tcp_soft, tcp_rcvbuf, tcp_txdrop = 0.0, 0.0, 0.0, 0.0, 0.0
    for test, n in (("tcp1", 1), ("tcp4", 4)):
        j = read_json(os.path.join(d, test + ".json"))
        if not j or "error" in j or "sum_received" not in j.get("end", {}):
            if j and "error" in j:
                problems.append(f"{test}: iperf3: {j['error']}")
            continue
        recv, sent = j["end"]["sum_received"], j["end"]["sum_sent"]
        m[f"{test}_gbps"] = recv["bits_per_second"] / 1e9
        m[f"{test}_retrans"] = sent.get("retransmits")
        m[f"{test}_cc"] = j["end"].get("sender_tcp_congestion")
        b, a = counters(d, test)
        tcp_bytes += recv["bytes"]
        tcp_fwd += delta(b, a, "fwd_ticks") or 0
        tcp_soft += delta(b, a, "softirq") or 0
        busy, steal, seconds = delta(b, a, "busy"), delta(b, a, "steal"), delta(b, a, "time")
        if n == 4 and busy is not None and recv["bytes"] > 0:  # absent in raw files from before the counter
            # busy counts steal (older raw files have no separate steal counter and keep it): the time the
            # hypervisor gave this VM's CPUs to someone else is not what the transfer cost
            work = busy - (steal or 0)
            m["machine_cpu_s_per_gb"] = work / CLK_TCK / (recv["bytes"] / GB)
            if seconds and cpus:
                m["machine_busy_pct"] = 100.0 * work / CLK_TCK / (seconds * cpus)
                if steal is not None:
                    m["host_steal_pct"] = 100.0 * steal / CLK_TCK / (seconds * cpus)
        if n == 4:  # absent in raw files from before the counters
            # segments the receiving pod queued out of order: reordered, or behind a segment lost on the way
            m["tcp4_ofo"] = delta(b, a, "ofo_app")
            # reorderings the sending pod's TCP detected (SACK, timestamps, Reno): reordering only, not loss
            m["tcp4_reorder"] = delta(b, a, "reorder_cli")
        tcp_rcvbuf += delta(b, a, "rcvbuf_node_b") or 0
        tcp_txdrop += (delta(b, a, "txdrop_node_a") or 0) + (delta(b, a, "txdrop_node_b") or 0)
    if tcp_bytes > 0:  # over the TCP tests that worked
        if has_forwarder:
            m["fwd_cpu_s_per_gb"] = tcp_fwd / CLK_TCK / (tcp_bytes / GB)
        m["softirq_s_per_gb"] = tcp_soft / CLK_TCK / (tcp_bytes / GB)
        if has_overlay:
            m["rcvbuf_node_tcp"] = tcp_rcvbuf
        if has_forwarder or "txdrop_node_a" in counters(d, "tcp1")[0]:
            m["txdrop_tcp"] = tcp_txdrop

    j = read_json(os.path.join(d, "udp.json"))
    if j and "error" in j:
        problems.append(f"udp: iperf3: {j['error']}")
    u = udp_test(d, "udp")
    if u:
        m["udp_rx_kpps"], m["udp_tx_kpps"], m["udp_loss_pct"] = u["rx_kpps"], u["tx_kpps"], u.get("loss_pct")
        b, a = counters(d, "udp")
        if has_overlay:  # on the underlay the node is the receiver: its errors are iperf3's, shown below
            m["rcvbuf_node_udp"] = delta(b, a, "rcvbuf_node_b")
        m["rcvbuf_app_udp"] = delta(b, a, "rcvbuf_app")
        m["txdrop_send_udp"] = delta(b, a, "txdrop_node_a")
        if has_forwarder and u["got"]:
            fwd = delta(b, a, "fwd_ticks")
            if fwd is not None:
                m["fwd_cpu_us_per_pkt"] = fwd / CLK_TCK / u["got"] * 1e6
    for k in udp_pps:
        j = read_json(os.path.join(d, f"udp-{k}.json"))
        if j and "error" in j:
            problems.append(f"udp-{k}: iperf3: {j['error']}")
        u = udp_test(d, f"udp-{k}")
        if u:
            m[f"udp{k}k_rx_kpps"], m[f"udp{k}k_loss_pct"] = u["rx_kpps"], u.get("loss_pct")

    mem = read_kv(os.path.join(d, "memory"))
    if has_forwarder and mem:
        # the larger node: both run the same forwarder, the receiving one usually holds more in its buffers
        for key, field in (("fwd_peak_rss_mb", "hwm_kb"), ("fwd_anon_mb", "anon_kb")):
            vals = [float(mem[f"{field}_{n}"]) for n in "ab" if f"{field}_{n}" in mem]
            if vals and max(vals) > 0:
                m[key] = max(vals) / 1024

    cc = read_text(os.path.join(d, "cc"))
    if cc:
        m["cc"] = cc.strip()
    mtu = read_text(os.path.join(d, "mtu"))
    if mtu and mtu.split():
        m["client_mtu"] = int(mtu.split()[-1])
    return {k: v for k, v in m.items() if v is not None}, problems


def main():
    args = sys.argv[1:]
    as_json, check = "--json" in args, "--check" in args
    args = [a for a in args if a not in ("--json", "--check")]
    if len(args) != 1:
        sys.exit("usage: report.py [--json | --check] RAW_DIR")
    raw = args[0]
    meta = read_kv(os.path.join(raw, "meta"))
    configs = meta.get("configs", "").split()
    runs = int(meta.get("runs", "0"))
    udp_pps = [k for k in meta.get("udp_pps", "").split(",") if k]
    cpus = int(meta["cpus"]) if meta.get("cpus", "").isdigit() else None
    rows = ROWS + [row for k in udp_pps for row in (
        (f"udp{k}k_rx_kpps", f"UDP 64 B at {k} kpps: received", "{:.1f}"),
        (f"udp{k}k_loss_pct", f"UDP 64 B at {k} kpps: loss %", "{:.1f}"))]
    names = {c: (meta.get("peer_name", "peer") if c == "peer" else c) for c in configs}

    result = {"params": meta, "configs": {}}
    result["params"]["clk_tck"] = CLK_TCK
    for c in configs:
        per_run, failures, problems = [], [], []
        for r in range(1, runs + 1):
            d = os.path.join(raw, f"run{r}", c)
            failed = read_text(os.path.join(d, "failed"))
            if failed is not None:
                failures.append({"run": r, "error": failed.strip()})
                continue
            if not os.path.isdir(d):
                continue
            m, p = one_run(d, is_forwarder(c), c != "underlay", udp_pps, cpus)
            m["run"] = r
            for name in ("status-a.json", "status-b.json"):
                s = read_json(os.path.join(d, name))
                if s is not None:
                    m[name[:-5].replace("-", "_")] = s
            per_run.append(m)
            problems += [{"run": r, "problem": x} for x in p]
        medians = {}
        for key, _, _ in rows + [("ping_loss_pct", "", "")]:
            vals = [m[key] for m in per_run if isinstance(m.get(key), (int, float))]
            if vals:
                medians[key] = statistics.median(vals)
        result["configs"][names[c]] = {
            "runs_ok": len(per_run),
            "runs": runs,
            "failures": failures,
            "problems": problems,
            "median": medians,
            "per_run": per_run,
        }

    result["ratios"] = ratios(result, [names[c] for c in configs])
    # flannel-udp with N worker pairs (bench/run --workers N) gets a ratio table of its own.
    result["worker_ratios"] = {c: ratios(result, [names[x] for x in configs], c)
                               for c in configs if c.startswith("flannel-udp-w")}
    if check:
        sys.exit(check_all_ran(result))
    if as_json:
        json.dump(result, sys.stdout, indent=2, sort_keys=False)
        print()
        return
    print_table(result, [names[c] for c in configs], rows)


def check_all_ran(result):
    """For a smoke run: 0 when every configuration worked in every run, measured TCP and has believable idle and
    loaded ping figures (latency_problems), else 1, with why."""
    bad = []
    for name, c in result["configs"].items():
        if c["runs_ok"] != c["runs"] or "tcp4_gbps" not in c["median"]:
            why = [f["error"] for f in c["failures"]] + [p["problem"] for p in c["problems"]]
            if not why:
                why = [f"{c['runs_ok']} of {c['runs']} runs worked" if c["runs_ok"] != c["runs"] else "no TCP figure"]
            bad.append(f"{name}: {'; '.join(why)}")
        for m in c["per_run"]:
            why = latency_problems(m)
            if why:
                bad.append(f"{name}: run {m['run']}: {'; '.join(why)}")
    if not result["configs"]:
        bad.append("no configuration in the raw files")
    for line in bad:
        print("bench check: " + line)
    if not bad:
        print("bench check: every configuration ran: " + ", ".join(result["configs"]))
    return 1 if bad else 0


# fewer pings than this answered or sent under load says the ping did not run alongside the 4-stream test
MIN_LOAD_PINGS = 10


def latency_problems(m):
    """Why one run's latency figures are missing or not believable (empty when they are fine)."""
    why = []
    for kind in ("idle", "load"):
        med, p99 = m.get(f"ping_{kind}_median_ms"), m.get(f"ping_{kind}_p99_ms")
        what = "idle ping" if kind == "idle" else "ping under TCP 4"
        if med is None or p99 is None:
            why.append(f"no {what} median/p99")
        elif not (0 < med <= p99 < 60000):
            why.append(f"{what}: median {med} / p99 {p99} ms not sane")
    loss = m.get("ping_load_loss_pct")
    if loss is None:
        why.append("no ping loss under TCP 4")
    elif not 0 <= loss <= 100:
        why.append(f"ping loss under TCP 4 {loss} % not sane")
    if m.get("ping_load_median_ms") is not None and (m.get("ping_load_sent") or 0) < MIN_LOAD_PINGS:
        why.append(f"only {m.get('ping_load_sent')} pings sent under TCP 4 (fewer than {MIN_LOAD_PINGS})")
    if m.get("ping_load_outside"):
        why.append(f"{m['ping_load_outside']} ping replies under TCP 4 came outside the test")
    return why


def is_forwarder(config):
    """The configurations with a forwarder process: those of FORWARDERS, flannel-udp-wN, lane-bound-sN,
    lane-node-sN and lane-decide-sN."""
    return config in FORWARDERS or config.startswith(("flannel-udp-w", "lane-bound-s", "lane-node-s", "lane-decide-s"))


def ratios(result, cols, subject_name=RATIO_SUBJECT):
    """flannel-udp's figure over each other configuration's, per run where both measured it, and their median.
    Ratios from the same run share the machine's state at that moment, so they vary less than the medians do."""
    out = {}
    subject = result["configs"].get(subject_name)
    if subject is None:
        return out
    mine = {m["run"]: m for m in subject["per_run"]}
    for c in cols:
        if c == subject_name:
            continue
        theirs = {m["run"]: m for m in result["configs"][c]["per_run"]}
        entry = {}
        for key, _ in RATIOS:
            per_run = [mine[r][key] / theirs[r][key] for r in sorted(mine.keys() & theirs.keys())
                       if isinstance(mine[r].get(key), (int, float)) and isinstance(theirs[r].get(key), (int, float))
                       and theirs[r][key] > 0]
            if per_run:
                entry[key] = {"median": statistics.median(per_run), "per_run": per_run}
        for key, _, _ in DIFFS:
            per_run = [mine[r][key] - theirs[r][key] for r in sorted(mine.keys() & theirs.keys())
                       if isinstance(mine[r].get(key), (int, float)) and isinstance(theirs[r].get(key), (int, float))]
            if per_run:
                entry[key] = {"median_diff": statistics.median(per_run), "per_run_diff": per_run}
        if entry:
            out[c] = entry
    return out


def print_ratios(result, cols, subject_name=RATIO_SUBJECT):
    r = result["ratios"] if subject_name == RATIO_SUBJECT else result["worker_ratios"][subject_name]
    others = [c for c in cols if c in r]
    if not others:
        return
    w0 = max([len(label) for _, label in RATIOS] + [len(f"{label}, {unit}") for _, label, unit in DIFFS]) + 2
    def cells(key, fmt, values, median):
        """One row's cells: the median and, over several runs, the lowest-highest run."""
        row = []
        for c in others:
            e = r[c].get(key)
            if not e:
                row.append("n/a")
            elif len(e[values]) > 1:
                row.append(fmt(e[median], min(e[values]), max(e[values])))
            else:
                row.append(fmt(e[median], None, None))
        return row

    def ratio(m, lo, hi):
        return f"{m:.2f}x" if lo is None else f"{m:.2f}x ({lo:.2f}-{hi:.2f})"

    def diff(m, lo, hi):
        return f"{m:+.1f}" if lo is None else f"{m:+.1f} ({lo:+.1f}..{hi:+.1f})"

    rows = [(label, cells(key, ratio, "per_run", "median")) for key, label in RATIOS]
    rows += [(f"{label}, {unit}", cells(key, diff, "per_run_diff", "median_diff")) for key, label, unit in DIFFS]
    table = [(label, row) for label, row in rows if any(x != "n/a" for x in row)]
    w = max(len(x) for x in others + [x for _, cells in table for x in cells]) + 3
    print()
    print(f"{subject_name} over each: median of the per-run ratios (lowest-highest run); same run, same namespaces;")
    print(f"loss: {subject_name}'s minus theirs, in percentage points")
    print(" " * w0 + "".join(c.rjust(w) for c in others))
    for label, cells in table:
        print(label.ljust(w0) + "".join(x.rjust(w) for x in cells))


def print_table(result, cols, rows):
    p = result["params"]
    ccs = sorted({m.get("cc") for c in result["configs"].values() for m in c["per_run"] if m.get("cc")})
    print(f"flannel-udp bench  {p.get('date', '')}  kernel {p.get('kernel', '')}  {p.get('cpus', '?')} CPUs  "
          f"commit {p.get('commit', '?')}")
    print(f"iperf3 {p.get('time')} s per test, medians of {p.get('runs')} runs, {p.get('pings')} pings at 10 ms, "
          f"UDP -l 64 -b {p.get('udp_rate')}; congestion control: {', '.join(ccs) or 'unknown'}")
    print(f"load average at start {p.get('loadavg_start', '?')}, at end {p.get('loadavg_end', '?')} "
          f"(other work on the machine skews every figure)")
    w0 = max(len(label) for _, label, _ in rows) + 2
    w = max(12, max(len(c) for c in cols) + 2)
    print()
    print(" " * w0 + "".join(c.rjust(w) for c in cols))
    print(("runs ok").ljust(w0) + "".join(
        f"{result['configs'][c]['runs_ok']}/{result['configs'][c]['runs']}".rjust(w) for c in cols))
    mtus = []
    for c in cols:
        v = [m.get("client_mtu") for m in result["configs"][c]["per_run"] if m.get("client_mtu")]
        mtus.append(str(v[0]) if v else "-")
    print("client MTU".ljust(w0) + "".join(x.rjust(w) for x in mtus))
    for key, label, fmt in rows:
        cells = []
        for c in cols:
            cfg = result["configs"][c]
            v = cfg["median"].get(key)
            if v is not None:
                cells.append(fmt.format(v))
            elif cfg["runs_ok"] == 0:
                cells.append("failed" if cfg["failures"] else "-")  # "-": not measured (interrupted)
            else:
                cells.append("n/a")
        print(label.ljust(w0) + "".join(x.rjust(w) for x in cells))
    print_ratios(result, cols)
    for subject_name in result.get("worker_ratios", {}):
        print_ratios(result, cols, subject_name)
    notes = []
    for c in cols:
        cfg = result["configs"][c]
        for f in cfg["failures"]:
            notes.append(f"{c}: run {f['run']}: {f['error']}")
        for x in cfg["problems"]:
            notes.append(f"{c}: run {x['run']}: {x['problem']}")
    print()
    print("n/a: the kernel does the forwarding (no forwarder process) or the figure does not apply.")
    print("machine CPU and softirq are machine-wide (/proc/stat), so other load on the machine shows up in them;")
    print("host steal is time the hypervisor ran something else while this VM had work: it slows every figure, and")
    print("machine CPU and busy leave it out.")
    if notes:
        print()
        for n in notes:
            print("note: " + n)


if __name__ == "__main__":
    main()
