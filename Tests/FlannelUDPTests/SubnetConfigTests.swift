import XCTest
@testable import FlannelCore
@testable import FlannelUDP

/// flannel's config rules (pkg/subnet/config.go): defaults, validation, and Go-style JSON reading.
final class SubnetConfigTests: XCTestCase {
    private func parse(_ json: String) throws -> NetworkConfig { try NetworkConfig(json: json) }

    private func assertRefused(_ json: String, _ expected: String, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertThrowsError(try parse(json), file: file, line: line) { error in
            guard let e = error as? NetworkConfigError else {
                return XCTFail("unexpected error \(error)", file: file, line: line)
            }
            XCTAssertEqual(e.message, expected, file: file, line: line)
            XCTAssertFalse(e.message.contains("\n"), "one line", file: file, line: line)
        }
    }

    func testMinimalConfigGetsFlannelDefaults() throws {
        let c = try parse(#"{"Network": "10.244.0.0/16"}"#)
        XCTAssertEqual(c.network.description, "10.244.0.0/16")
        XCTAssertEqual(c.subnetLength, 24)
        // The first subnet is skipped: a node on 10.244.0.0 would sit on the network address.
        XCTAssertEqual(c.subnetMin.description, "10.244.1.0")
        XCTAssertEqual(c.subnetMax.description, "10.244.255.0")
        XCTAssertEqual(c.backendType, "udp")
        XCTAssertEqual(c.port, 8285)
    }

    func testSubnetLenDefaultDependsOnNetworkSize() throws {
        // /22 and larger: /24 per node.
        XCTAssertEqual(try parse(#"{"Network": "10.0.0.0/8"}"#).subnetLength, 24)
        XCTAssertEqual(try parse(#"{"Network": "10.1.0.0/22"}"#).subnetLength, 24)
        // Smaller: split into four (prefix + 2).
        let c23 = try parse(#"{"Network": "10.1.0.0/23"}"#)
        XCTAssertEqual(c23.subnetLength, 25)
        XCTAssertEqual(c23.subnetMin.description, "10.1.0.128")
        XCTAssertEqual(c23.subnetMax.description, "10.1.1.128")
        XCTAssertEqual(try parse(#"{"Network": "10.1.0.0/28"}"#).subnetLength, 30)
        assertRefused(#"{"Network": "10.1.0.0/29"}"#,
                      "flannel config Network 10.1.0.0/29 is too small: the smallest useful network is a /28")
    }

    func testExplicitValues() throws {
        let c = try parse("""
            {"Network": "172.16.0.0/12", "SubnetLen": 20, "SubnetMin": "172.16.16.0", "SubnetMax": "172.31.224.0",
             "Backend": {"Type": "udp", "Port": 7890}}
            """)
        XCTAssertEqual(c.subnetLength, 20)
        XCTAssertEqual(c.subnetMin.description, "172.16.16.0")
        XCTAssertEqual(c.subnetMax.description, "172.31.224.0")
        XCTAssertEqual(c.port, 7890)
        XCTAssertEqual(c.subnetSize, 4096)
    }

    func testGoStyleKeysAndExtras() throws {
        // encoding/json matches field names case-insensitively and ignores unknown ones; null means unset.
        let c = try parse(#"{"network": "10.5.0.0/16", "SUBNETLEN": 26, "backend": {"type": "udp", "port": 9000}, "Foo": [1], "SubnetMin": null}"#)
        XCTAssertEqual(c.network.description, "10.5.0.0/16")
        XCTAssertEqual(c.subnetLength, 26)
        XCTAssertEqual(c.port, 9000)
        XCTAssertEqual(c.subnetMin.description, "10.5.0.64")
        // Like net.ParseCIDR, host bits are cleared.
        XCTAssertEqual(try parse(#"{"Network": "10.5.3.7/16"}"#).network.description, "10.5.0.0/16")
        // SubnetLen 0 is Go's zero value: the default applies.
        XCTAssertEqual(try parse(#"{"Network": "10.5.0.0/16", "SubnetLen": 0}"#).subnetLength, 24)
    }

    func testBackendTypeDefaultsToUDPAndOthersAreRefused() throws {
        XCTAssertEqual(try parse(#"{"Network": "10.5.0.0/16", "Backend": {}}"#).backendType, "udp")
        XCTAssertEqual(try parse(#"{"Network": "10.5.0.0/16", "Backend": {"Port": 8300}}"#).port, 8300)
        assertRefused(#"{"Network": "10.5.0.0/16", "Backend": {"Type": "vxlan", "VNI": 1}}"#,
                      "flannel config Backend.Type 'vxlan' is not supported: flannel-udp implements only the udp backend")
        assertRefused(#"{"Network": "10.5.0.0/16", "Backend": {"Type": "host-gw"}}"#,
                      "flannel config Backend.Type 'host-gw' is not supported: flannel-udp implements only the udp backend")
        assertRefused(#"{"Network": "10.5.0.0/16", "Backend": {"Port": 70000}}"#,
                      "flannel config Backend.Port 70000 is outside 1-65535")
        assertRefused(#"{"Network": "10.5.0.0/16", "Backend": {"Port": 0}}"#,
                      "flannel config Backend.Port 0 is outside 1-65535")
        assertRefused(#"{"Network": "10.5.0.0/16", "Backend": "udp"}"#,
                      "flannel config Backend must be an object, not 'udp'")
    }

    func testIPv6SettingsAreIgnored() throws {
        let c = try parse("""
            {"EnableIPv6": true, "Network": "10.42.0.0/16", "IPv6Network": "2001:cafe:42::/56", "IPv6SubnetLen": 64,
             "Backend": {"Type": "udp"}}
            """)
        XCTAssertEqual(c.network.description, "10.42.0.0/16")
        assertRefused(#"{"EnableIPv4": false, "EnableIPv6": true, "IPv6Network": "fc00::/48"}"#,
                      "flannel config sets EnableIPv4 to false: the udp backend carries IPv4 only")
    }

    func testValidationMessagesNameTheValue() {
        assertRefused("{}", "flannel config has no Network: add e.g. \"Network\": \"10.244.0.0/16\"")
        assertRefused(#"{"Network": ""}"#, "flannel config has no Network: add e.g. \"Network\": \"10.244.0.0/16\"")
        assertRefused(#"{"Network": "10.244.0.0"}"#,
                      "flannel config Network '10.244.0.0' is not an IPv4 CIDR (expected A.B.C.D/N)")
        assertRefused(#"{"Network": 10}"#, "flannel config Network must be a string, not 10")
        assertRefused(#"{"Network": "10.244.0.0/16", "SubnetLen": 31}"#,
                      "flannel config SubnetLen 31 is too long: it must be 30 or less")
        assertRefused(#"{"Network": "10.244.0.0/16", "SubnetLen": 17}"#,
                      "flannel config SubnetLen 17 leaves Network 10.244.0.0/16 fewer than four subnets (use 18 or more)")
        assertRefused(#"{"Network": "10.244.0.0/16", "SubnetLen": -1}"#,
                      "flannel config SubnetLen must not be negative, not -1")
        assertRefused(#"{"Network": "10.244.0.0/16", "SubnetLen": 24.5}"#,
                      "flannel config SubnetLen must be an integer, not 24.5")
        assertRefused(#"{"Network": "10.244.0.0/16", "SubnetMin": "10.245.1.0"}"#,
                      "flannel config SubnetMin 10.245.1.0 is not inside Network 10.244.0.0/16")
        assertRefused(#"{"Network": "10.244.0.0/16", "SubnetMax": "10.0.0.0"}"#,
                      "flannel config SubnetMax 10.0.0.0 is not inside Network 10.244.0.0/16")
        assertRefused(#"{"Network": "10.244.0.0/16", "SubnetMin": "10.244.1.128"}"#,
                      "flannel config SubnetMin 10.244.1.128 is not on a /24 boundary (SubnetLen)")
        assertRefused(#"{"Network": "10.244.0.0/16", "SubnetMax": "10.244.9.1"}"#,
                      "flannel config SubnetMax 10.244.9.1 is not on a /24 boundary (SubnetLen)")
        assertRefused(#"{"Network": "10.244.0.0/16", "SubnetMin": "nope"}"#,
                      "flannel config SubnetMin 'nope' is not an IPv4 address")
        assertRefused(#"{"Network": "10.244.0.0/16", "SubnetMin": "10.244.9.0", "SubnetMax": "10.244.8.0"}"#,
                      "flannel config SubnetMin 10.244.9.0 is above SubnetMax 10.244.8.0")
        assertRefused(#"{"Network": "10.244.0.0/16", "EnableIPv4": "yes"}"#,
                      "flannel config EnableIPv4 must be true or false, not 'yes'")
        assertRefused("[1]", "flannel config must be a JSON object, e.g. {\"Network\": \"10.244.0.0/16\"}")
        assertRefused("{\"Network\": ", "flannel config is not valid JSON: '{\"Network\": '")
    }

    func testAdmits() throws {
        let c = try parse(#"{"Network": "10.244.0.0/16", "SubnetMin": "10.244.10.0", "SubnetMax": "10.244.20.0"}"#)
        XCTAssertTrue(c.admits(try IPv4Network(parsing: "10.244.10.0/24")))
        XCTAssertTrue(c.admits(try IPv4Network(parsing: "10.244.20.0/24")))
        XCTAssertFalse(c.admits(try IPv4Network(parsing: "10.244.9.0/24")))
        XCTAssertFalse(c.admits(try IPv4Network(parsing: "10.244.21.0/24")))
        XCTAssertFalse(c.admits(try IPv4Network(parsing: "10.244.12.0/25")), "wrong length")
    }
}
