import XCTest
@testable import FlannelCore
@testable import FlannelUDP
import TestSupport

/// `cleanup` after a switch from any flannel backend. Device kinds this kernel cannot create (ipip, wireguard) are
/// fed to the planner as the kernel would describe them: RTM_NEWLINK / RTM_NEWNEIGH bytes in kernel layout, parsed
/// by the same code that parses a real dump.
final class CleanupBackendsTests: XCTestCase {
    let network = try! IPv4Network(parsing: "10.244.0.0/16")

    /// An RTM_NEWLINK dump entry as the kernel sends it for a device of `kind` (ifi_type, flags and attribute order
    /// as `ip -d link show` of such a device on a kernel that has the driver).
    static func linkMessage(index: Int32, name: String, kind: String, type: UInt16, flags: UInt32, mtu: UInt32) -> [UInt8] {
        var body = Wire()
        body.u8(0); body.u8(0); body.u16(type)      // ifi_family AF_UNSPEC, pad, ifi_type
        body.i32(index)
        body.u32(flags)
        body.u32(0)
        body.attr(3, Array(name.utf8) + [0])        // IFLA_IFNAME
        body.attr(13, le32(1000))                   // IFLA_TXQLEN
        body.attr(4, le32(mtu))                     // IFLA_MTU
        var info = Wire()
        info.attr(1, Array(kind.utf8) + [0])        // IFLA_INFO_KIND
        info.attr(2 | 0x8000, [])                   // IFLA_INFO_DATA (nested, empty here)
        body.attr(18 | 0x8000, info.bytes)          // IFLA_LINKINFO
        return Wire.message(type: 16, flags: 2, body: body).bytes
    }

    /// An RTM_NEWNEIGH dump entry: `10.244.<n>.0 lladdr 0a:58:0a:f4:0n:00 PERMANENT` on ifindex `index`, as
    /// flanneld's vxlan backend installs one per peer.
    static func neighbourMessage(index: Int32, third: UInt8) -> [UInt8] {
        var body = Wire()
        body.u8(2); body.u8(0); body.u16(0)         // ndm_family AF_INET, pad1, pad2
        body.i32(index)                             // ndm_ifindex
        body.u16(0x80)                              // ndm_state NUD_PERMANENT
        body.u8(0); body.u8(1)                      // ndm_flags, ndm_type RTN_UNICAST
        body.attr(1, [10, 244, third, 0])           // NDA_DST
        body.attr(2, [0x0a, 0x58, 0x0a, 0xf4, third, 0x00])  // NDA_LLADDR
        body.attr(3, le32(0) + le32(0) + le32(0) + le32(0))   // NDA_CACHEINFO
        body.attr(4, le32(0))                       // NDA_PROBES
        return Wire.message(type: 28, flags: 2, body: body).bytes
    }

    func testNeighbourRequestsAndReply() throws {
        XCTAssertEqual(NetlinkMessages.dumpNeighbours(sequence: 7), [
            28, 0, 0, 0, 30, 0, 0x05, 0x03, 7, 0, 0, 0, 0, 0, 0, 0,   // RTM_GETNEIGH, REQUEST|ACK|DUMP
            2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,                       // ndmsg: AF_INET, all else 0
        ])
        let n = try XCTUnwrap(NetlinkMessages.parseNeighbour(Self.neighbourMessage(index: 9, third: 2)))
        XCTAssertEqual(n, Neighbour(index: 9, address: IPv4Address(10, 244, 2, 0),
                                    linkAddress: [0x0a, 0x58, 0x0a, 0xf4, 2, 0], state: 0x80))
        XCTAssertEqual(n.description, "10.244.2.0 lladdr 0a:58:0a:f4:02:00")
        XCTAssertEqual(NetlinkMessages.deleteNeighbour(n, sequence: 8), [
            36, 0, 0, 0, 29, 0, 0x05, 0, 8, 0, 0, 0, 0, 0, 0, 0,      // RTM_DELNEIGH, REQUEST|ACK
            2, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0,                       // AF_INET, ifindex 9
            8, 0, 1, 0, 10, 244, 2, 0,                                // NDA_DST 10.244.2.0
        ])
        // An IPv6 entry (another family) is not an IPv4 neighbour; one without NDA_DST is malformed.
        var v6 = Self.neighbourMessage(index: 9, third: 2)
        v6[16] = 10
        XCTAssertNil(NetlinkMessages.parseNeighbour(v6))
        var noDst = Wire()
        noDst.u8(2); noDst.u8(0); noDst.u16(0); noDst.i32(9); noDst.u16(0x80); noDst.u8(0); noDst.u8(1)
        XCTAssertNil(NetlinkMessages.parseNeighbour(Wire.message(type: 28, flags: 2, body: noDst).bytes))
    }

    /// Every backend's device, as the kernel describes it, with its address, routes and neighbours; plus the same
    /// names with the wrong kind or an address outside the network, and a live daemon's flannel0, all kept.
    func testEveryBackendsDeviceIsFoundByNameAndKind() throws {
        let up: UInt32 = 0x1_0041  // UP | RUNNING | LOWER_UP
        let p2p: UInt32 = 0x1_00d1  // UP | POINTOPOINT | RUNNING | NOARP | LOWER_UP
        let wire: [[UInt8]] = [
            Self.linkMessage(index: 2, name: "eth0", kind: "veth", type: 1, flags: up, mtu: 1500),
            Self.linkMessage(index: 3, name: "flannel.1", kind: "vxlan", type: 1, flags: up, mtu: 1450),
            Self.linkMessage(index: 4, name: "flannel-v6.1", kind: "vxlan", type: 1, flags: up, mtu: 1430),
            Self.linkMessage(index: 5, name: "flannel.ipip", kind: "ipip", type: 768, flags: p2p, mtu: 1480),
            Self.linkMessage(index: 6, name: "flannel-wg", kind: "wireguard", type: 65534, flags: p2p, mtu: 1420),
            Self.linkMessage(index: 7, name: "flannel-wg-v6", kind: "wireguard", type: 65534, flags: p2p, mtu: 1420),
            Self.linkMessage(index: 8, name: "flannel0", kind: "tun", type: 65534, flags: p2p, mtu: 1472),
            Self.linkMessage(index: 9, name: "flannel-wg", kind: "veth", type: 1, flags: up, mtu: 1500),   // wrong kind
            Self.linkMessage(index: 10, name: "flannel.ipip2", kind: "ipip", type: 768, flags: p2p, mtu: 1480), // not a flannel name
            Self.linkMessage(index: 11, name: "flannel.7", kind: "vxlan", type: 1, flags: up, mtu: 1450),  // address outside
        ]
        let links = try wire.map { try XCTUnwrap(NetlinkMessages.parseLink($0)) }
        XCTAssertEqual(links[3], Link(index: 5, name: "flannel.ipip", mtu: 1480, flags: p2p, kind: "ipip"))
        XCTAssertEqual(links[4].kind, "wireguard")
        let addrs = [
            InterfaceAddress(index: 2, address: IPv4Address(192, 168, 77, 1), prefixLength: 24),
            InterfaceAddress(index: 3, address: IPv4Address(10, 244, 1, 0), prefixLength: 32),
            InterfaceAddress(index: 5, address: IPv4Address(10, 244, 1, 0), prefixLength: 32),
            InterfaceAddress(index: 6, address: IPv4Address(10, 244, 1, 0), prefixLength: 32),
            InterfaceAddress(index: 8, address: IPv4Address(10, 244, 1, 0), prefixLength: 32),
            InterfaceAddress(index: 11, address: IPv4Address(172, 16, 0, 0), prefixLength: 32),
        ]
        let viaIPIP = Route(destination: try IPv4Network(parsing: "10.244.2.0/24"), gateway: IPv4Address(192, 168, 77, 2),
                            outputInterface: 5)
        let viaWG = Route(destination: network, outputInterface: 6)
        let viaTun = Route(destination: network, outputInterface: 8)
        let neighbours = try [Self.neighbourMessage(index: 3, third: 2), Self.neighbourMessage(index: 2, third: 3)]
            .map { try XCTUnwrap(NetlinkMessages.parseNeighbour($0)) }
        let actions = Cleanup.plan(network: network, links: links, addresses: addrs, routes: [viaIPIP, viaWG, viaTun],
                                   neighbours: neighbours)
        XCTAssertEqual(actions.map(\.description), [
            "delete route 10.244.2.0/24 via 192.168.77.2 dev flannel.ipip",
            "delete route 10.244.0.0/16 dev flannel-wg",
            "delete route 10.244.0.0/16 dev flannel0",
            "delete neighbour 10.244.2.0 lladdr 0a:58:0a:f4:02:00 dev flannel.1",
            "delete vxlan device flannel.1",
            "delete vxlan device flannel-v6.1",
            "delete ipip device flannel.ipip",
            "delete wireguard device flannel-wg",
            "delete wireguard device flannel-wg-v6",
            "delete tun device flannel0",
        ])
        // flannel0 of a live flannel-udp daemon is never a leftover.
        let live = Cleanup.plan(network: network, links: links, addresses: addrs, routes: [viaTun],
                                keepDevices: ["flannel0"])
        XCTAssertFalse(live.contains { $0.description.contains("flannel0") }, "\(live)")
    }

    func testFlanneldRulesAreRemovedOnlyForThisNetwork() {
        let ours = Cleanup.NetfilterView.Table(family: "ip", name: "flannel-ipv4", listing: """
            table ip flannel-ipv4 {
            	comment "rules for flannel-ipv4"
            	chain postrtg {
            		type nat hook postrouting priority srcnat; policy accept;
            		ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random
            	}
            }
            """)
        let v6 = Cleanup.NetfilterView.Table(family: "ip6", name: "flannel-ipv6", listing: "table ip6 flannel-ipv6 {\n}\n")
        let nat = IPTablesSave.parse(NetfilterRulesTests.natSave, table: "nat")
        let filter = IPTablesSave.parse(NetfilterRulesTests.filterSave, table: "filter")
        let nat6 = IPTablesSave.parse("""
            *nat
            :POSTROUTING ACCEPT [0:0]
            :FLANNEL-POSTRTG - [0:0]
            -A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
            -A FLANNEL-POSTRTG -s fd00:10:244::/56 ! -d ff00::/8 -m comment --comment "flanneld masq" -j MASQUERADE
            COMMIT
            """, table: "nat")
        let view = Cleanup.NetfilterView(nftTables: [ours, v6], iptables: [nat, filter], ip6tables: [nat6])
        // natSave jumps to the nat chain twice: both jumps go, then what `cleanup` removes in a namespace.
        XCTAssertEqual(Cleanup.plan(network: network, links: [], addresses: [], routes: [], netfilter: view).map(\.description),
                       ["delete iptables rule -t nat -A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG"]
                       + flanneldMasqueradeCleanup + ["delete nftables table ip6 flannel-ipv6"])
        // Another network's rules are noted and left alone.
        let other = try! IPv4Network(parsing: "10.50.0.0/16")
        let kept = Cleanup.plan(network: other, links: [], addresses: [], routes: [],
                                netfilter: Cleanup.NetfilterView(nftTables: [ours], iptables: [nat, filter]))
        XCTAssertEqual(kept.filter(\.isChange), [])
        XCTAssertEqual(kept.count, 3)
    }

    func testStaleCNI0IsNotedAndWithFixReaddressed() {
        let links = [Link(index: 4, name: "cni0", mtu: 1450, flags: 0x1_1043, kind: "bridge")]
        let stale = InterfaceAddress(index: 4, address: IPv4Address(10, 244, 5, 1), prefixLength: 24)
        let subnet = try! IPv4Network(parsing: "10.244.1.0/24")
        let noted = Cleanup.plan(network: network, links: links, addresses: [stale], routes: [], subnet: subnet)
        XCTAssertEqual(noted.count, 1)
        XCTAssertFalse(noted[0].isChange)
        XCTAssertTrue(noted[0].description.contains("cni0 has 10.244.5.1/24, outside this node's subnet 10.244.1.0/24"), noted[0].description)
        let fixed = Cleanup.plan(network: network, links: links, addresses: [stale], routes: [], subnet: subnet, fixCNI0: true)
        XCTAssertEqual(fixed.map(\.description), ["delete address 10.244.5.1/24 dev cni0", "add address 10.244.1.1/24 dev cni0"])
        let good = InterfaceAddress(index: 4, address: IPv4Address(10, 244, 1, 1), prefixLength: 24)
        XCTAssertEqual(Cleanup.plan(network: network, links: links, addresses: [good], routes: [], subnet: subnet, fixCNI0: true), [])
        // A veth called cni0 is not the CNI bridge.
        let veth = [Link(index: 4, name: "cni0", mtu: 1450, flags: 0, kind: "veth")]
        XCTAssertEqual(Cleanup.plan(network: network, links: veth, addresses: [stale], routes: [], subnet: subnet), [])
    }
}
