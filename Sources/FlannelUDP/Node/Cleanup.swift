import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// What a previous backend left behind inside the overlay network, and how to remove it.
///
/// Only things that lie inside the network are ever touched:
/// - host-gw: routes to a subnet of the network via a gateway (on any device other than ours);
/// - vxlan: a vxlan device named `flannel.<N>` whose addresses all lie inside the network (routes through it go
///   with it), and routes to the network through it;
/// - a dead daemon's state file (its pid no longer runs).
public enum Cleanup {
    public enum Action: Equatable, CustomStringConvertible, Sendable {
        case deleteRoute(Route, device: String)
        case deleteLink(index: Int32, name: String)
        case removeFile(String)

        public var description: String {
            switch self {
            case .deleteRoute(let r, let dev):
                var s = "delete route \(r.destination)"
                if let gw = r.gateway { s += " via \(gw)" }
                s += " dev \(dev)"
                if r.table != Route.mainTable { s += " table \(r.table)" }
                return s
            case .deleteLink(_, let name): return "delete vxlan device \(name)"
            case .removeFile(let path): return "remove \(path)"
            }
        }
    }

    /// Decides what to remove from a view of the system. Pure, so that it can be tested without root.
    /// - Parameters:
    ///   - keepDevices: devices in use by a live flannel-udp daemon (never touched).
    public static func plan(network: IPv4Network, links: [Link], addresses: [InterfaceAddress], routes: [Route],
                            keepDevices: Set<String> = []) -> [Action] {
        var actions: [Action] = []
        let names = Dictionary(links.map { ($0.index, $0.name) }, uniquingKeysWith: { a, _ in a })
        let vxlans = links.filter { link in
            guard link.kind == "vxlan", isFlannelVXLANName(link.name), !keepDevices.contains(link.name) else { return false }
            let own = addresses.filter { $0.index == link.index }
            return own.allSatisfy { network.contains($0.address) }
        }
        let vxlanIndexes = Set(vxlans.map(\.index))
        for route in routes where network.contains(route.destination) {
            guard let oif = route.outputInterface, let dev = names[oif], !keepDevices.contains(dev) else { continue }
            if vxlanIndexes.contains(oif) {
                actions.append(.deleteRoute(route, device: dev))  // through a leftover flannel.<VNI>
            } else if route.gateway != nil && route.destination.prefixLength > network.prefixLength {
                actions.append(.deleteRoute(route, device: dev))  // host-gw: a node's subnet via its address
            }
        }
        for link in vxlans { actions.append(.deleteLink(index: link.index, name: link.name)) }
        return actions
    }

    /// flannel's vxlan device names: "flannel." followed by the VNI in decimal.
    public static func isFlannelVXLANName(_ name: String) -> Bool {
        guard name.hasPrefix("flannel.") else { return false }
        let vni = name.dropFirst("flannel.".count)
        return !vni.isEmpty && vni.allSatisfy { $0.isASCII && $0.isNumber }
    }

    /// State files of daemons that are no longer running, in this namespace's state directory.
    public static func staleStateFiles(runDirectory: String, namespaceID: UInt64) -> [String] {
        let dir = "\(runDirectory)/ns-\(namespaceID)"
        guard let entries = try? FileManager.default.contentsOfDirectory(atPath: dir) else { return [] }
        return entries.filter { $0.hasSuffix(".json") }.sorted().compactMap { name in
            let path = "\(dir)/\(name)"
            guard let state = DaemonState.load(path: path) else { return path }  // unreadable: stale by definition
            return state.isAlive ? nil : path
        }
    }
}
