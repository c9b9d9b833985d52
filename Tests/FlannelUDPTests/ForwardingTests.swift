import XCTest
import Foundation
@testable import FlannelCore
@testable import FlannelUDP

/// Node 10.244.1.0/24 in overlay 10.244.0.0/16; peers 10.244.2.0/24 at 192.168.1.2 and 10.244.3.0/24 at
/// 192.168.1.3:9000, and a more specific 10.244.2.128/25 at 192.168.1.4.
final class ForwardingTests: XCTestCase {
    let config = ForwardingConfig(network: net("10.244.0.0/16"), subnet: net("10.244.1.0/24"))
    let table = RouteTable([route("10.244.2.0/24", "192.168.1.2"), route("10.244.3.0/24", "192.168.1.3:9000"),
                            route("10.244.2.128/25", "192.168.1.4")])

    private func fromTun(_ decider: inout PacketDecider, _ bytes: [UInt8]) -> (TunVerdict, [UInt8], [UInt8]) {
        let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: 2048, alignment: 16)
        defer { scratch.deallocate() }
        let snapshot = table.snapshot()
        let (v, after) = withMutablePacket(bytes, offset: 1) {
            decider.fromTun($0, snapshot: snapshot, scratch: scratch)
        }
        var reply: [UInt8] = []
        if case .icmpToTun(let n, _) = v { reply = Array(scratch[0..<n]) }
        return (v, after, reply)
    }

    private func fromUDP(_ decider: inout PacketDecider, _ bytes: [UInt8], from outer: String)
        -> (UDPVerdict, [UInt8], [UInt8]) {
        let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: 2048, alignment: 16)
        defer { scratch.deallocate() }
        let snapshot = table.snapshot()
        let (v, after) = withMutablePacket(bytes, offset: 3) {
            decider.fromUDP($0, outerSource: ip(outer), snapshot: snapshot, scratch: scratch)
        }
        var reply: [UInt8] = []
        if case .icmpToPeer(let n, _, _) = v { reply = Array(scratch[0..<n]) }
        return (v, after, reply)
    }

    func testCountersSnapshotHasEveryReasonAndRoundTripsThroughJSON() throws {
        let c = DataPlaneCounters()
        c.countDrop(.noRoute)
        c.countDrop(.unknownPeer, 3)
        c.tunToUDPPackets.wrappingIncrement(by: 2, ordering: .relaxed)
        c.tunToUDPBytes.wrappingIncrement(by: 200, ordering: .relaxed)
        c.icmpRateLimited.wrappingIncrement(ordering: .relaxed)
        let snap = c.snapshot()
        XCTAssertEqual(Set(snap.drops.keys), Set(DropReason.allCases.map(\.rawValue)))
        XCTAssertEqual(snap.drops(.noRoute), 1)
        XCTAssertEqual(snap.drops(.unknownPeer), 3)
        XCTAssertEqual(snap.drops(.malformed), 0)
        XCTAssertEqual(snap.tunToUDP, DirectionCounts(packets: 2, bytes: 200))
        XCTAssertEqual(snap.icmpRateLimited, 1)
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        let json = String(decoding: try encoder.encode(snap), as: UTF8.self)
        XCTAssertTrue(json.contains("\"unknownPeer\":3"), json)
        XCTAssertTrue(json.contains("\"tunToUDP\":{\"bytes\":200,\"packets\":2}"), json)
        XCTAssertEqual(try JSONDecoder().decode(DataPlaneCountersSnapshot.self, from: Data(json.utf8)), snap)
        // Dense indices: every reason has its own counter.
        XCTAssertEqual(Set(DropReason.allCases.map(\.index)), Set(0..<DropReason.allCases.count))
    }

    func testDefaultICMPSourceIsNeverANodeAddress() {
        XCTAssertEqual(config.icmpSource, ip("10.244.0.0"))
        XCTAssertEqual(config.tunAddress, ip("10.244.1.0"))
        // The node that leased the overlay's first /24 would own 10.244.0.0: use the overlay's last address.
        XCTAssertEqual(ForwardingConfig(network: net("10.244.0.0/16"), subnet: net("10.244.0.0/24")).icmpSource,
                       ip("10.244.255.255"))
        XCTAssertEqual(ForwardingConfig(network: net("10.0.0.0/8"), subnet: net("10.0.0.0/16")).icmpSource,
                       ip("10.255.255.255"))
        XCTAssertEqual(ForwardingConfig(network: net("10.0.0.0/8"), subnet: net("10.5.0.0/16")).icmpSource,
                       ip("10.0.0.0"))
        XCTAssertEqual(ForwardingConfig(network: net("10.244.0.0/16"), subnet: net("10.244.1.0/24"),
                                        icmpSource: ip("10.244.9.9")).icmpSource, ip("10.244.9.9"))
    }

    func testForwardDecrementsTTLAndPicksLongestPrefix() {
        var d = PacketDecider(config: config)
        let pkt = makeIPv4(source: ip("10.244.1.2"), destination: ip("10.244.2.200"), ttl: 64,
                           payload: [UInt8](repeating: 9, count: 100))
        let (v, after, _) = fromTun(&d, pkt + [0xEE, 0xEE])  // trailing bytes past the total length
        XCTAssertEqual(v, .forward(peer: 2, length: 120))  // the /25, not the /24
        XCTAssertEqual(after[8], 63)
        XCTAssertEqual(referenceChecksum(Array(after[0..<20])), 0)
        XCTAssertEqual(Array(after[20..<120]), Array(pkt[20...]))
        XCTAssertEqual(fromTun(&d, makeIPv4(source: ip("10.244.1.2"), destination: ip("10.244.2.7"))).0,
                       .forward(peer: 0, length: 24))
    }

    func testNoRouteGivesNetUnreachableFromTheOverlayAddress() {
        var d = PacketDecider(config: config)
        let echo = makeIPv4(source: ip("10.244.1.2"), destination: ip("10.244.7.9"), proto: 1, ttl: 64,
                            payload: makeICMP(type: 8, rest: [0x12, 0x34, 0, 1], data: Array("abcdefgh".utf8)))
        let (v, after, reply) = fromTun(&d, echo)
        XCTAssertEqual(v, .icmpToTun(length: 28 + echo.count, reason: .noRoute))
        XCTAssertEqual(after, echo, "the dropped packet is not modified")
        XCTAssertEqual(reply[9], 1)
        XCTAssertEqual(IPv4Address(UInt32(word(reply, 12)) << 16 | UInt32(word(reply, 14))), ip("10.244.0.0"))
        XCTAssertEqual(IPv4Address(UInt32(word(reply, 16)) << 16 | UInt32(word(reply, 18))), ip("10.244.1.2"))
        XCTAssertEqual(Array(reply[20..<22]), [3, 0])
        XCTAssertEqual(Array(reply[28...]), echo)
        XCTAssertEqual(referenceChecksum(Array(reply[0..<20])), 0)
        XCTAssertEqual(referenceChecksum(Array(reply[20...])), 0)
        // Identification counts up per generated error.
        XCTAssertEqual(word(reply, 4), 0)
        XCTAssertEqual(word(fromTun(&d, echo).2, 4), 1)
    }

    func testTTLOneGivesTimeExceededAndNoICMPAboutErrors() {
        var d = PacketDecider(config: config)
        let pkt = makeIPv4(source: ip("10.244.1.2"), destination: ip("10.244.3.1"), ttl: 1)
        let (v, after, reply) = fromTun(&d, pkt)
        XCTAssertEqual(v, .icmpToTun(length: 28 + pkt.count, reason: .ttlExpired))
        XCTAssertEqual(after, pkt)
        XCTAssertEqual(Array(reply[20..<22]), [11, 0])
        // An ICMP error that cannot be forwarded is dropped silently.
        let err = makeIPv4(source: ip("10.244.1.2"), destination: ip("10.244.7.9"), proto: 1,
                           payload: makeICMP(type: 3, code: 1, data: pkt))
        XCTAssertEqual(fromTun(&d, err).0, .drop(.noRoute))
        XCTAssertEqual(fromTun(&d, makeIPv4(source: ip("10.244.1.2"), destination: ip("10.244.7.9"),
                                            flagsFragment: 0x0004)).0, .drop(.noRoute))
    }

    func testMalformedNotIPv4AndOversize() {
        var d = PacketDecider(config: config)
        XCTAssertEqual(fromTun(&d, [0x60] + [UInt8](repeating: 0, count: 39)).0, .drop(.notIPv4))
        XCTAssertEqual(fromTun(&d, [0x45, 0, 0, 10] + [UInt8](repeating: 0, count: 16)).0, .drop(.malformed))
        var small = PacketDecider(config: ForwardingConfig(network: net("10.244.0.0/16"), subnet: net("10.244.1.0/24"),
                                                         maxPacketLength: 100))
        let big = makeIPv4(source: ip("10.244.1.2"), destination: ip("10.244.2.1"), payload: filled(0, 81))
        XCTAssertEqual(fromTun(&small, big).0, .drop(.oversize))
        XCTAssertEqual(fromTun(&small, Array(big[0..<100])).0, .drop(.malformed))
        XCTAssertEqual(fromUDP(&small, big, from: "192.168.1.2").0, .drop(.oversize))
    }

    func testRateLimitSuppressesAfterBurst() {
        var d = PacketDecider(config: config, rateLimiter: ICMPRateLimiter(ratePerSecond: 1, burst: 3, clock: { 0 }))
        let pkt = makeIPv4(source: ip("10.244.1.2"), destination: ip("10.244.7.9"))
        for _ in 0..<3 {
            guard case .icmpToTun = fromTun(&d, pkt).0 else { return XCTFail() }
        }
        XCTAssertEqual(fromTun(&d, pkt).0, .drop(.noRoute, icmpRateLimited: true))
    }

    func testUDPDeliverFromTheRightPeer() {
        var d = PacketDecider(config: config)
        let pkt = makeIPv4(source: ip("10.244.3.4"), destination: ip("10.244.1.2"), ttl: 63)
        let (v, after, _) = fromUDP(&d, pkt, from: "192.168.1.3")
        XCTAssertEqual(v, .deliver(peer: 1, length: pkt.count))
        XCTAssertEqual(after[8], 62)
        XCTAssertEqual(referenceChecksum(Array(after[0..<20])), 0)
        // Longest prefix decides whose subnet the inner source is in.
        XCTAssertEqual(fromUDP(&d, makeIPv4(source: ip("10.244.2.130"), destination: ip("10.244.1.2")),
                               from: "192.168.1.4").0, .deliver(peer: 2, length: 24))
    }

    func testUDPPeerChecks() {
        var d = PacketDecider(config: config)
        let from3 = makeIPv4(source: ip("10.244.3.4"), destination: ip("10.244.1.2"))
        // Not a peer at all.
        XCTAssertEqual(fromUDP(&d, from3, from: "192.168.1.99").0, .drop(.unknownPeer))
        // A peer, but the inner source belongs to another peer's subnet.
        XCTAssertEqual(fromUDP(&d, from3, from: "192.168.1.2").0, .drop(.spoofedSource))
        // A peer, inner source in nobody's subnet (e.g. our own, or outside the overlay).
        XCTAssertEqual(fromUDP(&d, makeIPv4(source: ip("10.244.1.7"), destination: ip("10.244.1.2")),
                               from: "192.168.1.2").0, .drop(.spoofedSource))
        XCTAssertEqual(fromUDP(&d, makeIPv4(source: ip("8.8.8.8"), destination: ip("10.244.1.2")),
                               from: "192.168.1.77").0, .drop(.unknownPeer))
        // Nothing was modified on the way to a drop.
        XCTAssertEqual(fromUDP(&d, from3, from: "192.168.1.99").1, from3)

        // A covering route (10.244.0.0/16 via a gateway node) must not let that node send from our own subnet.
        var covered = PacketDecider(config: config)
        let gateway = RouteTable([PeerRoute(subnet: net("10.244.0.0/16"), endpoint: Endpoint(address: ip("192.168.1.9"), port: 8285))])
        let fromOurSubnet = makeIPv4(source: ip("10.244.1.7"), destination: ip("10.244.1.2"))
        var copy = fromOurSubnet
        let verdict = copy.withUnsafeMutableBytes { pkt in
            withUnsafeTemporaryAllocation(byteCount: 576, alignment: 8) { scratch in
                covered.fromUDP(pkt, outerSource: ip("192.168.1.9"), snapshot: gateway.snapshot(), scratch: scratch)
            }
        }
        XCTAssertEqual(verdict, .drop(.spoofedSource))
        XCTAssertEqual(fromUDP(&covered, from3, from: "192.168.1.3").0, .deliver(peer: 1, length: 24))

        var relaxed = PacketDecider(config: ForwardingConfig(network: net("10.244.0.0/16"),
                                                             subnet: net("10.244.1.0/24"), peerCheck: .relaxed))
        XCTAssertEqual(fromUDP(&relaxed, from3, from: "203.0.113.5").0, .deliver(peer: 1, length: 24))
        XCTAssertEqual(fromUDP(&relaxed, makeIPv4(source: ip("10.244.9.1"), destination: ip("10.244.1.2")),
                               from: "203.0.113.5").0, .drop(.unknownPeer))
        XCTAssertEqual(fromUDP(&relaxed, makeIPv4(source: ip("10.244.9.1"), destination: ip("10.244.1.2")),
                               from: "192.168.1.3").0, .drop(.spoofedSource))
    }

    /// The attacker is a peer (or, in relaxed mode, anyone who puts a peer's pod address in the inner source):
    /// it addresses the inner packet to the node's underlay, a host beyond it, or the internet, hoping the
    /// node's kernel accepts or forwards it as if one of our pods had sent it.
    func testUDPDropsInnerDestinationsOutsideTheNetwork() {
        var strict = PacketDecider(config: config)
        var relaxed = PacketDecider(config: ForwardingConfig(network: net("10.244.0.0/16"),
                                                             subnet: net("10.244.1.0/24"), peerCheck: .relaxed))
        for destination in ["192.168.1.1", "127.0.0.1", "10.245.0.1", "10.243.255.255", "0.0.0.0",
                            "255.255.255.255", "224.0.0.1", "8.8.8.8"] {
            let pkt = makeIPv4(source: ip("10.244.3.4"), destination: ip(destination))
            let (v, after, _) = fromUDP(&strict, pkt, from: "192.168.1.3")
            XCTAssertEqual(v, .drop(.outsideNetwork), destination)
            XCTAssertEqual(after, pkt, "nothing modified on the way to the drop")
            XCTAssertEqual(fromUDP(&relaxed, pkt, from: "203.0.113.5").0, .drop(.outsideNetwork), destination)
            // Counted under this reason whoever sent it, strangers included.
            XCTAssertEqual(fromUDP(&strict, pkt, from: "192.168.1.99").0, .drop(.outsideNetwork), destination)
            // Even with TTL 1: no time-exceeded error goes back about it.
            let ttl1 = makeIPv4(source: ip("10.244.3.4"), destination: ip(destination), ttl: 1)
            XCTAssertEqual(fromUDP(&strict, ttl1, from: "192.168.1.3").0, .drop(.outsideNetwork), destination)
        }
        // Inside the network it is still delivered: our pods, our tun address, other nodes' subnets (routed on by
        // our kernel through the tun again), the network's first and last address.
        for destination in ["10.244.1.2", "10.244.1.0", "10.244.2.1", "10.244.0.0", "10.244.255.255"] {
            let pkt = makeIPv4(source: ip("10.244.3.4"), destination: ip(destination))
            XCTAssertEqual(fromUDP(&strict, pkt, from: "192.168.1.3").0, .deliver(peer: 1, length: pkt.count),
                           destination)
        }
    }

    func testUDPTTLExpiryGoesBackToThePeerFromOurTunAddress() {
        var d = PacketDecider(config: config)
        let pkt = makeIPv4(source: ip("10.244.3.4"), destination: ip("10.244.1.2"), ttl: 1)
        let (v, after, reply) = fromUDP(&d, pkt, from: "192.168.1.3")
        XCTAssertEqual(v, .icmpToPeer(length: 28 + pkt.count, peer: 1, reason: .ttlExpired))
        XCTAssertEqual(after, pkt)
        XCTAssertEqual(IPv4Address(UInt32(word(reply, 12)) << 16 | UInt32(word(reply, 14))), ip("10.244.1.0"))
        XCTAssertEqual(IPv4Address(UInt32(word(reply, 16)) << 16 | UInt32(word(reply, 18))), ip("10.244.3.4"))
        XCTAssertEqual(Array(reply[20..<22]), [11, 0])
        XCTAssertEqual(referenceChecksum(Array(reply[20...])), 0)
        // Not about an ICMP error, and not for an unknown sender.
        let err = makeIPv4(source: ip("10.244.3.4"), destination: ip("10.244.1.2"), proto: 1, ttl: 1,
                           payload: makeICMP(type: 11))
        XCTAssertEqual(fromUDP(&d, err, from: "192.168.1.3").0, .drop(.ttlExpired))
        XCTAssertEqual(fromUDP(&d, pkt, from: "192.168.1.50").0, .drop(.unknownPeer))
    }
}
