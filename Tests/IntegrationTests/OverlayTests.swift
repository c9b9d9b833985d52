import Foundation
import XCTest
@testable import FlannelCore
@testable import FlannelUDP

/// The data plane end to end through the command line: nodes and pods in namespaces, as in scripts/demo.sh,
/// with a switch so that any number of nodes (and a stranger) share one underlay.
///
///                          wire (bridge br0)
///          +------------------+------------------+------------------+
///     eth0 192.168.77.1   eth0 .2             eth0 .3             eth0 .99
///       node 1              node 2              node 3            stranger
///     flannel0 10.244.1.0 flannel0 10.244.2.0 flannel0 10.244.3.0
///     cni0 10.244.1.1       cni0 10.244.2.1     cni0 10.244.3.1
///       pod 1 10.244.1.2    pod 2 10.244.2.2    pod 3 10.244.3.2
class OverlayTests: WireTestCase {
    override class var prefix: String { "fu-ov" }

    typealias Node = OverlayNode

    func routeAdd(_ node: Node, _ subnet: String, via other: Node) {
        let r = fu(node, ["route", "add", subnet, "via", other.underlay])
        XCTAssertEqual(r.status, 0, r.description)
    }

    func status(_ node: Node) throws -> [String: Any] {
        try daemonJSON(fu(node, ["status", "--json"]))
    }

    func counters(_ node: Node) throws -> (drops: [String: Int], udpToTun: Int, peers: [String: [String: Any]]) {
        let daemon = try status(node)
        let c = try XCTUnwrap(daemon["counters"] as? [String: Any])
        let drops = try XCTUnwrap(c["drops"] as? [String: Int])
        let udpToTun = try XCTUnwrap((c["udpToTun"] as? [String: Any])?["packets"] as? Int)
        var peers: [String: [String: Any]] = [:]
        for r in (daemon["routes"] as? [[String: Any]]) ?? [] { peers[r["subnet"] as? String ?? ""] = r }
        return (drops, udpToTun, peers)
    }

    /// Nodes 1 and 2, each with a route to the other, and a ping from pod 1 to pod 2 that got through.
    func twoNodesThatPing() throws -> (Node, Node) {
        let a = try makeNode(1)
        let b = try makeNode(2)
        routeAdd(a, b.subnet, via: b)
        routeAdd(b, a.subnet, via: a)
        XCTAssertEqual(ping(from: a.pod, b.podAddress).status, 0)
        return (a, b)
    }

    func testPingIperfRouteChangesAndTTL() throws {
        let a = try makeNode(1)
        let b = try makeNode(2)
        routeAdd(a, b.subnet, via: b)
        routeAdd(b, a.subnet, via: a)

        let ok = ping(from: a.pod, b.podAddress)
        XCTAssertEqual(ok.status, 0, ok.description)

        // A TCP transfer completes (iperf3 on the far pod, a fixed amount of data from the near one).
        let server = try startIperf3Server(in: b.pod, address: b.podAddress)
        addTeardownBlock { stopBackground(server) }
        let iperf = runCommand(["ip", "netns", "exec", a.pod.name, "iperf3", "-c", b.podAddress, "-n", "50M", "-J"])
        XCTAssertEqual(iperf.status, 0, iperf.description)
        XCTAssertTrue(iperf.stdout.contains("\"sum_received\""), iperf.stdout)

        // No route: the pod's ping gets "Destination Net Unreachable" from a non-local source.
        XCTAssertEqual(fu(a, ["route", "del", b.subnet]).status, 0)
        let unreachable = ping(from: a.pod, b.podAddress)
        XCTAssertNotEqual(unreachable.status, 0)
        XCTAssertTrue(unreachable.stdout.contains("From 10.244.0.0 icmp_seq=1 Destination Net Unreachable"), unreachable.stdout)
        // Restored without a restart.
        routeAdd(a, b.subnet, via: b)
        XCTAssertEqual(ping(from: a.pod, b.podAddress).status, 0)

        // TTL: 1 expires in node A's kernel; 2 in A's forwarder (tun -> UDP); 3 in B's forwarder (UDP -> tun),
        // whose error travels back over the overlay from B's tun address.
        let ttl1 = ping(from: a.pod, b.podAddress, ["-t", "1"])
        XCTAssertTrue(ttl1.stdout.contains("Time to live exceeded"), ttl1.stdout)
        let ttl2 = ping(from: a.pod, b.podAddress, ["-t", "2"])
        XCTAssertTrue(ttl2.stdout.contains("From 10.244.0.0 icmp_seq=1 Time to live exceeded"), ttl2.stdout)
        let ttl3 = ping(from: a.pod, b.podAddress, ["-t", "3"])
        XCTAssertTrue(ttl3.stdout.contains("From 10.244.2.0 icmp_seq=1 Time to live exceeded"), ttl3.stdout)
        // 4 more expire in B's kernel forwarding to its pod; 5 arrive.
        XCTAssertEqual(ping(from: a.pod, b.podAddress, ["-t", "5"]).status, 0)
        XCTAssertGreaterThanOrEqual(try counters(a).drops["ttlExpired"] ?? 0, 1)
        XCTAssertGreaterThanOrEqual(try counters(b).drops["ttlExpired"] ?? 0, 1)
        XCTAssertGreaterThanOrEqual(try counters(a).drops["noRoute"] ?? 0, 1)
    }

    /// The receive side's CoDel under a 4-stream load: the bulk flows fill node B's socket queue and lose packets
    /// to it (`codel` drops move), while a ping sharing that queue (a sparse flow) loses none. Mechanism only:
    /// how long the ping waits is for bench/run to measure, not for a test on a shared machine.
    func testCoDelDropsTheBulkFlowsNeverTheSparsePing() throws {
        let (a, b) = try twoNodesThatPing()
        let before = try counters(b).drops["codel"] ?? -1
        XCTAssertEqual(before, 0, "no CoDel drop without load")

        let server = try startIperf3Server(in: b.pod, address: b.podAddress)
        addTeardownBlock { stopBackground(server) }
        let client = try startBackground(["ip", "netns", "exec", a.pod.name, "iperf3", "-c", b.podAddress, "-P", "4",
                                          "-t", "8"])
        addTeardownBlock { stopBackground(client) }
        try waitFor("the streams run") { (try? counters(b).udpToTun) ?? 0 > 20_000 }
        let pings = runCommand(["ip", "netns", "exec", a.pod.name, "ping", "-n", "-q", "-c", "300", "-i", "0.01",
                                "-W", "1", b.podAddress])
        let dropsDuringPing = try counters(b).drops["codel"] ?? 0
        client.waitUntilExit()
        XCTAssertEqual(client.terminationStatus, 0, "iperf3 client")
        XCTAssertTrue(pings.stdout.contains(" 0% packet loss"), pings.description)
        XCTAssertGreaterThan(dropsDuringPing, 0, "the bulk flows kept node B's socket queue above the target")
    }

    func testLongestPrefixWins() throws {
        let a = try makeNode(1)
        let b = try makeNode(2)
        let c = try makeNode(5)
        // Node 5 knows 10.244.0.0/22 (nodes 1 and 2, not its own subnet: a route covering that is refused) via
        // node 1, listed first (flannel's first-match scan would pick it), and 10.244.2.0/24 via node 2.
        routeAdd(c, "10.244.0.0/22", via: a)
        routeAdd(c, b.subnet, via: b)
        routeAdd(b, c.subnet, via: c)
        routeAdd(a, c.subnet, via: c)
        let r = ping(from: c.pod, b.podAddress)
        XCTAssertEqual(r.status, 0, r.description)
        let peers = try counters(c).peers
        XCTAssertEqual(peers["10.244.2.0/24"]?["txPackets"] as? Int, 1)
        XCTAssertEqual(peers["10.244.0.0/22"]?["txPackets"] as? Int, 0)
        // And the covering route carries what nothing more specific claims.
        XCTAssertEqual(ping(from: c.pod, a.podAddress).status, 0)
        XCTAssertEqual(try counters(c).peers["10.244.0.0/22"]?["txPackets"] as? Int, 1)
    }

    func testDatagramsFromStrangersAndSpoofersNeverReachTheTun() throws {
        let (a, b) = try twoNodesThatPing()
        let stranger = try TestNamespace(prefix: "fu-ovs")
        addTeardownBlock { stranger.destroy() }
        try plug(stranger, index: 99)

        let before = try counters(a)
        // A well-formed packet claiming to come from pod B, sent by the stranger: not a peer's address.
        let forged = Self.icmpEcho(source: IPv4Address(10, 244, 2, 2), destination: IPv4Address(10, 244, 1, 2))
        for _ in 0..<5 { try sendUDP(from: stranger, to: a.underlay + ":8285", forged) }
        // From node B's own address, but claiming a source outside B's subnet.
        let spoofed = Self.icmpEcho(source: IPv4Address(10, 244, 7, 7), destination: IPv4Address(10, 244, 1, 2))
        for _ in 0..<3 { try sendUDP(from: b.ns, to: a.underlay + ":8285", spoofed) }
        try waitFor("A counts the drops") {
            let now = try counters(a)
            return (now.drops["unknownPeer"] ?? 0) - (before.drops["unknownPeer"] ?? 0) == 5
                && (now.drops["spoofedSource"] ?? 0) - (before.drops["spoofedSource"] ?? 0) == 3
        }
        XCTAssertEqual(try counters(a).udpToTun, before.udpToTun, "a dropped datagram reached the tun")
    }

    /// A minimal valid IPv4 ICMP echo request (header checksum and ICMP checksum correct).
    static func icmpEcho(source: IPv4Address, destination: IPv4Address) -> [UInt8] {
        var p: [UInt8] = [0x45, 0, 0, 28, 0x12, 0x34, 0, 0, 64, 1, 0, 0]
        for a in [source, destination] {
            let o = a.octets
            p += [o.0, o.1, o.2, o.3]
        }
        p += [8, 0, 0, 0, 0xab, 0xcd, 0, 1]
        func sum(_ bytes: ArraySlice<UInt8>) -> UInt16 {
            var s: UInt32 = 0
            var i = bytes.startIndex
            while i < bytes.endIndex { s += UInt32(bytes[i]) << 8 | UInt32(bytes[i + 1]); i += 2 }
            while s > 0xffff { s = (s & 0xffff) + (s >> 16) }
            return ~UInt16(s)
        }
        let h = sum(p[0..<20])
        p[10] = UInt8(h >> 8); p[11] = UInt8(h & 0xff)
        let c = sum(p[20..<28])
        p[22] = UInt8(c >> 8); p[23] = UInt8(c & 0xff)
        return p
    }
}
