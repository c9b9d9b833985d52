import CShims
import XCTest
@testable import FlannelUDP
#if canImport(Glibc)
import Glibc
#endif

/// The kernel runs the steering program as `FlowSteering` says: on 127.0.0.1 (no privileges, no device), a group of
/// sockets on one port (`UDPSocket.group`) receives datagrams whose payloads are inner IPv4 packets, and each lands
/// on the socket `FlowSteering.worker` names. This is the proof that, for UDP, the reuseport program sees the
/// packet from the UDP payload on (the kernel pulls the UDP header before it runs the program).
final class ReusePortSteeringTests: XCTestCase {
    func testDatagramsLandOnTheSocketTheProgramNames() throws {
        for count in [2, 4] {
            let group = try UDPSocket.group(bind: Endpoint(address: ip("127.0.0.1"), port: 0), count: count,
                                            bufferSize: 1 << 20)
            defer { group.forEach { $0.close() } }
            XCTAssertEqual(Set(group.map(\.localEndpoint)).count, 1, "one address and port for the group")
            let sender = try UDPSocket(bind: Endpoint(address: ip("127.0.0.1"), port: 0))
            defer { sender.close() }
            var landed = [Int](repeating: 0, count: count)
            for k in 0..<200 {
                var spec = TCPPacketSpec()
                spec.sourcePort = UInt16(30000 + k % 50)       // 50 flows, each sent 4 times
                spec.destination = IPv4Address(0x0AF4_0200 | UInt32(k % 7))
                spec.payload = filled(UInt8(k & 0xFF), k % 3 * 100)
                let packet = spec.bytes()
                let expected = packet.withUnsafeBytes { FlowSteering.worker($0, workers: count) }
                send(packet, from: sender, to: group[0].localEndpoint)
                // Loopback delivers within sendto: the datagram is already queued on its socket.
                let got = group.indices.filter { receive(group[$0]) != nil }
                XCTAssertEqual(got, [expected], "datagram \(k) of \(count) sockets")
                if got.count == 1 { landed[got[0]] += 1 }
            }
            XCTAssertTrue(landed.allSatisfy { $0 > 0 }, "50 flows spread over all \(count) sockets: \(landed)")
        }
    }

    func testOneSocketGroupHasNoProgramAndPortInUseWithoutReusePort() throws {
        let group = try UDPSocket.group(bind: Endpoint(address: ip("127.0.0.1"), port: 0), count: 1)
        defer { group.forEach { $0.close() } }
        // A socket without SO_REUSEPORT cannot join the group.
        XCTAssertThrowsError(try UDPSocket(bind: group[0].localEndpoint)) { error in
            XCTAssertEqual((error as? SystemError)?.description,
                           "bind \(group[0].localEndpoint): Address already in use")
        }
        // Nor can another group (a second daemon for another device on the same port): refused, as it always was.
        XCTAssertThrowsError(try UDPSocket.group(bind: group[0].localEndpoint, count: 2)) { error in
            XCTAssertEqual((error as? SystemError)?.description,
                           "bind \(group[0].localEndpoint): Address already in use")
        }
        // A second group member (what a replacing daemon does) can.
        let second = try UDPSocket(bind: group[0].localEndpoint, reusePort: true)
        second.close()
    }

    /// `up --replace` on the port: the new daemon's sockets join the old group, its program (offset by the old
    /// sockets) sends every datagram to them; when the old sockets close, the kernel compacts the group and the
    /// program's indices point past it, so the kernel's hash picks (nothing is lost); the program attached again
    /// without offset keeps each flow on one socket.
    func testAReplacingGroupTakesEveryDatagramAndLosesNoneWhenTheOldOneCloses() throws {
        let old = try UDPSocket.group(bind: Endpoint(address: ip("127.0.0.1"), port: 0), count: 2, bufferSize: 1 << 20)
        defer { old.forEach { $0.close() } }
        let port = old[0].localEndpoint
        let new = try UDPSocket.join(port, count: 3, bufferSize: 1 << 20, steeringOffset: nil)
        defer { new.forEach { $0.close() } }
        let sender = try UDPSocket(bind: Endpoint(address: ip("127.0.0.1"), port: 0))
        defer { sender.close() }
        func packet(_ k: Int) -> [UInt8] {
            var spec = TCPPacketSpec()
            spec.sourcePort = UInt16(40000 + k % 20)
            return spec.bytes()
        }
        /// Sends 60 datagrams of 20 flows; returns where each landed (-1: an old socket, -2: nowhere).
        func round() -> [Int] {
            (0..<60).map { k in
                send(packet(k), from: sender, to: port)
                if old.contains(where: { receive($0) != nil }) { return -1 }
                return new.indices.first { receive(new[$0]) != nil } ?? -2
            }
        }
        // Before the new program: the old one spreads over the old sockets only.
        XCTAssertEqual(Set(round()), [-1])
        try UDPSocket.steer(new, offset: old.count)
        let steered = round()
        for (k, landed) in steered.enumerated() {
            let expected = packet(k).withUnsafeBytes { FlowSteering.worker($0, workers: new.count) }
            XCTAssertEqual(landed, expected, "datagram \(k) goes to the new socket the offset program names")
        }
        old.forEach { $0.close() }
        XCTAssertFalse(round().contains(-2), "past the compacted group the kernel's hash picks: nothing is lost")
        try UDPSocket.steer(new, offset: 0)
        let settled = round()
        XCTAssertFalse(settled.contains(-2))
        for k in 0..<20 {
            XCTAssertEqual(Set(stride(from: k, to: 60, by: 20).map { settled[$0] }).count, 1, "flow \(k) on one socket")
        }
    }

    private func send(_ bytes: [UInt8], from sock: UDPSocket, to endpoint: Endpoint) {
        var sa = sockaddr_in()
        sa.sin_family = sa_family_t(AF_INET)
        sa.sin_port = endpoint.port.bigEndian
        sa.sin_addr = in_addr(s_addr: endpoint.address.networkOrder)
        let n = bytes.withUnsafeBytes { b in
            withUnsafePointer(to: &sa) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    sendto(sock.fd, b.baseAddress, b.count, 0, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
                }
            }
        }
        XCTAssertEqual(n, bytes.count, "sendto: \(SystemError.describe(errno))")
    }

    private func receive(_ sock: UDPSocket) -> Int? {
        var buf = [UInt8](repeating: 0, count: 2048)
        let n = buf.withUnsafeMutableBytes { recv(sock.fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
        return n >= 0 ? n : nil
    }
}
