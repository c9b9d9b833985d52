import XCTest
import Logging
@testable import FlannelCore
@testable import FlannelUDP

/// The peer-source seam: a config says where its network comes from, and only a fixed one is checked before
/// anything is asked of the system; a registry's network is checked when it answers (`Membership.validate`).
final class PeerSourceTests: XCTestCase {
    private let logger = Logger(label: "test")

    func testFixedMembershipIsStaticAndJoinsAtOnce() throws {
        var config = NodeConfig(network: net("10.244.0.0/16"), subnet: net("10.244.3.0/24"))
        config.port = 8300
        let source = try XCTUnwrap(config.peerSource(logger: logger) as? StaticPeerSource)
        let joined = try source.join(underlay: ip("192.168.7.1"), publicIP: ip("192.168.7.1"), previous: nil)
        XCTAssertEqual(joined, Membership(network: net("10.244.0.0/16"), subnet: net("10.244.3.0/24"), port: 8300))
        XCTAssertEqual(joined.tunAddress, ip("10.244.3.0"))
        XCTAssertNil(joined.leaseLength, "static peers are not leases of a fixed size")
        XCTAssertNil(source.lease)
        XCTAssertNil(source.unhealthyReason)
    }

    func testRegistryConfigHasNoNetworkToCheckUntilItAnswers() {
        let config = NodeConfig(source: .etcd(EtcdOptions(endpoints: ["http://127.0.0.1:2379"])))
        XCTAssertNil(config.validate(), "no placeholder network to trip over")
        XCTAssertTrue(config.peerSource(logger: logger) is EtcdPeerSource)
        // Before `join` there is no lease and so nothing to report, and `leave` has nothing to give back.
        let source = EtcdPeerSource(options: EtcdOptions(endpoints: ["http://127.0.0.1:2379"]), logger: logger)
        XCTAssertNil(source.lease)
        XCTAssertNil(source.unhealthyReason)
        source.leave(keep: false)
    }

    func testMembershipValidationNamesTheValue() {
        XCTAssertEqual(Membership(network: net("10.244.0.0/16"), subnet: net("10.245.1.0/24"), port: 8285).validate(),
                       "subnet 10.245.1.0/24 is not inside network 10.244.0.0/16")
        XCTAssertEqual(Membership(network: net("10.244.0.0/16"), subnet: net("10.244.0.0/16"), port: 8285).validate(),
                       "subnet 10.244.0.0/16 is not inside network 10.244.0.0/16")
        XCTAssertEqual(Membership(network: net("10.244.1.0/31"), subnet: net("10.244.1.0/32"), port: 8285).validate(),
                       "network 10.244.1.0/31 is too small for an overlay (at most /30)")
        XCTAssertEqual(Membership(network: net("10.244.0.0/16"), subnet: net("10.244.1.0/24"), port: 0).validate(),
                       "port 0 is not a valid UDP port (1-65535)")
        XCTAssertNil(Membership(network: net("10.244.0.0/16"), subnet: net("10.244.1.0/24"), port: 8285).validate())
        // And a fixed config carries the same checks.
        XCTAssertEqual(NodeConfig(network: net("10.244.0.0/16"), subnet: net("10.245.1.0/24")).validate(),
                       "subnet 10.245.1.0/24 is not inside network 10.244.0.0/16")
    }

    /// A config that does not come from the command line (a test's, a library user's) gets the same checks and
    /// messages as `up`'s options; the option's 0 (no lane) is `express == nil` here, so 0 is refused.
    func testNodeConfigRefusesOptionValuesUpRefuses() {
        var config = NodeConfig(network: net("10.244.0.0/16"), subnet: net("10.244.1.0/24"))
        XCTAssertNil(config.validate())
        config.express = 0
        XCTAssertEqual(config.validate(), "express-size 0 is outside 20-65535 bytes (0 turns the express lane off)")
        config.express = nil
        XCTAssertNil(config.validate())
        config.masqResyncSeconds = 0
        XCTAssertEqual(config.validate(), "masq-resync 0.0 is outside 0-3600 seconds (it must be more than 0)")
    }
}
