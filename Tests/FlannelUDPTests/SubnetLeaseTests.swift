import XCTest
@testable import FlannelCore
@testable import FlannelUDP

/// Lease values and keys exactly as flannel writes and reads them.
final class SubnetLeaseTests: XCTestCase {
    func testUDPValueIsFlannelsBytes() {
        // flannel's udp backend sets only PublicIP; Go writes PublicIPv6 as null and omits the empty rest.
        XCTAssertEqual(LeaseAttributes.udp(publicIP: IPv4Address(192, 168, 1, 2)).json,
                       #"{"PublicIP":"192.168.1.2","PublicIPv6":null}"#)
    }

    func testValueWithAllFieldsKeepsGoFieldOrder() throws {
        let a = LeaseAttributes(publicIP: IPv4Address(10, 0, 0, 1), publicIPv6: "fd00::1", backendType: "vxlan",
                                backendData: .object(["VNI": .number(1), "VtepMAC": .string("aa:bb:cc:dd:ee:ff")]))
        XCTAssertEqual(a.json,
                       #"{"PublicIP":"10.0.0.1","PublicIPv6":"fd00::1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}}"#)
        XCTAssertEqual(try LeaseAttributes(json: a.json), a)
    }

    func testStringsAreEscapedAsGoEscapesThem() throws {
        // Go's encoding/json leaves "/" alone (Foundation's default would write "\/") and escapes quotes.
        let a = LeaseAttributes(publicIP: IPv4Address(10, 0, 0, 1), publicIPv6: nil, backendType: #"a/b"c"#)
        XCTAssertEqual(a.json, #"{"PublicIP":"10.0.0.1","PublicIPv6":null,"BackendType":"a/b\"c"}"#)
        XCTAssertEqual(try LeaseAttributes(json: a.json), a)
    }

    func testReadsFlannelValues() throws {
        // Current udp node.
        let udp = try LeaseAttributes(json: #"{"PublicIP":"192.168.1.2","PublicIPv6":null}"#)
        XCTAssertEqual(udp.publicIP.description, "192.168.1.2")
        XCTAssertNil(udp.publicIPv6)
        XCTAssertNil(udp.backendType)
        // Written before IPv6 support, with an explicit BackendType.
        let old = try LeaseAttributes(json: #"{"PublicIP":"10.1.2.3","BackendType":"udp"}"#)
        XCTAssertEqual(old.publicIP.description, "10.1.2.3")
        XCTAssertEqual(old.backendType, "udp")
        // A vxlan node (what a mixed or migrating cluster has in the registry).
        let vxlan = try LeaseAttributes(json: """
            {"PublicIP":"10.1.2.4","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"6e:2f:3a:aa:01:02"}}
            """)
        XCTAssertEqual(vxlan.backendType, "vxlan")
        XCTAssertEqual(vxlan.backendData, .object(["VNI": .number(1), "VtepMAC": .string("6e:2f:3a:aa:01:02")]))
        // Dual stack, with v6 backend data.
        let dual = try LeaseAttributes(json: """
            {"PublicIP":"10.1.2.5","PublicIPv6":"fd00::5","BackendType":"vxlan","BackendData":{"VNI":1},"BackendV6Data":{"VNI":1}}
            """)
        XCTAssertEqual(dual.publicIPv6, "fd00::5")
        XCTAssertEqual(dual.backendV6Data, .object(["VNI": .number(1)]))
        // Go's decoder matches keys case-insensitively.
        XCTAssertEqual(try LeaseAttributes(json: #"{"publicip":"10.9.9.9"}"#).publicIP.description, "10.9.9.9")
    }

    func testRefusesValuesWithoutUsableAddress() {
        for bad in ["", "null", "[]", "{}", #"{"PublicIP":null}"#, #"{"PublicIP":"fd00::1"}"#, #"{"PublicIP":17}"#,
                    #"{"PublicIP":"10.0.0.256"}"#, "{\"PublicIP\":\"10.0.0.1\""] {
            XCTAssertThrowsError(try LeaseAttributes(json: bad), bad)
        }
    }

    func testKeyFormatting() throws {
        let subnet = try IPv4Network(parsing: "10.244.1.0/24")
        XCTAssertEqual(SubnetKey.name(for: subnet), "10.244.1.0-24")
        XCTAssertEqual(SubnetKey.key(prefix: "/coreos.com/network", subnet: subnet),
                       "/coreos.com/network/subnets/10.244.1.0-24")
    }

    func testKeyParsing() throws {
        XCTAssertEqual(SubnetKey.parse("/coreos.com/network/subnets/10.244.1.0-24"),
                       try IPv4Network(parsing: "10.244.1.0/24"))
        XCTAssertEqual(SubnetKey.parse("10.244.1.128-25"), try IPv4Network(parsing: "10.244.1.128/25"))
        // Dual-stack keys carry the IPv6 subnet after '&'.
        XCTAssertEqual(SubnetKey.parse("/x/subnets/10.244.3.0-24&fc00:0:0:3::-64"),
                       try IPv4Network(parsing: "10.244.3.0/24"))
        for bad in ["/coreos.com/network/config", "10.244.1.0", "10.244.1.0-", "10.244.1.0-33", "10.244.1.0-024",
                    "10.244.1.5-24", "10.244.1-24", "a.b.c.d-24", "10.244.1.0_24", "/coreos.com/network/subnets/"] {
            XCTAssertNil(SubnetKey.parse(bad), bad)
        }
        for len in [8, 16, 24, 26, 30] {
            let n = IPv4Network(address: IPv4Address(10, 244, 77, 192), prefixLength: len)
            XCTAssertEqual(SubnetKey.parse(SubnetKey.key(prefix: "/p", subnet: n)), n)
        }
    }
}
