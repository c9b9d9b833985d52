import Foundation
import Synchronization

/// Keeps the registry's bad leases out of the peer table. Anyone who can write to the registry can write any
/// lease; a lease that breaks `PeerRouteRules` is ignored (the other leases still apply), and reported once: the
/// watch hands over the whole list on every change, and a hostile or stale entry must not write a log line each
/// time. A lease is reported again only after it has gone from the registry (or changed) and come back.
public final class RegistryRouteFilter: Sendable {
    private let reported = Mutex<Set<PeerRoute>>([])

    public init() {}

    /// Splits the registry's routes into those `store` accepts and the refusals not reported before.
    public func filter(_ routes: [PeerRoute], store: RouteStore)
        -> (usable: [PeerRoute], newlyRefused: [FlannelError]) {
        var usable: [PeerRoute] = []
        var refused: [(PeerRoute, FlannelError)] = []
        for route in routes {
            do throws(FlannelError) {
                try store.check(route, origin: .registry)
                usable.append(route)
            } catch {
                refused.append((route, error))
            }
        }
        return reported.withLock { reported in
            let bad = Set(refused.map(\.0))
            let fresh = refused.filter { !reported.contains($0.0) }.map(\.1)
            reported = bad  // forget what is gone, so the set stays as small as the registry
            return (usable, fresh)
        }
    }
}
