import Foundation
import XCTest
@testable import FlannelCore
@testable import FlannelUDP
import TestSupport

/// `cleanup` on a node switched away from flanneld's vxlan backend with --ip-masq, in a fresh namespace:
///
///     namespace N ("fu-clb-<pid>-<n>")
///       eth0 192.168.77.1/24 (veth, peer eth0peer)
///       flanneld's leftovers: flannel.1 (vxlan, 10.244.1.0/32) with a route and a neighbour per peer,
///         nftables table ip flannel-ipv4, iptables FLANNEL-POSTRTG / FLANNEL-FWD with their jumps (and the
///         ip6tables FLANNEL-POSTRTG of its IPv6 side),
///         a host-gw route 10.244.3.0/24 via 192.168.77.3, cni0 (bridge) still at 10.244.5.1/24 after the node's
///         subnet changed to 10.244.1.0/24
///       someone else's: keep0 (bridge, 172.16.9.1/24), a route 172.16.5.0/24 via 192.168.77.2, an iptables
///         MASQUERADE rule for 172.16.0.0/12, an nftables table ip keepme
final class CleanupLeftoversTests: XCTestCase {
    var tmp = ""

    override func setUpWithError() throws {
        try requireRoot()
        try requireTools(["nft", "iptables", "iptables-save", "ip6tables"], packages: "nftables iptables")
        tmp = try makeTestDirectory("fu-clb", for: self)
    }

    /// What flanneld's nftables mode installs for network 10.244.0.0/16, lease 10.244.1.0/24 (its rules, written
    /// out as `nft list` prints them).
    static let flanneldTable = """
        table ip flannel-ipv4 {
        	comment "rules for flannel-ipv4"
        	chain postrtg {
        		comment "chain to manage traffic masquerading by flannel"
        		type nat hook postrouting priority srcnat; policy accept;
        		meta mark 0x00004000 return
        		ip saddr 10.244.1.0/24 ip daddr 10.244.0.0/16 return
        		ip saddr 10.244.0.0/16 ip daddr 10.244.1.0/24 return
        		ip saddr != 10.244.1.0/24 ip daddr 10.244.0.0/16 return
        		ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random
        		ip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade fully-random
        	}
        	chain forward {
        		comment "chain to accept flannel traffic"
        		type filter hook forward priority filter; policy accept;
        		ip saddr 10.244.0.0/16 accept
        		ip daddr 10.244.0.0/16 accept
        	}
        }
        """

    func testCleanupRemovesExactlyWhatFlanneldVXLANWithIPMasqLeft() throws {
        let ns = try TestNamespace(prefix: "fu-clb")
        addTeardownBlock { ns.destroy() }
        try addLoneUnderlay(ns)

        // flanneld's vxlan backend: device, a route and a neighbour per peer.
        try ns.run(["ip", "link", "add", "flannel.1", "type", "vxlan", "id", "1", "dev", "eth0", "dstport", "8472", "nolearning"])
        try ns.run(["ip", "addr", "add", "10.244.1.0/32", "dev", "flannel.1"])
        try ns.run(["ip", "link", "set", "flannel.1", "up"])
        try ns.run(["ip", "route", "add", "10.244.2.0/24", "via", "10.244.2.0", "dev", "flannel.1", "onlink"])
        try ns.run(["ip", "neigh", "add", "10.244.2.0", "lladdr", "0a:58:0a:f4:02:00", "dev", "flannel.1", "nud", "permanent"])
        // its --ip-masq rules, both kinds.
        let nftFile = tmp + "/flanneld.nft"
        try Self.flanneldTable.write(toFile: nftFile, atomically: true, encoding: .utf8)
        try ns.run(["nft", "-f", nftFile])
        try ns.run(["iptables", "-t", "nat", "-N", "FLANNEL-POSTRTG"])
        try ns.run(["iptables", "-t", "nat", "-A", "POSTROUTING", "-m", "comment", "--comment", "flanneld masq", "-j", "FLANNEL-POSTRTG"])
        try ns.run(["iptables", "-t", "nat", "-A", "FLANNEL-POSTRTG", "-s", "10.244.0.0/16", "!", "-d", "224.0.0.0/4", "-m", "comment", "--comment", "flanneld masq", "-j", "MASQUERADE", "--random-fully"])
        try ns.run(["iptables", "-t", "filter", "-N", "FLANNEL-FWD"])
        try ns.run(["iptables", "-t", "filter", "-A", "FORWARD", "-m", "comment", "--comment", "flanneld forward", "-j", "FLANNEL-FWD"])
        try ns.run(["iptables", "-t", "filter", "-A", "FLANNEL-FWD", "-s", "10.244.0.0/16", "-m", "comment", "--comment", "flanneld forward", "-j", "ACCEPT"])
        try ns.run(["ip6tables", "-t", "nat", "-N", "FLANNEL-POSTRTG"])
        try ns.run(["ip6tables", "-t", "nat", "-A", "POSTROUTING", "-m", "comment", "--comment", "flanneld masq", "-j", "FLANNEL-POSTRTG"])
        try ns.run(["ip6tables", "-t", "nat", "-A", "FLANNEL-POSTRTG", "-s", "fd00:10:244::/56", "-m", "comment", "--comment", "flanneld masq", "-j", "MASQUERADE"])
        // host-gw from before that, and a cni0 still addressed for the old subnet.
        try ns.run(["ip", "route", "add", "10.244.3.0/24", "via", "192.168.77.3", "dev", "eth0"])
        try ns.run(["ip", "link", "add", "cni0", "type", "bridge"])
        try ns.run(["ip", "addr", "add", "10.244.5.1/24", "dev", "cni0"])
        try ns.run(["ip", "link", "set", "cni0", "up"])
        // Someone else's rule, route and device.
        try ns.run(["iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "172.16.0.0/12", "-j", "MASQUERADE"])
        try ns.run(["nft", "add table ip keepme; add chain ip keepme out { type filter hook output priority 0; }; add rule ip keepme out ip daddr 172.16.0.0/12 accept"])
        try ns.run(["ip", "route", "add", "172.16.5.0/24", "via", "192.168.77.2", "dev", "eth0"])
        try ns.run(["ip", "link", "add", "keep0", "type", "bridge"])
        try ns.run(["ip", "addr", "add", "172.16.9.1/24", "dev", "keep0"])

        let expected = [
            "delete route 10.244.2.0/24 via 10.244.2.0 dev flannel.1",
            "delete route 10.244.3.0/24 via 192.168.77.3 dev eth0",
            "delete neighbour 10.244.2.0 lladdr 0a:58:0a:f4:02:00 dev flannel.1",
            "delete vxlan device flannel.1",
        ] + flanneldMasqueradeCleanup + [
            "delete address 10.244.5.1/24 dev cni0",
            "add address 10.244.1.1/24 dev cni0",
        ]
        let args = ["cleanup", "--network", "10.244.0.0/16", "--subnet", "10.244.1.0/24", "--fix-cni0"]

        // Without --fix-cni0 the stale cni0 is only reported.
        let report = fu(ns, ["cleanup", "--network", "10.244.0.0/16", "--subnet", "10.244.1.0/24", "--dry-run"])
        XCTAssertEqual(report.status, 0, report.description)
        XCTAssertTrue(report.stdout.hasPrefix("note: cni0 has 10.244.5.1/24, outside this node's subnet 10.244.1.0/24"), report.stdout)
        XCTAssertFalse(report.stdout.contains("dev cni0\n"), report.stdout)

        let before = try systemView(ns)
        let dry = fu(ns, args + ["--dry-run"])
        XCTAssertEqual(dry.status, 0, dry.description)
        XCTAssertEqual(dry.stdout.split(separator: "\n").map(String.init), expected.map { "[dry-run] \($0)" })
        XCTAssertEqual(try systemView(ns), before, "--dry-run changed the namespace")

        let real = fu(ns, args)
        XCTAssertEqual(real.status, 0, real.description)
        XCTAssertEqual(real.stdout.split(separator: "\n").map(String.init), expected.map { "[#] \($0)" })

        let after = try systemView(ns)
        for gone in ["flannel", "FLANNEL", "10.244.2.0", "10.244.3.0", "10.244.5.1"] {
            XCTAssertFalse(after.contains(gone), "\(gone) is still there:\n\(after)")
        }
        for kept in ["-A POSTROUTING -s 172.16.0.0/12 -j MASQUERADE", "table ip keepme", "ip daddr 172.16.0.0/12 accept",
                     "172.16.5.0/24 via 192.168.77.2 dev eth0", "keep0", "inet 172.16.9.1/24", "inet 10.244.1.1/24"] {
            XCTAssertTrue(after.contains(kept), "someone else's \(kept) is gone:\n\(after)")
        }
        let nothing = fu(ns, args)
        XCTAssertEqual(nothing.stdout, "nothing to clean up in 10.244.0.0/16\n", nothing.description)
    }

    /// flanneld's own udp backend leaves a flannel0 tun (here a persistent one, as a daemon that died mid-way
    /// might): cleanup removes it with its route; a flannel0 that a live flannel-udp daemon owns it never touches.
    func testStaleFlannel0IsRemovedButALiveDaemonsIsNot() throws {
        let ns = try TestNamespace(prefix: "fu-clb")
        addTeardownBlock { ns.destroy() }
        try addLoneUnderlay(ns)
        try ns.run(["ip", "tuntap", "add", "flannel0", "mode", "tun"])
        try ns.run(["ip", "addr", "add", "10.244.1.0/32", "dev", "flannel0"])
        try ns.run(["ip", "link", "set", "flannel0", "up"])
        try ns.run(["ip", "route", "add", "10.244.0.0/16", "dev", "flannel0"])

        let real = fu(ns, ["cleanup", "--network", "10.244.0.0/16"])
        XCTAssertEqual(real.status, 0, real.description)
        XCTAssertEqual(real.stdout, "[#] delete route 10.244.0.0/16 dev flannel0\n[#] delete tun device flannel0\n")
        XCTAssertFalse(try ns.run(["ip", "-o", "link", "show"]).contains("flannel0"))

        let up = fu(ns, ["up", "--network", "10.244.0.0/16", "--subnet", "10.244.1.0/24", "--iface", "eth0",
                         "--subnet-file", tmp + "/subnet.env", "--detach"])
        XCTAssertEqual(up.status, 0, up.description)
        addTeardownBlock { _ = self.fu(ns, ["down"]) }
        let live = fu(ns, ["cleanup", "--network", "10.244.0.0/16"])
        XCTAssertEqual(live.stdout, "nothing to clean up in 10.244.0.0/16\n", live.description)
        XCTAssertTrue(try ns.run(["ip", "-o", "link", "show"]).contains("flannel0"))
    }

    private func fu(_ ns: TestNamespace, _ args: [String]) -> CommandResult {
        runFlannelUDP(in: ns, args, runDirectory: tmp + "/run")
    }

    /// Links, IPv4 addresses, routes, neighbours and every rule, without counters (nft -s) and generation comments.
    private func systemView(_ ns: TestNamespace) throws -> String {
        let links = try ns.run(["ip", "-o", "link", "show"])
            .replacingOccurrences(of: #"\s+link/.*"#, with: "", options: .regularExpression)
        let save = try (ns.run(["iptables-save"]) + ns.run(["ip6tables-save"])).split(separator: "\n")
            .filter { !$0.hasPrefix("#") }
            .map { $0.replacingOccurrences(of: #"\[\d+:\d+\]"#, with: "", options: .regularExpression) }
            .joined(separator: "\n")
        let addrs = try ns.run(["ip", "-4", "-o", "addr", "show"])
        let routes = try ns.run(["ip", "-4", "route", "show", "table", "all"])
        let neighbours = try ns.run(["ip", "-4", "neigh", "show", "nud", "permanent"])
        return links + addrs + routes + neighbours + (try ns.run(["nft", "-s", "list", "ruleset"])) + save
    }
}
