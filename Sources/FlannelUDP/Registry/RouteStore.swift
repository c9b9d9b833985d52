import Foundation
import Synchronization

/// Receives the effective peer table whenever it changes. The data plane's `RouteTable` is the real one; tests
/// may record what was published.
public protocol RoutePublisher: AnyObject, Sendable {
    func publish(_ routes: [PeerRoute])
}

/// The control-plane copy of the peer table, merged from every source (manual `route add`, a peers file, etcd).
///
/// Each source owns its own set of routes and replaces it whole; for a subnet named by several sources the most
/// specific origin wins (manual > file > registry). Every change recomputes the effective set and publishes it
/// as one atomic update, so the data plane never sees a half-applied change. All methods are thread-safe. A route
/// the rules refuse, or one that is not there to remove, is bad input: `.usage`, and nothing changes.
public final class RouteStore: Sendable {
    /// Each origin's routes. Published while held, so two changes can never publish out of order.
    private let bySource = Mutex<[RouteOrigin: [IPv4Network: Endpoint]]>([:])
    private let publisher: RoutePublisher
    /// What every route is checked against (`PeerRouteRules`); nil accepts anything (tests of the merging only).
    public let rules: PeerRouteRules?

    public init(publisher: RoutePublisher, rules: PeerRouteRules?) {
        self.publisher = publisher
        self.rules = rules
    }

    /// Checks one route of `origin` against the rules without changing anything.
    public func check(_ route: PeerRoute, origin: RouteOrigin) throws(FlannelError) {
        guard let rules else { return }
        do { try rules.check(route, origin: origin) } catch { throw .refused(route, error) }
    }

    /// Adds or replaces one route of `origin`.
    public func add(_ route: PeerRoute, origin: RouteOrigin = .manual) throws(FlannelError) {
        try check(route, origin: origin)
        bySource.withLock { bySource in
            bySource[origin, default: [:]][route.subnet] = route.endpoint
            publish(bySource)
        }
    }

    /// Removes the route for `subnet` that `origin` added.
    public func remove(_ subnet: IPv4Network, origin: RouteOrigin = .manual) throws(FlannelError) {
        try bySource.withLock { (bySource) throws(FlannelError) in
            guard bySource[origin]?.removeValue(forKey: subnet) != nil else { throw .usage("no route for \(subnet)") }
            publish(bySource)
        }
    }

    /// Removes the route for `subnet` from whichever source has it (what `route del` means to an operator).
    public func removeAny(_ subnet: IPv4Network) throws(FlannelError) {
        try bySource.withLock { (bySource) throws(FlannelError) in
            var found = false
            for origin in RouteOrigin.allCases where bySource[origin]?.removeValue(forKey: subnet) != nil { found = true }
            guard found else { throw .usage("no route for \(subnet)") }
            publish(bySource)
        }
    }

    /// Replaces everything `origin` contributed with `routes`. All routes are checked first: on any error nothing
    /// changes.
    public func replace(_ routes: [PeerRoute], origin: RouteOrigin) throws(FlannelError) {
        for r in routes { try check(r, origin: origin) }
        var map: [IPv4Network: Endpoint] = [:]
        for r in routes { map[r.subnet] = r.endpoint }
        bySource.withLock { bySource in
            bySource[origin] = map
            publish(bySource)
        }
    }

    /// The effective table, sorted by subnet, with each route's origin.
    public func entries() -> [(route: PeerRoute, origin: RouteOrigin)] {
        bySource.withLock { Self.effective($0) }
    }

    private static func effective(_ bySource: [RouteOrigin: [IPv4Network: Endpoint]])
        -> [(route: PeerRoute, origin: RouteOrigin)] {
        var merged: [IPv4Network: (Endpoint, RouteOrigin)] = [:]
        for origin in RouteOrigin.allCases.sorted() {  // lowest rank first; later (more specific) origins overwrite
            for (subnet, endpoint) in bySource[origin] ?? [:] { merged[subnet] = (endpoint, origin) }
        }
        return merged.map { (route: PeerRoute(subnet: $0.key, endpoint: $0.value.0), origin: $0.value.1) }
            .sorted { ($0.route.subnet.address, $0.route.subnet.prefixLength) < ($1.route.subnet.address, $1.route.subnet.prefixLength) }
    }

    private func publish(_ bySource: [RouteOrigin: [IPv4Network: Endpoint]]) {
        publisher.publish(Self.effective(bySource).map(\.route))
    }
}

extension RouteTable: RoutePublisher {}

extension FlannelError {
    /// `route` broke one of the rules (`PeerRouteRules`): bad input, and nothing was changed.
    public static func refused(_ route: PeerRoute, _ problem: PeerRouteRules.Problem) -> FlannelError {
        .usage("route \(route.subnet) via \(route.endpoint) refused: \(problem)")
    }
}
