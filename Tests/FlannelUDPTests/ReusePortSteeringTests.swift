import CShims
import XCTest
@testable import FlannelCore
@testable import FlannelUDP
import TestSupport
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

    /// `up --replace` changing the number of workers on the sockets it took over: sockets joined to the group get
    /// nothing until the program is attached again for all of them, which then steers as `FlowSteering` says;
    /// closing the last sockets after steering over the first ones renumbers nothing and loses nothing.
    func testAGroupThatGrowsAndShrinksSteersAsToldAndLosesNothing() throws {
        let first = try UDPSocket.group(bind: Endpoint(address: ip("127.0.0.1"), port: 0), count: 2, bufferSize: 1 << 20)
        let port = first[0].localEndpoint
        let added = try UDPSocket.join(port, count: 2, bufferSize: 1 << 20, steering: false)
        let all = first + added
        defer { all.forEach { $0.close() } }
        let sender = try UDPSocket(bind: Endpoint(address: ip("127.0.0.1"), port: 0))
        defer { sender.close() }
        func packet(_ k: Int) -> [UInt8] {
            var spec = TCPPacketSpec()
            spec.sourcePort = UInt16(40000 + k % 20)
            return spec.bytes()
        }
        /// Sends 60 datagrams of 20 flows; returns the socket each landed on (-1: none).
        func round() -> [Int] {
            (0..<60).map { k in
                send(packet(k), from: sender, to: port)
                return all.indices.first { receive(all[$0]) != nil } ?? -1
            }
        }
        func expected(_ workers: Int) -> [Int] {
            (0..<60).map { k in packet(k).withUnsafeBytes { FlowSteering.worker($0, workers: workers) } }
        }
        XCTAssertEqual(round(), expected(2), "joined sockets get nothing before the program covers them")
        try UDPSocket.steer(all)
        let four = round()
        XCTAssertEqual(four, expected(4))
        XCTAssertTrue(four.contains(3), "the flows spread over the joined sockets too: \(four)")
        try UDPSocket.steer(Array(all.prefix(1)))
        all[3].close()
        all[2].close()
        all[1].close()
        XCTAssertEqual(round(), [Int](repeating: 0, count: 60), "one socket left, every datagram on it")
    }

    private func send(_ bytes: [UInt8], from sock: UDPSocket, to endpoint: Endpoint) {
        let n = sendDatagram(bytes, from: sock.fd, to: endpoint)
        XCTAssertEqual(n, bytes.count, "sendto: \(SystemError.describe(errno))")
    }

    private func receive(_ sock: UDPSocket) -> Int? {
        var buf = [UInt8](repeating: 0, count: 2048)
        let n = buf.withUnsafeMutableBytes { recv(sock.fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
        return n >= 0 ? n : nil
    }
}
