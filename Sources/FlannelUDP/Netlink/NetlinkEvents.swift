import CNetlink
#if canImport(Glibc)
import Glibc
#endif

/// One rtnetlink notification, reduced to what a watcher needs to decide whether to look again: which kind of
/// object changed, whether it was removed, and on which interface (and, for a route, to which destination).
///
/// The notifications are only a trigger: whoever acts on one re-reads the real state over a request socket, so a
/// lost, reordered or unexpected notification can delay a reaction but never cause a wrong one.
struct NetlinkEvent: Equatable, Sendable {
    enum Kind: String, Sendable {
        case link, address, route
    }

    var kind: Kind
    /// RTM_DEL*: the object is gone.
    var deleted: Bool
    /// ifi_index, ifa_index or the route's RTA_OIF (first next hop of a multipath route); nil when the message
    /// names no interface or could not be read (a watcher then has to assume it concerns it).
    var index: Int32?
    /// For routes: the destination prefix.
    var destination: IPv4Network?
    /// For links: the state the kernel announced (absent for a message that could not be read).
    var link: Link?
}

extension NetlinkMessages {
    /// The multicast groups (nl_groups bits for bind) that announce IPv4 links, addresses and routes:
    /// RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE.
    static let linkAddressRouteGroups = UInt32(RTMGRP_LINK) | UInt32(RTMGRP_IPV4_IFADDR) | UInt32(RTMGRP_IPV4_ROUTE)

    /// Splits one datagram received on a subscribed socket into events. Messages of other types (and other
    /// families than IPv4 for addresses and routes) are skipped. A link, address or route message that cannot be
    /// read still yields an event, with no index, so that nothing that might matter goes unnoticed. Nil when the
    /// datagram itself is not a sequence of whole netlink messages.
    static func parseNotifications(_ datagram: UnsafeRawBufferPointer) -> [NetlinkEvent]? {
        guard let base = datagram.baseAddress, datagram.count > 0 else { return nil }
        var events: [NetlinkEvent] = []
        var remaining = Int32(clamping: datagram.count)
        var message: UnsafePointer<nlmsghdr>? = base.assumingMemoryBound(to: nlmsghdr.self)
        while let m = message, mnl_nlmsg_ok(m, remaining) {
            let bytes = UnsafeRawBufferPointer(start: m, count: Int(m.pointee.nlmsg_len))
            if let event = parseNotification(bytes) { events.append(event) }
            message = UnsafePointer(mnl_nlmsg_next(m, &remaining))
        }
        // The kernel pads every message to NLMSG_ALIGN, so a whole datagram leaves nothing over (an unpadded last
        // message leaves less than nothing); bytes left over are a cut or corrupt message.
        if remaining > 0 { return nil }
        return events
    }

    static func parseNotifications(_ bytes: [UInt8]) -> [NetlinkEvent]? {
        bytes.withUnsafeBytes { parseNotifications($0) }
    }

    /// One message of a notification datagram; nil for a type that is not a link, address or route message, or
    /// an address or route of another family.
    static func parseNotification(_ message: UnsafeRawBufferPointer) -> NetlinkEvent? {
        guard message.count >= MemoryLayout<nlmsghdr>.size else { return nil }
        let type = message.loadUnaligned(as: nlmsghdr.self).nlmsg_type
        switch Int32(type) {
        case Int32(RTM_NEWLINK), Int32(RTM_DELLINK):
            var event = NetlinkEvent(kind: .link, deleted: Int32(type) == Int32(RTM_DELLINK))
            if let (header, attrs) = open(message, type: type, fixed: ifinfomsg.self) {
                event.index = header.ifi_index
                // A full link message (as RTM_NEWLINK sends) also gives the announced state. parseLink insists
                // on RTM_NEWLINK; the layout of RTM_DELLINK is the same, so read the few fields here.
                if let name = attrs.string(UInt16(IFLA_IFNAME)), let mtu = attrs.u32(UInt16(IFLA_MTU)) {
                    event.link = Link(index: header.ifi_index, name: name, mtu: Int(mtu), flags: header.ifi_flags)
                }
            }
            return event
        case Int32(RTM_NEWADDR), Int32(RTM_DELADDR):
            var event = NetlinkEvent(kind: .address, deleted: Int32(type) == Int32(RTM_DELADDR))
            if let (header, _) = open(message, type: type, fixed: ifaddrmsg.self) {
                guard header.ifa_family == UInt8(AF_INET) else { return nil }
                event.index = Int32(bitPattern: header.ifa_index)
            }
            return event
        case Int32(RTM_NEWROUTE), Int32(RTM_DELROUTE):
            var event = NetlinkEvent(kind: .route, deleted: Int32(type) == Int32(RTM_DELROUTE))
            if let (header, _) = open(message, type: type, fixed: rtmsg.self) {
                guard header.rtm_family == UInt8(AF_INET) else { return nil }
            }
            // parseRoute reads RTM_NEWROUTE only; RTM_DELROUTE has the same layout, so parse a copy retyped.
            var copy = Array(message)
            copy.withUnsafeMutableBytes { raw in
                raw.storeBytes(of: UInt16(RTM_NEWROUTE), toByteOffset: MemoryLayout<UInt32>.size, as: UInt16.self)
            }
            if let parsed = parseRoute(copy) {
                event.index = parsed.route.outputInterface
                event.destination = parsed.route.destination
            }
            return event
        default:
            return nil
        }
    }
}

extension NetlinkEvent {
    init(kind: Kind, deleted: Bool) {
        self.init(kind: kind, deleted: deleted, index: nil, destination: nil, link: nil)
    }

    /// Whether this event may concern the overlay device `index` or its route to `network`: it names the
    /// interface, or is a route to the network, or could not be read.
    func concerns(index ours: Int32, network: IPv4Network) -> Bool {
        if kind == .route, let destination, destination == network { return true }
        guard let index else { return true }
        return index == ours
    }
}
