import Foundation
import XCTest
import Logging
@testable import FlannelCore
@testable import FlannelUDP
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

    /// Whether every worker's heartbeat moves at least `by` from `first` within 5 s (polled, with a deadline).
    func heartbeatsMove(_ forwarder: Forwarder, from first: [(worker: String, count: UInt64)], by: UInt64 = 3) -> Bool {
        let deadline = Date().addingTimeInterval(5)
        while Date() < deadline {
            if zip(forwarder.heartbeats, first).allSatisfy({ $0.0.count >= $0.1.count + by }) { return true }
            usleep(5000)
        }
        return false
    }

    /// Starts `forwarder` and lets every loop go round once into its blocking wait; then stops it from another
    /// thread (only the wake signal that stop() sends can end the wait when the heartbeat timer is far away) and
    /// returns each heartbeat as it was before the stop. The 60 s is a liveness bound, not a measurement.
    func heartbeatsBeforeAStopThatWakes(_ forwarder: Forwarder) throws -> [UInt64] {
        try forwarder.start()
        let deadline = Date().addingTimeInterval(5)
        while forwarder.heartbeats.contains(where: { $0.count == 0 }) && Date() < deadline { usleep(5000) }
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
