import Foundation
import XCTest
@testable import FlannelCore
@testable import FlannelUDP

/// Issue 12, "unchecked routes", from a writer to the registry: leases and configs written with etcdctl that
/// would steal a pod's traffic, point the node at itself, at loopback, multicast or broadcast, loop datagrams
/// through the tun, or make the whole address space (or the underlay) the overlay. Runs in ClusterTests'
/// topology (etcd on the test wire).
extension ClusterTests {
    /// Like `makeNode`, with the daemon's log in `tmp/node-<index>.log`.
    func makeLoggedNode(_ index: Int) throws -> (Node, log: String) {
        let log = "\(tmp)/node-\(index).log"
        return (try makeNode(index, extra: ["--log-file", log]), log)
    }

    func peerRoutes(_ node: Node) throws -> [String: String] {
        let r = fu(node.ns, ["route", "list", "--json"])
        XCTAssertEqual(r.status, 0, r.description)
        let json = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any]
        var out: [String: String] = [:]
        for p in (json?["peers"] as? [[String: Any]]) ?? [] {
            out[p["subnet"] as? String ?? ""] = p["endpoint"] as? String ?? ""
        }
        return out
    }

    func testHostileLeasesAreIgnoredLoggedOnceAndPodsStillTalk() throws {
        let (n1, log1) = try makeLoggedNode(1)
        let (n2, _) = try makeLoggedNode(2)
        try waitFor("pods ping each other", timeout: 5) { pings(n1, n2) && pings(n2, n1) }
        let before = try peerRoutes(n1)
        XCTAssertEqual(before, [n2.subnet.description: "192.168.77.2:8285"])

        // Free /24s for the hostile leases (the nodes leased two at random).
        var free = (100...254).map { IPv4Network(address: IPv4Address(10, 244, UInt8($0), 0), prefixLength: 24) }
        free.removeAll { $0 == n1.subnet || $0 == n2.subnet }
        // A /32 on node 2's pod: by longest prefix it would take that pod's traffic to a host that is no node.
        let thief = IPv4Network(address: IPv4Address(n2.subnet.address.value + 2), prefixLength: 32)
        let hostile: [(IPv4Network, String, String)] = [
            (thief, "192.168.77.66", "is not a /24"),
            (free[0], "127.0.0.1", "loopback"),
            (free[1], "224.0.0.1", "multicast"),
            (free[2], "0.0.0.0", "unspecified"),
            (free[3], "255.255.255.255", "broadcast"),
            (free[4], "10.244.77.1", "inside the overlay network"),
            (free[5], n1.underlay, "this node's own public IP"),
        ]
        func key(_ s: IPv4Network) -> String { "/coreos.com/network/subnets/\(s.address)-\(s.prefixLength)" }
        for (subnet, ip, _) in hostile {
            try etcdctl(["put", key(subnet), #"{"PublicIP":"\#(ip)","PublicIPv6":null}"#])
        }
        func logged(_ subnet: IPv4Network) -> Int {
            let text = (try? String(contentsOfFile: log1, encoding: .utf8)) ?? ""
            return text.split(separator: "\n").filter {
                $0.contains("ignoring a lease") && $0.contains("route \(subnet) via")
            }.count
        }
        try waitFor("node 1 logs every hostile lease", timeout: 5) { hostile.allSatisfy { logged($0.0) >= 1 } }

        // More watch updates with the hostile leases still there: a legitimate lease comes and goes, twice.
        let extra = free[6]
        for _ in 0..<2 {
            try etcdctl(["put", key(extra), #"{"PublicIP":"192.168.77.3","PublicIPv6":null}"#])
            try waitFor("node 1 routes the new lease") { try peerRoutes(n1)[extra.description] == "192.168.77.3:8285" }
            try etcdctl(["del", key(extra)])
            try waitFor("node 1 drops the lease again") { try peerRoutes(n1)[extra.description] == nil }
        }
        XCTAssertEqual(try peerRoutes(n1), before, "a hostile lease became a route")
        let text = (try? String(contentsOfFile: log1, encoding: .utf8)) ?? ""
        for (subnet, _, why) in hostile {
            XCTAssertEqual(logged(subnet), 1, "lease \(subnet) logged \(logged(subnet)) times:\n\(text)")
            XCTAssertTrue(text.contains(why), "log names why \(subnet) is refused (\(why)):\n\(text)")
        }
        // Pod traffic unaffected, including to the pod the /32 aimed at.
        XCTAssertTrue(pings(n1, n2))
        XCTAssertTrue(pings(n2, n1))
    }

    func testRegistryNetworkSwallowingTheAddressSpaceOrTheUnderlayIsRefused() throws {
        for (network, why) in [("0.0.0.0/0", "is the whole IPv4 address space"),
                               ("192.168.0.0/16", "covers the underlay address 192.168.77.1")] {
            try etcdctl(["put", "/coreos.com/network/config", #"{"Network":"\#(network)","Backend":{"Type":"udp"}}"#])
            let ns = try plugNode(prefix: "fu-cln", index: 1)
            let routesBefore = try ns.run(["ip", "route", "show", "table", "all"])
            let linksBefore = try ns.run(["ip", "-o", "link", "show"])
            let file = "\(tmp)/refused.env"
            let up = fu(ns, ["up", "--etcd-endpoints", etcdURL, "--iface", "eth0", "--subnet-file", file, "--detach"])
            XCTAssertEqual(up.status, 64, "usage exit for \(network): \(up.description)")
            XCTAssertTrue(up.stderr.contains("network \(network) \(why)"), up.stderr)
            // Nothing changed: no lease taken, no device, no route, no subnet file.
            XCTAssertEqual(try etcdctl(["get", "--prefix", "/coreos.com/network/subnets/", "--keys-only"])
                .trimmingCharacters(in: .whitespacesAndNewlines), "", "a lease was taken")
            XCTAssertEqual(try ns.run(["ip", "route", "show", "table", "all"]), routesBefore)
            XCTAssertEqual(try ns.run(["ip", "-o", "link", "show"]), linksBefore)
            XCTAssertFalse(FileManager.default.fileExists(atPath: file))
            ns.destroy()
        }
    }
}
