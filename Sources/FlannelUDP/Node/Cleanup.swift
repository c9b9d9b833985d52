import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// What a previous backend left behind inside the overlay network, and how to remove it.
///
/// Only things that lie inside the network, or that carry a flannel backend's own name, are ever touched:
/// - host-gw: routes to a subnet of the network via a gateway (on any device other than ours);
/// - any flannel backend's device, matched by name and kind, whose IPv4 addresses all lie inside the network:
///   `flannel.<VNI>` and `flannel-v6.<VNI>` (vxlan), `flannel.ipip` (ipip), `flannel-wg` and `flannel-wg-v6`
///   (wireguard), and `flannel0` (tun: flanneld's udp backend, or a dead flannel-udp; never a live daemon's), with
///   the routes into the network through it and its neighbour entries inside the network;
/// - flanneld's masquerade rules: nftables table `ip flannel-ipv4` when it mentions the network or holds no
///   rules, its IPv6 twin `ip6 flannel-ipv6`, and the iptables chains `FLANNEL-POSTRTG` / `FLANNEL-FWD` (nat or
///   filter) under the same condition, with every jump to them, and the ip6tables chains of those names;
/// - a `cni0` bridge with an address outside this node's subnet (the "cni0 already has an IP address different
///   from ..." failure after a subnet change): reported, and with `fixCNI0` re-addressed to the subnet's gateway;
/// - a dead daemon's state file (its pid no longer runs).
public enum Cleanup {
    public enum Action: Equatable, CustomStringConvertible, Sendable {
        case deleteRoute(Route, device: String)
        case deleteNeighbour(Neighbour, device: String)
        case deleteLink(index: Int32, name: String, kind: String = "vxlan")
        case deleteNFTable(family: String, name: String)
        /// A jump to one of flanneld's chains, as iptables-save (ip6tables-save with `ipv6`) prints it.
        case deleteIPTablesRule(table: String, rule: IPTablesSave.Rule, ipv6: Bool = false)
        /// One of flanneld's chains: flushed, then deleted.
        case deleteIPTablesChain(table: String, chain: String, rules: Int, ipv6: Bool = false)
        case deleteAddress(InterfaceAddress, device: String)
        case addAddress(InterfaceAddress, device: String)
        case removeFile(String)
        /// Not a change: something found that is left as it is (printed as "note: ...").
        case note(String)

        public var description: String {
            switch self {
            case .deleteRoute(let r, let dev): return "delete route \(r.description(device: dev))"
            case .deleteNeighbour(let n, let dev): return "delete neighbour \(n) dev \(dev)"
            case .deleteLink(_, let name, let kind): return "delete \(kind) device \(name)"
            case .deleteNFTable(let family, let name): return "delete nftables table \(family) \(name)"
            case .deleteIPTablesRule(let table, let rule, let ipv6):
                return "delete \(ipv6 ? "ip6tables" : "iptables") rule -t \(table) \(rule.line)"
            case .deleteIPTablesChain(let table, let chain, let rules, let ipv6):
                return "delete \(ipv6 ? "ip6tables" : "iptables") chain -t \(table) \(chain) (\(rules) rule\(rules == 1 ? "" : "s"))"
            case .deleteAddress(let a, let dev): return "delete address \(a) dev \(dev)"
            case .addAddress(let a, let dev): return "add address \(a) dev \(dev)"
            case .removeFile(let path): return "remove \(path)"
            case .note(let text): return text
            }
        }

        /// Whether this changes the system (everything but a note).
        public var isChange: Bool {
            if case .note = self { return false }
            return true
        }
    }

    /// flanneld's masquerade rules as found on the system: its nftables tables (as `nft list table` prints them)
    /// and the iptables nat and filter tables (as iptables-save prints them).
    public struct NetfilterView: Sendable, Equatable {
        public struct Table: Sendable, Equatable {
            public var family: String
            public var name: String
            public var listing: String
        }
        public var nftTables: [Table]
        public var iptables: [IPTablesSave]
        /// ip6tables' nat and filter tables: flanneld's IPv6 chains carry the same names.
        public var ip6tables: [IPTablesSave]
        public init(nftTables: [Table] = [], iptables: [IPTablesSave] = [], ip6tables: [IPTablesSave] = []) {
            self.nftTables = nftTables
            self.iptables = iptables
            self.ip6tables = ip6tables
        }
    }

    /// The backend devices cleanup knows, by kind.
    public static func flannelDeviceKind(name: String, kind: String?) -> String? {
        switch kind ?? "" {
        case "vxlan" where isFlannelVXLANName(name) || isNumbered(name, prefix: "flannel-v6."): return "vxlan"
        case "ipip" where name == "flannel.ipip": return "ipip"
        case "wireguard" where name == "flannel-wg" || name == "flannel-wg-v6": return "wireguard"
        case "tun" where name == FlannelDefault.device: return "tun"
        default: return nil
        }
    }

    /// Decides what to remove from a view of the system. Pure, so that it can be tested without root.
    /// - Parameters:
    ///   - subnet: this node's subnet, to judge cni0 by; nil leaves cni0 unjudged (noted when it exists).
    ///   - keepDevices: devices in use by a live flannel-udp daemon (never touched).
    ///   - fixCNI0: re-address a cni0 whose address is outside `subnet` instead of only noting it.
    public static func plan(network: IPv4Network, links: [Link], addresses: [InterfaceAddress], routes: [Route],
                            neighbours: [Neighbour] = [], netfilter: NetfilterView = NetfilterView(),
                            subnet: IPv4Network? = nil, keepDevices: Set<String> = [], fixCNI0: Bool = false)
        -> [Action] {
        var actions: [Action] = []
        let names = Dictionary(links.map { ($0.index, $0.name) }, uniquingKeysWith: { a, _ in a })
        let devices: [(link: Link, kind: String)] = links.compactMap { link in
            guard let kind = flannelDeviceKind(name: link.name, kind: link.kind), !keepDevices.contains(link.name)
            else { return nil }
            let own = addresses.filter { $0.index == link.index }
            return own.allSatisfy { network.contains($0.address) } ? (link, kind) : nil
        }
        let deviceIndexes = Set(devices.map(\.link.index))
        for route in routes where network.contains(route.destination) {
            guard let oif = route.outputInterface, let dev = names[oif], !keepDevices.contains(dev) else { continue }
            if deviceIndexes.contains(oif) {
                actions.append(.deleteRoute(route, device: dev))  // through a leftover backend device
            } else if route.gateway != nil && route.destination.prefixLength > network.prefixLength {
                actions.append(.deleteRoute(route, device: dev))  // host-gw: a node's subnet via its address
            }
        }
        for n in neighbours where deviceIndexes.contains(n.index) && network.contains(n.address) {
            actions.append(.deleteNeighbour(n, device: names[n.index] ?? "ifindex \(n.index)"))
        }
        for (link, kind) in devices { actions.append(.deleteLink(index: link.index, name: link.name, kind: kind)) }
        actions += planNetfilter(network: network, netfilter)
        actions += planCNI0(links: links, addresses: addresses, subnet: subnet, fix: fixCNI0)
        return actions
    }

    /// Whether rule text belongs to this network: it names the network, or names no address range at all (an
    /// empty chain or table).
    private static func mentions(_ text: String, _ network: IPv4Network) -> Bool {
        text.contains(network.description) || !text.contains("/")
    }

    private static func planNetfilter(network: IPv4Network, _ view: NetfilterView) -> [Action] {
        var actions: [Action] = []
        // IPv6 chains cannot name an IPv4 network: like the ip6 nftables table they go by flanneld's names alone.
        for (tables, ipv6) in [(view.iptables, false), (view.ip6tables, true)] {
            for table in tables {
                for chain in [IPTablesMasquerade.natChain, IPTablesMasquerade.forwardChain] {
                    let inside = table.rules(in: chain)
                    let body = inside.map(\.spec).joined(separator: "\n")
                    guard table.chains.contains(chain) || !table.jumps(to: chain).isEmpty else { continue }
                    guard ipv6 || mentions(body, network) else {
                        actions.append(.note("note: iptables chain -t \(table.table) \(chain) is for another network; left alone"))
                        continue
                    }
                    actions += table.jumps(to: chain).map { .deleteIPTablesRule(table: table.table, rule: $0, ipv6: ipv6) }
                    if table.chains.contains(chain) {
                        actions.append(.deleteIPTablesChain(table: table.table, chain: chain, rules: inside.count, ipv6: ipv6))
                    }
                }
            }
        }
        for table in view.nftTables {
            if table.family == "ip6" || mentions(table.listing.replacingOccurrences(of: "rules for \(table.name)", with: ""), network) {
                actions.append(.deleteNFTable(family: table.family, name: table.name))
            } else {
                actions.append(.note("note: nftables table \(table.family) \(table.name) is for another network; left alone"))
            }
        }
        return actions
    }

    /// The flannel CNI plugin's bridge: "cni0", kind bridge, gateway address = the subnet's first host.
    private static func planCNI0(links: [Link], addresses: [InterfaceAddress], subnet: IPv4Network?, fix: Bool)
        -> [Action] {
        guard let cni0 = links.first(where: { $0.name == "cni0" && $0.kind == "bridge" }) else { return [] }
        let own = addresses.filter { $0.index == cni0.index }
        guard let subnet else {
            return own.isEmpty ? [] : [.note("note: cni0 not checked: this node's subnet is unknown (give --subnet)")]
        }
        let stale = own.filter { !subnet.contains($0.address) }
        guard !stale.isEmpty else { return [] }
        guard fix else {
            return [.note("note: cni0 has \(stale.map(\.description).joined(separator: ", ")), outside this node's subnet \(subnet); pods cannot start (\"cni0 already has an IP address different from ...\"); --fix-cni0 re-addresses it")]
        }
        var actions: [Action] = stale.map { .deleteAddress($0, device: "cni0") }
        let gateway = InterfaceAddress(index: cni0.index, address: subnet.firstHost, prefixLength: subnet.prefixLength)
        if !own.contains(gateway) { actions.append(.addAddress(gateway, device: "cni0")) }
        return actions
    }

    /// flannel's vxlan device names: "flannel." followed by the VNI in decimal.
    public static func isFlannelVXLANName(_ name: String) -> Bool {
        isNumbered(name, prefix: "flannel.")
    }

    private static func isNumbered(_ name: String, prefix: String) -> Bool {
        guard name.hasPrefix(prefix) else { return false }
        let vni = name.dropFirst(prefix.count)
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
