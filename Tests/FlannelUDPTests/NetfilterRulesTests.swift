import XCTest
@testable import FlannelCore
@testable import FlannelUDP

/// The masquerade rules as text: the nftables batch and the iptables-restore inputs, compared line for line with
/// what flanneld's pkg/trafficmngr installs (names, chains, comments, order), and iptables-save parsing.
final class NetfilterRulesTests: XCTestCase {
    let spec = MasqueradeSpec(network: try! IPv4Network(parsing: "10.244.0.0/16"),
                              subnet: try! IPv4Network(parsing: "10.244.1.0/24"))

    func testNFTablesBatchIsOneTransactionThatFlushesAndRefillsBothChains() {
        let expected = """
            add table ip flannel-ipv4 { comment "rules for flannel-ipv4"; }
            add chain ip flannel-ipv4 postrtg { type nat hook postrouting priority srcnat; comment "chain to manage traffic masquerading by flannel"; }
            add chain ip flannel-ipv4 forward { type filter hook forward priority filter; comment "chain to accept flannel traffic"; }
            flush chain ip flannel-ipv4 postrtg
            flush chain ip flannel-ipv4 forward
            add rule ip flannel-ipv4 postrtg meta mark & 0x4000 == 0x4000 return
            add rule ip flannel-ipv4 postrtg ip saddr 10.244.1.0/24 ip daddr 10.244.0.0/16 return
            add rule ip flannel-ipv4 postrtg ip saddr 10.244.0.0/16 ip daddr 10.244.1.0/24 return
            add rule ip flannel-ipv4 postrtg ip saddr != 10.244.0.0/16 ip daddr 10.244.1.0/24 return
            add rule ip flannel-ipv4 postrtg ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random
            add rule ip flannel-ipv4 postrtg ip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade fully-random
            add rule ip flannel-ipv4 forward ip saddr 10.244.0.0/16 accept
            add rule ip flannel-ipv4 forward ip daddr 10.244.0.0/16 accept

            """
        XCTAssertEqual(NFTablesMasquerade.installBatch(spec), expected)
        var plain = spec
        plain.randomFully = false
        XCTAssertFalse(NFTablesMasquerade.installBatch(plain).contains("fully-random"))
        XCTAssertEqual(NFTablesMasquerade.removeBatch(family: "ip", table: "flannel-ipv4"),
                       "add table ip flannel-ipv4\ndelete table ip flannel-ipv4\n")
    }

    func testIPTablesInstallOnACleanNodeDeclaresTheChainsAndAppendsTheJumps() {
        let input = IPTablesMasquerade.restoreInput(spec, nat: IPTablesSave(table: "nat"),
                                                    filter: IPTablesSave(table: "filter"))
        let expected = """
            *nat
            :FLANNEL-POSTRTG - [0:0]
            -A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
            -A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN
            -A FLANNEL-POSTRTG -s 10.244.1.0/24 -d 10.244.0.0/16 -m comment --comment "flanneld masq" -j RETURN
            -A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment "flanneld masq" -j RETURN
            -A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment "flanneld masq" -j RETURN
            -A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
            -A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
            COMMIT
            *filter
            :FLANNEL-FWD - [0:0]
            -A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD
            -A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT
            -A FLANNEL-FWD -d 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT
            COMMIT

            """
        XCTAssertEqual(input, expected)
    }

    /// A node where flanneld (or an earlier run) left two jumps: both are deleted in the same commit that appends
    /// the one jump, and someone else's rules are not mentioned at all.
    func testIPTablesReinstallDeletesExistingJumpsInTheSameCommit() {
        let nat = IPTablesSave.parse(Self.natSave, table: "nat")
        let input = IPTablesMasquerade.restoreInput(spec, nat: nat, filter: IPTablesSave(table: "filter"))
        let natBlock = input.components(separatedBy: "COMMIT")[0]
        XCTAssertTrue(natBlock.hasPrefix("*nat\n:FLANNEL-POSTRTG - [0:0]\n"
            + "-D POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n"
            + "-D POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n"
            + "-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n"), input)
        XCTAssertFalse(input.contains("KUBE-POSTROUTING"), input)
        XCTAssertFalse(input.contains("-s 10.0.0.0/8"), input)
    }

    func testIPTablesSaveParsesTablesChainsRulesAndJumps() {
        let nat = IPTablesSave.parse(Self.natSave + Self.filterSave, table: "nat")
        XCTAssertEqual(nat.chains, ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING", "FLANNEL-POSTRTG", "KUBE-POSTROUTING"])
        XCTAssertEqual(nat.rules.count, 6)
        XCTAssertEqual(nat.jumps(to: "FLANNEL-POSTRTG").count, 2)
        XCTAssertEqual(nat.rules(in: "FLANNEL-POSTRTG").map(\.spec),
                       ["-s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully"])
        XCTAssertEqual(nat.rules[2].target, "KUBE-POSTROUTING")
        XCTAssertNil(nat.rules[3].target.flatMap { $0 == "FLANNEL-POSTRTG" ? $0 : nil })
        let filter = IPTablesSave.parse(Self.natSave + Self.filterSave, table: "filter")
        XCTAssertEqual(filter.chains, ["INPUT", "FORWARD", "OUTPUT", "FLANNEL-FWD"])
        XCTAssertEqual(filter.jumps(to: "FLANNEL-FWD").map(\.chain), ["FORWARD"])
        XCTAssertEqual(IPTablesSave.parse(Self.natSave, table: "mangle"), IPTablesSave(table: "mangle"))
    }

    func testIPTablesRemovalDeletesJumpsThenFlushesAndDeletesChainsOnly() {
        let nat = IPTablesSave.parse(Self.natSave, table: "nat")
        let filter = IPTablesSave.parse(Self.filterSave, table: "filter")
        let expected = """
            *nat
            -D POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
            -D POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
            -F FLANNEL-POSTRTG
            -X FLANNEL-POSTRTG
            COMMIT
            *filter
            -D FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD
            -F FLANNEL-FWD
            -X FLANNEL-FWD
            COMMIT

            """
        XCTAssertEqual(IPTablesMasquerade.removalInput(nat: nat, filter: filter), expected)
        XCTAssertNil(IPTablesMasquerade.removalInput(nat: IPTablesSave(table: "nat"), filter: IPTablesSave(table: "filter")))
    }

    static let natSave = """
        # Generated by iptables-save v1.8.9 (nf_tables) on Tue Dec  1 14:03:22 2026
        *nat
        :PREROUTING ACCEPT [0:0]
        :INPUT ACCEPT [0:0]
        :OUTPUT ACCEPT [0:0]
        :POSTROUTING ACCEPT [12:720]
        :FLANNEL-POSTRTG - [0:0]
        :KUBE-POSTROUTING - [0:0]
        -A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
        -A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
        -A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
        -A POSTROUTING -s 10.0.0.0/8 -o eth1 -j MASQUERADE
        -A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
        -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
        COMMIT
        # Completed on Tue Dec  1 14:03:22 2026

        """

    static let filterSave = """
        *filter
        :INPUT ACCEPT [0:0]
        :FORWARD DROP [0:0]
        :OUTPUT ACCEPT [0:0]
        :FLANNEL-FWD - [0:0]
        -A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD
        -A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT
        COMMIT

        """
}
