import CNetlink

// The values the netlink layer hands out and takes in. They are plain data: building them touches no socket, and
// `NetlinkMessages` turns them into and out of rtnetlink bytes.

/// A network interface as RTM_NEWLINK describes it.
public struct Link: Sendable, Equatable {
    /// The interface index (ifi_index), unique within one network namespace.
    public var index: Int32
    /// The interface name (IFLA_IFNAME), at most 15 bytes.
    public var name: String
    /// The MTU in bytes (IFLA_MTU).
    public var mtu: Int
    /// The IFF_* flags (ifi_flags): IFF_UP, IFF_RUNNING, IFF_LOWER_UP, IFF_POINTOPOINT, ...
    public var flags: UInt32
    /// The link kind (IFLA_INFO_KIND inside IFLA_LINKINFO): "tun", "vxlan", "veth", "dummy"; nil for devices
    /// without rtnl link ops, such as lo or a physical NIC.
    public var kind: String?

    public init(index: Int32, name: String, mtu: Int, flags: UInt32, kind: String? = nil) {
        self.index = index
        self.name = name
        self.mtu = mtu
        self.flags = flags
        self.kind = kind
    }

    /// Whether the administrative IFF_UP flag is set (what `ip link set up` changes), read from and written to
    /// `flags`.
    public var isUp: Bool {
        get { flags & UInt32(IFF_UP.rawValue) != 0 }
        set { flags = newValue ? flags | UInt32(IFF_UP.rawValue) : flags & ~UInt32(IFF_UP.rawValue) }
    }
}

/// An IPv4 address assigned to an interface, as `ip addr add ADDRESS/PREFIX dev NAME` gives it.
public struct InterfaceAddress: Sendable, Hashable, CustomStringConvertible {
    /// The interface index the address belongs to.
    public var index: Int32
    /// The local address (IFA_LOCAL).
    public var address: IPv4Address
    /// The prefix length, 0-32.
    public var prefixLength: Int

    public init(index: Int32, address: IPv4Address, prefixLength: Int) {
        self.index = index
        self.address = address
        self.prefixLength = prefixLength
    }

    /// "10.244.1.0/32"; the device is left out because only an index is known here.
    public var description: String { "\(address)/\(prefixLength)" }
}

/// An IPv4 route, with the fields `ip route` shows.
public struct Route: Sendable, Hashable {
    /// The destination prefix; 0.0.0.0/0 for a default route.
    public var destination: IPv4Network
    /// The next hop (RTA_GATEWAY); nil for a route straight out of a device.
    public var gateway: IPv4Address?
    /// The output interface index (RTA_OIF).
    public var outputInterface: Int32?
    /// The routing table (RTA_TABLE); `Route.mainTable` unless given.
    public var table: UInt32
    /// Who installed the route (rtm_protocol): `Route.protocolBoot` for a route added by hand or by this tool, as
    /// `ip route add` does; `Route.protocolKernel` for the prefix routes the kernel adds with an address.
    public var `protocol`: UInt8
    /// The scope (rtm_scope): `Route.scopeLink` for a device route without a gateway, `Route.scopeUniverse`
    /// otherwise.
    public var scope: UInt8
    /// The route type (rtm_type); `Route.typeUnicast` for everything this tool adds.
    public var type: UInt8
    /// The metric (RTA_PRIORITY); nil means none was given (the kernel treats that as 0).
    public var priority: UInt32?

    /// Makes a route with the defaults `ip route add` uses: main table, protocol boot, unicast, and scope link
    /// when there is no gateway, universe when there is one.
    public init(destination: IPv4Network, gateway: IPv4Address? = nil, outputInterface: Int32? = nil,
                table: UInt32 = Route.mainTable, protocol: UInt8 = Route.protocolBoot, scope: UInt8? = nil,
                type: UInt8 = Route.typeUnicast, priority: UInt32? = nil) {
        self.destination = destination
        self.gateway = gateway
        self.outputInterface = outputInterface
        self.table = table
        self.protocol = `protocol`
        self.scope = scope ?? (gateway == nil ? Route.scopeLink : Route.scopeUniverse)
        self.type = type
        self.priority = priority
    }

    /// The route the way `ip route` writes it, with the output device's name supplied by the caller (only its
    /// index is known here): "10.244.2.0/24 via 192.168.1.12 dev eth0 table 100 metric 5". The one formatter for
    /// routes in messages, `status` and cleanup's lines.
    public func description(device: String?) -> String {
        var text = destination.description
        if let gateway { text += " via \(gateway)" }
        if let device { text += " dev \(device)" }
        if table != Route.mainTable { text += " table \(table)" }
        if let priority { text += " metric \(priority)" }
        return text
    }

    /// RT_TABLE_MAIN (254), the table `ip route` shows.
    public static let mainTable = UInt32(RT_TABLE_MAIN.rawValue)
    /// RT_TABLE_LOCAL (255), where the kernel keeps local and broadcast routes.
    public static let localTable = UInt32(RT_TABLE_LOCAL.rawValue)
    /// RTPROT_KERNEL (2): added by the kernel, e.g. the prefix route of an address.
    public static let protocolKernel = UInt8(RTPROT_KERNEL)
    /// RTPROT_BOOT (3): added by hand or by a tool, the default of `ip route add`.
    public static let protocolBoot = UInt8(RTPROT_BOOT)
    /// RT_SCOPE_UNIVERSE (0): a route through a gateway.
    public static let scopeUniverse = UInt8(RT_SCOPE_UNIVERSE.rawValue)
    /// RT_SCOPE_LINK (253): a destination directly on the device.
    public static let scopeLink = UInt8(RT_SCOPE_LINK.rawValue)
    /// RTN_UNICAST (1): an ordinary route.
    public static let typeUnicast = UInt8(RTN_UNICAST)
}

/// An IPv4 neighbour (ARP) entry, as `ip neigh` shows it: what flanneld's vxlan backend installs for each peer's
/// flannel.<VNI> address.
public struct Neighbour: Sendable, Hashable, CustomStringConvertible {
    /// The interface index (ndm_ifindex).
    public var index: Int32
    /// The neighbour's IPv4 address (NDA_DST).
    public var address: IPv4Address
    /// Its link-layer address (NDA_LLADDR), when the entry has one.
    public var linkAddress: [UInt8]?
    /// The NUD_* state (ndm_state): NUD_PERMANENT (0x80) for an entry added by hand or by flanneld.
    public var state: UInt16

    public init(index: Int32, address: IPv4Address, linkAddress: [UInt8]? = nil, state: UInt16 = 0x80) {
        self.index = index
        self.address = address
        self.linkAddress = linkAddress
        self.state = state
    }

    /// "10.244.2.0 lladdr 0a:58:0a:f4:02:00"; the device is left out because only an index is known here.
    public var description: String {
        guard let lladdr = linkAddress, !lladdr.isEmpty else { return "\(address)" }
        return "\(address) lladdr " + lladdr.map { byte in
            let hex = String(byte, radix: 16)
            return byte < 16 ? "0" + hex : hex
        }.joined(separator: ":")
    }
}
