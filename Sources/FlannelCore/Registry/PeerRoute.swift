/// One entry of the overlay's peer table: packets for `subnet` go to the flannel node at `endpoint`.
/// Fed by the command line (`route add`), a peers file, or the etcd registry; the data plane sees only an
/// immutable snapshot of all of them (see `RouteTable`).
public struct PeerRoute: Hashable, Sendable, CustomStringConvertible {
    public var subnet: IPv4Network
    public var endpoint: Endpoint

    public init(subnet: IPv4Network, endpoint: Endpoint) {
        self.subnet = subnet
        self.endpoint = endpoint
    }

    public var description: String { "\(subnet) via \(endpoint)" }
}

/// Where a peer route came from. A route from a more specific source is not overwritten by a less specific one:
/// an operator's `route add` wins over a peers file, which wins over the registry.
public enum RouteOrigin: String, Codable, Sendable, CaseIterable, Comparable {
    case registry   // etcd
    case file       // --peers FILE
    case manual     // flannel-udp route add / up --route

    private var rank: Int {
        switch self {
        case .registry: return 0
        case .file: return 1
        case .manual: return 2
        }
    }

    public static func < (lhs: RouteOrigin, rhs: RouteOrigin) -> Bool { lhs.rank < rhs.rank }
}
