import XCTest
import CShims
@testable import FlannelCore
@testable import FlannelUDP
#if canImport(Glibc)
import Glibc
#endif

/// TCP segments merged into super-packets for the tun: byte for byte against a reference super-packet, the
/// checksum verified after completing it the way the kernel does, a round trip through the segmenter, and every
/// rule that must keep packets apart.
final class CoalescingTests: XCTestCase {
    /// `count` consecutive segments of one flow, `size` payload bytes each (the last `lastSize`).
    private func flow(_ count: Int, size: Int = 1420, lastSize: Int? = nil, base: TCPPacketSpec = TCPPacketSpec(),
                      lastFlags: UInt8? = nil) -> ([TCPPacketSpec], [UInt8]) {
        var specs: [TCPPacketSpec] = []
        var all: [UInt8] = []
        var seq = base.sequence
        for k in 0..<count {
            var s = base
            let n = k == count - 1 ? (lastSize ?? size) : size
            s.payload = patternPayload(n, seed: UInt8(k))
            s.sequence = seq
            s.identification = base.identification &+ UInt16(k)
            if k == count - 1, let f = lastFlags { s.flags = f }
            seq &+= UInt32(n)
            all += s.payload
            specs.append(s)
        }
        return (specs, all)
    }

    /// Runs packets through a coalescer the way the UDP -> tun worker does; returns what would be written
    /// (virtio header + packet) in order.
    private func coalesce(_ packets: [[UInt8]]) -> [(VirtioNetHeader, [UInt8])] {
        let c = TCPCoalescer()
        var out: [(VirtioNetHeader, [UInt8])] = []
        let header = UnsafeMutableRawPointer.allocate(byteCount: 16, alignment: 8)
        defer { header.deallocate() }
        // Packets must stay put until the group is finished, like receive buffers.
        let buffers = packets.map { p -> UnsafeMutableRawBufferPointer in
            let b = UnsafeMutableRawBufferPointer.allocate(byteCount: p.count, alignment: 4)
            b.copyBytes(from: p)
            return b
        }
        defer { buffers.forEach { $0.deallocate() } }
        func flush() {
            let pieces = c.finish(header: header)
            XCTAssertEqual(pieces[0].iov_base, header, "the gather list starts with the virtio header")
            XCTAssertEqual(pieces[0].iov_len, VirtioNetHeader.length)
            out.append((VirtioNetHeader(from: header), packetBytes(of: pieces)))
        }
        for b in buffers {
            if c.isOpen {
                if c.append(UnsafeRawBufferPointer(b)) { continue }
                flush()
            }
            if TCPCoalescer.isCandidate(UnsafeRawBufferPointer(b)) {
                c.begin(b)
            } else {
                VirtioNetHeader.none.store(to: header)
                out.append((.none, Array(b)))
            }
        }
        if c.isOpen { flush() }
        return out
    }

    /// Completes a NEEDS_CSUM packet as the kernel would and returns it.
    private func completed(_ header: VirtioNetHeader, _ packet: [UInt8]) -> [UInt8] {
        var p = packet
        if header.needsChecksum {
            XCTAssertTrue(p.withUnsafeMutableBytes {
                InternetChecksum.complete($0, start: Int(header.checksumStart), offset: Int(header.checksumOffset))
            })
        }
        return p
    }

    func testConsecutiveSegmentsBecomeOneSuperPacket() {
        let (specs, payload) = flow(5, lastSize: 333, lastFlags: TCPHeader.ack | TCPHeader.psh)
        let out = coalesce(specs.map { $0.bytes() })
        XCTAssertEqual(out.count, 1)
        let (h, packet) = out[0]
        XCTAssertEqual(h, VirtioNetHeader(flags: 1, gsoType: 1, headerLength: 52, gsoSize: 1420, checksumStart: 20,
                                          checksumOffset: 16))
        // The reference: the first segment's headers, all payload, PSH from the last, the pseudo-header sum
        // in the checksum field.
        var whole = specs[0]
        whole.payload = payload
        whole.flags = TCPHeader.ack | TCPHeader.psh
        XCTAssertEqual(hexString(packet), hexString(whole.bytes(partialChecksum: true)))
        XCTAssertEqual(completed(h, packet), whole.bytes())
        XCTAssertTrue(checksumsVerify(completed(h, packet)))

        // Round trip: segmenting the super-packet again gives back the original segments exactly.
        let q = SendQueue(capacity: 64, gso: false)
        var p = packet
        let outcome = p.withUnsafeMutableBytes {
            TCPSegmenter.segment($0, gsoSize: Int(h.gsoSize), peer: 0, name: sockaddr_in(), into: q)
        }
        XCTAssertEqual(outcome, .segmented(5))
        let again = withExtendedLifetime(p) { (0..<q.segmentCount).map { queuedSegment(q, $0) } }
        XCTAssertEqual(again, specs.map { $0.bytes() })
    }

    func testSingleAndNonTCPPacketsGoAsTheyAreWithZeroHeader() {
        let udp = makeIPv4(source: ip("10.244.2.5"), destination: ip("10.244.1.2"), payload: filled(1, 100))
        let icmp = makeIPv4(source: ip("10.244.2.5"), destination: ip("10.244.1.2"), proto: 1,
                            payload: makeICMP(type: 8, data: filled(2, 56)))
        let (specs, _) = flow(1)
        let out = coalesce([udp, specs[0].bytes(), icmp])
        XCTAssertEqual(out.map { $0.0 }, [.none, .none, .none])
        XCTAssertEqual(out.map { $0.1 }, [udp, specs[0].bytes(), icmp])
    }

    func testInterleavedNonTCPSplitsGroupsAndKeepsOrder() {
        let (specs, _) = flow(4)
        let udp = makeIPv4(source: ip("10.244.2.5"), destination: ip("10.244.1.2"), payload: filled(1, 100))
        let out = coalesce([specs[0].bytes(), specs[1].bytes(), udp, specs[2].bytes(), specs[3].bytes()])
        XCTAssertEqual(out.count, 3)
        XCTAssertEqual(out.map { Int(word($0.1, 2)) }, [52 + 2840, 120, 52 + 2840])
        XCTAssertEqual(out[1].1, udp)
        XCTAssertTrue(out.allSatisfy { $0.1[9] != 6 || checksumsVerify(completed($0.0, $0.1)) })
    }

    /// Each change to the second of two segments that the kernel's GRO would not merge keeps them apart.
    func testRulesThatKeepSegmentsApart() {
        let (specs, _) = flow(2)
        let first = specs[0]
        let cases: [(String, (inout TCPPacketSpec) -> Void)] = [
            ("sequence gap", { $0.sequence &+= 1 }),
            ("acknowledgment", { $0.acknowledgment &+= 1 }),
            ("window", { $0.window &+= 1 }),
            ("timestamp", { $0.tcpOptions = timestampOption(tsval: 0x11223345, tsecr: 0x55667788) }),
            ("timestamp echo (the options' last word)", {
                $0.tcpOptions = timestampOption(tsval: 0x11223344, tsecr: 0x55667789) }),
            ("no options", { $0.tcpOptions = [] }),
            ("source port", { $0.sourcePort &+= 1 }),
            ("destination port", { $0.destinationPort &+= 1 }),
            ("source", { $0.source = ip("10.244.1.3") }),
            ("destination", { $0.destination = ip("10.244.2.6") }),
            ("TTL", { $0.ttl -= 1 }),
            ("TOS (ECN CE)", { $0.tos = 3 }),
            ("DF", { $0.flagsFragment = 0 }),
            ("identification", { $0.identification &+= 1 }),
            ("CWR", { $0.flags |= TCPHeader.cwr }),
            ("ECE", { $0.flags |= TCPHeader.ece }),
            ("FIN", { $0.flags |= TCPHeader.fin }),
            ("SYN", { $0.flags |= TCPHeader.syn }),
            ("RST", { $0.flags |= TCPHeader.rst }),
            ("URG", { $0.flags |= TCPHeader.urg }),
            ("longer", { $0.payload += [0] }),
            ("IP options", { $0.ipOptions = [0x94, 0x04, 0, 0] }),
            ("fragment", { $0.flagsFragment = 0x2000 }),
        ]
        for (what, change) in cases {
            var second = specs[1]
            change(&second)
            let out = coalesce([first.bytes(), second.bytes()])
            XCTAssertEqual(out.count, 2, what)
            XCTAssertEqual(out.map { $0.1 }, [first.bytes(), second.bytes()], what)
        }
        // Regression (fuzz target `gro`): the reserved bits beside the header length (AccECN's AE flag) differ.
        // The kernel's GRO compares them with the flags; merged, the second segment's bits were lost.
        var reserved = specs[1].bytes()
        reserved[32] |= 0x01
        XCTAssertEqual(coalesce([first.bytes(), reserved]).map { $0.1 }, [first.bytes(), reserved], "reserved bits")
        // The control: unchanged, they merge.
        XCTAssertEqual(coalesce([first.bytes(), specs[1].bytes()]).count, 1)
        // IP options on the first: never a group.
        var withOptions = first
        withOptions.ipOptions = [0x94, 0x04, 0, 0]
        XCTAssertFalse(withOptions.bytes().withUnsafeBytes { TCPCoalescer.isCandidate($0) })
        // No payload (a pure ACK): never a group.
        var ack = first
        ack.payload = []
        XCTAssertFalse(ack.bytes().withUnsafeBytes { TCPCoalescer.isCandidate($0) })
    }

    func testShortSegmentOrPSHEndsTheGroupAndCWROnlyOnTheFirst() {
        // A short segment closes: the next full one starts a new group.
        var (specs, _) = flow(4)
        specs[1].payload = patternPayload(1000)
        specs[2].sequence = specs[1].sequence &+ 1000
        specs[3].sequence = specs[2].sequence &+ 1420
        XCTAssertEqual(coalesce(specs.map { $0.bytes() }).map { $0.0.gsoType }, [1, 1])
        XCTAssertEqual(coalesce(specs.map { $0.bytes() }).map { Int(word($0.1, 2)) }, [52 + 2420, 52 + 2840])
        // PSH in the middle closes after that segment; PSH is set on the result.
        var (p, _) = flow(3)
        p[1].flags |= TCPHeader.psh
        let out = coalesce(p.map { $0.bytes() })
        XCTAssertEqual(out.count, 2)
        XCTAssertEqual(out[0].1[33], TCPHeader.ack | TCPHeader.psh)
        XCTAssertEqual(out[1].1, p[2].bytes())
        // CWR on the first segment is kept and the group goes on.
        var (c, _) = flow(3)
        c[0].flags |= TCPHeader.cwr
        let cw = coalesce(c.map { $0.bytes() })
        XCTAssertEqual(cw.count, 1)
        XCTAssertEqual(cw[0].1[33], TCPHeader.ack | TCPHeader.cwr)
    }

    func testAtMost64SegmentsAnd65535Bytes() {
        let (small, _) = flow(100, size: 200)
        let out = coalesce(small.map { $0.bytes() })
        XCTAssertEqual(out.count, 2)
        XCTAssertEqual(out.map { (Int(word($0.1, 2)) - 52) / 200 }, [64, 36])
        let (big, _) = flow(50, size: 1420)
        let bigOut = coalesce(big.map { $0.bytes() })
        XCTAssertTrue(bigOut.allSatisfy { $0.1.count <= 65535 })
        XCTAssertEqual(bigOut.map { (Int(word($0.1, 2)) - 52) / 1420 }, [46, 4])
        for (h, p) in bigOut { XCTAssertTrue(checksumsVerify(completed(h, p))) }
    }
}
