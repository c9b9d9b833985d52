import CNetlink
#if canImport(Glibc)
import Glibc
#endif

/// Builds rtnetlink requests and parses rtnetlink replies, as bytes, without a socket.
///
/// Everything here is pure: `Netlink` does the I/O, and the unit tests check requests byte for byte and feed
/// hand-built (also truncated and corrupt) replies to the parsers. Builders take the sequence number the socket
/// layer assigns; every request carries NLM_F_REQUEST | NLM_F_ACK so the kernel always ends the exchange with an
/// NLMSG_ERROR (an ack or an error) or, for dumps, NLMSG_DONE. Parsers return nil for anything that is not a whole,
/// well-formed message of the expected type and family; they never read past the bytes they are given.
package enum NetlinkMessages {
    // MARK: - Links

    /// RTM_GETLINK for one interface by index.
    package static func getLink(index: Int32, sequence: UInt32) -> [UInt8] {
        MessageBuilder(type: UInt16(RTM_GETLINK), flags: 0, sequence: sequence, header: linkHeader(index: index))
            .bytes
    }

    /// RTM_GETLINK for one interface by name (IFLA_IFNAME). The caller checks the name's length.
    package static func getLink(name: String, sequence: UInt32) -> [UInt8] {
        let m = MessageBuilder(type: UInt16(RTM_GETLINK), flags: 0, sequence: sequence, header: linkHeader(index: 0))
        m.putString(UInt16(IFLA_IFNAME), name)
        return m.bytes
    }

    /// RTM_GETLINK dump of every interface.
    package static func dumpLinks(sequence: UInt32) -> [UInt8] {
        MessageBuilder(type: UInt16(RTM_GETLINK), flags: UInt16(NLM_F_DUMP), sequence: sequence,
                       header: linkHeader(index: 0)).bytes
    }

    /// RTM_NEWLINK on an existing interface (no NLM_F_CREATE) that changes only IFLA_MTU.
    package static func setMTU(_ mtu: UInt32, index: Int32, sequence: UInt32) -> [UInt8] {
        setLinkU32(UInt16(IFLA_MTU), mtu, index: index, sequence: sequence)
    }

    /// RTM_NEWLINK on an existing interface that changes only IFLA_TXQLEN (`ip link set DEV txqueuelen N`).
    package static func setTxQueueLength(_ length: UInt32, index: Int32, sequence: UInt32) -> [UInt8] {
        setLinkU32(UInt16(IFLA_TXQLEN), length, index: index, sequence: sequence)
    }

    private static func setLinkU32(_ type: UInt16, _ value: UInt32, index: Int32, sequence: UInt32) -> [UInt8] {
        let m = MessageBuilder(type: UInt16(RTM_NEWLINK), flags: 0, sequence: sequence,
                               header: linkHeader(index: index))
        m.putU32(type, value)
        return m.bytes
    }

    /// RTM_NEWLINK on an existing interface that changes only IFF_UP (ifi_change = IFF_UP masks the rest).
    package static func setUp(_ up: Bool, index: Int32, sequence: UInt32) -> [UInt8] {
        let header = linkHeader(index: index, flags: up ? UInt32(IFF_UP.rawValue) : 0, change: UInt32(IFF_UP.rawValue))
        return MessageBuilder(type: UInt16(RTM_NEWLINK), flags: 0, sequence: sequence, header: header).bytes
    }

    /// RTM_DELLINK by index.
    package static func deleteLink(index: Int32, sequence: UInt32) -> [UInt8] {
        MessageBuilder(type: UInt16(RTM_DELLINK), flags: 0, sequence: sequence, header: linkHeader(index: index))
            .bytes
    }

    /// The fixed header of a link request (any family); `change` masks the `flags` it sets.
    private static func linkHeader(index: Int32, flags: UInt32 = 0, change: UInt32 = 0) -> ifinfomsg {
        ifinfomsg(ifi_family: UInt8(AF_UNSPEC), __ifi_pad: 0, ifi_type: 0, ifi_index: index, ifi_flags: flags,
                  ifi_change: change)
    }

    // MARK: - Addresses

    /// RTM_GETADDR dump of the IPv4 addresses of every interface (the kernel filters by family).
    package static func dumpAddresses(sequence: UInt32) -> [UInt8] {
        MessageBuilder(type: UInt16(RTM_GETADDR), flags: UInt16(NLM_F_DUMP), sequence: sequence,
                       header: addressHeader(prefixLength: 0, scope: 0, index: 0)).bytes
    }

    /// RTM_NEWADDR with NLM_F_CREATE | NLM_F_EXCL, as `ip addr add A/N dev D` sends it: IFA_LOCAL and IFA_ADDRESS
    /// both the address (no peer), scope universe, no broadcast.
    package static func newAddress(_ address: InterfaceAddress, sequence: UInt32) -> [UInt8] {
        addressMessage(UInt16(RTM_NEWADDR), UInt16(NLM_F_CREATE | NLM_F_EXCL), address, sequence)
    }

    /// RTM_DELADDR for one address; the kernel matches index, IFA_LOCAL, prefix length and IFA_ADDRESS.
    package static func deleteAddress(_ address: InterfaceAddress, sequence: UInt32) -> [UInt8] {
        addressMessage(UInt16(RTM_DELADDR), 0, address, sequence)
    }

    private static func addressMessage(_ type: UInt16, _ flags: UInt16, _ address: InterfaceAddress,
                                       _ sequence: UInt32) -> [UInt8] {
        precondition((0...32).contains(address.prefixLength), "prefix length \(address.prefixLength) out of range")
        let header = addressHeader(prefixLength: UInt8(address.prefixLength), scope: UInt8(RT_SCOPE_UNIVERSE.rawValue),
                                   index: UInt32(bitPattern: address.index))
        let m = MessageBuilder(type: type, flags: flags, sequence: sequence, header: header)
        m.putIPv4(UInt16(IFA_LOCAL), address.address)
        m.putIPv4(UInt16(IFA_ADDRESS), address.address)
        return m.bytes
    }

    /// The fixed header of an IPv4 address request (no IFA_F_* flags).
    private static func addressHeader(prefixLength: UInt8, scope: UInt8, index: UInt32) -> ifaddrmsg {
        ifaddrmsg(ifa_family: UInt8(AF_INET), ifa_prefixlen: prefixLength, ifa_flags: 0, ifa_scope: scope,
                  ifa_index: index)
    }

    // MARK: - Neighbours

    /// RTM_GETNEIGH dump of the IPv4 neighbour (ARP) tables of every interface.
    package static func dumpNeighbours(sequence: UInt32) -> [UInt8] {
        MessageBuilder(type: UInt16(RTM_GETNEIGH), flags: UInt16(NLM_F_DUMP), sequence: sequence,
                       header: neighbourHeader(index: 0)).bytes
    }

    /// RTM_DELNEIGH for one IPv4 entry, as `ip neigh del ADDRESS dev DEV` sends it: interface and NDA_DST.
    package static func deleteNeighbour(_ neighbour: Neighbour, sequence: UInt32) -> [UInt8] {
        let m = MessageBuilder(type: UInt16(RTM_DELNEIGH), flags: 0, sequence: sequence,
                               header: neighbourHeader(index: neighbour.index))
        m.putIPv4(UInt16(NDA_DST), neighbour.address)
        return m.bytes
    }

    /// The fixed header of an IPv4 neighbour request on interface `index` (0: every interface), the rest zero.
    private static func neighbourHeader(index: Int32) -> ndmsg {
        ndmsg(ndm_family: UInt8(AF_INET), ndm_pad1: 0, ndm_pad2: 0, ndm_ifindex: index, ndm_state: 0, ndm_flags: 0,
              ndm_type: 0)
    }

    // MARK: - Routes

    /// RTM_GETROUTE dump of the IPv4 routing tables (all tables; `Netlink.routes` filters by table).
    package static func dumpRoutes(sequence: UInt32) -> [UInt8] {
        MessageBuilder(type: UInt16(RTM_GETROUTE), flags: UInt16(NLM_F_DUMP), sequence: sequence,
                       header: routeHeader(destinationLength: 0, table: 0, protocol: 0, scope: 0, type: 0)).bytes
    }

    /// RTM_NEWROUTE with NLM_F_CREATE | NLM_F_EXCL (so an existing identical route is EEXIST, as with
    /// `ip route add`).
    package static func newRoute(_ route: Route, sequence: UInt32) -> [UInt8] {
        routeMessage(UInt16(RTM_NEWROUTE), UInt16(NLM_F_CREATE | NLM_F_EXCL), route, forDelete: false, sequence)
    }

    /// RTM_DELROUTE. Protocol and scope are sent as wildcards (RTPROT_UNSPEC, RT_SCOPE_NOWHERE) as
    /// `ip route del` does, so a route is found by destination, table, type, gateway, device and metric alone.
    package static func deleteRoute(_ route: Route, sequence: UInt32) -> [UInt8] {
        routeMessage(UInt16(RTM_DELROUTE), 0, route, forDelete: true, sequence)
    }

    private static func routeMessage(_ type: UInt16, _ flags: UInt16, _ route: Route, forDelete: Bool,
                                     _ sequence: UInt32) -> [UInt8] {
        // rtm_table is 8 bits; tables above 255 exist only in RTA_TABLE, which the kernel prefers when present.
        let header = routeHeader(destinationLength: UInt8(route.destination.prefixLength),
                                 table: route.table < 256 ? UInt8(route.table) : UInt8(RT_TABLE_UNSPEC.rawValue),
                                 protocol: forDelete ? UInt8(RTPROT_UNSPEC) : route.protocol,
                                 scope: forDelete ? UInt8(RT_SCOPE_NOWHERE.rawValue) : route.scope, type: route.type)
        let m = MessageBuilder(type: type, flags: flags, sequence: sequence, header: header)
        m.putU32(UInt16(RTA_TABLE.rawValue), route.table)
        if route.destination.prefixLength > 0 {
            m.putIPv4(UInt16(RTA_DST.rawValue), route.destination.address)
        }
        if let gateway = route.gateway { m.putIPv4(UInt16(RTA_GATEWAY.rawValue), gateway) }
        if let oif = route.outputInterface { m.putU32(UInt16(RTA_OIF.rawValue), UInt32(bitPattern: oif)) }
        if let priority = route.priority { m.putU32(UInt16(RTA_PRIORITY.rawValue), priority) }
        return m.bytes
    }

    /// RTM_GETROUTE for one destination (`ip route get A`): the kernel answers with the route it would use.
    package static func getRoute(to destination: IPv4Address, sequence: UInt32) -> [UInt8] {
        let m = MessageBuilder(type: UInt16(RTM_GETROUTE), flags: 0, sequence: sequence,
                               header: routeHeader(destinationLength: 32, table: 0, protocol: 0, scope: 0, type: 0))
        m.putIPv4(UInt16(RTA_DST.rawValue), destination)
        return m.bytes
    }

    /// The fixed header of an IPv4 route request (no source prefix, TOS or RTM_F_* flags); 0 leaves table,
    /// protocol, scope or type unspecified.
    private static func routeHeader(destinationLength: UInt8, table: UInt8, protocol: UInt8, scope: UInt8,
                                    type: UInt8) -> rtmsg {
        rtmsg(rtm_family: UInt8(AF_INET), rtm_dst_len: destinationLength, rtm_src_len: 0, rtm_tos: 0, rtm_table: table,
              rtm_protocol: `protocol`, rtm_scope: scope, rtm_type: type, rtm_flags: 0)
    }

    // MARK: - Parsing

    /// A parsed RTM_NEWROUTE: the route plus what `Route` does not carry.
    package struct RouteMessage: Equatable {
        package var route: Route
        /// RTA_PREFSRC: the source address the kernel would pick.
        package var preferredSource: IPv4Address?
        /// rtm_flags (RTM_F_CLONED marks a cached clone, not a table entry).
        package var flags: UInt32
    }

    /// The outcome an NLMSG_ERROR or NLMSG_DONE reports.
    package struct Status: Equatable {
        /// The positive errno, or 0 for an ack / a clean end of dump.
        package var errno: Int32
        /// The kernel's extended-ack text (NLMSGERR_ATTR_MSG), when it sent one.
        package var message: String?
    }

    /// Parses an RTM_NEWLINK reply. Nil when malformed: no name or MTU, or an attribute of the wrong length.
    package static func parseLink(_ message: UnsafeRawBufferPointer) -> Link? {
        guard let (header, attrs) = open(message, type: UInt16(RTM_NEWLINK), fixed: ifinfomsg.self),
              let name = attrs.string(UInt16(IFLA_IFNAME)), let mtu = attrs.u32(UInt16(IFLA_MTU))
        else { return nil }
        var kind: String?
        if attrs.has(UInt16(IFLA_LINKINFO)) {
            guard let info = attrs.nested(UInt16(IFLA_LINKINFO)) else { return nil }
            if info.has(UInt16(IFLA_INFO_KIND)) {
                guard let k = info.string(UInt16(IFLA_INFO_KIND)) else { return nil }
                kind = k
            }
        }
        return Link(index: header.ifi_index, name: name, mtu: Int(mtu), flags: header.ifi_flags, kind: kind)
    }

    /// Parses an RTM_NEWADDR reply for an IPv4 address. Nil for another family or a malformed message.
    package static func parseAddress(_ message: UnsafeRawBufferPointer) -> InterfaceAddress? {
        guard let (header, attrs) = open(message, type: UInt16(RTM_NEWADDR), fixed: ifaddrmsg.self),
              header.ifa_family == UInt8(AF_INET), header.ifa_prefixlen <= 32
        else { return nil }
        // IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer on a point-to-point link and equals
        // IFA_LOCAL otherwise. Use IFA_ADDRESS only when the kernel sent no IFA_LOCAL.
        let local = UInt16(IFA_LOCAL), address = UInt16(IFA_ADDRESS)
        let ip: IPv4Address
        if attrs.has(local) {
            guard let a = attrs.ipv4(local) else { return nil }
            ip = a
        } else {
            guard let a = attrs.ipv4(address) else { return nil }
            ip = a
        }
        return InterfaceAddress(index: Int32(bitPattern: header.ifa_index), address: ip,
                                prefixLength: Int(header.ifa_prefixlen))
    }

    /// Parses an RTM_NEWROUTE reply (a dump entry or an RTM_GETROUTE answer) for IPv4. Nil for another family or a
    /// malformed message. For a multipath route the first next hop supplies gateway and device: that is also the
    /// one the kernel matches when such a route is deleted by gateway and device.
    package static func parseRoute(_ message: UnsafeRawBufferPointer) -> RouteMessage? {
        guard let (header, attrs) = open(message, type: UInt16(RTM_NEWROUTE), fixed: rtmsg.self),
              header.rtm_family == UInt8(AF_INET), header.rtm_dst_len <= 32
        else { return nil }
        func optionalIPv4(_ type: rtattr_type_t) -> IPv4Address?? {
            attrs.has(UInt16(type.rawValue)) ? attrs.ipv4(UInt16(type.rawValue)).map { $0 } : .some(nil)
        }
        func optionalU32(_ type: rtattr_type_t) -> UInt32?? {
            attrs.has(UInt16(type.rawValue)) ? attrs.u32(UInt16(type.rawValue)).map { $0 } : .some(nil)
        }
        // Each `??` level: outer nil = present but malformed, inner nil = absent.
        guard let dst = optionalIPv4(RTA_DST), let gateway = optionalIPv4(RTA_GATEWAY),
              let source = optionalIPv4(RTA_PREFSRC), let oif = optionalU32(RTA_OIF),
              let priority = optionalU32(RTA_PRIORITY), let tableAttr = optionalU32(RTA_TABLE)
        else { return nil }
        // A route with a prefix must name it; only a default route (dst_len 0) leaves RTA_DST out.
        if dst == nil && header.rtm_dst_len != 0 { return nil }
        var route = Route(destination: IPv4Network(address: dst ?? .any, prefixLength: Int(header.rtm_dst_len)),
                          gateway: gateway, outputInterface: oif.map { Int32(bitPattern: $0) },
                          table: tableAttr ?? UInt32(header.rtm_table), protocol: header.rtm_protocol,
                          scope: header.rtm_scope, type: header.rtm_type, priority: priority)
        if oif == nil, attrs.has(UInt16(RTA_MULTIPATH.rawValue)) {
            guard let hops = attrs.payload(UInt16(RTA_MULTIPATH.rawValue)),
                  let first = firstNextHop(hops) else { return nil }
            route.outputInterface = first.outputInterface
            if route.gateway == nil { route.gateway = first.gateway }
        }
        return RouteMessage(route: route, preferredSource: source, flags: header.rtm_flags)
    }

    /// The first struct rtnexthop of an RTA_MULTIPATH payload and its RTA_GATEWAY.
    private static func firstNextHop(_ payload: UnsafeRawBufferPointer)
        -> (outputInterface: Int32, gateway: IPv4Address?)? {
        let size = MemoryLayout<rtnexthop>.size
        guard payload.count >= size else { return nil }
        let hop = payload.loadUnaligned(as: rtnexthop.self)
        let length = Int(hop.rtnh_len)
        guard length >= size, length <= payload.count,
              let attrs = NetlinkAttributes(UnsafeRawBufferPointer(rebasing: payload[netlinkAlign(size)..<length]))
        else { return nil }
        let gw = UInt16(RTA_GATEWAY.rawValue)
        if attrs.has(gw) {
            guard let gateway = attrs.ipv4(gw) else { return nil }
            return (hop.rtnh_ifindex, gateway)
        }
        return (hop.rtnh_ifindex, nil)
    }

    /// Parses NLMSG_ERROR (an ack when errno is 0) or NLMSG_DONE (which carries an error when a dump failed).
    /// The extended ack (NLMSGERR_ATTR_MSG) is read when NLM_F_ACK_TLVS says it is there; a malformed extended ack
    /// is dropped, the errno is kept. Nil when the message is too short to hold the error code.
    package static func parseStatus(_ message: UnsafeRawBufferPointer) -> Status? {
        let headerSize = MemoryLayout<nlmsghdr>.size
        guard message.count >= headerSize else { return nil }
        let header = message.loadUnaligned(as: nlmsghdr.self)
        let length = Int(header.nlmsg_len)
        guard length >= headerSize + 4, length <= message.count else { return nil }
        let code = message.loadUnaligned(fromByteOffset: headerSize, as: Int32.self)
        // The kernel sends -errno; a few subsystems have sent it positive. Either way the magnitude is the errno.
        var status = Status(errno: code == Int32.min ? EINVAL : abs(code), message: nil)
        guard header.nlmsg_flags & UInt16(NLM_F_ACK_TLVS) != 0 else { return status }

        let tlvStart: Int
        switch Int32(header.nlmsg_type) {
        case NLMSG_ERROR:
            // struct nlmsgerr { int error; struct nlmsghdr msg; } then, unless NLM_F_CAPPED, the rest of the
            // request we sent, then the TLVs.
            let errSize = MemoryLayout<nlmsgerr>.size
            guard length >= headerSize + errSize else { return status }
            var body = errSize
            if header.nlmsg_flags & UInt16(NLM_F_CAPPED) == 0 {
                let request = Int(message.loadUnaligned(fromByteOffset: headerSize + 4, as: UInt32.self))
                guard request >= headerSize else { return status }
                body += request - headerSize
            }
            tlvStart = headerSize + netlinkAlign(body)
        case NLMSG_DONE:
            tlvStart = headerSize + 4
        default:
            return status
        }
        guard tlvStart < length,
              let attrs = NetlinkAttributes(UnsafeRawBufferPointer(rebasing: message[tlvStart..<length]))
        else { return status }
        status.message = attrs.string(UInt16(NLMSGERR_ATTR_MSG.rawValue))
        return status
    }

    /// Parses an RTM_NEWNEIGH reply for IPv4. Nil for another family or a malformed message (no NDA_DST, or one
    /// that is not 4 bytes).
    package static func parseNeighbour(_ message: UnsafeRawBufferPointer) -> Neighbour? {
        guard let (header, attrs) = open(message, type: UInt16(RTM_NEWNEIGH), fixed: ndmsg.self),
              header.ndm_family == UInt8(AF_INET), let address = attrs.ipv4(UInt16(NDA_DST))
        else { return nil }
        let lladdr = attrs.payload(UInt16(NDA_LLADDR)).map { Array($0) }
        return Neighbour(index: header.ndm_ifindex, address: address, linkAddress: lladdr, state: header.ndm_state)
    }

    /// The fixed header and attributes of a whole message of `type`, or nil: shorter than its header, claiming
    /// more bytes than there are, another type, or attributes that are not whole. Also used by the notification
    /// parser (NetlinkEvents.swift), whose messages share the replies' layout.
    package static func open<Fixed>(_ message: UnsafeRawBufferPointer, type: UInt16, fixed: Fixed.Type)
        -> (Fixed, NetlinkAttributes)? {
        let headerSize = MemoryLayout<nlmsghdr>.size
        guard message.count >= headerSize else { return nil }
        let header = message.loadUnaligned(as: nlmsghdr.self)
        let length = Int(header.nlmsg_len)
        guard header.nlmsg_type == type, length >= headerSize + MemoryLayout<Fixed>.size, length <= message.count
        else { return nil }
        let value = message.loadUnaligned(fromByteOffset: headerSize, as: Fixed.self)
        let start = min(headerSize + netlinkAlign(MemoryLayout<Fixed>.size), length)
        guard let attrs = NetlinkAttributes(UnsafeRawBufferPointer(rebasing: message[start..<length])) else {
            return nil
        }
        return (value, attrs)
    }
}

// Convenience for tests and callers holding bytes in an array.
extension NetlinkMessages {
    package static func parseLink(_ bytes: [UInt8]) -> Link? { bytes.withUnsafeBytes { parseLink($0) } }
    package static func parseAddress(_ bytes: [UInt8]) -> InterfaceAddress? { bytes.withUnsafeBytes { parseAddress($0) } }
    package static func parseRoute(_ bytes: [UInt8]) -> RouteMessage? { bytes.withUnsafeBytes { parseRoute($0) } }
    package static func parseStatus(_ bytes: [UInt8]) -> Status? { bytes.withUnsafeBytes { parseStatus($0) } }
    package static func parseNeighbour(_ bytes: [UInt8]) -> Neighbour? { bytes.withUnsafeBytes { parseNeighbour($0) } }
}

/// One request under construction, in a zeroed, aligned buffer, written with libmnl's put functions (which keep
/// nlmsg_len and the 4-byte attribute padding right).
///
/// The requests here are a fixed header and a few small attributes, far below the capacity; running out of room is
/// a programming error and traps.
package final class MessageBuilder {
    private static let capacity = 512
    private let buffer: UnsafeMutableRawPointer
    private let header: UnsafeMutablePointer<nlmsghdr>

    /// Starts a message of `type` with its family header (ifinfomsg, ifaddrmsg, ndmsg, rtmsg) right after
    /// nlmsghdr, as every rtnetlink request has one; NLM_F_REQUEST | NLM_F_ACK are always set, `flags` adds to them.
    package init<Fixed: BitwiseCopyable>(type: UInt16, flags: UInt16, sequence: UInt32, header fixed: Fixed) {
        buffer = UnsafeMutableRawPointer.allocate(byteCount: MessageBuilder.capacity, alignment: 16)
        buffer.initializeMemory(as: UInt8.self, repeating: 0, count: MessageBuilder.capacity)
        header = mnl_nlmsg_put_header(buffer)
        header.pointee.nlmsg_type = type
        header.pointee.nlmsg_flags = UInt16(NLM_F_REQUEST | NLM_F_ACK) | flags
        header.pointee.nlmsg_seq = sequence
        header.pointee.nlmsg_pid = 0  // addressed to the kernel
        precondition(netlinkAlign(MemoryLayout<Fixed>.size) <= MessageBuilder.capacity - Int(header.pointee.nlmsg_len),
                     "netlink request buffer too small")
        mnl_nlmsg_put_extra_header(header, MemoryLayout<Fixed>.size).storeBytes(of: fixed, as: Fixed.self)
    }

    deinit { buffer.deallocate() }

    package func putU32(_ type: UInt16, _ value: UInt32) {
        precondition(mnl_attr_put_u32_check(header, MessageBuilder.capacity, type, value),
                     "netlink request buffer too small")
    }

    /// An IPv4 address attribute: 4 bytes in network byte order.
    package func putIPv4(_ type: UInt16, _ address: IPv4Address) { putU32(type, address.networkOrder) }

    /// A NUL-terminated string attribute.
    package func putString(_ type: UInt16, _ value: String) {
        precondition(mnl_attr_put_strz_check(header, MessageBuilder.capacity, type, value),
                     "netlink request buffer too small")
    }

    /// The finished message, nlmsg_len bytes.
    package var bytes: [UInt8] { Array(UnsafeRawBufferPointer(start: buffer, count: Int(header.pointee.nlmsg_len))) }
}
