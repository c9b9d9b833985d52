import Foundation
import Logging
import Synchronization
import XCTest
@testable import FlannelCore
@testable import FlannelUDP

// Self-healing without root: the notification parser on kernel-shaped bytes (numbers are literals from
// <linux/rtnetlink.h>, as in NetlinkMessagesTests), and the guard's decisions on observed states.

final class NetlinkNotificationTests: XCTestCase {
    /// What `ip monitor` shows as "Deleted 10.244.1.0/32 scope global flannel0": RTM_DELADDR, sequence 0, from
    /// the kernel.
    static func deletedAddress(index: UInt32 = 7, family: UInt8 = 2) -> Wire {
        var body = Wire()
        body.u8(family); body.u8(32); body.u8(0x80); body.u8(0); body.u32(index)
        body.attr(1, [10, 244, 1, 0])                 // IFA_ADDRESS
        body.attr(2, [10, 244, 1, 0])                 // IFA_LOCAL
        body.attr(3, Array("flannel0".utf8) + [0])    // IFA_LABEL
        body.attr(8, le32(0x80))                      // IFA_FLAGS
        return Wire.message(type: 21, flags: 0, sequence: 0, body: body)
    }

    /// RTM_NEWLINK for flannel0 going down (IFF_UP cleared; POINTOPOINT | NOARP | MULTICAST left).
    static func linkDown(index: Int32 = 7, type: UInt16 = 16) -> Wire {
        var body = Wire()
        body.u8(0); body.u8(0); body.u16(65534)       // AF_UNSPEC, ARPHRD_NONE
        body.i32(index)
        body.u32(0x1090)                              // flags: no IFF_UP
        body.u32(0)
        body.attr(3, Array("flannel0".utf8) + [0])    // IFLA_IFNAME
        body.attr(13, le32(500))                      // IFLA_TXQLEN
        body.attr(4, le32(1472))                      // IFLA_MTU
        return Wire.message(type: type, flags: 0, sequence: 0, body: body)
    }

    /// RTM_DELROUTE for "10.244.0.0/16 dev flannel0 proto boot scope link".
    static func deletedRoute(family: UInt8 = 2, oif: UInt32 = 7) -> Wire {
        var body = Wire()
        body.u8(family); body.u8(16); body.u8(0); body.u8(0)
        body.u8(254); body.u8(3); body.u8(253); body.u8(1)
        body.u32(0)
        body.attr(15, le32(254))                      // RTA_TABLE
        body.attr(1, [10, 244, 0, 0])                 // RTA_DST
        body.attr(4, le32(oif))                       // RTA_OIF
        return Wire.message(type: 25, flags: 0, sequence: 0, body: body)
    }

    func testDeletedAddress() throws {
        let events = try XCTUnwrap(NetlinkMessages.parseNotifications(Self.deletedAddress().bytes))
        XCTAssertEqual(events, [NetlinkEvent(kind: .address, deleted: true, index: 7, destination: nil, link: nil)])
    }

    func testLinkDownCarriesTheAnnouncedState() throws {
        let events = try XCTUnwrap(NetlinkMessages.parseNotifications(Self.linkDown().bytes))
        XCTAssertEqual(events.count, 1)
        XCTAssertEqual(events[0].kind, .link)
        XCTAssertFalse(events[0].deleted)
        XCTAssertEqual(events[0].index, 7)
        XCTAssertEqual(events[0].link?.mtu, 1472)
        XCTAssertEqual(events[0].link?.isUp, false)
        let deleted = try XCTUnwrap(NetlinkMessages.parseNotifications(Self.linkDown(type: 17).bytes))
        XCTAssertEqual(deleted.first?.deleted, true)
    }

    func testDeletedRouteHasDestinationAndDevice() throws {
        let events = try XCTUnwrap(NetlinkMessages.parseNotifications(Self.deletedRoute().bytes))
        XCTAssertEqual(events, [NetlinkEvent(kind: .route, deleted: true, index: 7,
                                             destination: net("10.244.0.0/16"), link: nil)])
    }

    func testSeveralMessagesInOneDatagramAndOtherFamiliesSkipped() throws {
        // An IPv6 route and an IPv6 address (family 10) in between are not ours to watch; a neighbour message
        // (RTM_NEWNEIGH 28) is not a link, address or route message.
        var neighbour = Wire()
        neighbour.u8(2); neighbour.u8(0); neighbour.u16(0); neighbour.i32(7); neighbour.u16(0x80); neighbour.u8(0)
        neighbour.u8(1)
        let datagram = Self.linkDown().bytes + Self.deletedRoute(family: 10).bytes
            + Self.deletedAddress(family: 10).bytes + Wire.message(type: 28, flags: 0, body: neighbour).bytes
            + Self.deletedAddress(index: 3).bytes
        let events = try XCTUnwrap(NetlinkMessages.parseNotifications(datagram))
        XCTAssertEqual(events.map(\.kind), [.link, .address])
        XCTAssertEqual(events.map(\.index), [7, 3])
    }

    func testBrokenFramingIsNilAndAnUnreadableMessageStillCounts() throws {
        let whole = Self.deletedAddress().bytes
        // Cut inside the second message: the datagram is not whole.
        XCTAssertNil(NetlinkMessages.parseNotifications(whole + Array(whole.prefix(20))))
        XCTAssertNil(NetlinkMessages.parseNotifications([]))
        // A route message whose RTA_OIF has the wrong length: an event with no index (it may concern us).
        var route = Self.deletedRoute()
        route.setU16(at: 16 + 12 + 16, 6)             // RTA_OIF nla_len 6
        let events = try XCTUnwrap(NetlinkMessages.parseNotifications(route.bytes))
        XCTAssertEqual(events.count, 1)
        XCTAssertEqual(events[0].kind, .route)
        XCTAssertNil(events[0].index)
        XCTAssertTrue(events[0].concerns(index: 9, network: net("10.244.0.0/16")))
    }

    func testEveryTruncationEitherFailsOrYieldsAtMostTheWholeEvent() {
        let whole = Self.deletedRoute().bytes
        for cut in 0..<whole.count {
            var bytes = whole
            bytes.removeLast(whole.count - cut)
            // nlmsg_len still claims the whole message: the framing check must refuse it.
            XCTAssertNil(NetlinkMessages.parseNotifications(bytes), "cut at \(cut)")
        }
    }

    func testConcerns() {
        let ours: Int32 = 7, network = net("10.244.0.0/16")
        XCTAssertTrue(NetlinkEvent(kind: .address, deleted: true, index: 7, destination: nil, link: nil)
            .concerns(index: ours, network: network))
        XCTAssertFalse(NetlinkEvent(kind: .address, deleted: true, index: 3, destination: nil, link: nil)
            .concerns(index: ours, network: network))
        // Someone moved the overlay route to another device: that concerns us.
        XCTAssertTrue(NetlinkEvent(kind: .route, deleted: false, index: 3, destination: network, link: nil)
            .concerns(index: ours, network: network))
        XCTAssertFalse(NetlinkEvent(kind: .route, deleted: false, index: 3, destination: net("192.168.1.0/24"),
                                    link: nil).concerns(index: ours, network: network))
    }
}

final class NodeGuardDecisionTests: XCTestCase {
    let device = OverlayDevice(name: "flannel0", index: 7,
                               address: InterfaceAddress(index: 7, address: ip("10.244.1.0"), prefixLength: 32),
                               mtu: 1472,
                               route: Route(destination: net("10.244.0.0/16"), outputInterface: 7))

    var healthy: NodeGuard.Observed {
        NodeGuard.Observed(link: Link(index: 7, name: "flannel0", mtu: 1472, flags: 0x11091, kind: "tun"),
                           addresses: [device.address], overlayRoutes: [device.route])
    }

    func testNothingToDoWhenAllIsInPlace() {
        XCTAssertEqual(NodeGuard.decide(device, healthy), [])
    }

    func testEachMissingPieceAlone() {
        var o = healthy
        o.overlayRoutes = []
        XCTAssertEqual(NodeGuard.decide(device, o), [.route])
        o = healthy
        o.addresses = [InterfaceAddress(index: 7, address: ip("10.244.1.0"), prefixLength: 24)]
        XCTAssertEqual(NodeGuard.decide(device, o), [.address])
        o = healthy
        o.link?.isUp = false
        XCTAssertEqual(NodeGuard.decide(device, o), [.linkUp])
        o = healthy
        o.link?.mtu = 1400
        XCTAssertEqual(NodeGuard.decide(device, o), [.mtu(found: 1400)])
    }

    func testOrderAfterTheKernelFlushedTheRoutes() {
        // A link set down loses its routes; an MTU below 68 loses IPv4 altogether. Put back the link first, the
        // route last (it cannot be added through a link that is down).
        var o = healthy
        o.link?.isUp = false
        o.link?.mtu = 60
        o.addresses = []
        o.overlayRoutes = []
        XCTAssertEqual(NodeGuard.decide(device, o), [.mtu(found: 60), .linkUp, .address, .route])
    }

    func testARouteThroughAnotherDeviceOrAGatewayIsNotOurs() {
        var o = healthy
        o.overlayRoutes = [Route(destination: net("10.244.0.0/16"), outputInterface: 3),
                           Route(destination: net("10.244.0.0/16"), gateway: ip("192.168.1.1"), outputInterface: 7)]
        XCTAssertEqual(NodeGuard.decide(device, o), [.route])
    }

    func testDeviceGoneOrReplaced() {
        var o = healthy
        o.link = nil
        guard case .deviceGone(let why)? = NodeGuard.decide(device, o).first else { return XCTFail("not gone") }
        XCTAssertEqual(why, "device flannel0 (ifindex 7) was deleted")
        o = healthy
        o.link?.name = "renamed0"
        XCTAssertEqual(NodeGuard.decide(device, o).map(\.kind), [.device])
        XCTAssertTrue(NodeGuard.explainDeviceGone(why).contains("flannel-udp stops instead of forwarding into nothing"))
    }

    func testAGuardWhoseDeviceIsGoneReportsItAndStops() throws {
        // Only reads (no device has this index, so nothing is ever repaired): safe in any namespace, no root.
        var gone = device
        gone.index = Int32.max - 1
        let reported = DispatchSemaphore(value: 0)
        let reason = Mutex<String?>(nil)
        let guarded = try NodeGuard(device: gone, logger: Logger(label: "test"), onDeviceGone: { why in
            reason.withLock { $0 = why }
            reported.signal()
        })
        guarded.start()
        XCTAssertEqual(reported.wait(timeout: .now() + 5), .success)
        guarded.stop()
        XCTAssertTrue(reason.withLock { $0 }?.hasPrefix("device flannel0 (ifindex 2147483646) was deleted") == true)
        XCTAssertEqual(guarded.status.total, 0)
        XCTAssertNotNil(guarded.deviceGoneReason())
    }

    func testRetryDelayDoublesUpToAMinute() {
        XCTAssertEqual((0...8).map { NodeGuard.retryDelay(failures: $0) }, [0, 1, 2, 4, 8, 16, 32, 60, 60])
        XCTAssertEqual(NodeGuard.retryDelay(failures: 1000), 60)
    }
}
