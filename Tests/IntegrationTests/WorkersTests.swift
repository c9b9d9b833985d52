import Foundation
import XCTest
@testable import FlannelCore
@testable import FlannelUDP

// The overlay and hostile-traffic tests again, unchanged, with 2 and 4 worker pairs (on these 2 CPUs: as many
// workers as cores, and more). Linux's test discovery lists only the test methods a class declares itself, so each
// variant names the inherited tests it runs again; a test added to OverlayTests or HostileTrafficTests belongs here
// too.
final class OverlayTestsWorkers2: OverlayTests {
    override var upOptions: [String] { ["--workers", "2"] }
    override func testPingIperfRouteChangesAndTTL() throws { try super.testPingIperfRouteChangesAndTTL() }
    override func testLongestPrefixWins() throws { try super.testLongestPrefixWins() }
    override func testDatagramsFromStrangersAndSpoofersNeverReachTheTun() throws {
        try super.testDatagramsFromStrangersAndSpoofersNeverReachTheTun()
    }
}

final class OverlayTestsWorkers4: OverlayTests {
    override var upOptions: [String] { ["--workers", "4"] }
    override func testPingIperfRouteChangesAndTTL() throws { try super.testPingIperfRouteChangesAndTTL() }
    override func testLongestPrefixWins() throws { try super.testLongestPrefixWins() }
    override func testDatagramsFromStrangersAndSpoofersNeverReachTheTun() throws {
        try super.testDatagramsFromStrangersAndSpoofersNeverReachTheTun()
    }
}

final class HostileTrafficTestsWorkers2: HostileTrafficTests {
    override var upOptions: [String] { ["--workers", "2"] }
    override func testFloodIsCountedAndNeverReachesTheTun() throws { try super.testFloodIsCountedAndNeverReachesTheTun() }
}

final class HostileTrafficTestsWorkers4: HostileTrafficTests {
    override var upOptions: [String] { ["--workers", "4"] }
    override func testFloodIsCountedAndNeverReachesTheTun() throws { try super.testFloodIsCountedAndNeverReachesTheTun() }
}

/// Worker pairs end to end (topology in HostileTopology.swift): one inner flow is handled by one worker pair on
/// both sides of a node, several flows spread over the pairs, short packets take the express lane's pair, and TCP
/// sees no more reordering with 4 pairs than with 1.
final class WorkersTests: HostileTopologyTestCase {
    /// Per worker pair: packets tun -> UDP and UDP -> tun so far.
    func workers(_ node: Node) throws -> [(tunToUDP: Int, udpToTun: Int)] {
        try workerStatus(node).map { ($0["tunToUDPPackets"] as? Int ?? -1, $0["udpToTunPackets"] as? Int ?? -1) }
    }

    func workerStatus(_ node: Node) throws -> [[String: Any]] {
        try XCTUnwrap(daemonStatus(node)["workers"] as? [[String: Any]])
    }

    func pair(_ i: Int, _ j: Int, workers n: Int, extra: [String] = []) throws -> (Node, Node) {
        let a = try makeNode(i, extra: ["--workers", "\(n)"] + extra)
        let b = try makeNode(j, extra: ["--workers", "\(n)"] + extra)
        XCTAssertEqual(fu(a, ["route", "add", b.subnet, "via", b.underlay]).status, 0)
        XCTAssertEqual(fu(b, ["route", "add", a.subnet, "via", a.underlay]).status, 0)
        XCTAssertEqual(ping(from: b.pod, a.podAddress).status, 0, "overlay up")
        return (a, b)
    }

    /// The packets each pair moved between two readings, per direction.
    func moved(_ after: [(tunToUDP: Int, udpToTun: Int)], _ before: [(tunToUDP: Int, udpToTun: Int)])
        -> (rx: [Int], tx: [Int]) {
        (zip(after, before).map { $0.0.udpToTun - $0.1.udpToTun }, zip(after, before).map { $0.0.tunToUDP - $0.1.tunToUDP })
    }

    func testOneFlowStaysOnOneWorkerWhileFlowsSpread() throws {
        let (a, b) = try pair(1, 2, workers: 4)
        let status = try workerStatus(a)
        XCTAssertEqual(status.count, 5, "4 worker pairs and the express lane's")
        XCTAssertEqual(status.map { $0["express"] as? Bool ?? false }, [false, false, false, false, true])
        let before = try workers(a)

        // One flow of full-size packets: 100 echo requests of 1028 bytes from pod B (an ICMP flow is its address
        // pair). At node A every request arrives on one worker's socket, and every reply leaves through that
        // worker's tun queue (both programs hash the flow's addresses alike).
        let p = ping(from: b.pod, a.podAddress, ["-c", "100", "-i", "0.005", "-q", "-s", "1000"])
        XCTAssertEqual(p.status, 0, p.description)
        let after = try workers(a)
        let (rx, tx) = moved(after, before)
        XCTAssertEqual(rx.filter { $0 > 0 }.count, 1, "one flow, one receiving worker: \(rx)")
        XCTAssertEqual(rx.reduce(0, +), 100, "\(rx)")
        XCTAssertEqual(tx.filter { $0 > 0 }.count, 1, "one flow, one sending worker: \(tx)")
        XCTAssertEqual(rx.firstIndex { $0 > 0 }, tx.firstIndex { $0 > 0 }, "the same pair both ways: \(rx) \(tx)")
        XCTAssertEqual(rx[4] + tx[4], 0, "full-size packets stay off the express lane: \(rx) \(tx)")

        // Short pings (84 bytes) take the express lane, both ways, and nothing else does meanwhile.
        let p2 = ping(from: b.pod, a.podAddress, ["-c", "50", "-i", "0.005", "-q"])
        XCTAssertEqual(p2.status, 0, p2.description)
        let afterShort = try workers(a)
        let (rxShort, txShort) = moved(afterShort, after)
        XCTAssertEqual(rxShort, [0, 0, 0, 0, 50], "echo requests arrive on the express lane")
        XCTAssertEqual(txShort, [0, 0, 0, 0, 50], "echo replies leave on the express lane")

        // Eight TCP flows (iperf3 -P 8: eight source ports) spread over more than one worker on each side; of
        // them the express lane gets the handshakes and closes (and iperf3's short control messages), not the
        // data or the bare acknowledgements.
        let sender = try workers(b)
        let (_, spread) = try iperf(from: b, to: a)
        let (rx8, _) = moved(try workers(a), afterShort)
        XCTAssertGreaterThan(rx8[..<4].filter { $0 > 0 }.count, 1, "8 flows over 4 receiving workers: \(rx8) (\(spread))")
        let (_, tx8) = moved(try workers(b), sender)
        XCTAssertGreaterThan(tx8[..<4].filter { $0 > 0 }.count, 1, "8 flows over 4 sending workers: \(tx8)")
        XCTAssertGreaterThan(rx8[..<4].reduce(0, +), 10_000, "\(rx8)")
        XCTAssertLessThan(rx8[4], 200, "the data and the acknowledgements stay on their flows' workers: \(rx8)")
        XCTAssertLessThan(tx8[4], 200, "\(tx8)")
    }

    /// The express lane's realtime priority as an operator meets it. By default the daemon may raise the lane:
    /// status shows priority 10 and nothing refused. Started without CAP_SYS_NICE (setpriv drops it from the
    /// bounding set, as a systemd unit that does not grant it would) and with RLIMIT_RTPRIO 0, the kernel refuses
    /// SCHED_FIFO: the daemon says so once, when it starts, in its log and in status, and the lane still forwards.
    func testWithoutCapSysNiceTheExpressLaneSaysSoAndStillForwards() throws {
        try requireTools(["setpriv", "prlimit"], packages: "util-linux")
        let a = try makeNode(1)
        let x = try XCTUnwrap(daemonStatus(a)["expressPriority"] as? [String: Any])
        XCTAssertEqual(x["priority"] as? Int, 10)
        XCTAssertNil(x["refused"], "root may raise the lane: \(x)")

        let b = try makeNode(2, start: false)
        let log = tmp + "/b.log"
        let up = runCommand(["ip", "netns", "exec", b.ns.name, "setpriv", "--bounding-set", "-sys_nice", "--",
                             "prlimit", "--rtprio=0:0", "--", flannelUDPBinary(), "up", "--network", "10.244.0.0/16",
                             "--subnet", b.subnet, "--iface", "eth0", "--subnet-file", "\(tmp)/subnet-2.env",
                             "--detach", "--log-file", log], environment: environment)
        XCTAssertEqual(up.status, 0, up.description)
        XCTAssertEqual(fu(a, ["route", "add", b.subnet, "via", b.underlay]).status, 0)
        XCTAssertEqual(fu(b, ["route", "add", a.subnet, "via", a.underlay]).status, 0)
        let before = try workers(b)
        let p = ping(from: a.pod, b.podAddress, ["-c", "20", "-i", "0.005", "-q"])
        XCTAssertEqual(p.status, 0, p.description)
        let (rx, tx) = moved(try workers(b), before)
        XCTAssertEqual(rx.last, 20, "the requests came in through the lane: \(rx)")
        XCTAssertEqual(tx.last, 20, "the replies left through it: \(tx)")

        let refused = try XCTUnwrap(daemonStatus(b)["expressPriority"] as? [String: Any])
        XCTAssertEqual(refused["realtime"] as? Bool, false)
        let why = try XCTUnwrap(refused["refused"] as? String, "\(refused)")
        XCTAssertTrue(why.contains("sched_setscheduler SCHED_FIFO 10") && why.contains("Operation not permitted"), why)
        let text = fu(b, ["status"])
        XCTAssertTrue(text.stdout.contains("express:   normal scheduler (realtime priority 10 refused"), text.stdout)
        let logged = try String(contentsOfFile: log, encoding: .utf8)
        XCTAssertEqual(logged.components(separatedBy: "the express lane keeps the normal scheduler").count - 1, 1, logged)
    }

    /// `--express-size 0`: no express lane, every pair carries flows, short pings included.
    func testNoExpressLaneWhenTurnedOff() throws {
        let (a, b) = try pair(1, 2, workers: 2, extra: ["--express-size", "0"])
        let status = try workerStatus(a)
        XCTAssertEqual(status.count, 2)
        XCTAssertTrue(status.allSatisfy { $0["express"] == nil }, "\(status)")
        let before = try workers(a)
        let p = ping(from: b.pod, a.podAddress, ["-c", "20", "-i", "0.005", "-q"])
        XCTAssertEqual(p.status, 0, p.description)
        let (rx, _) = moved(try workers(a), before)
        XCTAssertEqual(rx.reduce(0, +), 20, "\(rx)")
        XCTAssertEqual(rx.filter { $0 > 0 }.count, 1, "one flow, one worker: \(rx)")
    }

    /// iperf3 with 8 streams through 1 and through 4 worker pairs: the receiving pod's out-of-order queueing and
    /// the sender's retransmits with 4 pairs stay in the range of 1 pair's (a flow split over two workers would
    /// reorder a large share of its segments). A bound, not a speed.
    func testEightStreamsReorderNoMoreWithFourWorkersThanWithOne() throws {
        let (a1, b1) = try pair(1, 2, workers: 1)
        let (a4, b4) = try pair(3, 4, workers: 4)
        let one = try iperf(from: b1, to: a1)
        let four = try iperf(from: b4, to: a4)
        let message = "1 worker: \(one.1), \(try spins(b1, a1)); 4 workers: \(four.1), \(try spins(b4, a4))"
        print("[+] \(message)")
        XCTAssertLessThanOrEqual(four.0.outOfOrder, 3 * one.0.outOfOrder + four.0.segments / 100, message)
        XCTAssertLessThanOrEqual(four.0.retransmits, 3 * one.0.retransmits + four.0.segments / 100, message)
    }

    struct Reordering { var retransmits: Int; var outOfOrder: Int; var segments: Int }

    /// The express lane's spins on both nodes, and how many the flows' traffic held back (`FlowsQuiet`).
    func spins(_ nodes: Node...) throws -> String {
        try nodes.map { node in
            let x = try XCTUnwrap(daemonStatus(node)["expressSpin"] as? [String: Any])
            return "\(x["spins"] ?? "?") spins \(x["held"] ?? "?") held"
        }.joined(separator: " / ")
    }

    /// iperf3 -P 8 for 3 s from `client`'s pod to `server`'s pod: the sender's retransmits, the receiving pod's
    /// TCPOFOQueue (segments queued out of order) and the segments received.
    func iperf(from client: Node, to server: Node) throws -> (Reordering, String) {
        let before = try netstat(server.pod)
        let srv = try startIperf3Server(in: server.pod, address: server.podAddress)
        defer { stopBackground(srv) }
        let r = runCommand(["ip", "netns", "exec", client.pod.name, "iperf3", "-c", server.podAddress, "-P", "8",
                            "-t", "3", "-J"])
        XCTAssertEqual(r.status, 0, r.description)
        let json = try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any])
        let sent = try XCTUnwrap((json["end"] as? [String: Any])?["sum_sent"] as? [String: Any])
        let retransmits = sent["retransmits"] as? Int ?? 0
        let after = try netstat(server.pod)
        let ofo = (after["TCPOFOQueue"] ?? 0) - (before["TCPOFOQueue"] ?? 0)
        let segments = (after["InSegs"] ?? 0) - (before["InSegs"] ?? 0)
        let bits = sent["bits_per_second"] as? Double ?? 0
        return (Reordering(retransmits: retransmits, outOfOrder: ofo, segments: segments),
                "\(retransmits) retransmits, \(ofo) out of order of \(segments) segments, \(Int(bits / 1e6)) Mbit/s")
    }

    /// TcpExt and Tcp counters of a namespace (/proc/net/netstat and /proc/net/snmp, name -> value).
    func netstat(_ ns: TestNamespace) throws -> [String: Int] {
        var out: [String: Int] = [:]
        for file in ["/proc/net/netstat", "/proc/net/snmp"] {
            let lines = try ns.run(["cat", file]).split(separator: "\n")
            var i = 0
            while i + 1 < lines.count {
                let names = lines[i].split(separator: " ").dropFirst()
                let values = lines[i + 1].split(separator: " ").dropFirst()
                for (n, v) in zip(names, values) { out[String(n)] = Int(v) ?? 0 }
                i += 2
            }
        }
        return out
    }
}
