import Foundation
import XCTest
@testable import FlannelCore
@testable import FlannelUDP

/// Cluster mode end to end: a real etcd (Debian's etcd-server) on the underlay, nodes that take their subnet
/// from it with `flannel-udp up --etcd-endpoints`, and pods that must all reach each other.
///
///                   wire (bridge br0, etcd on 192.168.77.250:2379)
///        +----------------+----------------+----------------+
///     node 1 (.1)      node 2 (.2)      node 3 (.3)      node 4 (.4, joins later)
///     pod: <leased subnet>.2 behind cni0 <leased subnet>.1
final class ClusterTests: EtcdWireTestCase {
    override func setUpWithError() throws {
        try requireRoot()
        try requireEtcd()
        try setUpWire("fu-cl")
        try startEtcd()
        try putNetworkConfig()
    }

    struct Node {
        var ns: TestNamespace
        var pod: TestNamespace
        var underlay: String
        var subnet: IPv4Network
        var podAddress: String { IPv4Address(subnet.address.value + 2).description }
    }

    func fu(_ ns: TestNamespace, _ args: [String], environment: [String: String] = [:]) -> CommandResult {
        runFlannelUDP(in: ns, args, runDirectory: tmp + "/run", environment: environment)
    }

    /// A node joined to the wire and brought up from etcd, with a pod in the subnet it leased; `extra` options
    /// for its `up`.
    func makeNode(_ index: Int, extra: [String] = []) throws -> Node {
        let pod = try TestNamespace(prefix: "fu-clp")
        addTeardownBlock { pod.destroy() }
        let ns = try plugNode(prefix: "fu-cln", index: index)
        let up = fu(ns, ["up", "--etcd-endpoints", etcdURL, "--iface", "eth0", "--subnet-file", "\(tmp)/subnet-\(index).env", "--detach"] + extra)
        XCTAssertEqual(up.status, 0, up.description)
        let file = try SubnetFile.load(path: "\(tmp)/subnet-\(index).env")
        let subnet = IPv4Network(address: file.subnet.address, prefixLength: file.subnet.prefixLength)
        try attachPod(pod, to: ns, subnet: subnet)
        return Node(ns: ns, pod: pod, underlay: "192.168.77.\(index)", subnet: subnet)
    }

    func pings(_ from: Node, _ to: Node) -> Bool {
        ping(from: from.pod, to.podAddress, wait: 1).status == 0
    }

    func peerSubnets(_ node: Node) throws -> Set<String> {
        let r = fu(node.ns, ["route", "list", "--json"])
        guard r.status == 0 else { throw TimedOut(what: "route list: \(r.description)", seconds: 0) }
        let json = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any]
        return Set(((json?["peers"] as? [[String: Any]]) ?? []).compactMap { $0["subnet"] as? String })
    }

    func testNodesShareOneEtcdLikeFlannelNodes() throws {
        var nodes = try (1...3).map { try makeNode($0) }
        XCTAssertEqual(Set(nodes.map(\.subnet)).count, 3, "subnets must be distinct: \(nodes.map(\.subnet))")
        for n in nodes { XCTAssertTrue(try IPv4Network(parsing: "10.244.0.0/16").contains(n.subnet)) }

        // Every lease is in flannel's key layout with flannel's value.
        let keys = try etcdctl(["get", "--prefix", "/coreos.com/network/subnets/", "--keys-only"])
        for n in nodes {
            let key = "/coreos.com/network/subnets/\(n.subnet.address)-\(n.subnet.prefixLength)"
            XCTAssertTrue(keys.contains(key), keys)
            XCTAssertEqual(try etcdctl(["get", key, "--print-value-only"]).trimmingCharacters(in: .whitespacesAndNewlines),
                           #"{"PublicIP":"\#(n.underlay)","PublicIPv6":null}"#)
        }

        // Every pod reaches every other pod.
        for a in nodes { for b in nodes where a.subnet != b.subnet {
            try waitFor("\(a.podAddress) pings \(b.podAddress)", timeout: 5) { pings(a, b) }
        } }

        // A fourth node is reachable from the others within 2 s of its `up`.
        let fourth = try makeNode(4)
        let joined = Date()
        for a in nodes { try waitFor("\(a.podAddress) reaches the new node", timeout: 2) { pings(a, fourth) } }
        print("fourth node reachable from all after \(String(format: "%.2f", Date().timeIntervalSince(joined))) s")
        nodes.append(fourth)

        // A lease written by hand in flannel's format (as a flannel node would) becomes a route everywhere.
        let written = try freeSubnet(notIn: nodes.map(\.subnet), thirdOctets: 200...205)
        let writtenKey = SubnetKey.key(prefix: "/coreos.com/network", subnet: written)
        try etcdctl(["put", writtenKey, #"{"PublicIP":"192.168.77.200","PublicIPv6":null}"#])
        for n in nodes { try waitFor("the hand-written lease reaches node \(n.underlay)", timeout: 2) { try peerSubnets(n).contains(written.description) } }
        let listed = fu(nodes[0].ns, ["route", "list", "--json"]).stdout
        XCTAssertTrue(listed.contains("192.168.77.200:8285"), listed)

        // etcd restarted under traffic: no route is lost and the watch resumes.
        let before = try nodes.map { try peerSubnets($0) }
        stopEtcd()
        XCTAssertTrue(pings(nodes[0], nodes[1]), "traffic must keep flowing while etcd is down")
        try startEtcd()
        XCTAssertEqual(try nodes.map { try peerSubnets($0) }, before)
        try etcdctl(["del", writtenKey])
        for n in nodes { try waitFor("the watch resumed on \(n.underlay)", timeout: 10) { try !peerSubnets(n).contains(written.description) } }
        for a in nodes { for b in nodes where a.subnet != b.subnet { XCTAssertTrue(pings(a, b), "\(a.podAddress) -> \(b.podAddress)") } }

        // A node going down releases its lease and leaves the others' tables.
        XCTAssertEqual(fu(fourth.ns, ["down"]).status, 0)
        let gone = "\(fourth.subnet)"
        for n in nodes.prefix(3) { try waitFor("\(gone) leaves node \(n.underlay)'s table", timeout: 3) { try !peerSubnets(n).contains(gone) } }
        XCTAssertFalse(try etcdctl(["get", "--prefix", "/coreos.com/network/subnets/", "--keys-only"]).contains("\(fourth.subnet.address)-24"))
    }

    /// `up --replace` in cluster mode: the new daemon keeps the old one's lease (the same key on the same etcd
    /// lease, renewed by the new daemon), follows the registry, and `down` afterwards releases it.
    func testReplaceKeepsTheLease() throws {
        let a = try makeNode(1)
        let b = try makeNode(2)
        try waitFor("pods reach each other", timeout: 5) { pings(a, b) && pings(b, a) }
        let key = "/coreos.com/network/subnets/\(a.subnet.address)-\(a.subnet.prefixLength)"
        func etcdLease() throws -> Int {
            let json = try JSONSerialization.jsonObject(with: Data(try etcdctl(["get", key, "-w", "json"]).utf8)) as? [String: Any]
            return try XCTUnwrap((json?["kvs"] as? [[String: Any]])?.first?["lease"] as? Int, "\(json ?? [:])")
        }
        let lease = try etcdLease()
        let old = try XCTUnwrap(try daemonJSON(fu(a.ns, ["status", "--json"]))["pid"] as? Int)
        let r = fu(a.ns, ["up", "--etcd-endpoints", etcdURL, "--iface", "eth0", "--subnet-file", "\(tmp)/subnet-1.env",
                          "--detach", "--replace"])
        XCTAssertEqual(r.status, 0, r.description)
        let status = try daemonJSON(fu(a.ns, ["status", "--json"]))
        XCTAssertNotEqual(status["pid"] as? Int, old)
        XCTAssertEqual((status["lease"] as? [String: Any])?["subnet"] as? String, a.subnet.description)
        XCTAssertEqual(try etcdLease(), lease, "the same etcd lease")
        XCTAssertTrue(pings(a, b) && pings(b, a))
        XCTAssertTrue(try peerSubnets(a).contains(b.subnet.description))
        // The new daemon follows the registry.
        let written = try freeSubnet(notIn: [a.subnet, b.subnet], thirdOctets: 201...205)
        try etcdctl(["put", SubnetKey.key(prefix: "/coreos.com/network", subnet: written),
                     #"{"PublicIP":"192.168.77.201","PublicIPv6":null}"#])
        try waitFor("the new daemon sees a new lease", timeout: 3) { try peerSubnets(a).contains(written.description) }
        XCTAssertEqual(fu(a.ns, ["down"]).status, 0)
        XCTAssertFalse(try etcdctl(["get", "--prefix", "/coreos.com/network/subnets/", "--keys-only"]).contains(key),
                       "down after a replacement releases the lease")
    }

    func testTenNodesStartedAtOnceGetDistinctSubnets() throws {
        // A /20 of /24s leaves 15 free subnets (flannel's SubnetMin skips the first): the ten race for few.
        try etcdctl(["put", "/coreos.com/network/config", #"{"Network":"10.244.0.0/20","SubnetLen":24,"Backend":{"Type":"udp"}}"#])
        let namespaces = try (1...10).map { try plugNode(prefix: "fu-cln", index: 10 + $0) }
        // All ten `up`s run at the same time, each on its own thread; each writes only its own slot.
        nonisolated(unsafe) let results = UnsafeMutableBufferPointer<CommandResult>.allocate(capacity: namespaces.count)
        defer { results.deallocate() }
        let dir = tmp, url = etcdURL
        let names = namespaces.map(\.name)
        DispatchQueue.concurrentPerform(iterations: names.count) { i in
            (results.baseAddress! + i).initialize(to: runCommand(
                ["ip", "netns", "exec", names[i], flannelUDPBinary(), "up", "--etcd-endpoints", url,
                 "--iface", "eth0", "--subnet-file", "\(dir)/ten-\(i).env", "--detach"],
                environment: ["FLANNEL_UDP_RUN_DIR": dir + "/run"]))
        }
        var subnets: [String] = []
        for i in 0..<namespaces.count {
            XCTAssertEqual(results[i].status, 0, results[i].description)
            subnets.append(try SubnetFile.load(path: "\(tmp)/ten-\(i).env").subnet.description)
        }
        XCTAssertEqual(Set(subnets).count, 10, "subnets: \(subnets.sorted())")
        let keys = try etcdctl(["get", "--prefix", "/coreos.com/network/subnets/", "--keys-only"])
            .split(separator: "\n").filter { !$0.isEmpty }
        XCTAssertEqual(keys.count, 10, "\(keys)")
    }

    func testBadRegistryConfigIsOneClearError() throws {
        try etcdctl(["put", "/coreos.com/network/config", #"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#])
        let ns = try plugNode(prefix: "fu-cln", index: 9)
        let up = fu(ns, ["up", "--etcd-endpoints", etcdURL, "--iface", "eth0", "--subnet-file", "\(tmp)/x.env", "--detach"])
        XCTAssertEqual(up.status, 64, up.description)
        XCTAssertTrue(up.stderr.contains("vxlan"), up.stderr)
        XCTAssertFalse(try ns.run(["ip", "-o", "link", "show"]).contains("flannel0"))
        XCTAssertFalse(try etcdctl(["get", "--prefix", "/coreos.com/network/subnets/", "--keys-only"]).contains("-24"))
    }
}
