import XCTest
@testable import FlannelCore
@testable import FlannelUDP

final class PeersFileTests: XCTestCase {
    func testParsesRoutesCommentsAndPorts() throws {
        let text = """
            # node B
            10.244.2.0/24  192.168.77.2
            \t10.244.3.0/24\t192.168.77.3:8286   # another port

            """
        let routes = try PeersFile.parse(text, path: "peers", defaultPort: 8285)
        XCTAssertEqual(routes, [
            PeerRoute(subnet: try IPv4Network(parsing: "10.244.2.0/24"), endpoint: Endpoint(address: IPv4Address(192, 168, 77, 2), port: 8285)),
            PeerRoute(subnet: try IPv4Network(parsing: "10.244.3.0/24"), endpoint: Endpoint(address: IPv4Address(192, 168, 77, 3), port: 8286)),
        ])
    }

    func testRejectsBadLinesWithLineNumbers() {
        let cases: [(String, Int, String)] = [
            ("10.244.2.0/24 192.168.77.2\n10.244.3.0/24\n", 2, "expected 'SUBNET IP[:PORT]', found 1 field"),
            ("\n\n10.244.3.5/24 1.2.3.4\n", 3, "host bits set"),
            ("10.244.3.0/24 1.2.3.4:99999\n", 1, "port outside"),
            ("10.244.3.0/24 1.2.3\n", 1, "not an IPv4 address"),
            ("10.244.3.0/24 1.2.3.4\n10.244.3.0/24 1.2.3.5\n", 2, "already listed on line 1"),
            ("10.244.3.0/24 1.2.3.4 extra\n", 1, "found 3 fields"),
        ]
        for (text, line, fragment) in cases {
            XCTAssertThrowsError(try PeersFile.parse(text, path: "p", defaultPort: 8285)) { error in
                guard let e = error as? PeersFile.ParseError else { return XCTFail("wrong error \(error)") }
                XCTAssertEqual(e.line, line, text)
                XCTAssertTrue(e.description.contains(fragment), "\(e.description) lacks \(fragment)")
                XCTAssertTrue(e.description.hasPrefix("p:\(line): "), e.description)
            }
        }
    }
}

final class SubnetFileTests: XCTestCase {
    func testFlannelFormat() throws {
        let f = SubnetFile(network: try IPv4Network(parsing: "10.244.0.0/16"), subnet: try IPv4Network(parsing: "10.244.1.0/24"),
                           mtu: 1472, ipMasq: false)
        XCTAssertEqual(f.contents, "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n")
        XCTAssertEqual(try SubnetFile.parse(f.contents), f)
    }

    func testParsesFlanneldOutputWithExtraKeys() throws {
        let text = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\nFLANNEL_IPV6_NETWORK=fd00::/56\n"
        let f = try SubnetFile.parse(text)
        XCTAssertEqual(f.subnet.description, "10.244.7.0/24")
        XCTAssertEqual(f.mtu, 1450)
        XCTAssertTrue(f.ipMasq)
        XCTAssertThrowsError(try SubnetFile.parse("FLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1450\n"))
        XCTAssertThrowsError(try SubnetFile.parse("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=x\n"))
    }

    func testAtomicWriteCreatesDirectories() throws {
        let dir = NSTemporaryDirectory() + "fu-subnet-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/a/b/subnet.env"
        let f = SubnetFile(network: try IPv4Network(parsing: "10.244.0.0/16"), subnet: try IPv4Network(parsing: "10.244.1.0/24"), mtu: 1472, ipMasq: false)
        try f.write(to: path)
        XCTAssertEqual(try SubnetFile.load(path: path), f)
        let leftovers = try FileManager.default.contentsOfDirectory(atPath: dir + "/a/b")
        XCTAssertEqual(leftovers, ["subnet.env"])
    }
}

final class RouteStoreTests: XCTestCase {
    final class Recorder: RoutePublisher, @unchecked Sendable {
        var published: [[PeerRoute]] = []
        func publish(_ routes: [PeerRoute]) { published.append(routes) }
    }

    func route(_ s: String, _ e: String) -> PeerRoute {
        PeerRoute(subnet: try! IPv4Network(parsing: s), endpoint: try! Endpoint(parsing: e, defaultPort: 8285))
    }

    func testOriginsMergeAndManualWins() throws {
        let rec = Recorder()
        let store = RouteStore(publisher: rec, rules: PeerRouteRules(network: try IPv4Network(parsing: "10.244.0.0/16"),
                                                                     ownSubnet: try IPv4Network(parsing: "10.244.1.0/24")))
        try store.replace([route("10.244.2.0/24", "192.168.0.2"), route("10.244.3.0/24", "192.168.0.3")], origin: .registry)
        try store.add(route("10.244.2.0/24", "192.168.0.22"), origin: .manual)
        XCTAssertEqual(rec.published.last, [route("10.244.2.0/24", "192.168.0.22"), route("10.244.3.0/24", "192.168.0.3")])
        XCTAssertEqual(store.entries().map(\.origin), [.manual, .registry])
        try store.remove(try IPv4Network(parsing: "10.244.2.0/24"), origin: .manual)
        XCTAssertEqual(rec.published.last, [route("10.244.2.0/24", "192.168.0.2"), route("10.244.3.0/24", "192.168.0.3")])
        try store.removeAny(try IPv4Network(parsing: "10.244.3.0/24"))
        XCTAssertEqual(rec.published.last, [route("10.244.2.0/24", "192.168.0.2")])
    }

    func testRejectsOutsideAndOwnSubnetAndChangesNothing() throws {
        let rec = Recorder()
        let store = RouteStore(publisher: rec, rules: PeerRouteRules(network: try IPv4Network(parsing: "10.244.0.0/16"),
                                                                     ownSubnet: try IPv4Network(parsing: "10.244.1.0/24")))
        XCTAssertThrowsError(try store.add(route("10.245.2.0/24", "192.168.0.2")))
        XCTAssertThrowsError(try store.add(route("10.244.1.0/24", "192.168.0.2")))
        XCTAssertThrowsError(try store.replace([route("10.244.2.0/24", "192.168.0.2"), route("10.244.1.128/25", "192.168.0.2")], origin: .file))
        // A covering route (10.244.0.0/16 via a gateway node) was allowed until issue 12: it let the gateway
        // claim our own pods' addresses, so it is refused like a route inside our subnet.
        XCTAssertThrowsError(try store.add(route("10.244.0.0/16", "192.168.0.9")))
        XCTAssertThrowsError(try store.removeAny(try IPv4Network(parsing: "10.244.9.0/24")))
        XCTAssertTrue(rec.published.isEmpty)
        XCTAssertTrue(store.entries().isEmpty)
    }
}

final class ControlProtocolTests: XCTestCase {
    func testRoundTripIsOneLine() throws {
        let requests: [ControlRequest] = [.status, .routeList, .routeAdd(subnet: "10.244.2.0/24", endpoint: "1.2.3.4:8285"),
                                          .routeDel(subnet: "10.244.2.0/24"), .reloadPeers, .shutdown(keepLease: true)]
        for r in requests {
            let line = ControlProtocol.encodeLine(r)
            XCTAssertEqual(line.last, UInt8(ascii: "\n"))
            XCTAssertEqual(line.filter { $0 == UInt8(ascii: "\n") }.count, 1)
            XCTAssertEqual(try ControlProtocol.decode(ControlRequest.self, from: line.dropLast()), r)
        }
        for garbage in ["", "{", "[]", "{\"nope\":{}}", "\u{0}\u{1}"] {
            XCTAssertThrowsError(try ControlProtocol.decode(ControlRequest.self, from: Array(garbage.utf8)), garbage)
        }
    }

    /// What the server reads: a handover request on the wire as before it had a type of its own, an ordinary
    /// request as one, and a line that names one of each (or a handover with a bad value) as neither.
    func testMessagesKeepTheWireFormatAndAreExactlyOneRequest() throws {
        let handovers: [(HandoverRequest, String)] = [
            (.begin(version: 1), #"{"handoverBegin":{"version":1}}"#),
            (.commit(token: "t"), #"{"handoverCommit":{"token":"t"}}"#),
            (.abort(token: "t"), #"{"handoverAbort":{"token":"t"}}"#),
        ]
        for (request, line) in handovers {
            XCTAssertEqual(String(decoding: ControlProtocol.encodeLine(ControlMessage.handover(request)).dropLast(),
                                  as: UTF8.self), line)
            XCTAssertEqual(try ControlProtocol.decode(ControlMessage.self, from: Array(line.utf8)), .handover(request))
        }
        XCTAssertEqual(try ControlProtocol.decode(ControlMessage.self, from: Array(#"{"status":{}}"#.utf8)),
                       .request(.status))
        for bad in [#"{"status":{},"handoverBegin":{"version":1}}"#, #"{"handoverCommit":{"token":7}}"#, #"{"nope":{}}"#] {
            XCTAssertThrowsError(try ControlProtocol.decode(ControlMessage.self, from: Array(bad.utf8)), bad)
        }
    }
}

final class CleanupPlanTests: XCTestCase {
    func testFindsHostGWAndVXLANLeftoversOnlyInsideTheNetwork() throws {
        let net = try IPv4Network(parsing: "10.244.0.0/16")
        let links = [
            Link(index: 1, name: "lo", mtu: 65536, flags: 0),
            Link(index: 2, name: "eth0", mtu: 1500, flags: 0, kind: "veth"),
            Link(index: 3, name: "flannel.1", mtu: 1450, flags: 0, kind: "vxlan"),
            Link(index: 4, name: "flannel0", mtu: 1472, flags: 0, kind: "tun"),
            Link(index: 5, name: "flannel.2", mtu: 1450, flags: 0, kind: "vxlan"),   // address outside: not ours
            Link(index: 6, name: "flannel.x", mtu: 1450, flags: 0, kind: "vxlan"),   // not a flannel name
        ]
        let addrs = [
            InterfaceAddress(index: 2, address: IPv4Address(192, 168, 77, 1), prefixLength: 24),
            InterfaceAddress(index: 3, address: IPv4Address(10, 244, 1, 0), prefixLength: 32),
            InterfaceAddress(index: 5, address: IPv4Address(172, 16, 0, 0), prefixLength: 32),
        ]
        let hostgw = Route(destination: try IPv4Network(parsing: "10.244.2.0/24"), gateway: IPv4Address(192, 168, 77, 2), outputInterface: 2)
        let outside = Route(destination: try IPv4Network(parsing: "172.16.0.0/24"), gateway: IPv4Address(192, 168, 77, 2), outputInterface: 2)
        let throughVXLAN = Route(destination: try IPv4Network(parsing: "10.244.3.0/24"), gateway: IPv4Address(10, 244, 3, 0), outputInterface: 3)
        let ours = Route(destination: net, outputInterface: 4)
        let wholeNetViaGW = Route(destination: net, gateway: IPv4Address(192, 168, 77, 9), outputInterface: 2)
        let onLink = Route(destination: try IPv4Network(parsing: "10.244.9.0/24"), outputInterface: 2)
        let actions = Cleanup.plan(network: net, links: links, addresses: addrs,
                                   routes: [hostgw, outside, throughVXLAN, ours, wholeNetViaGW, onLink],
                                   keepDevices: ["flannel0"])  // a live daemon's
        XCTAssertEqual(actions, [
            .deleteRoute(hostgw, device: "eth0"),
            .deleteRoute(throughVXLAN, device: "flannel.1"),
            .deleteLink(index: 3, name: "flannel.1"),
        ])
        XCTAssertEqual(actions.map(\.description), [
            "delete route 10.244.2.0/24 via 192.168.77.2 dev eth0",
            "delete route 10.244.3.0/24 via 10.244.3.0 dev flannel.1",
            "delete vxlan device flannel.1",
        ])
        XCTAssertEqual(Cleanup.plan(network: net, links: links, addresses: addrs, routes: [hostgw], keepDevices: ["eth0", "flannel.1", "flannel0"]), [])
    }

    func testFlannelVXLANNames() {
        XCTAssertTrue(Cleanup.isFlannelVXLANName("flannel.1"))
        XCTAssertTrue(Cleanup.isFlannelVXLANName("flannel.4096"))
        XCTAssertFalse(Cleanup.isFlannelVXLANName("flannel."))
        XCTAssertFalse(Cleanup.isFlannelVXLANName("flannel0"))
        XCTAssertFalse(Cleanup.isFlannelVXLANName("flannel.1a"))
    }
}
