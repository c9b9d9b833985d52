import XCTest
@testable import FlannelCore
@testable import FlannelUDP

/// The one validation of peer routes (issue 12), played from the attacker's side: every route below is one that
/// a registry writer, a peers file or a `route add` could hand the node to turn it against its host or its pods.
/// Node 10.244.1.0/24 of 10.244.0.0/16, public IP 192.168.77.1, registry SubnetLen 24.
final class PeerRouteRulesTests: XCTestCase {
    let rules = PeerRouteRules(network: net("10.244.0.0/16"), ownSubnet: net("10.244.1.0/24"),
                               publicIP: ip("192.168.77.1"), subnetLength: 24)

    private func problem(_ subnet: String, _ endpoint: String, _ origin: RouteOrigin = .registry)
        -> PeerRouteRules.Problem? {
        do {
            try rules.check(PeerRoute(subnet: net(subnet), endpoint: try! Endpoint(parsing: endpoint, defaultPort: 8285)),
                            origin: origin)
            return nil
        } catch {
            return error
        }
    }

    func testAcceptsAnOrdinaryPeer() {
        for origin in RouteOrigin.allCases {
            XCTAssertNil(problem("10.244.2.0/24", "192.168.77.2", origin))
            XCTAssertNil(problem("10.244.255.0/24", "203.0.113.7:9000", origin))
        }
        // Sizes other than SubnetLen are the operator's business in a peers file or `route add`.
        XCTAssertNil(problem("10.244.2.0/23", "192.168.77.2", .manual))
        XCTAssertNil(problem("10.244.2.7/32", "192.168.77.2", .file))
    }

    func testSubnetMustLieInsideTheNetworkAndAwayFromOurs() {
        let outside = ["10.245.2.0/24", "0.0.0.0/0", "192.168.77.0/24"]
        // Inside ours (steals one of our pods), equal to ours, and covering ours (claims our pods as sources).
        let overlapping = ["10.244.1.5/32", "10.244.1.0/24", "10.244.0.0/16", "10.244.0.0/23"]
        for origin in RouteOrigin.allCases {
            for subnet in outside {
                XCTAssertEqual(problem(subnet, "192.168.77.2", origin),
                               .outsideNetwork(net(subnet), network: net("10.244.0.0/16")), "\(subnet) \(origin)")
            }
            for subnet in overlapping {
                XCTAssertEqual(problem(subnet, "192.168.77.2", origin),
                               .overlapsOwnSubnet(net(subnet), own: net("10.244.1.0/24")), "\(subnet) \(origin)")
            }
        }
    }

    func testRegistryLeasesMustHaveSubnetLen() {
        // A /32 lease inside another node's subnet takes that pod's traffic by longest prefix.
        XCTAssertEqual(problem("10.244.2.7/32", "192.168.77.66"), .prefixLength(net("10.244.2.7/32"), subnetLength: 24))
        XCTAssertEqual(problem("10.244.2.0/23", "192.168.77.66"), .prefixLength(net("10.244.2.0/23"), subnetLength: 24))
        XCTAssertEqual(problem("10.244.2.0/25", "192.168.77.66"), .prefixLength(net("10.244.2.0/25"), subnetLength: 24))
        // Without a SubnetLen (not in registry mode) nothing is checked about the size.
        var open = rules
        open.subnetLength = nil
        XCTAssertNoThrow(try open.check(PeerRoute(subnet: net("10.244.2.7/32"), endpoint: Endpoint(address: ip("192.168.77.2"), port: 8285)),
                                        origin: .registry))
    }

    func testEndpointMustBeAnotherHostsUnicastAddress() {
        let cases: [(String, String)] = [
            ("0.0.0.0", "unspecified"), ("0.1.2.3", "unspecified"),
            ("127.0.0.1", "loopback"), ("127.255.255.254", "loopback"),
            ("224.0.0.1", "multicast"), ("239.255.255.255", "multicast"),
            ("240.0.0.1", "reserved"), ("255.255.255.255", "broadcast"),
        ]
        for origin in RouteOrigin.allCases {
            for (address, word) in cases {
                guard case .endpointNotUnicast(let e, _)? = problem("10.244.2.0/24", address, origin) else {
                    XCTFail("\(address) accepted for \(origin)")
                    continue
                }
                XCTAssertEqual(e.address, ip(address))
                XCTAssertTrue(problem("10.244.2.0/24", address, origin)!.description.contains(word), address)
            }
            // Inside the overlay: the datagram would be routed into our own tun.
            XCTAssertEqual(problem("10.244.2.0/24", "10.244.2.1", origin),
                           .endpointInsideNetwork(try! Endpoint(parsing: "10.244.2.1", defaultPort: 8285), network: net("10.244.0.0/16")))
            XCTAssertEqual(problem("10.244.2.0/24", "10.244.1.0", origin),
                           .endpointInsideNetwork(try! Endpoint(parsing: "10.244.1.0", defaultPort: 8285), network: net("10.244.0.0/16")))
            // Ourselves.
            XCTAssertEqual(problem("10.244.2.0/24", "192.168.77.1:9999", origin),
                           .endpointIsThisNode(try! Endpoint(parsing: "192.168.77.1:9999", defaultPort: 8285)))
        }
        // Just outside the special ranges is fine.
        for address in ["1.0.0.1", "126.255.255.255", "128.0.0.1", "223.255.255.255", "10.243.255.255", "10.245.0.0"] {
            XCTAssertNil(problem("10.244.2.0/24", address), address)
        }
    }

    func testDescriptionsNameTheValue() {
        XCTAssertEqual(problem("10.244.1.5/32", "192.168.77.2")?.description,
                       "subnet 10.244.1.5/32 overlaps this node's own subnet 10.244.1.0/24")
        XCTAssertEqual(problem("10.244.2.0/24", "127.0.0.1")?.description,
                       "endpoint 127.0.0.1 is in the loopback range 127.0.0.0/8, not a peer's unicast address")
        XCTAssertEqual(problem("10.244.2.7/32", "192.168.77.2")?.description,
                       "subnet 10.244.2.7/32 is not a /24 (the registry's SubnetLen; flannel leases no other size)")
    }

    func testNetworkItselfAtStart() {
        XCTAssertNil(PeerRouteRules.checkNetwork(net("10.244.0.0/16"), underlay: ip("192.168.77.1")))
        XCTAssertNil(PeerRouteRules.checkNetwork(net("10.0.0.0/8"), underlay: ip("192.168.77.1")))
        XCTAssertNil(PeerRouteRules.checkNetwork(net("172.16.0.0/12"), underlay: ip("192.168.77.1"),
                                                 publicIP: ip("203.0.113.1")))
        let whole = PeerRouteRules.checkNetwork(net("0.0.0.0/0"))
        XCTAssertEqual(whole, "network 0.0.0.0/0 is the whole IPv4 address space; give the overlay's own range, e.g. 10.244.0.0/16")
        XCTAssertNotNil(PeerRouteRules.checkNetwork(net("0.0.0.0/1")))
        XCTAssertNotNil(PeerRouteRules.checkNetwork(net("128.0.0.0/1")))
        XCTAssertNotNil(PeerRouteRules.checkNetwork(net("10.0.0.0/7")))
        XCTAssertNotNil(PeerRouteRules.checkNetwork(net("127.0.0.0/8")))
        XCTAssertNotNil(PeerRouteRules.checkNetwork(net("224.0.0.0/8")))
        XCTAssertNotNil(PeerRouteRules.checkNetwork(net("0.0.0.0/8")))
        XCTAssertNotNil(PeerRouteRules.checkNetwork(net("255.255.0.0/16")))
        XCTAssertEqual(PeerRouteRules.checkNetwork(net("192.168.0.0/16"), underlay: ip("192.168.77.1")),
                       "network 192.168.0.0/16 covers the underlay address 192.168.77.1; the overlay must not contain the addresses its nodes use to reach each other")
        XCTAssertNotNil(PeerRouteRules.checkNetwork(net("203.0.113.0/24"), underlay: ip("192.168.77.1"),
                                                    publicIP: ip("203.0.113.1")))
        // And `up --network` meets the size and range checks before anything else (no system access needed).
        var config = NodeConfig(network: net("0.0.0.0/0"), subnet: net("10.244.1.0/24"))
        XCTAssertEqual(config.validate(), whole)
        config = NodeConfig(network: net("127.0.0.0/8"), subnet: net("127.1.0.0/24"))
        XCTAssertNotNil(config.validate())
    }

    func testStoreRefusesWithTheReasonAndChangesNothing() throws {
        final class Recorder: RoutePublisher, @unchecked Sendable {
            var published: [[PeerRoute]] = []
            func publish(_ routes: [PeerRoute]) { published.append(routes) }
        }
        let rec = Recorder()
        let store = RouteStore(publisher: rec, rules: rules)
        let good = PeerRoute(subnet: net("10.244.2.0/24"), endpoint: Endpoint(address: ip("192.168.77.2"), port: 8285))
        let bad = PeerRoute(subnet: net("10.244.3.0/24"), endpoint: Endpoint(address: ip("127.0.0.1"), port: 8285))
        XCTAssertThrowsError(try store.add(bad)) { error in
            XCTAssertEqual("\(error)", "route 10.244.3.0/24 via 127.0.0.1:8285 refused: endpoint 127.0.0.1 is in the loopback range 127.0.0.0/8, not a peer's unicast address")
        }
        XCTAssertThrowsError(try store.replace([good, bad], origin: .file))
        XCTAssertTrue(rec.published.isEmpty)
        XCTAssertTrue(store.entries().isEmpty)
        try store.replace([good], origin: .registry)
        XCTAssertEqual(rec.published, [[good]])
    }

    func testRegistryFilterReportsEachBadLeaseOnce() throws {
        final class Sink: RoutePublisher, @unchecked Sendable { func publish(_ routes: [PeerRoute]) {} }
        let store = RouteStore(publisher: Sink(), rules: rules)
        let filter = RegistryRouteFilter()
        let good = PeerRoute(subnet: net("10.244.2.0/24"), endpoint: Endpoint(address: ip("192.168.77.2"), port: 8285))
        let thief = PeerRoute(subnet: net("10.244.2.7/32"), endpoint: Endpoint(address: ip("192.168.77.66"), port: 8285))
        let loop = PeerRoute(subnet: net("10.244.3.0/24"), endpoint: Endpoint(address: ip("10.244.3.1"), port: 8285))

        var r = filter.filter([good, thief, loop], store: store)
        XCTAssertEqual(r.usable, [good])
        XCTAssertEqual(r.newlyRefused.count, 2)
        // The watch hands the same list over again (any other lease changed): nothing new to say.
        r = filter.filter([good, thief, loop], store: store)
        XCTAssertEqual(r.usable, [good])
        XCTAssertTrue(r.newlyRefused.isEmpty)
        // The thief's lease goes away and comes back: reported again; the loop, still there, is not.
        r = filter.filter([good, loop], store: store)
        XCTAssertTrue(r.newlyRefused.isEmpty)
        r = filter.filter([good, thief, loop], store: store)
        XCTAssertEqual(r.newlyRefused, [.refused(thief, .prefixLength(thief.subnet, subnetLength: 24))])
        // A lease that changes to another bad endpoint is a new entry.
        let loop2 = PeerRoute(subnet: loop.subnet, endpoint: Endpoint(address: ip("127.0.0.1"), port: 8285))
        r = filter.filter([good, thief, loop2], store: store)
        XCTAssertEqual(r.newlyRefused.count, 1)
    }
}
