import XCTest
@testable import FlannelCore
@testable import FlannelUDP

/// Reference packets below were built by hand from RFC 791/792 (header fields written out, checksums computed
/// independently of this code base).
final class ICMPTests: XCTestCase {
    /// An echo request 10.244.1.2 -> 10.244.7.9, TTL 64, id 0xbeef, DF, 8 bytes of data.
    static let echoRequest = hexBytes(
        "45000024beef400040015df70af401020af40709" + "08005435123400016162636465666768")

    private func build(_ error: ICMPError, _ original: [UInt8], source: IPv4Address, id: UInt16,
                       capacity: Int = 576) -> [UInt8] {
        guard case .valid(let p) = original.withUnsafeBytes({ IPv4Packet.parse($0) }) else {
            XCTFail("reference packet does not parse")
            return []
        }
        let out = UnsafeMutableRawBufferPointer.allocate(byteCount: capacity, alignment: 8)
        defer { out.deallocate() }
        let n = original.withUnsafeBytes { error.build(about: p, $0, source: source, identification: id, into: out) }
        return Array(out[0..<n])
    }

    func testNetUnreachableByteExact() {
        let got = build(.netUnreachable, Self.echoRequest, source: ip("10.244.0.0"), id: 0)
        XCTAssertEqual(hexString(got),
                       "45c0004000000000400163140af400000af40102" + "0300fcff00000000" +
                       "45000024beef400040015df70af401020af4070908005435123400016162636465666768")
    }

    func testTimeExceededByteExact() {
        // UDP 10.244.2.5:40000 -> 10.244.1.9:53 with TTL 1, id 0x0102, "ping".
        let udp = hexBytes("450000200102000001119fd60af402050af401099c400035000c000070696e67")
        let got = build(.timeExceeded, udp, source: ip("10.244.1.0"), id: 7)
        XCTAssertEqual(hexString(got),
                       "45c0003c000700004001610e0af401000af40205" + "0b0079ad00000000" +
                       "450000200102000001119fd60af402050af401099c400035000c000070696e67")
    }

    /// A 1000-byte packet: the error quotes its first 548 bytes so the whole message is exactly 576 bytes.
    func testQuoteIsCutAt576Bytes() {
        let payload = [0x00, 0x01, 0x00, 0x02, 0x03, 0xD4, 0x00, 0x00] + (0..<972).map { UInt8($0 % 251) }
        let big = makeIPv4(source: ip("10.244.1.3"), destination: ip("10.244.9.1"), proto: 17, ttl: 30,
                           identification: 0x4242, payload: payload)
        XCTAssertEqual(big.count, 1000)
        let got = build(.netUnreachable, big, source: ip("10.244.0.0"), id: 0)
        XCTAssertEqual(got.count, 576)
        XCTAssertEqual(word(got, 2), 576)
        XCTAssertEqual(word(got, 10), 0x6113)
        XCTAssertEqual(word(got, 22), 0xa6cd)
        XCTAssertEqual(Array(got[28...]), Array(big[0..<548]))
        XCTAssertEqual(referenceChecksum(Array(got[0..<20])), 0)
        XCTAssertEqual(referenceChecksum(Array(got[20...])), 0)
    }

    func testTooSmallBufferBuildsNothing() {
        XCTAssertEqual(build(.netUnreachable, Self.echoRequest, source: ip("10.244.0.0"), id: 0, capacity: 63), [])
        XCTAssertEqual(build(.netUnreachable, Self.echoRequest, source: ip("10.244.0.0"), id: 0, capacity: 64).count,
                       64)
    }

    private func mayReport(_ bytes: [UInt8]) -> Bool {
        guard case .valid(let p) = bytes.withUnsafeBytes({ IPv4Packet.parse($0) }) else { return false }
        return bytes.withUnsafeBytes { ICMPError.mayReport(p, $0) }
    }

    func testNeverAboutICMPErrorsButAboutQueries() {
        let src = ip("10.244.1.2"), dst = ip("10.244.7.9")
        for type: UInt8 in 0...40 {
            let pkt = makeIPv4(source: src, destination: dst, proto: 1, payload: makeICMP(type: type))
            let isError = [3, 4, 5, 11, 12].contains(type)
            XCTAssertEqual(mayReport(pkt), !isError, "ICMP type \(type)")
        }
        // ICMP with no type byte: silent.
        XCTAssertFalse(mayReport(makeIPv4(source: src, destination: dst, proto: 1, payload: [])))
        // Other protocols: yes.
        XCTAssertTrue(mayReport(makeIPv4(source: src, destination: dst, proto: 6, payload: [])))
    }

    func testNeverAboutNonFirstFragments() {
        let src = ip("10.244.1.2"), dst = ip("10.244.7.9")
        XCTAssertTrue(mayReport(makeIPv4(source: src, destination: dst, flagsFragment: 0x2000)))  // MF, offset 0
        XCTAssertTrue(mayReport(makeIPv4(source: src, destination: dst, flagsFragment: 0x4000)))  // DF
        XCTAssertFalse(mayReport(makeIPv4(source: src, destination: dst, flagsFragment: 0x2001)))
        XCTAssertFalse(mayReport(makeIPv4(source: src, destination: dst, flagsFragment: 0x00B9)))  // last fragment
        // A non-first fragment of an echo request: its first bytes are not an ICMP header at all.
        XCTAssertFalse(mayReport(makeIPv4(source: src, destination: dst, proto: 1, flagsFragment: 0x0010,
                                          payload: [8, 0, 0, 0])))
    }

    func testNeverToSourcesThatAreNotAHostOrToGroupDestinations() {
        let dst = ip("10.244.7.9")
        for bad in ["0.0.0.0", "0.1.2.3", "127.0.0.1", "127.255.255.254", "224.0.0.1", "239.1.2.3", "240.0.0.1",
                    "255.255.255.255"] {
            XCTAssertFalse(mayReport(makeIPv4(source: ip(bad), destination: dst)), bad)
        }
        for good in ["1.0.0.0", "10.244.1.2", "126.255.255.255", "128.0.0.0", "223.255.255.255", "192.168.1.1"] {
            XCTAssertTrue(mayReport(makeIPv4(source: ip(good), destination: dst)), good)
        }
        for group in ["224.0.0.251", "239.255.255.250", "255.255.255.255"] {
            XCTAssertFalse(mayReport(makeIPv4(source: ip("10.244.1.2"), destination: ip(group))), group)
        }
    }

    func testRateLimiterTokenBucket() {
        final class FakeClock: @unchecked Sendable { var now: UInt64 = 5_000_000_000 }
        let clock = FakeClock()
        var limiter = ICMPRateLimiter(ratePerSecond: 1000, burst: 50, clock: { clock.now })
        // A burst of 50, then nothing at the same instant.
        for i in 0..<50 { XCTAssertTrue(limiter.allow(), "token \(i)") }
        XCTAssertFalse(limiter.allow())
        // 0.9 ms later: still nothing; at 1 ms exactly one.
        clock.now += 900_000
        XCTAssertFalse(limiter.allow())
        clock.now += 100_000
        XCTAssertTrue(limiter.allow())
        XCTAssertFalse(limiter.allow())
        // 10.5 ms later: 10 tokens, and the half millisecond is not lost.
        clock.now += 10_500_000
        for _ in 0..<10 { XCTAssertTrue(limiter.allow()) }
        XCTAssertFalse(limiter.allow())
        clock.now += 500_000
        XCTAssertTrue(limiter.allow())
        // A long idle period refills only up to the burst.
        clock.now += 60_000_000_000
        var granted = 0
        while limiter.allow() { granted += 1 }
        XCTAssertEqual(granted, 50)
        // Over one simulated second of constant demand, about 1000 pass (plus the burst at the start).
        granted = 0
        for _ in 0..<10_000 {
            clock.now += 100_000
            if limiter.allow() { granted += 1 }
        }
        XCTAssertEqual(granted, 1000)
    }

    /// The limiter reads its clock only when asked for a token, i.e. only when an ICMP error is about to be built.
    func testRateLimiterReadsClockOnlyWhenAsked() {
        final class CountingClock: @unchecked Sendable { var reads = 0 }
        let c = CountingClock()
        var limiter = ICMPRateLimiter(clock: { c.reads += 1; return 0 })
        XCTAssertEqual(c.reads, 1)  // initialisation
        _ = limiter.allow()
        XCTAssertEqual(c.reads, 2)
    }
}
