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
/// as one atomic update, so the data plane never sees a half-applied change. All methods are thread-safe.
public final class RouteStore: Sendable {
    /// Each origin's routes. Published while held, so two changes can never publish out of order.
    private let bySource = Mutex<[RouteOrigin: [IPv4Network: Endpoint]]>([:])
    private let publisher: RoutePublisher
    /// What every route is checked against (`PeerRouteRules`); nil accepts anything (tests of the merging only).
    public let rules: PeerRouteRules?

    public enum Error: Swift.Error, CustomStringConvertible, Equatable {
        /// The route broke one of the rules; nothing was changed.
        case refused(PeerRoute, PeerRouteRules.Problem)
        case notFound(IPv4Network)

        public var description: String {
            switch self {
            case .refused(let r, let problem): return "route \(r.subnet) via \(r.endpoint) refused: \(problem)"
            case .notFound(let s): return "no route for \(s)"
            }
        }
    }

    public init(publisher: RoutePublisher, rules: PeerRouteRules?) {
        self.publisher = publisher
        self.rules = rules
    }

    /// Checks one route of `origin` against the rules without changing anything.
    public func check(_ route: PeerRoute, origin: RouteOrigin) throws(Error) {
        guard let rules else { return }
        do { try rules.check(route, origin: origin) } catch { throw .refused(route, error) }
    }

    /// Adds or replaces one route of `origin`.
    public func add(_ route: PeerRoute, origin: RouteOrigin = .manual) throws(Error) {
        try check(route, origin: origin)
        bySource.withLock { bySource in
            bySource[origin, default: [:]][route.subnet] = route.endpoint
            publish(bySource)
        }
    }

    /// Removes the route for `subnet` that `origin` added.
    public func remove(_ subnet: IPv4Network, origin: RouteOrigin = .manual) throws(Error) {
        try bySource.withLock { (bySource) throws(Error) in
            guard bySource[origin]?.removeValue(forKey: subnet) != nil else { throw .notFound(subnet) }
            publish(bySource)
        }
    }

    /// Removes the route for `subnet` from whichever source has it (what `route del` means to an operator).
    public func removeAny(_ subnet: IPv4Network) throws(Error) {
        try bySource.withLock { (bySource) throws(Error) in
            var found = false
            for origin in RouteOrigin.allCases where bySource[origin]?.removeValue(forKey: subnet) != nil { found = true }
            guard found else { throw .notFound(subnet) }
            publish(bySource)
        }
    }

    /// Replaces everything `origin` contributed with `routes`. All routes are checked first: on any error nothing
    /// changes.
    public func replace(_ routes: [PeerRoute], origin: RouteOrigin) throws(Error) {
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
