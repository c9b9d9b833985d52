import XCTest
import Foundation
import Atomics
@testable import FlannelCore
@testable import FlannelUDP
import TestSupport

func route(_ subnet: String, _ endpoint: String) -> PeerRoute {
    PeerRoute(subnet: net(subnet), endpoint: try! Endpoint(parsing: endpoint, defaultPort: 8285))
}

final class RouteTableTests: XCTestCase {
    /// Slow reference: scan everything, keep the longest match (ties cannot happen after de-duplication).
    private func referenceLookup(_ routes: [PeerRoute], _ a: IPv4Address) -> PeerRoute? {
        var best: PeerRoute?
        for r in routes where r.subnet.contains(a) {
            if best == nil || r.subnet.prefixLength > best!.subnet.prefixLength { best = r }
        }
        return best
    }

    func testLongestPrefixWinsRegardlessOfOrder() {
        // flannel's first-match scan would send 10.244.10.7 to the /16's peer here.
        let table = RouteTable([route("10.244.0.0/16", "192.168.1.1"), route("10.244.10.0/24", "192.168.1.2"),
                                route("10.244.10.128/25", "192.168.1.3"), route("10.244.10.77/32", "192.168.1.4")])
        let s = table.snapshot()
        func via(_ a: String) -> String? { s.lookup(ip(a)).map { s.peers[$0].route.endpoint.address.description } }
        XCTAssertEqual(via("10.244.10.7"), "192.168.1.2")
        XCTAssertEqual(via("10.244.10.200"), "192.168.1.3")
        XCTAssertEqual(via("10.244.10.77"), "192.168.1.4")
        XCTAssertEqual(via("10.244.11.1"), "192.168.1.1")
        XCTAssertNil(via("10.245.0.1"))
        XCTAssertEqual(s.prefixLengths, [32, 25, 24, 16])
    }

    func testDefaultRouteAndEmptyTable() {
        XCTAssertNil(RouteTable().snapshot().lookup(ip("1.2.3.4")))
        XCTAssertTrue(RouteTable().snapshot().peers.isEmpty)
        let s = RouteTable([route("0.0.0.0/0", "192.168.1.9")]).snapshot()
        XCTAssertEqual(s.lookup(ip("0.0.0.0")), 0)
        XCTAssertEqual(s.lookup(ip("255.255.255.255")), 0)
    }

    func testRandomTablesAgainstLinearScan() {
        var rng = SeededRandom(seed: 0xF1A2)
        for round in 0..<60 {
            // Prefixes clustered under 10.244.0.0/16 so that they nest, plus some anywhere; /0 and /32 included.
            var routes: [PeerRoute] = []
            let count = [0, 1, 3, 20, 300, 3000][round % 6]
            for i in 0..<count {
                let len = [0, 8, 12, 16, 20, 23, 24, 24, 24, 25, 28, 30, 31, 32][Int.random(in: 0..<14, using: &rng)]
                if len == 0 && Int.random(in: 0..<4, using: &rng) != 0 { continue }
                let base: UInt32 = Bool.random(using: &rng) ? 0x0AF4_0000 | UInt32.random(in: 0...0xFFFF, using: &rng)
                                                            : UInt32.random(in: 0...UInt32.max, using: &rng)
                let subnet = IPv4Network(address: IPv4Address(base), prefixLength: len)
                let peer = Endpoint(address: IPv4Address(0xC0A8_0000 | UInt32(i)), port: 8285)
                routes.append(PeerRoute(subnet: subnet, endpoint: peer))
            }
            // Later duplicates win; the reference works on the de-duplicated list.
            var dedup: [IPv4Network: PeerRoute] = [:]
            for r in routes { dedup[r.subnet] = r }
            let expectedRoutes = Array(dedup.values)
            let s = RouteTable(routes).snapshot()
            XCTAssertEqual(s.peers.count, expectedRoutes.count)
            for _ in 0..<2000 {
                // Mostly addresses inside or next to table entries, some random.
                var a: IPv4Address
                if !routes.isEmpty && Bool.random(using: &rng) {
                    let r = routes[Int.random(in: 0..<routes.count, using: &rng)]
                    a = IPv4Address(r.subnet.address.value ^ (UInt32.random(in: 0...UInt32.max, using: &rng)
                                                              >> UInt32.random(in: 20...32, using: &rng)))
                } else {
                    a = IPv4Address(0x0AF4_0000 | UInt32.random(in: 0...0xFFFF, using: &rng))
                    if Bool.random(using: &rng) { a = IPv4Address(UInt32.random(in: 0...UInt32.max, using: &rng)) }
                }
                let got = s.lookup(a).map { s.peers[$0].route }
                XCTAssertEqual(got, referenceLookup(expectedRoutes, a), "round \(round) address \(a)")
            }
        }
    }

    func testPeerAddressesAndExactEntries() {
        let s = RouteTable([route("10.244.1.0/24", "192.168.1.1:8285"), route("10.244.2.0/24", "192.168.1.2:9000"),
                            route("10.244.3.0/24", "192.168.1.2:9001")]).snapshot()
        XCTAssertTrue(s.isPeerAddress(ip("192.168.1.1")))
        XCTAssertTrue(s.isPeerAddress(ip("192.168.1.2")))
        XCTAssertFalse(s.isPeerAddress(ip("192.168.1.3")))
        XCTAssertFalse(s.isPeerAddress(ip("0.0.0.0")))
        XCTAssertEqual(s.entry(for: net("10.244.2.0/24"))?.route.endpoint.port, 9000)
        XCTAssertNil(s.entry(for: net("10.244.2.0/23")))
        // The prepared sockaddr is in network byte order.
        let sa = s.entry(for: net("10.244.2.0/24"))!.sockaddr
        XCTAssertEqual(sa.sin_family, sa_family_t(AF_INET))
        XCTAssertEqual(UInt16(bigEndian: sa.sin_port), 9000)
        XCTAssertEqual(IPv4Address(networkOrder: sa.sin_addr.s_addr), ip("192.168.1.2"))
    }

    func testDuplicateSubnetLaterWins() {
        let table = RouteTable([route("10.244.1.0/24", "192.168.1.1"), route("10.244.2.0/24", "192.168.1.2"),
                                route("10.244.1.0/24", "192.168.1.9")])
        XCTAssertEqual(table.routes, [route("10.244.1.0/24", "192.168.1.9"), route("10.244.2.0/24", "192.168.1.2")])
        XCTAssertFalse(table.snapshot().isPeerAddress(ip("192.168.1.1")))
    }

    func testCountersSurviveRepublishKeyedBySubnet() {
        let table = RouteTable([route("10.244.1.0/24", "192.168.1.1"), route("10.244.2.0/24", "192.168.1.2")])
        let first = table.snapshot()
        first.entry(for: net("10.244.1.0/24"))!.counters.countTx(bytes: 100)
        first.entry(for: net("10.244.2.0/24"))!.counters.countRx(bytes: 50)
        // Peer 1 moves to a new endpoint, peer 2 leaves, peer 3 arrives.
        table.publish([route("10.244.3.0/24", "192.168.1.3"), route("10.244.1.0/24", "192.168.1.7")])
        let second = table.snapshot()
        let moved = second.entry(for: net("10.244.1.0/24"))!
        XCTAssertTrue(moved.counters === first.entry(for: net("10.244.1.0/24"))!.counters)
        XCTAssertEqual(moved.counters.snapshot, PeerCountersSnapshot(txPackets: 1, txBytes: 100))
        XCTAssertEqual(moved.route.endpoint.address, ip("192.168.1.7"))
        XCTAssertEqual(second.entry(for: net("10.244.3.0/24"))!.counters.snapshot.txPackets, 0)
        // The old snapshot is untouched and still usable by a worker that holds it.
        XCTAssertEqual(first.peers.count, 2)
        XCTAssertEqual(first.lookup(ip("10.244.2.9")), 1)
        XCTAssertNil(second.lookup(ip("10.244.2.9")))
        // A subnet that went away and comes back starts from zero.
        table.publish([route("10.244.2.0/24", "192.168.1.2")])
        XCTAssertEqual(table.snapshot().peers[0].counters.snapshot.rxPackets, 0)
    }

    /// Readers on other threads keep looking up while the table is republished thousands of times: every
    /// snapshot they see is complete and self-consistent, and concurrent publishers lose no counters.
    func testConcurrentPublishAndLookup() {
        let table = RouteTable([route("10.244.1.0/24", "192.168.1.1"), route("10.244.2.0/24", "192.168.2.2")])
        table.snapshot().peers[0].counters.countTx(bytes: 1)
        let finished = ManagedAtomic<Bool>(false)
        let errors = ManagedAtomic<Int>(0)
        let loads = ManagedAtomic<Int>(0)
        // Real threads, not Dispatch's global queue: its pool is as wide as the CPUs (2 here), and two spinning
        // readers would keep the writers from ever running.
        let readers = DispatchGroup()
        for _ in 0..<2 {
            readers.enter()
            Thread.detachNewThread {
                defer { readers.leave() }
                var n = 0
                while !finished.load(ordering: .relaxed) {
                    let s = table.snapshot()
                    n += 1
                    // Every published table has 10.244.1.0/24 and one more /24 whose peer address ends in its
                    // third octet: check the pairing holds in whatever snapshot we got.
                    guard s.peers.count == 2, let i = s.lookup(ip("10.244.1.5")),
                          s.peers[i].route.endpoint.address == ip("192.168.1.1") else {
                        errors.wrappingIncrement(ordering: .relaxed)
                        break
                    }
                    let other = s.peers[1 - i].route
                    let third = (other.subnet.address.value >> 8) & 0xFF
                    if s.lookup(IPv4Address(other.subnet.address.value | 9)) != 1 - i
                        || other.endpoint.address.value & 0xFF != third {
                        errors.wrappingIncrement(ordering: .relaxed)
                        break
                    }
                    // Batch-like pacing: a worker loads the table once per batch, not in a tight loop.
                    if n % 64 == 0 { sched_yield() }
                }
                loads.wrappingIncrement(by: n, ordering: .relaxed)
            }
        }
        let writers = DispatchGroup()
        for w in 0..<2 {
            writers.enter()
            Thread.detachNewThread {
                defer { writers.leave() }
                for k in 0..<1000 {
                    let third = 2 + (k + w * 7) % 200
                    table.publish([route("10.244.1.0/24", "192.168.1.1"),
                                   route("10.244.\(third).0/24", "192.168.2.\(third)")])
                }
            }
        }
        writers.wait()
        finished.store(true, ordering: .relaxed)
        readers.wait()
        XCTAssertEqual(errors.load(ordering: .relaxed), 0)
        XCTAssertGreaterThan(loads.load(ordering: .relaxed), 0)
        XCTAssertEqual(table.snapshot().entry(for: net("10.244.1.0/24"))!.counters.snapshot.txPackets, 1)
    }
}
