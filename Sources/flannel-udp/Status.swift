import ArgumentParser
import FlannelUDP
import Foundation

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show the device, the overlay route and the daemon's state and counters.",
        discussion: """
            Reads the device over netlink and asks the daemon over its control socket, after checking that root \
            owns it and that it is the process the daemon's state file records: counters, peers, offloads and, \
            with --ip-masq, the masquerade rules (backend, where, in place or not, how often restored); the \
            self-healing repairs (how often the route, address, link up state and MTU were put back). Exit \
            status: 0 the daemon is running (or starting), 3 it is not, 1 an error (e.g. the control socket \
            refused us, or whoever answers is not the daemon).
            """
    )

    @OptionGroup var deviceOptions: DeviceOptions
    @OptionGroup var output: OutputOptions

    struct DeviceReport: Codable {
        var name: String
        var index: Int32
        var up: Bool
        var mtu: Int
        var kind: String?
        var addresses: [String]
        var routes: [String]
    }

    struct Report: Codable {
        var running: Bool
        var device: DeviceReport?
        var daemon: DaemonStatus?
        var error: String?
    }

    func run() throws {
        let paths = deviceOptions.paths
        var report = Report(running: false)
        do {
            let nl = try Netlink()
            if let link = try nl.link(named: deviceOptions.device) {
                let addrs = try nl.addresses(index: link.index).map { "\($0.address)/\($0.prefixLength)" }
                let routes = try nl.routes().filter { $0.outputInterface == link.index }.map { $0.description(device: link.name) }
                report.device = DeviceReport(name: link.name, index: link.index, up: link.isUp, mtu: link.mtu,
                                             kind: link.kind, addresses: addrs, routes: routes)
            }
        } catch {
            report.error = "\(error)"
        }
        do {
            switch try ControlClient.send(.status, paths: paths) {
            case .status(let s):
                report.daemon = s
                report.running = true
            case .error(let message):
                // E.g. a non-root caller: the daemon runs but refused us; not "not running" (exit 3).
                report.running = true
                report.error = "daemon: \(message)"
            case .ok, .routes, .handover:
                report.error = "daemon: unexpected response to status"
            }
        } catch {
            if case .notRunning = error {} else { report.error = error.description }
        }

        if output.json {
            print(try JSONFormat.text(report))
        } else {
            printTable(report)
        }
        if report.error != nil { throw Exit.failure }
        if !report.running { throw Exit.notRunning }
    }

    private func printTable(_ r: Report) {
        if let d = r.device {
            print("device:    \(d.name) (\(d.kind ?? "?"), \(d.up ? "UP" : "DOWN"), mtu \(d.mtu))")
            print("address:   \(d.addresses.isEmpty ? "-" : d.addresses.joined(separator: ", "))")
            print("route:     \(d.routes.isEmpty ? "-" : d.routes.joined(separator: "\n           "))")
        } else {
            print("device:    \(deviceOptions.device) does not exist")
        }
        guard let s = r.daemon else {
            // Running but it refused us (not root), or something answered that is not the daemon: say so, not
            // "not running", which would hide either.
            print(r.running ? "daemon:    running (it refused this request)"
                  : r.error == nil ? "daemon:    not running" : "daemon:    unknown")
            if let e = r.error { print("error:     \(e)") }
            return
        }
        if s.phase == .starting {
            print("daemon:    pid \(s.pid), starting for \(formatDuration(s.uptimeSeconds)), flannel-udp \(s.version)")
            return
        }
        // Running says nothing more; any other phase (a handover, or one a newer daemon knows) is shown.
        let phase = s.phase.map { $0 == .running ? "" : ", \($0.rawValue)" } ?? ""
        print("daemon:    pid \(s.pid), up \(formatDuration(s.uptimeSeconds)), flannel-udp \(s.version)\(phase)")
        print("network:   \(s.network)  subnet \(s.subnet)  mtu \(s.mtu)")
        print("listening: \(s.listen) on \(s.underlay) (public ip \(s.publicIP)), peer check \(s.peerCheck)")
        if let f = s.subnetFile { print("subnet file: \(f)") }
        if let f = s.peersFile { print("peers file:  \(f)") }
        if let lease = s.lease { print("lease:     \(lease.subnet) until \(lease.expires) (\(lease.endpoints.joined(separator: ",")))") }
        print("offloads:  \(s.offloads.isEmpty ? "none" : s.offloads.joined(separator: ", "))")
        if let o = s.offloadStatistics {
            print("           \(o.superPacketsSegmented) super-packets segmented, \(o.superPacketsCoalesced) coalesced, \(o.groBuffers) GRO buffers, largest datagram \(o.largestDatagramReceived) bytes")
        }
        if let w = s.workers, w.count > 1 {
            print("workers:   \(w.count): " + w.map { "#\($0.worker)\($0.express == true ? " (express)" : "") tun->udp \($0.tunToUDPPackets) udp->tun \($0.udpToTunPackets)" }.joined(separator: ", "))
        }
        if let x = s.expressPriority {
            if let refused = x.refused {
                print("express:   normal scheduler (realtime priority \(x.priority) refused: \(refused))")
            } else {
                print("express:   realtime priority \(x.priority) while the CPUs are busy, \(x.realtime ? "realtime now" : "normal now"); raised \(x.raised) time(s), lowered for a flood \(x.floodLowered) time(s)")
            }
        }
        if let x = s.expressSpin {
            if x.microseconds == 0 {
                print("spin:      off")
            } else {
                let ms = Double(x.spunNanoseconds) / 1e6
                print("spin:      up to \(x.microseconds) us within \(formatPerMille(x.budgetPerMille)) of a CPU; \(x.spins) spin(s), \(String(format: "%.1f", ms)) ms in all, \(x.cut) cut by the budget, \(x.held) held for bulk flows")
            }
        }
        if let m = s.masquerade {
            var line = "masquerade: \(m.backend) \(m.objects.joined(separator: ", ")); \(m.inPlace ? "in place" : "NOT in place")"
            line += ", checked every \(formatSeconds(m.resyncSeconds)), restored \(m.restored) time(s)"
            if let last = m.lastRestored { line += ", last \(last)" }
            print(line)
            if let e = m.lastError { print("            error: \(e)") }
        } else {
            print("masquerade: off")
        }
        if let r = s.repairs {
            var line = "repairs:   "
            line += r.total == 0 ? "none" : "route \(r.route), address \(r.address), link up \(r.linkUp), mtu \(r.mtu)"
            line += " (checked on every change and every \(formatSeconds(r.checkSeconds)))"
            print(line)
            if let last = r.last, let at = r.lastAt { print("           last: \(last) at \(at)") }
            if let e = r.lastError { print("           error: \(e)") }
        }
        let c = s.counters
        print("traffic:   tun->udp \(c.tunToUDP.packets) pkts \(c.tunToUDP.bytes) bytes, udp->tun \(c.udpToTun.packets) pkts \(c.udpToTun.bytes) bytes, icmp sent \(c.icmpSent)\(c.codelMarks > 0 ? ", codel marks \(c.codelMarks)" : "")")
        let drops = c.drops.filter { $0.value > 0 }.sorted { $0.key < $1.key }
        print("drops:     \(drops.isEmpty ? "none" : drops.map { "\($0.key) \($0.value)" }.joined(separator: ", "))")
        print("peers:     \(s.routes.count)")
        if !s.routes.isEmpty { printRoutes(s.routes) }
    }
}

func formatSeconds(_ seconds: Double) -> String {
    seconds == seconds.rounded() ? "\(Int(seconds)) s" : "\(seconds) s"
}

/// Thousandths as a percentage: 20 -> "2 %", 5 -> "0.5 %".
func formatPerMille(_ perMille: Int) -> String {
    perMille % 10 == 0 ? "\(perMille / 10) %" : "\(Double(perMille) / 10) %"
}

func formatDuration(_ seconds: Double) -> String {
    let s = Int(seconds)
    if s < 60 { return "\(s)s" }
    if s < 3600 { return "\(s / 60)m\(s % 60)s" }
    return "\(s / 3600)h\((s % 3600) / 60)m"
}

/// The peer table as a fixed-width table.
func printRoutes(_ routes: [RouteInfo]) {
    let header = ["SUBNET", "ENDPOINT", "ORIGIN", "TX PKTS", "TX BYTES", "RX PKTS", "RX BYTES"]
    let rows = routes.map { [$0.subnet, $0.endpoint, $0.origin, "\($0.txPackets)", "\($0.txBytes)", "\($0.rxPackets)", "\($0.rxBytes)"] }
    var widths = header.map(\.count)
    for row in rows { for (i, c) in row.enumerated() { widths[i] = max(widths[i], c.count) } }
    func line(_ cells: [String]) -> String {
        cells.enumerated().map { i, c in
            i < 3 ? c.padding(toLength: widths[i], withPad: " ", startingAt: 0)
                  : String(repeating: " ", count: widths[i] - c.count) + c
        }.joined(separator: "  ")
    }
    print("  " + line(header))
    for row in rows { print("  " + line(row)) }
}
