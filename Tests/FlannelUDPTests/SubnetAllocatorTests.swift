import XCTest
@testable import FlannelCore
@testable import FlannelUDP
import TestSupport

/// The subnet choice: own lease, previous subnet, random free subnet within SubnetMin..SubnetMax.
final class SubnetAllocatorTests: XCTestCase {
    private func net(_ s: String) -> IPv4Network { try! IPv4Network(parsing: s) }
    private let me = IPv4Address(192, 168, 0, 10)
    private let other = IPv4Address(192, 168, 0, 20)

    private func config(_ json: String = #"{"Network": "10.244.0.0/16"}"#) -> NetworkConfig {
        try! NetworkConfig(json: json)
    }

    func testFreeSubnetsRespectMinMaxAndLeases() {
        let c = config(#"{"Network": "10.244.0.0/16", "SubnetMin": "10.244.10.0", "SubnetMax": "10.244.14.0"}"#)
        let a = SubnetAllocator(config: c)
        XCTAssertEqual(a.freeSubnets(taken: []).map(\.description),
                       ["10.244.10.0/24", "10.244.11.0/24", "10.244.12.0/24", "10.244.13.0/24", "10.244.14.0/24"])
        // A lease of another length still blocks what it overlaps.
        XCTAssertEqual(a.freeSubnets(taken: [net("10.244.11.0/24"), net("10.244.12.0/23")]).map(\.description),
                       ["10.244.10.0/24", "10.244.14.0/24"])
        XCTAssertEqual(a.freeSubnets(taken: [], limit: 2).count, 2)
    }

    func testFreeSubnetsDoNotOverflowAtTheTopOfTheAddressSpace() {
        let c = config(#"{"Network": "255.255.255.0/24", "SubnetLen": 26}"#)
        XCTAssertEqual(SubnetAllocator(config: c).freeSubnets(taken: []).map(\.description),
                       ["255.255.255.64/26", "255.255.255.128/26", "255.255.255.192/26"])
    }

    func testFirst100FreeAreCandidatesAndChoiceIsRandomAmongThem() throws {
        let a = SubnetAllocator(config: config())
        var seen = Set<IPv4Network>()
        var rng = SeededRandom(seed: 42)
        for _ in 0..<2000 {
            let plan = try a.plan(leases: [:], publicIP: me, previous: nil, using: &rng)
            XCTAssertNil(plan.reuse)
            XCTAssertEqual(plan.delete, [])
            seen.insert(try XCTUnwrap(plan.create))
        }
        // flannel picks among the first 100 free subnets: 10.244.1.0 .. 10.244.100.0.
        XCTAssertEqual(seen.count, 100)
        XCTAssertEqual(seen.map(\.address).min()?.description, "10.244.1.0")
        XCTAssertEqual(seen.map(\.address).max()?.description, "10.244.100.0")
    }

    func testNeverPicksATakenSubnet() throws {
        let c = config(#"{"Network": "10.244.0.0/16", "SubnetMin": "10.244.1.0", "SubnetMax": "10.244.4.0"}"#)
        let leases: [IPv4Network: LeaseAttributes] = [
            net("10.244.1.0/24"): .udp(publicIP: other), net("10.244.2.0/24"): .udp(publicIP: other),
            net("10.244.4.0/24"): .udp(publicIP: IPv4Address(192, 168, 0, 30)),
        ]
        var rng = SeededRandom(seed: 7)
        for _ in 0..<50 {
            let plan = try SubnetAllocator(config: c).plan(leases: leases, publicIP: me, previous: nil, using: &rng)
            XCTAssertEqual(plan.create, net("10.244.3.0/24"))
        }
    }

    func testExhaustion() {
        let c = config(#"{"Network": "10.244.0.0/16", "SubnetMin": "10.244.1.0", "SubnetMax": "10.244.2.0"}"#)
        let leases: [IPv4Network: LeaseAttributes] = [
            net("10.244.1.0/24"): .udp(publicIP: other), net("10.244.2.0/24"): .udp(publicIP: other),
        ]
        XCTAssertThrowsError(try SubnetAllocator(config: c).plan(leases: leases, publicIP: me, previous: nil)) {
            XCTAssertEqual(($0 as? FlannelError)?.description,
                           "no free subnet left between SubnetMin 10.244.1.0 and SubnetMax 10.244.2.0 in 10.244.0.0/16 (every /24 is leased)")
        }
    }

    func testReusesOwnLease() throws {
        let leases: [IPv4Network: LeaseAttributes] = [
            net("10.244.7.0/24"): .udp(publicIP: me), net("10.244.8.0/24"): .udp(publicIP: other),
        ]
        let plan = try SubnetAllocator(config: config())
            .plan(leases: leases, publicIP: me, previous: net("10.244.9.0/24"))
        XCTAssertEqual(plan, SubnetAllocator.Plan(delete: [], reuse: net("10.244.7.0/24"), create: nil))
    }

    func testOwnLeaseThatNoLongerFitsIsDeletedAndReplaced() throws {
        // The network was narrowed to 10.244.20.0 .. 10.244.30.0 after we leased 10.244.7.0.
        let c = config(#"{"Network": "10.244.0.0/16", "SubnetMin": "10.244.20.0", "SubnetMax": "10.244.30.0"}"#)
        let leases: [IPv4Network: LeaseAttributes] = [net("10.244.7.0/24"): .udp(publicIP: me)]
        let plan = try SubnetAllocator(config: c).plan(leases: leases, publicIP: me, previous: nil)
        XCTAssertEqual(plan.delete, [net("10.244.7.0/24")])
        XCTAssertNil(plan.reuse)
        XCTAssertTrue(c.admits(try XCTUnwrap(plan.create)))
        // Same for a lease of the wrong length.
        let plan2 = try SubnetAllocator(config: config())
            .plan(leases: [net("10.244.7.0/25"): .udp(publicIP: me)], publicIP: me, previous: nil)
        XCTAssertEqual(plan2.delete, [net("10.244.7.0/25")])
        XCTAssertNotNil(plan2.create)
    }

    func testPreviousSubnetWhenFreeAndFitting() throws {
        let a = SubnetAllocator(config: config())
        let leases: [IPv4Network: LeaseAttributes] = [net("10.244.8.0/24"): .udp(publicIP: other)]
        XCTAssertEqual(try a.plan(leases: leases, publicIP: me, previous: net("10.244.9.0/24")).create,
                       net("10.244.9.0/24"))
        // Held by someone else: a fresh one, never that one.
        var rng = SeededRandom(seed: 1)
        for _ in 0..<200 {
            let plan = try a.plan(leases: leases, publicIP: me, previous: net("10.244.8.0/24"), using: &rng)
            XCTAssertNotEqual(plan.create, net("10.244.8.0/24"))
        }
        // Outside the config (the first subnet, a different length, another network): ignored.
        for stale in ["10.244.0.0/24", "10.244.9.0/25", "10.245.9.0/24"] {
            var rng = SeededRandom(seed: 3)
            for _ in 0..<100 {
                let plan = try a.plan(leases: [:], publicIP: me, previous: net(stale), using: &rng)
                XCTAssertNotEqual(plan.create, net(stale), stale)
                XCTAssertTrue(a.config.admits(try XCTUnwrap(plan.create)))
            }
        }
    }
}
