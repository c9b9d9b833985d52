import XCTest
import Logging
import CShims
import CAllocCounter
@testable import FlannelCore
@testable import FlannelUDP
import TestSupport
#if canImport(Glibc)
import Glibc
#endif

/// The socket offloads in the forwarding loop, without privileges: the tun is one end of a SOCK_SEQPACKET
/// socketpair and the underlay is UDP on loopback (which passes GSO sends to a GRO socket whole), as in
/// ForwarderTests. The workers' drain() runs on the test thread.
final class OffloadForwarderTests: LoopbackForwarderTestCase {
    override func setUpWithError() throws {
        try super.setUpWithError()
        for fd in pair { _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) }
    }

    private func forwarder(offloads: Bool) throws -> Forwarder {
        try Forwarder(tunFD: pair[0], tunName: "test-tun", socket: socket, table: table, config: config,
                      counters: counters, logger: logger, options: ForwarderOptions(batchSize: 8, offloads: offloads))
    }

    private func inbound(_ k: Int, _ size: Int) -> [UInt8] {
        makeIPv4(source: ip("10.244.2.5"), destination: ip("10.244.1.2"), identification: UInt16(k),
                 payload: patternPayload(size - 20, seed: UInt8(k)))
    }

    func testGROBufferIsSplitIntoItsPacketsBeforeTheTun() throws {
        let f = try forwarder(offloads: true)
        XCTAssertEqual(f.activeOffloads, ["batching", "gso", "gro"], "a socketpair has no vnet header: no tso")
        let packets = [inbound(0, 1472), inbound(1, 1472), inbound(2, 1472), inbound(3, 500)]
        let datagram = packets.reduce([], +)

        // The kernel hands a GRO socket the whole GSO send as one buffer (checked on a socket of our own)...
        let probe = try UDPSocket(bind: Endpoint(address: ip("127.0.0.1"), port: 0))
        defer { probe.close() }
        XCTAssertEqual(setInt(probe.fd, Int32(FU_UDP_GRO), 1), 0)
        XCTAssertEqual(setInt(peer.fd, Int32(FU_UDP_SEGMENT), 1472), 0)
        XCTAssertEqual(sendDatagram(datagram, from: peer.fd, to: probe.localEndpoint), datagram.count)
        XCTAssertEqual(drainFD(probe.fd).map { $0.count }, [datagram.count])

        // ...and the forwarder cuts it back into the four packets, each written to the tun on its own.
        XCTAssertEqual(sendDatagram(datagram, from: peer.fd, to: socket.localEndpoint), datagram.count)
        XCTAssertEqual(try f.udpToTun.drain(), 1)
        let written = drainFD(pair[1])
        XCTAssertEqual(written.count, 4)
        XCTAssertEqual(written, packets.map(forwarded))
        XCTAssertEqual(counters.snapshot().udpToTun.packets, 4)
        XCTAssertEqual(table.snapshot().peers[0].counters.snapshot.rxPackets, 4)
        XCTAssertEqual(f.offloadStatistics.groBuffers, 1)
        XCTAssertEqual(f.offloadStatistics.largestDatagramReceived, 1472)
    }

    /// Issue 12 on the GRO path: a peer's GSO send mixes packets for our pods with packets for this node's
    /// underlay and for loopback. Each datagram of the buffer is decided on its own: only the pods' reach the tun.
    func testGROBufferPacketsForOutsideTheNetworkAreDroppedOneByOne() throws {
        let f = try forwarder(offloads: true)
        func packet(_ k: Int, to destination: String) -> [UInt8] {
            makeIPv4(source: ip("10.244.2.5"), destination: ip(destination), identification: UInt16(k),
                     payload: patternPayload(1452, seed: UInt8(k)))
        }
        let packets = [packet(0, to: "10.244.1.2"), packet(1, to: "192.168.77.1"), packet(2, to: "10.244.1.3"),
                       packet(3, to: "127.0.0.1")]
        let datagram = packets.reduce([], +)
        XCTAssertEqual(setInt(peer.fd, Int32(FU_UDP_SEGMENT), 1472), 0)
        XCTAssertEqual(sendDatagram(datagram, from: peer.fd, to: socket.localEndpoint), datagram.count)
        XCTAssertEqual(try f.udpToTun.drain(), 1)
        XCTAssertEqual(f.offloadStatistics.groBuffers, 1, "the four packets came as one GRO buffer")
        XCTAssertEqual(drainFD(pair[1]), [forwarded(packets[0]), forwarded(packets[2])])
        XCTAssertEqual(counters.drops(.outsideNetwork), 2)
        XCTAssertEqual(counters.snapshot().udpToTun.packets, 2)
    }

    func testGSOSendsArriveAsOneDatagramPerPacket() throws {
        for offloads in [true, false] {
            counters = DataPlaneCounters()
            let f = try forwarder(offloads: offloads)
            XCTAssertEqual(f.activeOffloads, offloads ? ["batching", "gso", "gro"] : ["batching"])
            let sizes = [1472, 1472, 1472, 1000, 60, 1472]
            let packets = sizes.enumerated().map { k, size in
                makeIPv4(source: ip("10.244.1.2"), destination: ip("10.244.2.5"), identification: UInt16(k),
                         payload: patternPayload(size - 20, seed: UInt8(k)))
            }
            for p in packets { _ = p.withUnsafeBytes { write(pair[1], $0.baseAddress, $0.count) } }
            XCTAssertEqual(try f.tunToUDP.drain(), 6)
            // The peer's socket has no GRO: what it receives is what is on the wire.
            let received = drainFD(peer.fd)
            XCTAssertEqual(received.map { $0.count }, sizes, "offloads \(offloads)")
            XCTAssertEqual(received, packets.map(forwarded))
            XCTAssertEqual(counters.snapshot().tunToUDP.packets, 6)
            XCTAssertEqual(counters.snapshot().tunToUDP.bytes, UInt64(sizes.reduce(0, +)))
            XCTAssertEqual(counters.drops(.sendFailed), 0)
        }
    }
}
