import Foundation
import XCTest
@testable import FlannelCore
@testable import FlannelUDP
import TestSupport

/// Issue 12, "relay into the host": a peer (or, in relaxed mode, anyone who puts a peer's pod address in the
/// inner source) forges a datagram whose inner packet is addressed not to a pod but to node A's underlay address,
/// or to a host beyond A (the stranger on the underlay, which A's kernel would forward to). Node A must drop each
/// one as `outsideNetwork` and nothing may reach the listeners there. Topology in HostileTopology.swift; every
/// address used lies inside the test's own namespaces.
///
/// A positive control goes the same way right after the forged datagrams: a datagram from B's pod to a listener
/// in A's pod, which must arrive. The UDP -> tun worker handles datagrams in order, so once it is there the forged
/// ones have been decided.
final class RelayIntoHostTests: HostileTopologyTestCase {
    func testPeerCannotRelayIntoTheNodeOrBeyond() throws {
        let (a, b) = try makePair()
        XCTAssertEqual(ping(from: b.pod, a.podAddress).status, 0, "overlay up")
        try attack(a, from: b.ns, innerSource: IPv4Address(10, 244, 2, 2), control: b)
    }

    func testStrangerSpoofingAPeerInRelaxedModeCannotRelayEither() throws {
        let a = try makeNode(1, extra: ["--peer-check", "relaxed"])
        let b = try makeNode(2)
        XCTAssertEqual(fu(a, ["route", "add", b.subnet, "via", b.underlay]).status, 0)
        XCTAssertEqual(fu(b, ["route", "add", a.subnet, "via", a.underlay]).status, 0)
        XCTAssertEqual(ping(from: b.pod, a.podAddress).status, 0, "overlay up")
        let stranger = try TestNamespace(prefix: "fu-hs")
        addTeardownBlock { stranger.destroy() }
        try plug(stranger, index: 98)
        // In relaxed mode A takes the stranger's datagram as B's (its inner source is B's pod): only the
        // destination check stands between it and A's host.
        try attack(a, from: stranger, innerSource: IPv4Address(10, 244, 2, 2), control: b)
    }

    /// Sends the forged datagrams to node `a` from `sender`'s namespace and checks that each is dropped and
    /// counted, and that nothing reaches A's underlay address or the host beyond.
    private func attack(_ a: Node, from sender: TestNamespace, innerSource: IPv4Address, control b: Node) throws {
        let beyond = try TestNamespace(prefix: "fu-hs")
        addTeardownBlock { beyond.destroy() }
        try plug(beyond, index: 99)
        // The host beyond takes packets from any source (A's kernel would forward them with the pod's address).
        try beyond.run(["sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0"])
        try beyond.run(["sysctl", "-qw", "net.ipv4.conf.eth0.rp_filter=0"])
        try beyond.run(["ip", "route", "add", "10.244.0.0/16", "via", a.underlay])

        let port: UInt16 = 9999
        let onUnderlay = try UDPListener(in: a.ns, address: a.underlay, port: port)
        let onHostBeyond = try UDPListener(in: beyond, address: "192.168.77.99", port: port)
        let inPod = try UDPListener(in: a.pod, address: a.podAddress, port: port)

        // The forged datagrams reach the listeners when written into A's tun: shown by the control below.
        let targets = [IPv4Address(a.underlay)!, IPv4Address(192, 168, 77, 99)]
        let forged = targets.map { Forge.udp(source: innerSource, destination: $0, port: port, payload: Array("relay".utf8)) }
        // And a run of TCP segments of one flow, sent as one UDP GSO message so that A receives them in one batch
        // (one GRO buffer): A's TCP coalescing would merge them into one super-packet for its tun if they got
        // past the check.
        let run = (0..<4).map { k in
            Forge.tcpSegment(source: innerSource, destination: targets[0], port: port, sequence: 1000 + UInt32(k) * 100,
                             identification: 0x2000 + UInt16(k), payload: Array(repeating: 0x41, count: 100))
        }
        let before = try counters(a)
        let groBefore = try groBuffers(a)
        try sendUDP(from: sender, to: a.underlay + ":8285", forged)
        try sendGSO(from: sender, to: a.underlay + ":8285", run)
        try waitFor("A counts the forged datagrams as outsideNetwork") {
            try counters(a).drop("outsideNetwork") - before.drop("outsideNetwork") >= forged.count + run.count
        }
        // Positive control, from B's own pod address through B's namespace.
        let control = Forge.udp(source: IPv4Address(10, 244, 2, 2), destination: IPv4Address(a.podAddress)!, port: port,
                                payload: Array("control".utf8))
        try sendUDP(from: b.ns, to: a.underlay + ":8285", [control])
        try waitFor("the control datagram reaches A's pod") { inPod.received() == ["control"] }

        let after = try counters(a)
        XCTAssertEqual(after.drop("outsideNetwork") - before.drop("outsideNetwork"), forged.count + run.count,
                       "drops[outsideNetwork]")
        XCTAssertEqual(onUnderlay.received(), [], "a forged datagram reached a listener on A's underlay address")
        // Forwarding to the host beyond takes one more hop: give it the time a ping needs before concluding.
        XCTAssertEqual(ping(from: a.pod, "192.168.77.99").status, 0, "the host beyond is reachable from A's pod")
        XCTAssertEqual(onHostBeyond.received(), [], "A forwarded a forged datagram to the host beyond it")
        // The TCP run took the offload path: one GRO buffer, split and decided packet by packet (without the
        // check its four segments are coalesced into one super-packet for the tun).
        if let groBefore {
            XCTAssertGreaterThanOrEqual(try groBuffers(a) ?? 0, groBefore + 1, "the TCP run did not arrive as one GRO buffer")
        }
        for reason in ["unknownPeer", "spoofedSource", "malformed"] {
            XCTAssertEqual(after.drop(reason), before.drop(reason), "drops[\(reason)]")
        }
    }
}

extension RelayIntoHostTests {
    /// The daemon's count of GRO buffers received, or nil when UDP GRO is not in use.
    func groBuffers(_ node: Node) throws -> Int? {
        let stats = try XCTUnwrap(try daemonStatus(node)["offloadStatistics"] as? [String: Any])
        guard try XCTUnwrap(stats["active"] as? [String]).contains("gro") else { return nil }
        return try XCTUnwrap(stats["groBuffers"] as? Int)
    }

    /// Sends `packets` (all of one size but the last) as one UDP GSO message from a socket opened inside `ns`.
    func sendGSO(from ns: TestNamespace, to endpoint: String, _ packets: [[UInt8]]) throws {
        let target = try Endpoint(parsing: endpoint, defaultPort: 8285)
        try ns.withEntered {
            let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
            guard fd >= 0 else { throw SystemError.current("socket", "udp") }
            defer { close(fd) }
            var size = Int32(packets[0].count)
            // SOL_UDP (17), UDP_SEGMENT (103): the kernel cuts the message into datagrams of `size` bytes.
            guard setsockopt(fd, 17, 103, &size, socklen_t(MemoryLayout<Int32>.size)) == 0 else {
                throw SystemError.current("set UDP_SEGMENT on", "udp socket")
            }
            let message = packets.reduce([], +)
            guard sendDatagram(message, from: fd, to: target) == message.count else { throw SystemError.current("sendto", endpoint) }
        }
    }
}

extension Forge {
    /// An IPv4/TCP segment (ACK, window 502) with a valid TCP checksum, from port 40000 to `port`.
    static func tcpSegment(source: IPv4Address, destination: IPv4Address, port: UInt16, sequence: UInt32,
                           identification: UInt16, payload: [UInt8]) -> [UInt8] {
        var tcp: [UInt8] = [0x9c, 0x40, UInt8(port >> 8), UInt8(port & 0xff),
                            UInt8(sequence >> 24), UInt8((sequence >> 16) & 0xff), UInt8((sequence >> 8) & 0xff),
                            UInt8(sequence & 0xff), 0, 0, 0x10, 0, 0x50, 0x10, 0x01, 0xf6, 0, 0, 0, 0] + payload
        var pseudo: [UInt8] = []
        for a in [source, destination] {
            let o = a.octets
            pseudo += [o.0, o.1, o.2, o.3]
        }
        pseudo += [0, 6, UInt8(tcp.count >> 8), UInt8(tcp.count & 0xff)]
        let c = checksum((pseudo + tcp)[...])
        tcp[16] = UInt8(c >> 8); tcp[17] = UInt8(c & 0xff)
        var p = ipv4(source: source, destination: destination, proto: 6, payload: tcp)
        p[4] = UInt8(identification >> 8); p[5] = UInt8(identification & 0xff)
        p[6] = 0x40  // DF, as TCP sends
        p[10] = 0; p[11] = 0
        let h = checksum(p[0..<20])
        p[10] = UInt8(h >> 8); p[11] = UInt8(h & 0xff)
        return p
    }

    /// An IPv4/UDP packet with no UDP checksum (0, allowed in IPv4), from port 40000 to `port`.
    static func udp(source: IPv4Address, destination: IPv4Address, port: UInt16, payload: [UInt8]) -> [UInt8] {
        let length = 8 + payload.count
        let header: [UInt8] = [0x9c, 0x40, UInt8(port >> 8), UInt8(port & 0xff),
                               UInt8(length >> 8), UInt8(length & 0xff), 0, 0]
        return ipv4(source: source, destination: destination, proto: 17, payload: header + payload)
    }
}

/// A UDP socket bound inside a namespace, read without blocking: what has arrived so far.
final class UDPListener {
    let fd: Int32
    let name: String

    init(in ns: TestNamespace, address: String, port: UInt16) throws {
        name = "\(address):\(port) in \(ns.name)"
        let name = self.name
        fd = try ns.withEntered {
            let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
            guard fd >= 0 else { throw SystemError.current("socket", name) }
            var sa = sockaddr_in()
            sa.sin_family = sa_family_t(AF_INET)
            sa.sin_port = port.bigEndian
            sa.sin_addr = in_addr(s_addr: IPv4Address(address)!.networkOrder)
            let rc = withUnsafePointer(to: &sa) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
                }
            }
            guard rc == 0 else {
                let e = SystemError.current("bind", name)
                close(fd)
                throw e
            }
            return fd
        }
    }

    deinit { close(fd) }

    /// The payloads received so far, as text.
    func received() -> [String] {
        var out: [String] = []
        var buffer = [UInt8](repeating: 0, count: 2048)
        while true {
            let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
            if n < 0 {
                let e = errno
                if e == EINTR { continue }
                if e != EAGAIN && e != EWOULDBLOCK { XCTFail("\(SystemError("recv on", name, errno: e))") }
                break  // nothing more
            }
            out.append(String(decoding: buffer[0..<n], as: UTF8.self))
        }
        return out
    }
}
