import XCTest
@testable import FlannelUDP

/// The replacing daemon's checks of the running daemon's handover answer (Node/Handover.swift): it comes from
/// another process, so anything that makes no sense is refused with the reason, and a node whose identity would
/// change is not replaced.
final class HandoverTests: XCTestCase {
    let good = HandoverState(
        token: "t", daemonVersion: "0.1.0", device: "flannel0", deviceIndex: 7, network: "10.244.0.0/16",
        subnet: "10.244.1.0/24", publicIP: "192.168.77.1", port: 8285, mtu: 1472, vnetHeader: true, sockets: 2,
        subnetFile: "/run/flannel/subnet.env", subnetFileContents: nil, routes: [], masquerade: nil, lease: nil)

    func testMalformedAnswersAreRefusedWithTheReason() {
        XCTAssertNil(HandoverClient.validate(good, device: "flannel0"))
        var cases: [(String, (inout HandoverState) -> Void)] = [
            ("not flannel0", { $0.device = "other0" }),
            ("bad token", { $0.token = "" }),
            ("bad token", { $0.token = String(repeating: "x", count: 129) }),
            ("device index 0", { $0.deviceIndex = 0 }),
            ("0 sockets", { $0.sockets = 0 }),
            ("65 sockets", { $0.sockets = 65 }),
            ("MTU 70000", { $0.mtu = 70000 }),
            ("network '10.244.0.0/33'", { $0.network = "10.244.0.0/33" }),
            ("subnet '10.244.1.1/24'", { $0.subnet = "10.244.1.1/24" }),
            ("public IP '192.168.77'", { $0.publicIP = "192.168.77" }),
        ]
        cases.append(("100001 routes", { $0.routes = Array(repeating: RouteInfo(subnet: "", endpoint: "", origin: ""), count: 100_001) }))
        for (expected, change) in cases {
            var state = good
            change(&state)
            let problem = HandoverClient.validate(state, device: "flannel0")
            XCTAssertTrue(problem?.contains(expected) == true, "\(expected): \(problem ?? "accepted")")
        }
    }

    func testAChangedIdentityIsNamed() throws {
        var config = NodeConfig(network: try IPv4Network(parsing: "10.244.0.0/16"), subnet: try IPv4Network(parsing: "10.244.1.0/24"))
        config.subnetFile = "/run/flannel/subnet.env"
        let network = try IPv4Network(parsing: "10.244.0.0/16")
        func subnet(_ config: NodeConfig) -> IPv4Network {
            if case .fixed(_, let subnet) = config.source { return subnet }
            return network
        }
        func plan(_ config: NodeConfig, port: UInt16 = 8285, mtu: Int = 1472) -> NodeSetup.Plan {
            NodeSetup.Plan(config: config, membership: Membership(network: network, subnet: subnet(config), port: port),
                           underlay: Link(index: 2, name: "eth0", mtu: 1500, flags: 0),
                           underlayAddress: IPv4Address(192, 168, 77, 1), publicIP: IPv4Address(192, 168, 77, 1),
                           mtu: mtu, listen: Endpoint(address: IPv4Address(192, 168, 77, 1), port: port))
        }
        XCTAssertNil(HandoverClient.identityChange(good, plan: plan(config)))
        var other = config
        other.source = .fixed(network: network, subnet: try IPv4Network(parsing: "10.244.2.0/24"))
        other.offloads = false
        other.ipMasq = true
        let change = HandoverClient.identityChange(good, plan: plan(other, port: 8286, mtu: 1400))
        XCTAssertEqual(change, "subnet 10.244.1.0/24 would become 10.244.2.0/24, port 8285 would become 8286, MTU 1472 would become 1400, masquerade off would become nftables, offloads on would become off")
        // Workers, peers file, peer check: not the node's identity.
        var workers = config
        workers.workers = 4
        workers.peerCheck = .relaxed
        XCTAssertNil(HandoverClient.identityChange(good, plan: plan(workers)))
    }
}
