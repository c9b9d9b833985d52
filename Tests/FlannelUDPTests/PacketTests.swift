import XCTest
@testable import FlannelCore
@testable import FlannelUDP

final class PacketTests: XCTestCase {
    private func parse(_ bytes: [UInt8], offset: Int = 0) -> IPv4Packet.Parse {
        withMutablePacket(bytes, offset: offset) { IPv4Packet.parse(UnsafeRawBufferPointer($0)) }.0
    }

    func testValidPacketFieldsAtAnyAlignment() {
        let p = makeIPv4(source: ip("10.244.1.2"), destination: ip("10.244.2.3"), proto: 6, ttl: 17,
                         identification: 0xBEEF, flagsFragment: 0x2000 | 5, payload: [UInt8](repeating: 7, count: 33))
        for offset in 0..<4 {
            XCTAssertEqual(parse(p, offset: offset), .valid(IPv4Packet(
                headerLength: 20, totalLength: 53, ttl: 17, proto: 6, flagsFragment: 0x2005,
                source: ip("10.244.1.2"), destination: ip("10.244.2.3"))))
        }
        if case .valid(let v) = parse(p) { XCTAssertEqual(v.fragmentOffset, 5) } else { XCTFail() }
    }

    func testHeaderWithOptions() {
        var p = makeIPv4(source: ip("10.0.0.1"), destination: ip("10.0.0.2"), payload: [])
        // IHL 6: 4 bytes of options (NOP NOP NOP EOL) and no payload.
        p[0] = 0x46
        p += [1, 1, 1, 0]
        p[3] = 24
        guard case .valid(let v) = parse(p) else { return XCTFail() }
        XCTAssertEqual(v.headerLength, 24)
        XCTAssertEqual(v.totalLength, 24)
    }

    func testPaddingAfterTotalLengthIsAllowed() {
        let p = makeIPv4(source: ip("10.0.0.1"), destination: ip("10.0.0.2"), payload: [1, 2])
        guard case .valid(let v) = parse(p + [0, 0, 0, 0]) else { return XCTFail() }
        XCTAssertEqual(v.totalLength, 22)
    }

    func testRejections() {
        let good = makeIPv4(source: ip("10.0.0.1"), destination: ip("10.0.0.2"), payload: [1, 2, 3, 4])
        XCTAssertEqual(parse([]), .invalid(.malformed))
        // IPv6 (version 6) and garbage versions are not IPv4.
        var v6 = [UInt8](repeating: 0, count: 40); v6[0] = 0x60
        XCTAssertEqual(parse(v6), .invalid(.notIPv4))
        var v0 = good; v0[0] = 0x05
        XCTAssertEqual(parse(v0), .invalid(.notIPv4))
        // IHL below 5.
        for ihl: UInt8 in 0...4 {
            var b = good; b[0] = 0x40 | ihl
            XCTAssertEqual(parse(b), .invalid(.malformed), "ihl \(ihl)")
        }
        // Header longer than what was read: IHL 15 (60 bytes) in a 24-byte read; and a 19-byte read.
        var long = good; long[0] = 0x4F
        XCTAssertEqual(parse(long), .invalid(.malformed))
        XCTAssertEqual(parse(Array(good[0..<19])), .invalid(.malformed))
        // Total length below the header length, and above the bytes read.
        var short = good; short[2] = 0; short[3] = 19
        XCTAssertEqual(parse(short), .invalid(.malformed))
        var over = good; over[3] = 25
        XCTAssertEqual(parse(over), .invalid(.malformed))
        XCTAssertEqual(parse(Array(good[0..<23])), .invalid(.malformed))
        // Exactly the header: fine.
        var bare = Array(good[0..<20]); bare[3] = 20
        if case .valid = parse(bare) {} else { XCTFail("a header-only packet is valid") }
    }
}
