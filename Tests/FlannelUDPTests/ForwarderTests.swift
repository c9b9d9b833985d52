import XCTest
import Atomics
import Logging
import CAllocCounter
@testable import FlannelCore
@testable import FlannelUDP
import TestSupport
#if canImport(Glibc)
import Glibc
#endif

/// The forwarding loop without privileges, on the socketpair-and-loopback fixture of `LoopbackForwarderTestCase`.
final class ForwarderTests: LoopbackForwarderTestCase {
    private func makeForwarder(onFailure: (@Sendable (SystemError) -> Void)? = nil) throws -> Forwarder {
        try Forwarder(tunFD: pair[0], tunName: "test-tun", socket: socket, table: table, config: config,
                      counters: counters, logger: logger, options: ForwarderOptions(batchSize: 8), onFailure: onFailure)
    }

    private func setNonBlocking(_ fd: Int32) {
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
    }

    /// Receives one datagram or packet from `fd` if one is waiting (non-blocking), with the sender's address.
    private func receive(_ fd: Int32) -> ([UInt8], IPv4Address)? {
        var buf = [UInt8](repeating: 0, count: 65536)
        var sa = sockaddr_in()
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let n = buf.withUnsafeMutableBytes { b in
            withUnsafeMutablePointer(to: &sa) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    recvfrom(fd, b.baseAddress, b.count, Int32(MSG_DONTWAIT), $0, &len)
                }
            }
        }
        guard n >= 0 else { return nil }
        return (Array(buf[0..<n]), IPv4Address(networkOrder: sa.sin_addr.s_addr))
    }

    private func waitForPacket(_ fd: Int32, timeout: Double = 5) -> [UInt8]? {
        var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        guard poll(&pfd, 1, Int32(timeout * 1000)) == 1 else { return nil }
        return receive(fd)?.0
    }

    private func sendUDP(_ bytes: [UInt8], from sock: UDPSocket) {
        XCTAssertEqual(sendDatagram(bytes, from: sock.fd, to: socket.localEndpoint), bytes.count)
    }

    private func writeTun(_ bytes: [UInt8]) {
        XCTAssertEqual(bytes.withUnsafeBytes { write(pair[1], $0.baseAddress, $0.count) }, bytes.count)
    }

    func testUDPSocketBindsReportsAndNamesErrors() throws {
        XCTAssertEqual(socket.localEndpoint.address, ip("127.0.0.1"))
        XCTAssertNotEqual(socket.localEndpoint.port, 0)
        XCTAssertGreaterThan(socket.receiveBufferSize, 1 << 20)
        XCTAssertTrue(fcntl(socket.fd, F_GETFL) & O_NONBLOCK != 0)
        XCTAssertTrue(fcntl(socket.fd, F_GETFD) & FD_CLOEXEC != 0)
        XCTAssertThrowsError(try UDPSocket(bind: socket.localEndpoint)) { error in
            XCTAssertEqual((error as? SystemError)?.description,
                           "bind \(socket.localEndpoint): Address already in use")
        }
        // 192.0.2.1 (TEST-NET-1) is not an address of this host: bind fails without sending anything.
        XCTAssertThrowsError(try UDPSocket(bind: Endpoint(address: ip("192.0.2.1"), port: 8285))) { error in
            XCTAssertEqual((error as? SystemError)?.description, "bind 192.0.2.1:8285: Cannot assign requested address")
        }
    }

    /// Both directions, driven by hand on this thread: forwards, ICMP into the tun, delivery, the peer check, and
    /// time exceeded back to the peer.
    func testDrainBothDirections() throws {
        let f = try makeForwarder()
        setNonBlocking(pair[0])
        let out = makeIPv4(source: ip("10.244.1.2"), destination: ip("10.244.2.5"), ttl: 64,
                           payload: Array(repeating: 0xAB, count: 1000))
        writeTun(out)
        writeTun(makeIPv4(source: ip("10.244.1.2"), destination: ip("10.244.9.9"), proto: 1,
                          payload: makeICMP(type: 8, rest: [0, 1, 0, 1])))
        writeTun([0x60] + [UInt8](repeating: 0, count: 47))
        XCTAssertEqual(try f.tunToUDP.drain(), 3)

        let (got, from) = try XCTUnwrap(receive(peer.fd))
        XCTAssertEqual(from, ip("127.0.0.1"))
        XCTAssertEqual(got.count, out.count)
        XCTAssertEqual(got[8], 63)
        XCTAssertEqual(Array(got[20...]), Array(out[20...]))
        XCTAssertNil(receive(peer.fd), "exactly one datagram per forwarded packet")
        let icmp = try XCTUnwrap(receive(pair[1])).0
        XCTAssertEqual(Array(icmp[20..<22]), [3, 0])
        XCTAssertEqual(Array(icmp[12..<16]), [10, 244, 0, 0])
        XCTAssertEqual(counters.snapshot().tunToUDP, DirectionCounts(packets: 1, bytes: 1020))
        XCTAssertEqual(counters.drops(.noRoute), 1)
        XCTAssertEqual(counters.drops(.notIPv4), 1)
        XCTAssertEqual(counters.icmpSent.load(ordering: .relaxed), 1)
        let peerCounters = table.snapshot().peers[0].counters.snapshot
        XCTAssertEqual(peerCounters.txPackets, 1)
        XCTAssertEqual(peerCounters.txBytes, 1020)

        // UDP -> tun from the peer: delivered with TTL - 1.
        let inbound = makeIPv4(source: ip("10.244.2.5"), destination: ip("10.244.1.2"), ttl: 10)
        sendUDP(inbound, from: peer)
        // From another local address (127.0.0.2 is loopback too, but not the peer's address): unknown peer.
        let stranger = try UDPSocket(bind: Endpoint(address: ip("127.0.0.2"), port: 0))
        defer { stranger.close() }
        sendUDP(inbound, from: stranger)
        // TTL 1 from the peer: time exceeded goes back to the peer, from our tun address.
        sendUDP(makeIPv4(source: ip("10.244.2.5"), destination: ip("10.244.1.2"), ttl: 1), from: peer)
        XCTAssertEqual(try f.udpToTun.drain(), 3)
        let delivered = try XCTUnwrap(receive(pair[1])).0
        XCTAssertEqual(delivered.count, inbound.count)
        XCTAssertEqual(delivered[8], 9)
        XCTAssertNil(receive(pair[1]), "the stranger's packet never reaches the tun")
        XCTAssertEqual(counters.drops(.unknownPeer), 1)
        XCTAssertEqual(counters.drops(.ttlExpired), 1)
        let back = try XCTUnwrap(receive(peer.fd)).0
        XCTAssertEqual(Array(back[20..<22]), [11, 0])
        XCTAssertEqual(Array(back[12..<16]), [10, 244, 1, 0])
        XCTAssertEqual(counters.snapshot().udpToTun, DirectionCounts(packets: 1, bytes: 24))
        XCTAssertEqual(table.snapshot().peers[0].counters.snapshot.rxPackets, 1)
        XCTAssertEqual(try f.udpToTun.drain(), 0, "nothing left: EAGAIN ends the drain")
    }

    /// More than one batch waiting: all of it is forwarded, in order, with one sendmmsg per batch.
    func testManyPacketsAcrossBatches() throws {
        let f = try makeForwarder()
        setNonBlocking(pair[0])
        for i in 0..<30 {
            writeTun(makeIPv4(source: ip("10.244.1.2"), destination: ip("10.244.2.5"), identification: UInt16(i)))
        }
        XCTAssertEqual(try f.tunToUDP.drain(), 30)
        for i in 0..<30 {
            let (got, _) = try XCTUnwrap(receive(peer.fd), "packet \(i)")
            XCTAssertEqual(word(got, 4), UInt16(i))
        }
        XCTAssertEqual(counters.snapshot().tunToUDP.packets, 30)
    }

    /// The threads: start, traffic both ways, route table swapped while running, stop joins (twice is fine).
    func testThreadsForwardAndStop() throws {
        let f = try makeForwarder()
        f.stop()  // before start: harmless, and does not keep start() from working
        try f.start()
        writeTun(makeIPv4(source: ip("10.244.1.2"), destination: ip("10.244.2.5")))
        XCTAssertNotNil(waitForPacket(peer.fd))
        sendUDP(makeIPv4(source: ip("10.244.2.5"), destination: ip("10.244.1.2")), from: peer)
        XCTAssertNotNil(waitForPacket(pair[1]))
        // Swap the table: 10.244.2.0/24 is gone, so the next packet gets net unreachable back in the tun.
        table.publish([PeerRoute(subnet: net("10.244.3.0/24"), endpoint: peer.localEndpoint)])
        writeTun(makeIPv4(source: ip("10.244.1.2"), destination: ip("10.244.2.5")))
        let icmp = try XCTUnwrap(waitForPacket(pair[1]))
        XCTAssertEqual(icmp[20], 3)
        f.stop()
        f.stop()
        XCTAssertNil(f.failure)
        XCTAssertEqual(counters.snapshot().tunToUDP.packets, 1)
        XCTAssertEqual(counters.snapshot().udpToTun.packets, 1)
    }

    /// A fatal error (here: the "tun" is a directory, so read() fails with EISDIR) stops both workers, is
    /// reported once through onFailure and kept in `failure`.
    func testFatalErrorStopsAndIsReported() throws {
        let dir = open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        defer { close(dir) }
        let reported = ManagedAtomic<Int>(0)
        let f = try Forwarder(tunFD: dir, tunName: "not-a-tun", socket: socket, table: table, config: config,
                              counters: counters, logger: logger, onFailure: { _ in
                                  reported.wrappingIncrement(ordering: .relaxed)
                              })
        try f.start()
        let error = f.wait()
        XCTAssertEqual(error?.errno, EISDIR)
        XCTAssertEqual(error?.description, "read from not-a-tun: Is a directory")
        XCTAssertEqual(reported.load(ordering: .relaxed), 1)
        f.stop()
    }

    /// The loop's per-packet path does not allocate: both workers' drain() (read/recvmmsg, decisions, sendmmsg,
    /// tun writes, ICMP) over hundreds of batches leave this thread's malloc count unchanged.
    func testDrainDoesNotAllocate() throws {
        let f = try makeForwarder()
        setNonBlocking(pair[0])
        setNonBlocking(pair[1])
        let templates: [[UInt8]] = [
            makeIPv4(source: ip("10.244.1.2"), destination: ip("10.244.2.5"), payload: filled(1, 1400)),
            makeIPv4(source: ip("10.244.1.2"), destination: ip("10.244.2.6")),
            makeIPv4(source: ip("10.244.1.2"), destination: ip("10.244.9.9")),           // ICMP into the tun
            makeIPv4(source: ip("10.244.1.2"), destination: ip("10.244.2.5"), ttl: 1),   // ICMP into the tun
        ]
        let inbound: [[UInt8]] = [
            makeIPv4(source: ip("10.244.2.5"), destination: ip("10.244.1.2"), payload: filled(2, 1400)),
            makeIPv4(source: ip("10.244.2.7"), destination: ip("10.244.1.2")),
            makeIPv4(source: ip("10.244.2.5"), destination: ip("10.244.1.2"), ttl: 1),   // ICMP back to the peer
            makeIPv4(source: ip("10.244.7.5"), destination: ip("10.244.1.2")),           // spoofed
        ]
        let sink = UnsafeMutableRawPointer.allocate(byteCount: 65536, alignment: 16)
        defer { sink.deallocate() }
        var dst = sockaddr_in()
        dst.sin_family = sa_family_t(AF_INET)
        dst.sin_port = socket.localEndpoint.port.bigEndian
        dst.sin_addr = in_addr(s_addr: socket.localEndpoint.address.networkOrder)
        let tunFD = pair[1], peerFD = peer.fd

        var measured: UInt64 = 0
        var processed = 0
        var round = 0
        while round < 300 {
            var i = 0
            while i < templates.count {
                _ = templates[i].withUnsafeBytes { write(tunFD, $0.baseAddress, $0.count) }
                _ = inbound[i].withUnsafeBytes { b in
                    withUnsafePointer(to: &dst) {
                        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                            sendto(peerFD, b.baseAddress, b.count, 0, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
                        }
                    }
                }
                i += 1
            }
            let before = fu_alloc_count_this_thread()
            processed += try f.tunToUDP.drain()
            processed += try f.udpToTun.drain()
            let after = fu_alloc_count_this_thread()
            if round >= 2 { measured += after - before }  // the first rounds warm up (metadata, first clock read)
            while read(tunFD, sink, 65536) > 0 {}
            while recv(peerFD, sink, 65536, Int32(MSG_DONTWAIT)) > 0 {}
            round += 1
        }
        XCTAssertEqual(processed, 300 * 8)
        XCTAssertEqual(measured, 0, "the forwarding loop allocated \(measured) times")
        XCTAssertEqual(counters.snapshot().tunToUDP.packets, 600)
        XCTAssertEqual(counters.snapshot().udpToTun.packets, 600)
        XCTAssertEqual(counters.drops(.spoofedSource), 300)
        XCTAssertGreaterThan(counters.icmpSent.load(ordering: .relaxed), 50)
    }
}
