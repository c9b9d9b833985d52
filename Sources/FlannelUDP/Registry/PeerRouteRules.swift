/// The one validation every peer route passes before it becomes a route, whatever its source: a registry lease,
/// a peers-file line or `route add`. A peer is trusted for its own subnet only, so a route may neither reach
/// outside the overlay network nor touch this node's subnet, and its endpoint must be a plain unicast address of
/// another host: not this node, not an address that loops back through the tun, nothing the kernel would send
/// somewhere other than one peer (loopback, multicast, broadcast, 0.0.0.0).
public struct PeerRouteRules: Sendable, Equatable {
    /// The whole overlay network (10.244.0.0/16).
    public var network: IPv4Network
    /// This node's subnet (10.244.1.0/24).
    public var ownSubnet: IPv4Network
    /// The address peers send to us at; nil when not known (then not checked).
    public var publicIP: IPv4Address?
    /// The registry config's SubnetLen: flannel writes leases of exactly this prefix length and no other, so a
    /// `/32` lease can only be someone stealing one pod's traffic by longest prefix. Checked for registry routes
    /// only; nil outside registry mode.
    public var subnetLength: Int?

    public init(network: IPv4Network, ownSubnet: IPv4Network, publicIP: IPv4Address? = nil, subnetLength: Int? = nil) {
        self.network = network
        self.ownSubnet = ownSubnet
        self.publicIP = publicIP
        self.subnetLength = subnetLength
    }

    /// Why a peer route was refused. Each description names the offending value.
    public enum Problem: Error, Equatable, Sendable, CustomStringConvertible {
        case outsideNetwork(IPv4Network, network: IPv4Network)
        case overlapsOwnSubnet(IPv4Network, own: IPv4Network)
        case prefixLength(IPv4Network, subnetLength: Int)
        case endpointNotUnicast(Endpoint, what: String)
        case endpointInsideNetwork(Endpoint, network: IPv4Network)
        case endpointIsThisNode(Endpoint)

        public var description: String {
            switch self {
            case .outsideNetwork(let s, let n):
                return "subnet \(s) is not inside the overlay network \(n)"
            case .overlapsOwnSubnet(let s, let own):
                return "subnet \(s) overlaps this node's own subnet \(own)"
            case .prefixLength(let s, let len):
                return "subnet \(s) is not a /\(len) (the registry's SubnetLen; flannel leases no other size)"
            case .endpointNotUnicast(let e, let what):
                return "endpoint \(e.address) is in \(what), not a peer's unicast address"
            case .endpointInsideNetwork(let e, let n):
                return "endpoint \(e.address) lies inside the overlay network \(n) (the datagrams would loop through the tun)"
            case .endpointIsThisNode(let e):
                return "endpoint \(e.address) is this node's own public IP"
            }
        }
    }

    /// Address ranges that never name one peer host, with what they are.
    static let nonUnicast: [(IPv4Network, String)] = [
        (IPv4Network(address: IPv4Address(0, 0, 0, 0), prefixLength: 8), "the unspecified range 0.0.0.0/8"),
        (IPv4Network(address: IPv4Address(127, 0, 0, 0), prefixLength: 8), "the loopback range 127.0.0.0/8"),
        (IPv4Network(address: IPv4Address(224, 0, 0, 0), prefixLength: 4), "the multicast range 224.0.0.0/4"),
        (IPv4Network(address: IPv4Address(240, 0, 0, 0), prefixLength: 4),
         "the reserved range 240.0.0.0/4 (with the broadcast address 255.255.255.255)"),
    ]

    /// Checks one route; `origin` decides whether the registry's SubnetLen applies.
    public func check(_ route: PeerRoute, origin: RouteOrigin) throws(Problem) {
        let subnet = route.subnet
        if !network.contains(subnet) { throw .outsideNetwork(subnet, network: network) }
        // Either direction: a route inside our subnet would send our pods' traffic away, and one covering it
        // would let its peer claim our pods' addresses as the source of what it sends.
        if subnet.overlaps(ownSubnet) { throw .overlapsOwnSubnet(subnet, own: ownSubnet) }
        if origin == .registry, let subnetLength, subnet.prefixLength != subnetLength {
            throw .prefixLength(subnet, subnetLength: subnetLength)
        }
        try checkEndpoint(route.endpoint)
    }

    func checkEndpoint(_ endpoint: Endpoint) throws(Problem) {
        for (range, what) in PeerRouteRules.nonUnicast where range.contains(endpoint.address) {
            throw .endpointNotUnicast(endpoint, what: what)
        }
        if network.contains(endpoint.address) { throw .endpointInsideNetwork(endpoint, network: network) }
        if let publicIP, endpoint.address == publicIP { throw .endpointIsThisNode(endpoint) }
    }

    /// The start-up check of the overlay network itself (from `--network` or the registry's config), against the
    /// addresses this node is reached at on the underlay. Returns the problem in words, or nil.
    ///
    /// Refused: anything larger than a /8 (0.0.0.0/0 would make every address on the internet a pod, and no
    /// cluster needs more than the 16 million addresses of 10.0.0.0/8, flannel's own default); a network that
    /// overlaps 0.0.0.0/8, loopback, multicast or 240.0.0.0/4 (no pod can live there); and a network that
    /// covers the underlay's address or the public IP (the node's own traffic to its peers would be routed into
    /// the tun).
    public static func checkNetwork(_ network: IPv4Network, underlay: IPv4Address? = nil,
                                    publicIP: IPv4Address? = nil) -> String? {
        if network.prefixLength == 0 {
            return "network \(network) is the whole IPv4 address space; give the overlay's own range, e.g. 10.244.0.0/16"
        }
        if network.prefixLength < minimumNetworkPrefix {
            return "network \(network) is larger than a /\(minimumNetworkPrefix); give the overlay's own range, e.g. 10.244.0.0/16"
        }
        for (range, what) in nonUnicast where range.overlaps(network) {
            return "network \(network) overlaps \(what), where no pod can live"
        }
        if let underlay, network.contains(underlay) {
            return "network \(network) covers the underlay address \(underlay); the overlay must not contain the addresses its nodes use to reach each other"
        }
        if let publicIP, publicIP != underlay, network.contains(publicIP) {
            return "network \(network) covers the public IP \(publicIP); the overlay must not contain the addresses its nodes use to reach each other"
        }
        return nil
    }

    /// The largest overlay network accepted (see `checkNetwork`).
    public static let minimumNetworkPrefix = 8
}
