import Foundation
import XCTest
@testable import FlannelUDP

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
        let before = try counters(a)
        try sendUDP(from: sender, to: a.underlay + ":8285", forged)
        try waitFor("A counts the forged datagrams as outsideNetwork") {
            try counters(a).drop("outsideNetwork") - before.drop("outsideNetwork") >= forged.count
        }
        // Positive control, from B's own pod address through B's namespace.
        let control = Forge.udp(source: IPv4Address(10, 244, 2, 2), destination: IPv4Address(a.podAddress)!, port: port,
                                payload: Array("control".utf8))
        try sendUDP(from: b.ns, to: a.underlay + ":8285", [control])
        try waitFor("the control datagram reaches A's pod") { inPod.received() == ["control"] }

        let after = try counters(a)
        XCTAssertEqual(after.drop("outsideNetwork") - before.drop("outsideNetwork"), forged.count,
                       "drops[outsideNetwork]")
        XCTAssertEqual(onUnderlay.received(), [], "a forged datagram reached a listener on A's underlay address")
        // Forwarding to the host beyond takes one more hop: give it the time a ping needs before concluding.
        XCTAssertEqual(ping(from: a.pod, "192.168.77.99").status, 0, "the host beyond is reachable from A's pod")
        XCTAssertEqual(onHostBeyond.received(), [], "A forwarded a forged datagram to the host beyond it")
        for reason in ["unknownPeer", "spoofedSource", "malformed"] {
            XCTAssertEqual(after.drop(reason), before.drop(reason), "drops[\(reason)]")
        }
    }
}

extension Forge {
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
