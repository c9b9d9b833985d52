import XCTest
@testable import FlannelCore
@testable import FlannelUDP

final class IPv4Tests: XCTestCase {
    func testParseAddress() {
        XCTAssertEqual(IPv4Address("10.244.1.0")?.value, 0x0AF4_0100)
        XCTAssertEqual(IPv4Address("255.255.255.255")?.value, UInt32.max)
        XCTAssertEqual(IPv4Address("0.0.0.0")?.value, 0)
        for bad in ["", "1.2.3", "1.2.3.4.5", "256.1.1.1", "01.1.1.1", "1..2.3", "a.b.c.d", "1.2.3.4 ", " 1.2.3.4",
                    "1.2.3.", ".1.2.3", "1.2.3.1000", "-1.2.3.4"] {
            XCTAssertNil(IPv4Address(bad), bad)
        }
        XCTAssertEqual(IPv4Address(10, 244, 1, 0).description, "10.244.1.0")
    }

    func testParseNetwork() throws {
        let n = try IPv4Network(parsing: "10.244.0.0/16")
        XCTAssertEqual(n.prefixLength, 16)
        XCTAssertTrue(n.contains(IPv4Address("10.244.255.1")!))
        XCTAssertFalse(n.contains(IPv4Address("10.245.0.1")!))
        XCTAssertTrue(n.contains(try IPv4Network(parsing: "10.244.1.0/24")))
        XCTAssertFalse(try IPv4Network(parsing: "10.244.1.0/24").contains(n))
        XCTAssertEqual(try IPv4Network(parsing: "10.244.1.0/24").firstHost.description, "10.244.1.1")
        XCTAssertEqual(try IPv4Network(parsing: "0.0.0.0/0").mask, 0)
        XCTAssertThrowsError(try IPv4Network(parsing: "10.244.1.5/16")) { error in
            XCTAssertEqual(error as? IPv4Network.ParseError, .hostBitsSet("10.244.1.5/16", network: "10.244.0.0/16"))
        }
        XCTAssertEqual(try IPv4Network(parsing: "10.244.1.5/16", strict: false).address.description, "10.244.0.0")
        for bad in ["10.244.0.0", "10.244.0.0/", "10.244.0.0/33", "10.244.0.0/-1", "10.244.0.0/016", "x/8",
                    "10.244.0.0/16/1", "10.244.0.0/ 8"] {
            XCTAssertThrowsError(try IPv4Network(parsing: bad), bad)
        }
    }

    func testParseEndpoint() throws {
        XCTAssertEqual(try Endpoint(parsing: "192.168.1.2", defaultPort: 8285).description, "192.168.1.2:8285")
        XCTAssertEqual(try Endpoint(parsing: "192.168.1.2:9000", defaultPort: 8285).port, 9000)
        for bad in ["192.168.1.2:0", "192.168.1.2:65536", "192.168.1.2:", "host:80", "192.168.1.2:+80"] {
            XCTAssertThrowsError(try Endpoint(parsing: bad, defaultPort: 8285), bad)
        }
    }
}
