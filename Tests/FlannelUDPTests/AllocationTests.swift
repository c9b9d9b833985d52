import XCTest
import Logging
import CAllocCounter
#if canImport(Glibc)
import Glibc
#endif
@testable import FlannelCore
@testable import FlannelUDP

/// Allocations made by the calling thread while `body` runs (counted by the CAllocCounter test allocator).
func allocations(_ body: () throws -> Void) rethrows -> UInt64 {
    let before = fu_alloc_count_this_thread()
    try body()
    return fu_alloc_count_this_thread() - before
}

/// Allocations made by the calling thread while `body` runs `times` times (an index loop: `for` allocates in an
/// unoptimised build).
func allocations(repeating times: Int, _ body: () -> Void) -> UInt64 {
    allocations {
        var r = 0
        while r < times {
            body()
            r += 1
        }
    }
}

/// Somewhere to put values so the optimiser cannot drop the code that made them.
nonisolated(unsafe) var allocationSink: [Int] = []

/// Proof that the per-packet path does not allocate: the decisions for every kind of verdict, run thousands of
/// times after one warm-up, leave the thread's malloc count where it was.
final class AllocationTests: XCTestCase {
    /// The harness itself can fail: a deliberate allocation inside the measured block is seen.
    func testCounterSeesADeliberateAllocation() {
        let n = allocations {
            allocationSink = [Int](repeating: 7, count: 100)
        }
        XCTAssertGreaterThanOrEqual(n, 1)
        let raw = allocations {
            let p = UnsafeMutableRawPointer.allocate(byteCount: 64, alignment: 64)
            p.deallocate()
        }
        XCTAssertEqual(raw, 1, "aligned allocation through posix_memalign/aligned_alloc is counted too")
        XCTAssertEqual(allocations {}, 0)
    }

    func testDecisionsDoNotAllocate() {
        let config = ForwardingConfig(network: net("10.244.0.0/16"), subnet: net("10.244.1.0/24"))
        // 2000 filler peers (10.0.0.0/24 ... 10.7.207.0/24) around the ones the packets below use.
        var routes: [PeerRoute] = (0..<2000).map { i in
            PeerRoute(subnet: IPv4Network(address: IPv4Address(0x0A00_0000 | UInt32(i) << 8), prefixLength: 24),
                      endpoint: Endpoint(address: IPv4Address(0xAC10_0000 | UInt32(i)), port: 8285))
        }
        routes += [route("10.244.2.0/24", "192.168.0.0"), route("10.244.3.0/24", "192.168.0.1"),
                   route("10.244.2.128/25", "192.168.9.9")]
        let table = RouteTable(routes)
        let counters = DataPlaneCounters()
        var decider = PacketDecider(config: config)

        // Templates, one per outcome, copied into one reusable packet buffer before each decision.
        let tunPackets: [[UInt8]] = [
            makeIPv4(source: ip("10.244.1.2"), destination: ip("10.244.2.200"), payload: filled(1, 1400)),
            makeIPv4(source: ip("10.244.1.2"), destination: ip("10.245.0.1"), proto: 1,
                     payload: makeICMP(type: 8, data: .init(repeating: 2, count: 56))),          // net unreachable
            makeIPv4(source: ip("10.244.1.2"), destination: ip("10.244.3.1"), ttl: 1),           // time exceeded
            [0x60] + [UInt8](repeating: 0, count: 39),                                           // not IPv4
            [0x45, 0, 0, 10] + [UInt8](repeating: 0, count: 16),                                 // malformed
        ]
        let udpPackets: [([UInt8], IPv4Address)] = [
            (makeIPv4(source: ip("10.244.2.5"), destination: ip("10.244.1.2"), payload: filled(3, 1400)),
             ip("192.168.0.0")),
            (makeIPv4(source: ip("10.244.2.5"), destination: ip("10.244.1.2")), ip("192.168.0.1")),  // spoofed
            (makeIPv4(source: ip("10.244.2.5"), destination: ip("10.244.1.2")), ip("172.31.0.1")),   // unknown
            (makeIPv4(source: ip("10.244.2.5"), destination: ip("10.244.1.2"), ttl: 1), ip("192.168.0.0")), // back
        ]
        let packet = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 16)
        let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: 2048, alignment: 16)
        defer { packet.deallocate(); scratch.deallocate() }
        let tunTemplates = tunPackets.map { t -> UnsafeMutableRawBufferPointer in
            let b = UnsafeMutableRawBufferPointer.allocate(byteCount: t.count, alignment: 1)
            b.copyBytes(from: t)
            return b
        }
        let udpTemplates = udpPackets.map { t -> (UnsafeMutableRawBufferPointer, IPv4Address) in
            let b = UnsafeMutableRawBufferPointer.allocate(byteCount: t.0.count, alignment: 1)
            b.copyBytes(from: t.0)
            return (b, t.1)
        }
        defer {
            tunTemplates.forEach { $0.deallocate() }
            udpTemplates.forEach { $0.0.deallocate() }
        }

        var seen = Set<String>()
        func round(record: Bool) {
            let snapshot = table.snapshot()
            // Index loops: `for x in array` allocates in an unoptimised build (the tests' configuration).
            var i = 0
            while i < tunTemplates.count {
                let t = tunTemplates[i]
                i += 1
                packet.copyMemory(from: UnsafeRawBufferPointer(t))
                let v = decider.fromTun(UnsafeMutableRawBufferPointer(rebasing: packet[0..<t.count]),
                                        snapshot: snapshot, scratch: scratch)
                switch v {
                case .forward(let peer, let length):
                    snapshot.peers[peer].counters.countTx(bytes: length)
                    counters.tunToUDPPackets.wrappingIncrement(ordering: .relaxed)
                case .icmpToTun(_, let reason):
                    counters.countDrop(reason)
                    counters.icmpSent.wrappingIncrement(ordering: .relaxed)
                case .drop(let reason, let limited):
                    counters.countDrop(reason)
                    if limited { counters.icmpRateLimited.wrappingIncrement(ordering: .relaxed) }
                }
                if record { seen.insert("\(v)") }
            }
            i = 0
            while i < udpTemplates.count {
                let (t, outer) = udpTemplates[i]
                i += 1
                packet.copyMemory(from: UnsafeRawBufferPointer(t))
                let v = decider.fromUDP(UnsafeMutableRawBufferPointer(rebasing: packet[0..<t.count]),
                                        outerSource: outer, snapshot: snapshot, scratch: scratch)
                switch v {
                case .deliver(let peer, let length):
                    snapshot.peers[peer].counters.countRx(bytes: length)
                case .icmpToPeer(_, let peer, let reason):
                    _ = snapshot.peers[peer].sockaddr
                    counters.countDrop(reason)
                case .drop(let reason, _):
                    counters.countDrop(reason)
                }
                if record { seen.insert("\(v)") }
            }
        }
        round(record: true)  // warm-up (lazy metadata, the clock's first read) and a check of what is covered
        XCTAssertEqual(seen.count, 9, "\(seen.sorted())")
        XCTAssertTrue(seen.contains { $0.hasPrefix("forward") } && seen.contains { $0.hasPrefix("icmpToTun") }
                      && seen.contains { $0.hasPrefix("deliver") } && seen.contains { $0.hasPrefix("icmpToPeer") })

        let n = allocations(repeating: 5000) { round(record: false) }
        XCTAssertEqual(n, 0, "the per-packet decisions allocated \(n) times in 45000 packets")
        XCTAssertGreaterThan(counters.drops(.unknownPeer), 5000)
    }

    /// The offload paths: a 64 KiB super-packet segmented into the send queue (GSO grouping, message vectors),
    /// and a run of segments coalesced into one super-packet, thousands of times, without an allocation.
    func testSegmentationAndCoalescingDoNotAllocate() {
        var spec = TCPPacketSpec()
        spec.payload = patternPayload(65000)
        let template = spec.bytes(partialChecksum: true)
        let packet = UnsafeMutableRawBufferPointer.allocate(byteCount: template.count, alignment: 16)
        defer { packet.deallocate() }
        let queue = SendQueue(capacity: 128, gso: true)
        let name = sockaddr_in()

        var segments: [UInt8] = []
        var lengths: [Int] = []
        var seq = spec.sequence
        for k in 0..<40 {
            var s = spec
            s.payload = patternPayload(k == 39 ? 700 : 1420, seed: UInt8(k))
            s.sequence = seq
            s.identification = spec.identification &+ UInt16(k)
            seq &+= UInt32(s.payload.count)
            let b = s.bytes()
            segments += b
            lengths.append(b.count)
        }
        let received = UnsafeMutableRawBufferPointer.allocate(byteCount: segments.count, alignment: 16)
        defer { received.deallocate() }
        received.copyBytes(from: segments)
        let coalescer = TCPCoalescer()
        let header = UnsafeMutableRawPointer.allocate(byteCount: 16, alignment: 16)
        defer { header.deallocate() }

        var produced = 0
        func round() {
            template.withUnsafeBytes { packet.copyMemory(from: $0) }
            if case .segmented(let n) = TCPSegmenter.segment(packet, gsoSize: 1420, peer: 0, name: name,
                                                               into: queue) {
                produced &+= n
            }
            queue.prepareMessages()
            queue.reset()
            var offset = 0
            var k = 0
            while k < 40 {
                let p = UnsafeMutableRawBufferPointer(rebasing: received[offset..<(offset + lengths[k])])
                if !coalescer.isOpen {
                    coalescer.begin(p)
                } else if !coalescer.append(UnsafeRawBufferPointer(p)) {
                    produced &+= packetLength(of: coalescer.finish(header: header))
                    coalescer.begin(p)
                }
                offset += lengths[k]
                k += 1
            }
            produced &+= packetLength(of: coalescer.finish(header: header))
        }
        round()
        XCTAssertEqual(produced, 46 + 52 + 39 * 1420 + 700)
        let n = allocations(repeating: 2000) { round() }
        XCTAssertEqual(n, 0, "segmentation and coalescing allocated \(n) times")
    }

    /// The receive path with kernel timestamps and CoDel: recvmmsg of a batch over loopback, each datagram's
    /// control messages (arrival time) read, and the CoDel verdict on it, thousands of times without an allocation.
    func testTimestampedReceiveAndCoDelDoNotAllocate() throws {
        let socket = try UDPSocket(bind: Endpoint(address: ip("127.0.0.1"), port: 0))
        defer { socket.close() }
        let options = ForwarderOptions(batchSize: 16)
        let offloads = OffloadState(vnetHeader: false, tso: false, udpGSO: false, udpGRO: false, coalesce: false)
        let io = StageIO(fd: socket.fd, name: "test", counters: DataPlaneCounters(), worker: WorkerCounters(),
                         offloads: offloads, logger: Logger(label: "test"))
        let receiver = try UDPReceiver(io, options: options, timestamps: true)
        // A target of 1 ns: every bulk packet is above it, so the drop schedule runs too.
        let codel = ReceiveCoDel(CoDelParameters(targetNanoseconds: 1, intervalNanoseconds: 1_000,
                                                 bulkBytes: 1_000))
        let sender = Glibc.socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        defer { _ = Glibc.close(sender) }
        var to = sockaddr_in()
        to.sin_family = sa_family_t(AF_INET)
        to.sin_port = socket.localEndpoint.port.bigEndian
        to.sin_addr = in_addr(s_addr: socket.localEndpoint.address.networkOrder)
        let packet = makeIPv4(source: ip("10.244.2.5"), destination: ip("10.244.1.2"), proto: 6,
                              payload: filled(7, 1200))
        var passed = 0, dropped = 0, timestamped = 0
        func round() {
            var k = 0
            while k < 16 {
                _ = packet.withUnsafeBytes { p in
                    withUnsafePointer(to: &to) {
                        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                            sendto(sender, p.baseAddress, p.count, 0, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
                        }
                    }
                }
                k += 1
            }
            guard (try? receiver.receive()) != nil else { return }
            while let d = receiver.next() {
                if d.sojourn > 0 { timestamped += 1 }
                if codel.verdict(d.bytes, sojourn: d.sojourn, now: receiver.batchTime) == .drop {
                    dropped += 1
                } else {
                    passed += 1
                }
            }
        }
        round()
        let n = allocations(repeating: 500) { round() }
        XCTAssertEqual(n, 0, "the timestamped receive and CoDel allocated \(n) times")
        XCTAssertGreaterThan(timestamped, 4000, "datagrams carry their arrival time")
        XCTAssertGreaterThan(dropped, 0)
        XCTAssertGreaterThan(passed, 0)
    }
}
