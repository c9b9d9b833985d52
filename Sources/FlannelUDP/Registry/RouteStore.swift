import Foundation

/// Receives the effective peer table whenever it changes. The data plane's `RouteTable` is the real one; tests
/// may record what was published.
public protocol RoutePublisher: AnyObject, Sendable {
    func publish(_ routes: [PeerRoute])
}

/// The control-plane copy of the peer table, merged from every source (manual `route add`, a peers file, etcd).
///
/// Each source owns its own set of routes and replaces it whole; for a subnet named by several sources the most
/// specific origin wins (manual > file > registry). Every change recomputes the effective set and publishes it
/// as one atomic update, so the data plane never sees a half-applied change. All methods are thread-safe.
public final class RouteStore: @unchecked Sendable {  // all state is behind `lock`
    private let lock = NSLock()
    private var bySource: [RouteOrigin: [IPv4Network: Endpoint]] = [:]
    private let publisher: RoutePublisher
    /// The node's own subnet and the overlay network: routes to our own subnet or outside the network are refused.
    private let ownSubnet: IPv4Network?
    private let network: IPv4Network?

    public enum Error: Swift.Error, CustomStringConvertible, Equatable {
        case outsideNetwork(IPv4Network, IPv4Network)
        case ownSubnet(IPv4Network)
        case notFound(IPv4Network)

        public var description: String {
            switch self {
            case .outsideNetwork(let s, let n): return "subnet \(s) is not inside the overlay network \(n)"
            case .ownSubnet(let s): return "subnet \(s) lies inside this node's own subnet"
            case .notFound(let s): return "no route for \(s)"
            }
        }
    }

    public init(publisher: RoutePublisher, network: IPv4Network?, ownSubnet: IPv4Network?) {
        self.publisher = publisher
        self.network = network
        self.ownSubnet = ownSubnet
    }

    /// Checks one route against the node's network and subnet without changing anything.
    public func check(_ route: PeerRoute) throws(Error) {
        if let network, !network.contains(route.subnet) { throw .outsideNetwork(route.subnet, network) }
        // A route inside our own subnet would send our pods' traffic away; a covering route (10.244.0.0/16 via a
        // gateway node) is fine: longest-prefix match keeps our subnet local.
        if let ownSubnet, ownSubnet.contains(route.subnet) { throw .ownSubnet(route.subnet) }
    }

    /// Adds or replaces one route of `origin`.
    public func add(_ route: PeerRoute, origin: RouteOrigin = .manual) throws(Error) {
        try check(route)
        lock.lock()
        defer { lock.unlock() }
        bySource[origin, default: [:]][route.subnet] = route.endpoint
        publishLocked()
    }

    /// Removes the route for `subnet` that `origin` added.
    public func remove(_ subnet: IPv4Network, origin: RouteOrigin = .manual) throws(Error) {
        lock.lock()
        defer { lock.unlock() }
        guard bySource[origin]?.removeValue(forKey: subnet) != nil else { throw .notFound(subnet) }
        publishLocked()
    }

    /// Removes the route for `subnet` from whichever source has it (what `route del` means to an operator).
    public func removeAny(_ subnet: IPv4Network) throws(Error) {
        lock.lock()
        defer { lock.unlock() }
        var found = false
        for origin in RouteOrigin.allCases where bySource[origin]?.removeValue(forKey: subnet) != nil { found = true }
        guard found else { throw .notFound(subnet) }
        publishLocked()
    }

    /// Replaces everything `origin` contributed with `routes`. All routes are checked first: on any error nothing
    /// changes.
    public func replace(_ routes: [PeerRoute], origin: RouteOrigin) throws(Error) {
        for r in routes { try check(r) }
        var map: [IPv4Network: Endpoint] = [:]
        for r in routes { map[r.subnet] = r.endpoint }
        lock.lock()
        defer { lock.unlock() }
        bySource[origin] = map
        publishLocked()
    }

    /// The effective table, sorted by subnet, with each route's origin.
    public func entries() -> [(route: PeerRoute, origin: RouteOrigin)] {
        lock.lock()
        defer { lock.unlock() }
        return effectiveLocked()
    }

    private func effectiveLocked() -> [(route: PeerRoute, origin: RouteOrigin)] {
        var merged: [IPv4Network: (Endpoint, RouteOrigin)] = [:]
        for origin in RouteOrigin.allCases.sorted() {  // lowest rank first; later (more specific) origins overwrite
            for (subnet, endpoint) in bySource[origin] ?? [:] { merged[subnet] = (endpoint, origin) }
        }
        return merged.map { (route: PeerRoute(subnet: $0.key, endpoint: $0.value.0), origin: $0.value.1) }
            .sorted { ($0.route.subnet.address, $0.route.subnet.prefixLength) < ($1.route.subnet.address, $1.route.subnet.prefixLength) }
    }

    private func publishLocked() {
        publisher.publish(effectiveLocked().map(\.route))
    }
}

extension RouteTable: RoutePublisher {}
