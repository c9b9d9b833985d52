import XCTest
@testable import FlannelCore
@testable import FlannelUDP
import TestSupport

final class ChecksumTests: XCTestCase {
    /// RFC 1071 section 3's worked example: the folded sum of 00 01 f2 03 f4 f5 f6 f7 is 0xddf2.
    func testRFC1071Example() {
        let bytes: [UInt8] = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]
        bytes.withUnsafeBytes { b in
            XCTAssertEqual(InternetChecksum.fold(InternetChecksum.sum(b)), 0xddf2)
            XCTAssertEqual(InternetChecksum.compute(b), 0x220d)
        }
    }

    func testEmptyAndOddLength() {
        [UInt8]().withUnsafeBytes { XCTAssertEqual(InternetChecksum.compute($0), 0xFFFF) }
        [UInt8]([0xAB]).withUnsafeBytes { XCTAssertEqual(InternetChecksum.compute($0), ~UInt16(0xAB00)) }
        [UInt8]([0x01, 0x02, 0x03]).withUnsafeBytes { XCTAssertEqual(InternetChecksum.compute($0), ~UInt16(0x0402)) }
    }

    /// The eight-bytes-at-a-time sum agrees with the plain word loop for every length 0...300 at every
    /// alignment, including all-0xFF buffers that carry on every addition.
    func testSumMatchesReferenceAtAllLengthsAndAlignments() {
        var rng = SeededRandom(seed: 1071)
        for length in 0...300 {
            for fill in 0..<3 {
                let bytes: [UInt8] = (0..<length).map { _ in
                    fill == 0 ? UInt8.random(in: 0...255, using: &rng) : (fill == 1 ? 0xFF : 0x00)
                }
                for offset in 0..<8 {
                    withMutablePacket(bytes, offset: offset) { buf in
                        XCTAssertEqual(InternetChecksum.compute(UnsafeRawBufferPointer(buf)), referenceChecksum(bytes),
                                       "length \(length) offset \(offset) fill \(fill)")
                    }
                }
            }
        }
    }

    /// Packet-sized buffers (up to a whole 64 KiB super-packet, all 0xFF so every word carries) at odd and even
    /// offsets, summed on top of an `initial` value of every magnitude the callers pass (a pseudo-header sum, a
    /// folded sum, an unfolded 32-bit accumulator), agree with the plain word loop.
    func testLongBuffersWithInitialValuesMatchReference() {
        var rng = SeededRandom(seed: 65535)
        for length in [1431, 1432, 1472, 9001, 32768, 65535, 65536] {
            for fill in 0..<2 {
                let bytes: [UInt8] = (0..<length).map { _ in fill == 0 ? UInt8.random(in: 0...255, using: &rng) : 0xFF }
                for initial: UInt32 in [0, 6, 0xFFFF, 0x1_2345, 0xFFFF_FFFF] {
                    // The reference: the initial value's folded 16 bits as two leading bytes of the data.
                    let folded = InternetChecksum.fold(initial)
                    let expected = referenceChecksum([UInt8(folded >> 8), UInt8(folded & 0xFF)] + bytes)
                    for offset in [0, 1, 3] {
                        withMutablePacket(bytes, offset: offset) { buf in
                            let sum = InternetChecksum.sum(UnsafeRawBufferPointer(buf), initial: initial)
                            XCTAssertEqual(~InternetChecksum.fold(sum), expected,
                                           "length \(length) fill \(fill) initial \(initial) offset \(offset)")
                        }
                    }
                }
            }
        }
    }

    func testFoldCarriesAround() {
        XCTAssertEqual(InternetChecksum.fold(0x0001_FFFF), 0x0001)
        XCTAssertEqual(InternetChecksum.fold(0xFFFF_FFFF), 0xFFFF)
        XCTAssertEqual(InternetChecksum.fold(0), 0)
        XCTAssertEqual(InternetChecksum.fold(0x0002_FFFE), 0x0001)
    }

    /// A header whose checksum field holds `checksum` and that still verifies: the identification field is
    /// chosen to make the one's complement sum of all words come out as 0xFFFF.
    private func header(ttl: UInt8, proto: UInt8, checksum: UInt16, rng: inout SeededRandom) -> [UInt8] {
        var p = makeIPv4(source: IPv4Address(UInt32.random(in: 1...UInt32.max, using: &rng)),
                         destination: IPv4Address(UInt32.random(in: 1...UInt32.max, using: &rng)),
                         proto: proto, ttl: ttl, identification: 0, payload: [])
        p[10] = UInt8(checksum >> 8); p[11] = UInt8(checksum & 0xFF)
        // Sum with id = 0 and the wanted checksum, then pick id = -sum so that the total is -0 (0xFFFF).
        let partial = ~referenceChecksum(p)  // the folded sum
        let id = ~partial
        p[4] = UInt8(id >> 8); p[5] = UInt8(id & 0xFF)
        return p
    }

    private func verifies(_ p: [UInt8]) -> Bool { referenceChecksum(Array(p[0..<20])) == 0 }

    /// RFC 1624: for every TTL and a spread of checksum values, including 0x0000 (+0), 0xFFFF (-0), 0xFFFE and
    /// 0x0001, the incrementally updated header verifies and equals a full recomputation.
    func testTTLDecrementMatchesFullRecomputationForAllTTLs() {
        var rng = SeededRandom(seed: 1624)
        var edges: [UInt16] = [0x0000, 0xFFFF, 0xFFFE, 0x0001, 0x8000, 0x7FFF, 0x0100, 0xFEFF]
        for _ in 0..<24 { edges.append(UInt16.random(in: 0...UInt16.max, using: &rng)) }
        var checked = 0
        for ttl in 1...255 {
            for checksum in edges {
                let proto = UInt8.random(in: 0...255, using: &rng)
                let before = header(ttl: UInt8(ttl), proto: proto, checksum: checksum, rng: &rng)
                XCTAssertTrue(verifies(before))
                for offset in [0, 1] {
                    let (ok, after) = withMutablePacket(before, offset: offset) { IPv4Header.decrementTTL($0) }
                    if ttl == 1 {
                        XCTAssertFalse(ok)
                        XCTAssertEqual(after, before, "a refused decrement leaves the packet untouched")
                        continue
                    }
                    XCTAssertTrue(ok)
                    XCTAssertEqual(after[8], UInt8(ttl - 1))
                    XCTAssertTrue(verifies(after), "ttl \(ttl) checksum \(checksum)")
                    // Full recomputation, over the new header with the checksum field zeroed.
                    var zeroed = after
                    zeroed[10] = 0; zeroed[11] = 0
                    XCTAssertEqual(word(after, 10), referenceChecksum(Array(zeroed[0..<20])),
                                   "ttl \(ttl) old checksum \(String(checksum, radix: 16))")
                    var rest = after
                    rest[8] = before[8]; rest[10] = before[10]; rest[11] = before[11]
                    XCTAssertEqual(rest, before, "only the TTL and the checksum change")
                    checked += 1
                }
            }
        }
        XCTAssertEqual(checked, 254 * edges.count * 2)
    }

    /// TTL 0 is refused too, and an incremental update keeps a wrong checksum exactly as wrong (it never
    /// repairs a corrupted header; the receiver still drops it).
    func testTTLZeroRefusedAndBadChecksumStaysBad() {
        var p = makeIPv4(source: ip("10.244.1.2"), destination: ip("10.244.2.3"), ttl: 0)
        let (ok, same) = withMutablePacket(p) { IPv4Header.decrementTTL($0) }
        XCTAssertFalse(ok)
        XCTAssertEqual(same, p)

        p = makeIPv4(source: ip("10.244.1.2"), destination: ip("10.244.2.3"), ttl: 9)
        p[11] ^= 0x5A
        let error = referenceChecksum(Array(p[0..<20]))
        XCTAssertNotEqual(error, 0)
        let (ok2, after) = withMutablePacket(p) { IPv4Header.decrementTTL($0) }
        XCTAssertTrue(ok2)
        XCTAssertEqual(referenceChecksum(Array(after[0..<20])), error)
    }
}
