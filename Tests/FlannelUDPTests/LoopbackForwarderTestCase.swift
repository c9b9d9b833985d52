import Foundation
import XCTest
import Logging
import CShims
@testable import FlannelCore
@testable import FlannelUDP
import TestSupport
#if canImport(Glibc)
import Glibc
#endif

/// The fixture of the unprivileged forwarding-loop tests: the tun is one end of an AF_UNIX SOCK_SEQPACKET
/// socketpair (one packet per read/write, like a tun), the underlay is UDP on loopback, and the "remote node" is
/// another UDP socket on loopback that owns 10.244.2.0/24. Nothing outside this process is touched.
///
///     test  <-- seqpacket -->  Forwarder  <-- UDP 127.0.0.1 -->  peer socket (node 10.244.2.0/24)
class LoopbackForwarderTestCase: XCTestCase {
    var pair: [Int32] = [-1, -1]
    var socket: UDPSocket!
    var peer: UDPSocket!
    var table: RouteTable!
    var counters: DataPlaneCounters!
    let config = ForwardingConfig(network: net("10.244.0.0/16"), subnet: net("10.244.1.0/24"))
    var logger = Logger(label: "test.forwarder")

    override func setUpWithError() throws {
        XCTAssertEqual(socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair), 0)
        socket = try UDPSocket(bind: Endpoint(address: ip("127.0.0.1"), port: 0))
        peer = try UDPSocket(bind: Endpoint(address: ip("127.0.0.1"), port: 0))
        table = RouteTable([PeerRoute(subnet: net("10.244.2.0/24"), endpoint: peer.localEndpoint)])
        counters = DataPlaneCounters()
        logger.logLevel = .critical
    }

    func setInt(_ fd: Int32, _ option: Int32, _ value: Int32) -> Int32 {
        var v = value
        return setsockopt(fd, Int32(FU_SOL_UDP), option, &v, socklen_t(MemoryLayout<Int32>.size))
    }

    /// Everything waiting on `fd`, one element per datagram or packet.
    func drainFD(_ fd: Int32) -> [[UInt8]] {
        var out: [[UInt8]] = []
        var buf = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = buf.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
            if n < 0 { return out }
            out.append(Array(buf[0..<n]))
        }
    }

    /// `packet` as the forwarder passes it on: TTL one less, header checksum updated.
    func forwarded(_ packet: [UInt8]) -> [UInt8] {
        var p = packet
        p[8] -= 1
        p[10] = 0; p[11] = 0
        put16(&p, 10, referenceChecksum(Array(p[0..<20])))
        return p
    }

    /// Whether every worker's heartbeat moves at least `by` from `first` within 5 s (polled, with a deadline).
    func heartbeatsMove(_ forwarder: Forwarder, from first: [(worker: String, count: UInt64)], by: UInt64 = 3) -> Bool {
        waitUntil(interval: 0.005) { zip(forwarder.heartbeats, first).allSatisfy { $0.0.count >= $0.1.count + by } }
    }

    /// Starts `forwarder` and lets every loop go round once into its blocking wait; then stops it from another
    /// thread (only the wake signal that stop() sends can end the wait when the heartbeat timer is far away) and
    /// returns each heartbeat as it was before the stop. The 60 s is a liveness bound, not a measurement.
    func heartbeatsBeforeAStopThatWakes(_ forwarder: Forwarder) throws -> [UInt64] {
        try forwarder.start()
        _ = waitUntil(interval: 0.005) { !forwarder.heartbeats.contains { $0.count == 0 } }
        usleep(200_000)  // past the flag check, into the blocking call
        let heartbeats = forwarder.heartbeats.map(\.count)
        let stopped = expectation(description: "stop() returned")
        Thread.detachNewThread {
            forwarder.stop()
            stopped.fulfill()
        }
        wait(for: [stopped], timeout: 60)
        return heartbeats
    }

    override func tearDown() {
        for fd in pair where fd >= 0 { close(fd) }
        socket?.close()
        peer?.close()
    }
}
