import Foundation

/// `--metrics-addr HOST:PORT`: an IPv4 address (0.0.0.0 for every address, or `localhost`) and a port.
public struct MetricsAddress: Equatable, Sendable, CustomStringConvertible {
    /// `localhost` is 127.0.0.1.
    public var ip: IPv4Address
    public var port: Int

    public struct Invalid: Error, CustomStringConvertible, Sendable {
        public var value: String
        public var problem: String
        public var description: String { "--metrics-addr \(value): \(problem)" }
    }

    public init(parsing text: String) throws(Invalid) {
        guard let colon = text.lastIndex(of: ":") else {
            throw Invalid(value: text, problem: "expected HOST:PORT, e.g. 127.0.0.1:9100")
        }
        let hostText = String(text[..<colon])
        let portText = String(text[text.index(after: colon)...])
        guard let port = Int(portText), (1...65535).contains(port) else {
            throw Invalid(value: text, problem: "port '\(portText)' is not a number in 1-65535")
        }
        guard let ip = hostText == "localhost" ? IPv4Address(127, 0, 0, 1) : IPv4Address(hostText) else {
            throw Invalid(value: text, problem: "host '\(hostText)' is not an IPv4 address (or localhost)")
        }
        self.ip = ip
        self.port = port
    }

    /// The address in dotted-quad form.
    public var host: String { ip.description }
    public var description: String { "\(host):\(port)" }
}

/// The /metrics page: Prometheus' text exposition format (version 0.0.4), rendered from one `DaemonStatus`, the
/// same value `status --json` prints, so the two agree when read at the same moment. Counters are
/// `flannel_udp_..._total`, sizes in bytes, times in seconds since the epoch. Label values of drop reasons and
/// directions are the keys `status --json` uses (`noRoute`, `tunToUDP`).
///
/// Hand-written rather than swift-prometheus: its registry wants counters that are incremented as events
/// happen, while the data plane's counters are atomics read into a snapshot; copying them into a registry on
/// every scrape would be two sources of truth.
public enum PrometheusText {
    public static let contentType = "text/plain; version=0.0.4; charset=utf-8"

    public static func render(status: DaemonStatus?, health: DaemonHealth, version: String) -> String {
        var out = Output()
        out.family("flannel_udp_build_info", .gauge, "Build information; always 1.")
        out.sample("flannel_udp_build_info", ["version": version], UInt64(1))
        out.family("flannel_udp_healthy", .gauge, "1 when /healthz answers 200, 0 when it answers 503.")
        out.sample("flannel_udp_healthy", [:], UInt64(health.healthy ? 1 : 0))
        guard let status else { return out.text }

        out.family("flannel_udp_start_time_seconds", .gauge, "When the daemon started, in seconds since the epoch.")
        out.sample("flannel_udp_start_time_seconds", [:], status.startedAt.timeIntervalSince1970)
        let c = status.counters
        out.family("flannel_udp_packets_total", .counter, "Packets forwarded, by direction (tunToUDP: sent to peers; udpToTun: delivered into the tun).")
        out.sample("flannel_udp_packets_total", ["direction": "tunToUDP"], c.tunToUDP.packets)
        out.sample("flannel_udp_packets_total", ["direction": "udpToTun"], c.udpToTun.packets)
        out.family("flannel_udp_bytes_total", .counter, "Bytes of the IP packets forwarded, by direction.")
        out.sample("flannel_udp_bytes_total", ["direction": "tunToUDP"], c.tunToUDP.bytes)
        out.sample("flannel_udp_bytes_total", ["direction": "udpToTun"], c.udpToTun.bytes)
        out.family("flannel_udp_dropped_packets_total", .counter, "Packets dropped, by reason.")
        for reason in DropReason.allCases {
            out.sample("flannel_udp_dropped_packets_total", ["reason": reason.rawValue], c.drops(reason))
        }
        out.family("flannel_udp_icmp_sent_total", .counter, "ICMP errors the data plane generated.")
        out.sample("flannel_udp_icmp_sent_total", [:], c.icmpSent)
        out.family("flannel_udp_icmp_rate_limited_total", .counter, "ICMP errors suppressed by the rate limit.")
        out.sample("flannel_udp_icmp_rate_limited_total", [:], c.icmpRateLimited)
        out.family("flannel_udp_codel_marks_total", .counter,
                   "Packets of bulk flows marked CE (not dropped) by the receive side's CoDel.")
        out.sample("flannel_udp_codel_marks_total", [:], c.codelMarks)

        out.family("flannel_udp_peers", .gauge, "Peer routes in the table.")
        out.sample("flannel_udp_peers", [:], UInt64(status.routes.count))
        out.family("flannel_udp_peer_packets_total", .counter, "Packets to (tx) and from (rx) each peer.")
        for r in status.routes {
            out.sample("flannel_udp_peer_packets_total", peerLabels(r, "tx"), r.txPackets)
            out.sample("flannel_udp_peer_packets_total", peerLabels(r, "rx"), r.rxPackets)
        }
        out.family("flannel_udp_peer_bytes_total", .counter, "Bytes to (tx) and from (rx) each peer.")
        for r in status.routes {
            out.sample("flannel_udp_peer_bytes_total", peerLabels(r, "tx"), r.txBytes)
            out.sample("flannel_udp_peer_bytes_total", peerLabels(r, "rx"), r.rxBytes)
        }

        out.family("flannel_udp_offload_enabled", .gauge, "Offloads in use (1 per active offload).")
        for name in status.offloads { out.sample("flannel_udp_offload_enabled", ["offload": name], UInt64(1)) }
        if let o = status.offloadStatistics {
            out.family("flannel_udp_offload_super_packets_segmented_total", .counter, "TCP super-packets read from the tun and segmented (tso).")
            out.sample("flannel_udp_offload_super_packets_segmented_total", [:], o.superPacketsSegmented)
            out.family("flannel_udp_offload_super_packets_coalesced_total", .counter, "Super-packets of two or more segments written into the tun (coalesce).")
            out.sample("flannel_udp_offload_super_packets_coalesced_total", [:], o.superPacketsCoalesced)
            out.family("flannel_udp_offload_gro_buffers_total", .counter, "Receives that returned several datagrams in one buffer (gro).")
            out.sample("flannel_udp_offload_gro_buffers_total", [:], o.groBuffers)
            out.family("flannel_udp_offload_largest_datagram_received_bytes", .gauge, "The largest datagram payload received from a peer.")
            out.sample("flannel_udp_offload_largest_datagram_received_bytes", [:], o.largestDatagramReceived)
        }
        if let workers = status.workers {
            out.family("flannel_udp_worker_packets_total", .counter, "Packets each worker pair moved, by direction; lane is express for the express lane's pair, else flows.")
            for w in workers {
                let lane = w.express == true ? "express" : "flows"
                out.sample("flannel_udp_worker_packets_total", ["worker": "\(w.worker)", "lane": lane, "direction": "tunToUDP"], w.tunToUDPPackets)
                out.sample("flannel_udp_worker_packets_total", ["worker": "\(w.worker)", "lane": lane, "direction": "udpToTun"], w.udpToTunPackets)
            }
        }
        if let x = status.expressPriority {
            out.family("flannel_udp_express_realtime", .gauge, "1 while the express lane's thread runs at its SCHED_FIFO priority (the CPUs are busy), else 0.")
            out.sample("flannel_udp_express_realtime", ["priority": "\(x.priority)"], UInt64(x.realtime ? 1 : 0))
            out.family("flannel_udp_express_raised_total", .counter, "Times the express lane's thread was raised to its realtime priority.")
            out.sample("flannel_udp_express_raised_total", [:], x.raised)
            out.family("flannel_udp_express_flood_lowered_total", .counter, "Times it was lowered for a flood of short packets: 1 ms without sleeping, or 12.5 ms of realtime in one 250 ms tick.")
            out.sample("flannel_udp_express_flood_lowered_total", [:], x.floodLowered)
        }
        if let x = status.expressSpin {
            out.family("flannel_udp_express_spins_total", .counter, "Times the express lane's thread kept looking for a packet before it slept (--express-spin).")
            out.sample("flannel_udp_express_spins_total", [:], x.spins)
            out.family("flannel_udp_express_spin_seconds_total", .counter, "Time the express lane's thread spent in those spins.")
            out.sample("flannel_udp_express_spin_seconds_total", [:], Double(x.spunNanoseconds) / 1e9)
            out.family("flannel_udp_express_spins_cut_total", .counter, "Spins the CPU budget ended early or did not let start: lone short packets came faster than it refills.")
            out.sample("flannel_udp_express_spins_cut_total", [:], x.cut)
            out.family("flannel_udp_express_spins_held_total", .counter, "Spins not started because the flow pairs were moving packets: bulk flows are running.")
            out.sample("flannel_udp_express_spins_held_total", [:], x.held)
        }
        if let lease = status.lease {
            out.family("flannel_udp_lease_expiry_timestamp_seconds", .gauge, "When our etcd lease expires unless renewed, in seconds since the epoch.")
            out.sample("flannel_udp_lease_expiry_timestamp_seconds", ["subnet": lease.subnet], lease.expires.timeIntervalSince1970)
        }
        return out.text
    }

    private static func peerLabels(_ r: RouteInfo, _ direction: String) -> [String: String] {
        ["subnet": r.subnet, "endpoint": r.endpoint, "origin": r.origin, "direction": direction]
    }

    enum Kind: String { case counter, gauge }

    struct Output {
        var text = ""

        mutating func family(_ name: String, _ kind: Kind, _ help: String) {
            text += "# HELP \(name) \(help.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\n", with: "\\n"))\n"
            text += "# TYPE \(name) \(kind.rawValue)\n"
        }

        mutating func sample(_ name: String, _ labels: [String: String], _ value: UInt64) {
            line(name, labels, String(value))
        }

        mutating func sample(_ name: String, _ labels: [String: String], _ value: Double) {
            line(name, labels, value.isFinite ? String(value) : (value.isNaN ? "NaN" : (value > 0 ? "+Inf" : "-Inf")))
        }

        private mutating func line(_ name: String, _ labels: [String: String], _ value: String) {
            text += name
            if !labels.isEmpty {
                text += "{" + labels.sorted { $0.key < $1.key }.map { "\($0.key)=\"\(escape($0.value))\"" }.joined(separator: ",") + "}"
            }
            text += " \(value)\n"
        }

        /// Label values escape backslash, double quote and newline.
        private func escape(_ v: String) -> String {
            v.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"")
                .replacingOccurrences(of: "\n", with: "\\n")
        }
    }
}
