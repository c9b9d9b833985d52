import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// The system side of `cleanup`: reads what `Cleanup.plan` judges, and carries out one action at a time.
public final class CleanupSystem {
    public let netlink: Netlink
    private var nftables: NFTables?

    public init() throws(SystemError) {
        netlink = try Netlink()
    }

    private func nft() throws(NetfilterError) -> NFTables {
        if let nftables { return nftables }
        let made = try NFTables()
        nftables = made
        return made
    }

    /// flanneld's nftables tables (listed in full) and the iptables nat and filter tables. iptables is read only
    /// when iptables-save is installed: a node without it has no iptables rules of flanneld's either.
    public func readNetfilter() throws(NetfilterError) -> Cleanup.NetfilterView {
        var view = Cleanup.NetfilterView()
        let nft = try nft()
        let tables = try nft.run("list tables\n", operation: "list", object: "tables")
        let wanted = [("ip", NFTablesMasquerade.table), ("ip6", NFTablesMasquerade.ipv6Table)]
        for line in tables.split(separator: "\n") {
            let words = line.split(separator: " ").map(String.init)
            guard words.count == 3, words[0] == "table",
                  wanted.contains(where: { $0.0 == words[1] && $0.1 == words[2] }) else { continue }
            let object = "table \(words[1]) \(words[2])"
            let listing = try nft.run("list \(object)\n", operation: "list", object: object)
            view.nftTables.append(.init(family: words[1], name: words[2], listing: listing))
        }
        if ExternalTool.locate("iptables-save") != nil {
            view.iptables = [try IPTablesMasquerade.save("nat"), try IPTablesMasquerade.save("filter")]
        }
        if ExternalTool.locate("ip6tables-save") != nil {
            view.ip6tables = [try IPTablesMasquerade.save("nat", ipv6: true),
                              try IPTablesMasquerade.save("filter", ipv6: true)]
        }
        return view
    }

    /// Everything `cleanup` finds in `network` in this namespace, as `Cleanup.plan` judges it, then the state of
    /// dead flannel-udp daemons. Devices a live daemon answers for are not leftovers. With `netfilterOptional`
    /// (a dry run) netfilter rules that cannot be read are reported through `warn` and left out.
    public func plan(network: IPv4Network, subnet: IPv4Network?, fixCNI0: Bool, netfilterOptional: Bool,
                     warn: (String) -> Void) throws -> [Cleanup.Action] {
        let links = try netlink.links()
        let keep = Set(links.map(\.name).filter { name in
            (try? ControlClient.send(.routeList, paths: RuntimePaths(device: name), timeoutSeconds: 1)) != nil
        })
        var netfilter = Cleanup.NetfilterView()
        do { netfilter = try readNetfilter() } catch {
            if !netfilterOptional { throw error }
            warn("cannot read the netfilter rules (\(error)); not listing them")
        }
        var actions = Cleanup.plan(network: network, links: links, addresses: try netlink.addresses(),
                                   routes: try netlink.routes(), neighbours: try netlink.neighbours(),
                                   netfilter: netfilter, subnet: subnet, keepDevices: keep, fixCNI0: fixCNI0)
        let paths = RuntimePaths(device: FlannelDefault.device)
        actions += Cleanup.staleStateFiles(runDirectory: paths.runDirectory, namespaceID: paths.namespaceID)
            .map { .removeFile($0) }
        return actions
    }

    /// Carries out one change. Something already gone (a route or neighbour that went with its device) is not an
    /// error: that is the goal.
    public func apply(_ action: Cleanup.Action) throws {
        do {
            switch action {
            case .deleteRoute(let route, _):
                try netlink.deleteRoute(route)
            case .deleteNeighbour(let neighbour, _):
                try netlink.deleteNeighbour(neighbour)
            case .deleteLink(let index, _, _):
                try netlink.deleteLink(index: index)
            case .deleteNFTable(let family, let name):
                try nft().run(NFTablesMasquerade.removeBatch(family: family, table: name), operation: "delete",
                              object: "table \(family) \(name)")
            case .deleteIPTablesRule(let table, let rule, let ipv6):
                try IPTablesMasquerade.restore("*\(table)\n-D \(rule.chain) \(rule.spec)\nCOMMIT\n",
                                               operation: "delete rule", ipv6: ipv6)
            case .deleteIPTablesChain(let table, let chain, _, let ipv6):
                try IPTablesMasquerade.restore("*\(table)\n-F \(chain)\n-X \(chain)\nCOMMIT\n", operation: "delete chain",
                                               ipv6: ipv6)
            case .deleteAddress(let address, _):
                try netlink.deleteAddress(address)
            case .addAddress(let address, _):
                try netlink.addAddress(address)
            case .removeFile(let path):
                // The dead daemon's state with its log, socket and lock, under its lock (so never a live one's).
                let device = URL(fileURLWithPath: path).deletingPathExtension().lastPathComponent
                DaemonLeftovers.remove(paths: RuntimePaths(device: device), state: nil)
                if FileManager.default.fileExists(atPath: path) {
                    throw SystemError("remove", "\(path) (a daemon holds its lock)", errno: EBUSY)
                }
            case .note:
                break
            }
        } catch let e as SystemError where e.errno == ESRCH || e.errno == ENODEV || e.errno == ENOENT {
            // Already gone.
        }
    }
}
