import XCTest
import CShims
@testable import FlannelCore
@testable import FlannelUDP
#if canImport(Glibc)
import Glibc
#endif

/// TSO super-packets cut into whole IPv4 packets, byte for byte against reference segments built field by field,
/// and the send queue's UDP GSO grouping.
final class SegmentationTests: XCTestCase {
    private let peerName = sockaddr_in()

    /// Segments `template` (a super-packet) at `gsoSize` into a fresh queue and returns the segments' bytes.
    private func segment(_ template: [UInt8], gsoSize: Int, gso: Bool = true, capacity: Int = 256)
        -> (TCPSegmenter.Outcome, [[UInt8]], SendQueue) {
        let q = SendQueue(capacity: capacity, gso: gso)
        var packet = template
        let outcome = packet.withUnsafeMutableBytes {
            TCPSegmenter.segment($0, gsoSize: gsoSize, peer: 0, name: peerName, into: q)
        }
        // The payload stays in `packet` (not copied): read the segments while it is alive.
        let segments = withExtendedLifetime(packet) { (0..<q.segmentCount).map { queuedSegment(q, $0) } }
        return (outcome, segments, q)
    }

    /// The segments the kernel's tcp_gso_segment would produce from `spec` at `gsoSize`.
    private func reference(_ spec: TCPPacketSpec, gsoSize: Int) -> [[UInt8]] {
        let chunks = stride(from: 0, to: max(spec.payload.count, 1), by: gsoSize).map {
            Array(spec.payload[$0..<min($0 + gsoSize, spec.payload.count)])
        }
        return chunks.enumerated().map { k, chunk in
            var s = spec
            s.payload = chunk
            s.identification = spec.identification &+ UInt16(k)
            s.sequence = spec.sequence &+ UInt32(k * gsoSize)
            var f = spec.flags
            if k != chunks.count - 1 { f &= ~(TCPHeader.fin | TCPHeader.psh) }
            if k != 0 { f &= ~TCPHeader.cwr }
            s.flags = f
            return s.bytes()
        }
    }

    func testSuperPacketBecomesReferenceSegmentsWithShortLastOne() {
        var spec = TCPPacketSpec()
        spec.payload = patternPayload(4001)  // 1420 + 1420 + 1161 at the MSS of a 1472-byte tun with timestamps
        spec.flags = TCPHeader.ack | TCPHeader.psh | TCPHeader.fin | TCPHeader.cwr
        let (outcome, segments, _) = segment(spec.bytes(partialChecksum: true), gsoSize: 1420)
        XCTAssertEqual(outcome, .segmented(3))
        let expected = reference(spec, gsoSize: 1420)
        XCTAssertEqual(segments.count, 3)
        for (k, s) in segments.enumerated() {
            XCTAssertEqual(hexString(s), hexString(expected[k]), "segment \(k)")
            XCTAssertTrue(checksumsVerify(s), "segment \(k)")
            XCTAssertLessThanOrEqual(s.count, 1472)
        }
        // FIN and PSH only on the last, CWR only on the first.
        XCTAssertEqual(segments.map { $0[20 + 13] }, [TCPHeader.ack | TCPHeader.cwr, TCPHeader.ack,
                                                      TCPHeader.ack | TCPHeader.psh | TCPHeader.fin])
        // Sequence numbers wrap around 2^32 here.
        XCTAssertEqual(segments.map { UInt32(word($0, 24)) << 16 | UInt32(word($0, 26)) },
                       [0xFFFF_F000, 0xFFFF_F000 &+ 1420, 0xFFFF_F000 &+ 2840])
    }

    func testOddSizesExactMultiplesAndSmallPackets() {
        for (payload, gsoSize) in [(2840, 1420), (1, 1420), (1420, 1420), (999, 7), (65495 - 32, 1448), (3, 1),
                                   (0, 1420)] {
            var spec = TCPPacketSpec()
            spec.payload = patternPayload(payload, seed: UInt8(truncatingIfNeeded: payload))
            spec.identification = 0xFFFE  // wraps
            let (outcome, segments, _) = segment(spec.bytes(), gsoSize: gsoSize, capacity: 1100)
            let expected = reference(spec, gsoSize: gsoSize)
            XCTAssertEqual(outcome, .segmented(expected.count), "\(payload)/\(gsoSize)")
            XCTAssertEqual(segments, expected, "\(payload)/\(gsoSize)")
            XCTAssertTrue(segments.allSatisfy(checksumsVerify), "\(payload)/\(gsoSize)")
        }
    }

    func testIPOptionsAreCopiedIntoEverySegment() {
        var spec = TCPPacketSpec()
        spec.ipOptions = [0x94, 0x04, 0x00, 0x00]  // router alert
        spec.tcpOptions = []
        spec.payload = patternPayload(3000)
        let (outcome, segments, _) = segment(spec.bytes(), gsoSize: 1000)
        XCTAssertEqual(outcome, .segmented(3))
        XCTAssertEqual(segments, reference(spec, gsoSize: 1000))
        XCTAssertTrue(segments.allSatisfy { $0[0] == 0x46 && checksumsVerify($0) })
    }

    func testNotSegmentable() {
        let udp = makeIPv4(source: ip("10.244.1.2"), destination: ip("10.244.2.5"), payload: filled(1, 3000))
        XCTAssertEqual(segment(udp, gsoSize: 1400).0, .invalid)
        var fragment = TCPPacketSpec()
        fragment.flagsFragment = 0x2000  // MF
        fragment.payload = filled(1, 3000)
        XCTAssertEqual(segment(fragment.bytes(), gsoSize: 1400).0, .invalid)
        var spec = TCPPacketSpec()
        spec.payload = filled(1, 3000)
        XCTAssertEqual(segment(spec.bytes(), gsoSize: 0).0, .invalid)
        var truncated = spec.bytes()
        truncated.removeLast()  // total length says one byte more than there is
        XCTAssertEqual(segment(truncated, gsoSize: 1400).0, .invalid)
        XCTAssertEqual(segment(spec.bytes(), gsoSize: 10, capacity: 100).0, .tooManySegments)
    }

    func testCompletesPartialChecksums() {
        var spec = TCPPacketSpec()
        spec.payload = patternPayload(777)
        var packet = spec.bytes(partialChecksum: true)
        XCTAssertFalse(checksumsVerify(packet))
        let ok = packet.withUnsafeMutableBytes { InternetChecksum.complete($0, start: 20, offset: 16) }
        XCTAssertTrue(ok)
        XCTAssertEqual(packet, spec.bytes())
        // UDP: partial pseudo-header sum in the field, completed over header and data.
        var udp = makeIPv4(source: ip("10.244.1.2"), destination: ip("10.244.2.5"),
                           payload: [0x9c, 0x40, 0x00, 0x35, 0x00, 0x0d, 0, 0, 1, 2, 3, 4, 5])
        let pseudo = Array(udp[12..<20]) + [0, 17, 0, 13]
        put16(&udp, 26, ~referenceChecksum(pseudo))
        XCTAssertTrue(udp.withUnsafeMutableBytes { InternetChecksum.complete($0, start: 20, offset: 6) })
        XCTAssertTrue(checksumsVerify(udp))
        // Offsets outside the packet are refused and change nothing.
        let before = udp
        XCTAssertFalse(udp.withUnsafeMutableBytes { InternetChecksum.complete($0, start: 20, offset: 40) })
        XCTAssertFalse(udp.withUnsafeMutableBytes { InternetChecksum.complete($0, start: 4, offset: 0) })
        XCTAssertEqual(udp, before)
    }

    func testVirtioHeaderLayout() {
        let h = VirtioNetHeader(flags: 1, gsoType: 1, headerLength: 0x0102, gsoSize: 1420, checksumStart: 20,
                                checksumOffset: 16)
        var raw = [UInt8](repeating: 0xEE, count: 10)
        raw.withUnsafeMutableBytes { h.store(to: $0.baseAddress!) }
        XCTAssertEqual(raw, [1, 1, 0x02, 0x01, 0x8c, 0x05, 20, 0, 16, 0])
        XCTAssertEqual(raw.withUnsafeBytes { VirtioNetHeader(from: $0.baseAddress!) }, h)
        XCTAssertEqual(VirtioNetHeader.length, 10)
    }

    // MARK: UDP GSO grouping

    func testGSOGroupsRunsOfEqualSegmentsPerPeerWithinKernelLimits() {
        var spec = TCPPacketSpec()
        spec.payload = patternPayload(60000)  // 43 segments of 1420 (1472 bytes each) and one of 360
        let (_, segments, q) = segment(spec.bytes(), gsoSize: 1420)
        XCTAssertEqual(segments.count, 43)
        q.prepareMessages()
        // 65507 / 1472 = 44 full segments fit in one GSO send: all 43 go in one message.
        XCTAssertEqual(q.messageCount, 1)
        XCTAssertEqual(q.messageSegments[0], 43)
        XCTAssertEqual(q.messageSegmentSize[0], 1472)
        XCTAssertEqual(q.messageBytes[0], segments.reduce(0) { $0 + $1.count })
        let msg = q.msgs[0].msg_hdr
        XCTAssertEqual(msg.msg_iovlen, 86)
        let c = fu_cmsg_firsthdr(&q.msgs[0].msg_hdr)!
        XCTAssertEqual(c.pointee.cmsg_level, Int32(FU_SOL_UDP))
        XCTAssertEqual(c.pointee.cmsg_type, Int32(FU_UDP_SEGMENT))
        XCTAssertEqual(UnsafeRawPointer(fu_cmsg_data(c)!).loadUnaligned(as: UInt16.self), 1472)

        // Byte limit: 65507 bytes hold 44 segments of 1472; the 45th starts a new message.
        let big = SendQueue(capacity: 200, gso: true)
        let slab = UnsafeMutableRawPointer.allocate(byteCount: 1472, alignment: 8)
        defer { slab.deallocate() }
        for _ in 0..<100 { big.append(peer: 1, name: peerName, first: slab, firstLength: 1472) }
        XCTAssertEqual((0..<big.messageCount).map { big.messageSegments[$0] }, [44, 44, 12])
        // Segment limit: 64 small segments per message.
        let small = SendQueue(capacity: 200, gso: true)
        for _ in 0..<130 { small.append(peer: 1, name: peerName, first: slab, firstLength: 100) }
        XCTAssertEqual((0..<small.messageCount).map { small.messageSegments[$0] }, [64, 64, 2])
        // A shorter segment ends a run; a longer one, or another peer, starts a new one.
        let mixed = SendQueue(capacity: 20, gso: true)
        for (peer, len) in [(1, 1000), (1, 1000), (1, 500), (1, 500), (2, 500), (2, 600), (2, 600), (1, 600)] {
            mixed.append(peer: peer, name: peerName, first: slab, firstLength: len)
        }
        XCTAssertEqual((0..<mixed.messageCount).map { mixed.messageSegments[$0] }, [3, 1, 1, 2, 1])
        XCTAssertEqual((0..<mixed.messageCount).map { mixed.messagePeer[$0] }, [1, 1, 2, 2, 1])
        // Without GSO: one message per segment.
        let plain = SendQueue(capacity: 20, gso: false)
        for _ in 0..<5 { plain.append(peer: 1, name: peerName, first: slab, firstLength: 1000) }
        XCTAssertEqual(plain.messageCount, 5)
    }

    func testSplittingMessagesWhenTheKernelRefusesGSO() {
        let q = SendQueue(capacity: 20, gso: true)
        let slab = UnsafeMutableRawPointer.allocate(byteCount: 1000, alignment: 8)
        defer { slab.deallocate() }
        var names = [sockaddr_in](repeating: sockaddr_in(), count: 3)
        for i in 0..<3 { names[i].sin_port = UInt16(8000 + i).bigEndian }
        for (peer, len) in [(0, 1000), (0, 1000), (1, 900), (1, 900), (1, 100), (2, 50)] {
            q.append(peer: peer, name: names[peer], first: slab, firstLength: len)
        }
        XCTAssertEqual((0..<q.messageCount).map { q.messageSegments[$0] }, [2, 3, 1])
        q.prepareMessages()
        // The first message went out; the kernel refused the second: split from there on.
        XCTAssertEqual(q.splitMessages(from: 1), 4)
        q.prepareMessages(from: 1)
        XCTAssertFalse(q.gso)
        XCTAssertEqual(q.messageCount, 5)
        XCTAssertEqual((0..<5).map { q.messageSegments[$0] }, [2, 1, 1, 1, 1])
        XCTAssertEqual((0..<5).map { q.messagePeer[$0] }, [0, 1, 1, 1, 2])
        XCTAssertEqual((0..<5).map { q.messageBytes[$0] }, [2000, 900, 900, 100, 50])
        XCTAssertEqual((0..<5).map { UInt16(bigEndian: q.names[$0].sin_port) }, [8000, 8001, 8001, 8001, 8002])
        XCTAssertEqual((1..<5).map { q.msgs[$0].msg_hdr.msg_controllen }, [0, 0, 0, 0])
        XCTAssertEqual((1..<5).map { q.msgs[$0].msg_hdr.msg_iovlen }, [1, 1, 1, 1])
        XCTAssertEqual(q.msgs[0].msg_hdr.msg_iovlen, 2)
    }
}
