import XCTest
@testable import FlannelCore
@testable import FlannelUDP
import TestSupport

// Requests are compared byte for byte with reference bytes written out by hand from the kernel's struct layouts
// (<linux/netlink.h>, <linux/rtnetlink.h>, <linux/if_link.h>, <linux/if_addr.h>); numbers are literals, not the
// library's constants, so a wrong constant in the library shows up here. Multi-byte fields are little-endian:
// these tests assume a little-endian host (x86-64, arm64), as flannel-udp targets.

final class NetlinkRequestTests: XCTestCase {
    func testNewRouteWithoutGateway() {
        // ip route add 10.244.0.0/16 dev <7>   (scope link, proto boot, table main)
        let route = Route(destination: net("10.244.0.0/16"), outputInterface: 7)
        XCTAssertEqual(route.scope, 253)
        let expected: [UInt8] = [
            52, 0, 0, 0,            // nlmsg_len
            24, 0,                  // RTM_NEWROUTE
            0x05, 0x06,             // NLM_F_REQUEST | NLM_F_ACK | NLM_F_EXCL | NLM_F_CREATE
            0x04, 0x03, 0x02, 0x01, // nlmsg_seq
            0, 0, 0, 0,             // nlmsg_pid: the kernel
            2, 16, 0, 0,            // rtm_family AF_INET, rtm_dst_len 16, rtm_src_len, rtm_tos
            254, 3, 253, 1,         // rtm_table main, rtm_protocol boot, rtm_scope link, rtm_type unicast
            0, 0, 0, 0,             // rtm_flags
            8, 0, 15, 0, 254, 0, 0, 0,   // RTA_TABLE 254
            8, 0, 1, 0, 10, 244, 0, 0,   // RTA_DST 10.244.0.0
            8, 0, 4, 0, 7, 0, 0, 0,      // RTA_OIF 7
        ]
        XCTAssertEqual(NetlinkMessages.newRoute(route, sequence: 0x0102_0304), expected)
    }

    func testNewRouteWithGatewayMetricAndTable() {
        // ip route add 10.244.2.0/24 via 192.168.1.12 dev <3> metric 100 table 100
        let route = Route(destination: net("10.244.2.0/24"), gateway: ip("192.168.1.12"), outputInterface: 3,
                          table: 100, priority: 100)
        XCTAssertEqual(route.scope, 0)
        let expected: [UInt8] = [
            68, 0, 0, 0, 24, 0, 0x05, 0x06, 9, 0, 0, 0, 0, 0, 0, 0,
            2, 24, 0, 0,
            100, 3, 0, 1,           // table 100, proto boot, scope universe, unicast
            0, 0, 0, 0,
            8, 0, 15, 0, 100, 0, 0, 0,     // RTA_TABLE 100
            8, 0, 1, 0, 10, 244, 2, 0,     // RTA_DST
            8, 0, 5, 0, 192, 168, 1, 12,   // RTA_GATEWAY
            8, 0, 4, 0, 3, 0, 0, 0,        // RTA_OIF
            8, 0, 6, 0, 100, 0, 0, 0,      // RTA_PRIORITY
        ]
        XCTAssertEqual(NetlinkMessages.newRoute(route, sequence: 9), expected)
    }

    func testNewRouteInTableAbove255AndDefaultRoute() {
        // rtm_table is 8 bits: table 1000 goes only in RTA_TABLE, rtm_table says RT_TABLE_UNSPEC.
        // A default route carries no RTA_DST.
        let route = Route(destination: net("0.0.0.0/0"), gateway: ip("10.0.0.1"), table: 1000)
        let expected: [UInt8] = [
            44, 0, 0, 0, 24, 0, 0x05, 0x06, 1, 0, 0, 0, 0, 0, 0, 0,
            2, 0, 0, 0, 0, 3, 0, 1, 0, 0, 0, 0,
            8, 0, 15, 0, 0xe8, 0x03, 0, 0,  // RTA_TABLE 1000
            8, 0, 5, 0, 10, 0, 0, 1,        // RTA_GATEWAY
        ]
        XCTAssertEqual(NetlinkMessages.newRoute(route, sequence: 1), expected)
    }

    func testDeleteRouteUsesWildcardProtocolAndScope() {
        let route = Route(destination: net("10.244.0.0/16"), outputInterface: 7)
        let expected: [UInt8] = [
            52, 0, 0, 0,
            25, 0,                  // RTM_DELROUTE
            0x05, 0x00,             // NLM_F_REQUEST | NLM_F_ACK
            2, 0, 0, 0, 0, 0, 0, 0,
            2, 16, 0, 0,
            254, 0, 255, 1,         // protocol RTPROT_UNSPEC, scope RT_SCOPE_NOWHERE: match any
            0, 0, 0, 0,
            8, 0, 15, 0, 254, 0, 0, 0,
            8, 0, 1, 0, 10, 244, 0, 0,
            8, 0, 4, 0, 7, 0, 0, 0,
        ]
        XCTAssertEqual(NetlinkMessages.deleteRoute(route, sequence: 2), expected)
    }

    func testNewAddress() {
        // ip addr add 10.244.1.0/32 dev <5>
        let address = InterfaceAddress(index: 5, address: ip("10.244.1.0"), prefixLength: 32)
        let expected: [UInt8] = [
            40, 0, 0, 0,
            20, 0,                  // RTM_NEWADDR
            0x05, 0x06,             // REQUEST | ACK | EXCL | CREATE
            0x78, 0x56, 0x34, 0x12, 0, 0, 0, 0,
            2, 32, 0, 0,            // ifa_family AF_INET, ifa_prefixlen 32, ifa_flags, ifa_scope universe
            5, 0, 0, 0,             // ifa_index
            8, 0, 2, 0, 10, 244, 1, 0,   // IFA_LOCAL
            8, 0, 1, 0, 10, 244, 1, 0,   // IFA_ADDRESS
        ]
        XCTAssertEqual(NetlinkMessages.newAddress(address, sequence: 0x1234_5678), expected)

        var delete = expected
        delete[4] = 21      // RTM_DELADDR
        delete[7] = 0       // no CREATE | EXCL
        XCTAssertEqual(NetlinkMessages.deleteAddress(address, sequence: 0x1234_5678), delete)
    }

    func testSetMTUAndTxQueueLength() {
        // ip link set <4> mtu 1472, ip link set <4> txqueuelen 1000: one u32 attribute each.
        func expected(_ attribute: [UInt8]) -> [UInt8] {
            [40, 0, 0, 0,
             16, 0,                 // RTM_NEWLINK
             0x05, 0x00,            // REQUEST | ACK: change an existing link, never create one
             3, 0, 0, 0, 0, 0, 0, 0,
             0, 0, 0, 0,            // ifi_family AF_UNSPEC, pad, ifi_type
             4, 0, 0, 0,            // ifi_index
             0, 0, 0, 0,            // ifi_flags
             0, 0, 0, 0]            // ifi_change: no flag changes
                + attribute
        }
        XCTAssertEqual(NetlinkMessages.setMTU(1472, index: 4, sequence: 3),
                       expected([8, 0, 4, 0, 0xc0, 0x05, 0, 0]))   // IFLA_MTU 1472
        XCTAssertEqual(NetlinkMessages.setTxQueueLength(1000, index: 4, sequence: 3),
                       expected([8, 0, 13, 0, 0xe8, 0x03, 0, 0]))  // IFLA_TXQLEN 1000
    }

    func testSetUpAndDown() {
        func expected(_ up: UInt8) -> [UInt8] {
            [32, 0, 0, 0, 16, 0, 0x05, 0x00, 4, 0, 0, 0, 0, 0, 0, 0,
             0, 0, 0, 0,
             4, 0, 0, 0,            // ifi_index
             up, 0, 0, 0,           // ifi_flags: IFF_UP or nothing
             1, 0, 0, 0]            // ifi_change: only IFF_UP
        }
        XCTAssertEqual(NetlinkMessages.setUp(true, index: 4, sequence: 4), expected(1))
        XCTAssertEqual(NetlinkMessages.setUp(false, index: 4, sequence: 4), expected(0))
    }

    func testGetLinkByNameAndIndexAndDelete() {
        let expected: [UInt8] = [
            48, 0, 0, 0,
            18, 0,                  // RTM_GETLINK
            0x05, 0x00,
            5, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,   // ifinfomsg, index 0: look up by name
            13, 0, 3, 0,            // IFLA_IFNAME, 4 + 9 bytes
            0x66, 0x6c, 0x61, 0x6e, 0x6e, 0x65, 0x6c, 0x30, 0,  // "flannel0\0"
            0, 0, 0,                // padding to 4
        ]
        XCTAssertEqual(NetlinkMessages.getLink(name: "flannel0", sequence: 5), expected)

        let byIndex: [UInt8] = [32, 0, 0, 0, 18, 0, 0x05, 0, 6, 0, 0, 0, 0, 0, 0, 0,
                                0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        XCTAssertEqual(NetlinkMessages.getLink(index: 9, sequence: 6), byIndex)
        var delete = byIndex
        delete[4] = 17      // RTM_DELLINK
        XCTAssertEqual(NetlinkMessages.deleteLink(index: 9, sequence: 6), delete)
    }

    func testDumpsAndRouteGet() {
        // Dumps add NLM_F_DUMP (NLM_F_ROOT | NLM_F_MATCH = 0x300) and ask for the IPv4 family where it matters.
        XCTAssertEqual(NetlinkMessages.dumpLinks(sequence: 7),
                       [32, 0, 0, 0, 18, 0, 0x05, 0x03, 7, 0, 0, 0, 0, 0, 0, 0] + [UInt8](repeating: 0, count: 16))
        XCTAssertEqual(NetlinkMessages.dumpAddresses(sequence: 7),
                       [24, 0, 0, 0, 22, 0, 0x05, 0x03, 7, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0])
        XCTAssertEqual(NetlinkMessages.dumpRoutes(sequence: 7),
                       [28, 0, 0, 0, 26, 0, 0x05, 0x03, 7, 0, 0, 0, 0, 0, 0, 0,
                        2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
        // ip route get 10.244.3.7
        XCTAssertEqual(NetlinkMessages.getRoute(to: ip("10.244.3.7"), sequence: 8),
                       [36, 0, 0, 0, 26, 0, 0x05, 0x00, 8, 0, 0, 0, 0, 0, 0, 0,
                        2, 32, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                        8, 0, 1, 0, 10, 244, 3, 7])
    }

    func testRouteRequestsParseBackToTheSameRoute() {
        // An RTM_NEWROUTE request has the shape of a dump entry, so the parser must read back what the builder wrote.
        let routes = [
            Route(destination: net("10.244.0.0/16"), outputInterface: 7),
            Route(destination: net("10.244.2.0/24"), gateway: ip("192.168.1.12"), outputInterface: 3, table: 100,
                  priority: 100),
            Route(destination: net("0.0.0.0/0"), gateway: ip("10.0.0.1"), table: 1000),
            Route(destination: net("10.1.2.3/32"), outputInterface: 1, protocol: 4, scope: 254, priority: 0),
        ]
        for route in routes {
            XCTAssertEqual(NetlinkMessages.parseRoute(NetlinkMessages.newRoute(route, sequence: 1))?.route, route)
        }
    }
}

final class NetlinkParserTests: XCTestCase {
    // MARK: kernel-shaped replies

    /// What the kernel sends for `ip link show veth0` in a dump: RTM_NEWLINK, NLM_F_MULTI, attributes in kernel
    /// order, including ones the parser does not use (txqueuelen, hardware address, nested linkinfo data).
    static func vethLink(mtuPayload: [UInt8] = le32(1500), name: [UInt8] = Array("veth0".utf8) + [0],
                         kind: [UInt8] = Array("veth".utf8) + [0]) -> Wire {
        var body = Wire()
        body.u8(0); body.u8(0); body.u16(1)         // ifi_family, pad, ifi_type ARPHRD_ETHER
        body.i32(5)                                 // ifi_index
        body.u32(0x1_1043)                          // UP | BROADCAST | RUNNING | MULTICAST | LOWER_UP
        body.u32(0)                                 // ifi_change
        body.attr(3, name)                          // IFLA_IFNAME
        body.attr(13, le32(1000))                   // IFLA_TXQLEN
        body.attr(4, mtuPayload)                    // IFLA_MTU
        body.attr(1, [0x02, 0x42, 0xac, 0x11, 0x00, 0x02])  // IFLA_ADDRESS (6 bytes, padded)
        var info = Wire()
        info.attr(1, kind)                          // IFLA_INFO_KIND
        info.attr(2 | 0x8000, [])                   // IFLA_INFO_DATA, empty, NLA_F_NESTED
        body.attr(18 | 0x8000, info.bytes)          // IFLA_LINKINFO, NLA_F_NESTED
        return Wire.message(type: 16, flags: 2, body: body)
    }

    func testParseLink() throws {
        let link = try XCTUnwrap(NetlinkMessages.parseLink(Self.vethLink().bytes))
        XCTAssertEqual(link, Link(index: 5, name: "veth0", mtu: 1500, flags: 0x1_1043, kind: "veth"))
        XCTAssertTrue(link.isUp)
        var down = link
        down.isUp = false
        XCTAssertEqual(down.flags, 0x1_1042)
    }

    func testParseLinkWithoutLinkInfo() throws {
        // lo has no rtnl link ops and so no IFLA_LINKINFO.
        var body = Wire()
        body.u8(0); body.u8(0); body.u16(772); body.i32(1); body.u32(0x10049); body.u32(0)
        body.attr(3, Array("lo".utf8) + [0])
        body.attr(4, le32(65536))
        let link = try XCTUnwrap(NetlinkMessages.parseLink(Wire.message(type: 16, flags: 2, body: body).bytes))
        XCTAssertEqual(link, Link(index: 1, name: "lo", mtu: 65536, flags: 0x10049, kind: nil))
    }

    func testParseAddress() throws {
        var body = Wire()
        body.u8(2); body.u8(24); body.u8(0x80); body.u8(0); body.u32(3)  // AF_INET /24 permanent, index 3
        body.attr(1, [10, 0, 0, 1])                 // IFA_ADDRESS
        body.attr(2, [10, 0, 0, 1])                 // IFA_LOCAL
        body.attr(4, [10, 0, 0, 255])               // IFA_BROADCAST
        body.attr(3, Array("eth0".utf8) + [0])      // IFA_LABEL
        body.attr(8, le32(0x80))                    // IFA_FLAGS
        body.attr(6, [UInt8](repeating: 0xff, count: 16))  // IFA_CACHEINFO
        let address = NetlinkMessages.parseAddress(Wire.message(type: 20, flags: 2, body: body).bytes)
        XCTAssertEqual(address, InterfaceAddress(index: 3, address: ip("10.0.0.1"), prefixLength: 24))
    }

    func testParseAddressPrefersLocalOverPeer() {
        // On a point-to-point link IFA_ADDRESS is the peer; the interface's own address is IFA_LOCAL.
        var body = Wire()
        body.u8(2); body.u8(32); body.u8(0); body.u8(0); body.u32(8)
        body.attr(1, [10, 0, 0, 2])
        body.attr(2, [10, 0, 0, 1])
        XCTAssertEqual(NetlinkMessages.parseAddress(Wire.message(type: 20, flags: 2, body: body).bytes)?.address,
                       ip("10.0.0.1"))
    }

    static func gatewayRoute() -> Wire {
        // 10.244.2.0/24 via 192.168.1.12 dev <3> proto static metric 100, as a dump entry.
        var body = Wire()
        body.u8(2); body.u8(24); body.u8(0); body.u8(0)
        body.u8(254); body.u8(4); body.u8(0); body.u8(1)
        body.u32(0)
        body.attr(15, le32(254))                    // RTA_TABLE
        body.attr(1, [10, 244, 2, 0])               // RTA_DST
        body.attr(6, le32(100))                     // RTA_PRIORITY
        body.attr(5, [192, 168, 1, 12])             // RTA_GATEWAY
        body.attr(4, le32(3))                       // RTA_OIF
        return Wire.message(type: 24, flags: 2, body: body)
    }

    func testParseRoute() throws {
        let parsed = try XCTUnwrap(NetlinkMessages.parseRoute(Self.gatewayRoute().bytes))
        XCTAssertEqual(parsed.route, Route(destination: net("10.244.2.0/24"), gateway: ip("192.168.1.12"),
                                           outputInterface: 3, table: 254, protocol: 4, scope: 0, type: 1,
                                           priority: 100))
        XCTAssertNil(parsed.preferredSource)
        XCTAssertEqual(parsed.flags, 0)
    }

    func testParseDeviceRouteWithSourceAndDefaultRoute() throws {
        // 192.168.50.0/24 dev <2> proto kernel scope link src 192.168.50.1
        var body = Wire()
        body.u8(2); body.u8(24); body.u8(0); body.u8(0); body.u8(254); body.u8(2); body.u8(253); body.u8(1)
        body.u32(0)
        body.attr(15, le32(254)); body.attr(1, [192, 168, 50, 0]); body.attr(7, [192, 168, 50, 1])
        body.attr(4, le32(2))
        let device = try XCTUnwrap(NetlinkMessages.parseRoute(Wire.message(type: 24, flags: 2, body: body).bytes))
        XCTAssertEqual(device.route, Route(destination: net("192.168.50.0/24"), outputInterface: 2,
                                           protocol: 2))
        XCTAssertEqual(device.preferredSource, ip("192.168.50.1"))

        // default via 10.0.0.1 dev <2>: dst_len 0 and no RTA_DST.
        var dflt = Wire()
        dflt.u8(2); dflt.u8(0); dflt.u8(0); dflt.u8(0); dflt.u8(254); dflt.u8(3); dflt.u8(0); dflt.u8(1)
        dflt.u32(0)
        dflt.attr(15, le32(254)); dflt.attr(5, [10, 0, 0, 1]); dflt.attr(4, le32(2))
        let route = try XCTUnwrap(NetlinkMessages.parseRoute(Wire.message(type: 24, flags: 2, body: dflt).bytes))
        XCTAssertEqual(route.route.destination, net("0.0.0.0/0"))
        XCTAssertEqual(route.route.gateway, ip("10.0.0.1"))
    }

    func testParseRouteTableFromRTATableWinsOverHeader() throws {
        // Table 1000 does not fit rtm_table; the kernel sends RT_TABLE_COMPAT (252) there and the real id in RTA_TABLE.
        var body = Wire()
        body.u8(2); body.u8(16); body.u8(0); body.u8(0); body.u8(252); body.u8(3); body.u8(253); body.u8(1)
        body.u32(0)
        body.attr(15, le32(1000)); body.attr(1, [10, 244, 0, 0]); body.attr(4, le32(7))
        XCTAssertEqual(NetlinkMessages.parseRoute(Wire.message(type: 24, flags: 2, body: body).bytes)?.route.table,
                       1000)
    }

    func testParseMultipathRouteTakesFirstHop() throws {
        // 10.9.0.0/16 nexthop via 10.0.0.1 dev <4> nexthop via 10.0.1.1 dev <5>
        var hops = Wire()
        for (gw, oif) in [([UInt8]([10, 0, 0, 1]), Int32(4)), ([10, 0, 1, 1], 5)] {
            var hop = Wire()
            hop.u16(16); hop.u8(0); hop.u8(0); hop.i32(oif)  // rtnexthop: len 8 + one 8-byte attribute
            hop.attr(5, gw)
            hops.append(hop.bytes)
        }
        var body = Wire()
        body.u8(2); body.u8(16); body.u8(0); body.u8(0); body.u8(254); body.u8(3); body.u8(0); body.u8(1)
        body.u32(0)
        body.attr(15, le32(254)); body.attr(1, [10, 9, 0, 0]); body.attr(9, hops.bytes)  // RTA_MULTIPATH
        let parsed = try XCTUnwrap(NetlinkMessages.parseRoute(Wire.message(type: 24, flags: 2, body: body).bytes))
        XCTAssertEqual(parsed.route.outputInterface, 4)
        XCTAssertEqual(parsed.route.gateway, ip("10.0.0.1"))

        // A next hop claiming more bytes than RTA_MULTIPATH holds is malformed.
        var bad = Wire()
        bad.u16(64); bad.u8(0); bad.u8(0); bad.i32(4)
        var badBody = Wire()
        badBody.u8(2); badBody.u8(16); badBody.u8(0); badBody.u8(0); badBody.u8(254); badBody.u8(3)
        badBody.u8(0); badBody.u8(1); badBody.u32(0)
        badBody.attr(1, [10, 9, 0, 0]); badBody.attr(9, bad.bytes)
        XCTAssertNil(NetlinkMessages.parseRoute(Wire.message(type: 24, flags: 2, body: badBody).bytes))
    }

    // MARK: malformed replies

    func testWrongTypeOrFamilyIsRejected() {
        var link = Self.vethLink()
        link.setU16(at: 4, 24)  // claims to be RTM_NEWROUTE
        XCTAssertNil(NetlinkMessages.parseLink(link.bytes))
        XCTAssertNil(NetlinkMessages.parseRoute(link.bytes))

        var route = Self.gatewayRoute()
        route.setU8(at: 16, 10)  // AF_INET6
        XCTAssertNil(NetlinkMessages.parseRoute(route.bytes))
        route = Self.gatewayRoute()
        route.setU8(at: 17, 33)  // dst_len 33
        XCTAssertNil(NetlinkMessages.parseRoute(route.bytes))
    }

    func testAttributesOfTheWrongLengthAreRejected() {
        XCTAssertNotNil(NetlinkMessages.parseLink(Self.vethLink().bytes))
        // IFLA_MTU with 2 or 8 bytes instead of 4.
        XCTAssertNil(NetlinkMessages.parseLink(Self.vethLink(mtuPayload: [0xdc, 0x05]).bytes))
        XCTAssertNil(NetlinkMessages.parseLink(Self.vethLink(mtuPayload: le32(1500) + le32(0)).bytes))
        // IFLA_IFNAME without its NUL: reading it as a C string would run past the attribute.
        XCTAssertNil(NetlinkMessages.parseLink(Self.vethLink(name: Array("veth0abc".utf8)).bytes))
        XCTAssertNil(NetlinkMessages.parseLink(Self.vethLink(name: []).bytes))
        // A nested IFLA_INFO_KIND without its NUL.
        XCTAssertNil(NetlinkMessages.parseLink(Self.vethLink(kind: Array("veth".utf8)).bytes))

        // RTA_GATEWAY of 3 bytes.
        var body = Wire()
        body.u8(2); body.u8(24); body.u8(0); body.u8(0); body.u8(254); body.u8(4); body.u8(0); body.u8(1)
        body.u32(0)
        body.attr(1, [10, 244, 2, 0]); body.attr(5, [192, 168, 1]); body.attr(4, le32(3))
        XCTAssertNil(NetlinkMessages.parseRoute(Wire.message(type: 24, flags: 2, body: body).bytes))

        // A /24 route without RTA_DST.
        var noDst = Wire()
        noDst.u8(2); noDst.u8(24); noDst.u8(0); noDst.u8(0); noDst.u8(254); noDst.u8(4); noDst.u8(0); noDst.u8(1)
        noDst.u32(0)
        noDst.attr(4, le32(3))
        XCTAssertNil(NetlinkMessages.parseRoute(Wire.message(type: 24, flags: 2, body: noDst).bytes))

        // An address whose IFA_LOCAL is 16 bytes (an IPv6 address in an AF_INET message).
        var addr = Wire()
        addr.u8(2); addr.u8(24); addr.u8(0); addr.u8(0); addr.u32(3)
        addr.attr(2, [UInt8](repeating: 1, count: 16))
        XCTAssertNil(NetlinkMessages.parseAddress(Wire.message(type: 20, flags: 2, body: addr).bytes))
    }

    func testBrokenAttributeHeadersAreRejected() {
        let good = Self.gatewayRoute()
        let firstAttribute = 16 + 12
        // nla_len below the attribute header's own 4 bytes.
        var short = good
        short.setU16(at: firstAttribute, 2)
        XCTAssertNil(NetlinkMessages.parseRoute(short.bytes))
        // nla_len running past the end of the message.
        var long = good
        long.setU16(at: firstAttribute, 200)
        XCTAssertNil(NetlinkMessages.parseRoute(long.bytes))
        // Three stray bytes after the last attribute.
        var tail = good
        tail.append([1, 2, 3])
        tail.setU32(at: 0, UInt32(tail.bytes.count))
        XCTAssertNil(NetlinkMessages.parseRoute(tail.bytes))
        // A nested IFLA_LINKINFO whose inner attribute overruns it.
        var link = Self.vethLink()
        // IFLA_LINKINFO (4-byte header) holds IFLA_INFO_KIND "veth\0" (12 bytes) and an empty IFLA_INFO_DATA (4).
        let infoKind = link.bytes.count - 12 - 4
        XCTAssertEqual(link.bytes[infoKind + 2], 1)
        link.setU16(at: infoKind, 40)
        XCTAssertNil(NetlinkMessages.parseLink(link.bytes))
    }

    func testTruncatedMessagesAreRejectedAtEveryLength() {
        let samples: [(Wire, ([UInt8]) -> Bool)] = [
            (Self.vethLink(), { NetlinkMessages.parseLink($0) != nil }),
            (Self.gatewayRoute(), { NetlinkMessages.parseRoute($0) != nil }),
        ]
        for (wire, parses) in samples {
            XCTAssertTrue(parses(wire.bytes))
            for cut in 0..<wire.bytes.count {
                // Cut off, header unchanged: the message claims more bytes than there are.
                XCTAssertFalse(parses(Array(wire.bytes[..<cut])), "cut at \(cut)")
                // Cut off with nlmsg_len shrunk to match: whole messages whose last attribute may be cut in two.
                guard cut >= 4 else { continue }
                var shrunk = Wire(bytes: Array(wire.bytes[..<cut]))
                shrunk.setU32(at: 0, UInt32(cut))
                let ok = parses(shrunk.bytes)
                if !wire.attributeEnds.contains(cut) {
                    XCTAssertFalse(ok, "message cut inside an attribute at \(cut) was accepted")
                }
            }
        }
    }

    func testRandomCorruptionNeverCrashes() {
        // Flip bytes of valid replies at random and parse them with every parser: anything may come back, but
        // nothing may trap or read out of bounds (run under ASan to see the latter).
        var generator = SeededRandom(seed: 0x5eed)  // seeded, so a failing corruption round can be reproduced
        let originals = [Self.vethLink().bytes, Self.gatewayRoute().bytes, statusWithExtAck(capped: false).bytes]
        var accepted = 0
        for round in 0..<3000 {
            var bytes = originals[round % originals.count]
            for _ in 0..<(1 + Int(generator.next() % 4)) {
                let at = Int(generator.next() % UInt64(bytes.count))
                bytes[at] = UInt8(truncatingIfNeeded: generator.next())
            }
            if let link = NetlinkMessages.parseLink(bytes) {
                accepted += 1
                XCTAssertLessThan(link.name.utf8.count, bytes.count)
            }
            if NetlinkMessages.parseRoute(bytes) != nil { accepted += 1 }
            if NetlinkMessages.parseAddress(bytes) != nil { accepted += 1 }
            _ = NetlinkMessages.parseStatus(bytes)
        }
        XCTAssertGreaterThan(accepted, 0, "corruption should sometimes hit bytes the parsers ignore")
    }

    // MARK: NLMSG_ERROR / NLMSG_DONE

    func statusWithExtAck(capped: Bool) -> Wire {
        // The kernel's answer to a rejected RTM_NEWLINK: error -EINVAL, the request's header (and with
        // NETLINK_CAP_ACK off, its payload), then NLMSGERR_ATTR_MSG and NLMSGERR_ATTR_OFFS.
        let request = NetlinkMessages.setMTU(70000, index: 4, sequence: 3)
        var body = Wire()
        body.i32(-22)
        body.append(capped ? Array(request[..<16]) : request)
        body.attr(1, Array("mtu greater than device maximum".utf8) + [0])  // NLMSGERR_ATTR_MSG
        body.attr(2, le32(32))                                             // NLMSGERR_ATTR_OFFS
        return Wire.message(type: 2, flags: 0x200 | (capped ? 0x100 : 0), body: body)
    }

    func testParseErrorWithExtendedAck() {
        for capped in [true, false] {
            XCTAssertEqual(NetlinkMessages.parseStatus(statusWithExtAck(capped: capped).bytes),
                           .init(errno: EINVAL, message: "mtu greater than device maximum"), "capped: \(capped)")
        }
    }

    func testParseAckAndPlainErrorAndDone() {
        var ack = Wire()
        ack.i32(0)
        ack.append(Array(NetlinkMessages.setUp(true, index: 1, sequence: 1)[..<16]))
        XCTAssertEqual(NetlinkMessages.parseStatus(Wire.message(type: 2, flags: 0x100, body: ack).bytes),
                       .init(errno: 0, message: nil))

        var exists = Wire()
        exists.i32(-17)
        exists.append([UInt8](repeating: 0, count: 16))
        XCTAssertEqual(NetlinkMessages.parseStatus(Wire.message(type: 2, flags: 0x100, body: exists).bytes),
                       .init(errno: EEXIST, message: nil))

        var done = Wire()
        done.i32(0)
        XCTAssertEqual(NetlinkMessages.parseStatus(Wire.message(type: 3, flags: 2, body: done).bytes),
                       .init(errno: 0, message: nil))
        // A dump that failed: NLMSG_DONE carries the error and, with NLM_F_ACK_TLVS, the reason.
        var failed = Wire()
        failed.i32(-95)
        failed.attr(1, Array("no dumps here".utf8) + [0])
        XCTAssertEqual(NetlinkMessages.parseStatus(Wire.message(type: 3, flags: 0x202, body: failed).bytes),
                       .init(errno: EOPNOTSUPP, message: "no dumps here"))
    }

    func testMalformedStatus() {
        // Too short for the error code.
        XCTAssertNil(NetlinkMessages.parseStatus(Wire.message(type: 2, flags: 0, body: Wire(bytes: [0xea, 0xff]))
            .bytes))
        XCTAssertNil(NetlinkMessages.parseStatus([]))
        // NLM_F_ACK_TLVS set but the TLV area is garbage: the errno survives, the text is dropped.
        var body = Wire()
        body.i32(-22)
        body.append([UInt8](repeating: 0, count: 16))
        body.append([99, 0, 1, 0, 0x41, 0x41, 0x41, 0x41])  // nla_len 99 > what is left
        XCTAssertEqual(NetlinkMessages.parseStatus(Wire.message(type: 2, flags: 0x300, body: body).bytes),
                       .init(errno: EINVAL, message: nil))
        // An uncapped error whose echoed request length is impossible (below a header).
        var bogus = Wire()
        bogus.i32(-22)
        bogus.append([4, 0, 0, 0] + [UInt8](repeating: 0, count: 12))
        bogus.attr(1, Array("x".utf8) + [0])
        XCTAssertEqual(NetlinkMessages.parseStatus(Wire.message(type: 2, flags: 0x200, body: bogus).bytes),
                       .init(errno: EINVAL, message: nil))
    }
}

// MARK: - Helpers

func le32(_ value: UInt32) -> [UInt8] { withUnsafeBytes(of: value.littleEndian, Array.init) }

/// Hand-assembled netlink bytes. Records where each attribute ends so truncation tests know which cuts leave
/// whole attributes.
struct Wire {
    var bytes: [UInt8] = []
    /// Offsets at which a message can end right after a whole attribute: from the end of its payload (an unpadded
    /// last attribute is legal) to the end of its padding.
    var attributeEnds: Set<Int> = []

    init(bytes: [UInt8] = []) { self.bytes = bytes }

    mutating func u8(_ v: UInt8) { bytes.append(v) }
    mutating func u16(_ v: UInt16) { bytes += withUnsafeBytes(of: v.littleEndian, Array.init) }
    mutating func u32(_ v: UInt32) { bytes += le32(v) }
    mutating func i32(_ v: Int32) { u32(UInt32(bitPattern: v)) }
    mutating func append(_ more: [UInt8]) { bytes += more }

    /// One attribute: nla_len (header + payload, without padding), nla_type, payload, zero padding to 4.
    mutating func attr(_ type: UInt16, _ payload: [UInt8]) {
        u16(UInt16(4 + payload.count))
        u16(type)
        bytes += payload
        attributeEnds.insert(bytes.count)
        while bytes.count % 4 != 0 {
            bytes.append(0)
            attributeEnds.insert(bytes.count)
        }
    }

    mutating func setU8(at offset: Int, _ v: UInt8) { bytes[offset] = v }
    mutating func setU16(at offset: Int, _ v: UInt16) {
        bytes[offset] = UInt8(v & 0xff)
        bytes[offset + 1] = UInt8(v >> 8)
    }
    mutating func setU32(at offset: Int, _ v: UInt32) { bytes.replaceSubrange(offset..<offset + 4, with: le32(v)) }

    /// A whole message: nlmsghdr (length computed, sequence 1, port id 0) followed by `body`.
    static func message(type: UInt16, flags: UInt16, sequence: UInt32 = 1, portID: UInt32 = 0, body: Wire) -> Wire {
        var m = Wire()
        m.u32(UInt32(16 + body.bytes.count))
        m.u16(type)
        m.u16(flags)
        m.u32(sequence)
        m.u32(portID)
        m.attributeEnds = Set(body.attributeEnds.map { $0 + 16 })
        m.bytes += body.bytes
        return m
    }
}

