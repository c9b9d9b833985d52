import Foundation
import Synchronization

/// The masquerade and forward rules as flanneld's nftables mode has them: table `ip flannel-ipv4`, a NAT chain
/// `postrtg` on postrouting (priority srcnat) and a filter chain `forward` on forward (priority filter).
///
/// Install is one batch: add the table and chains (a no-op when they exist), flush both chains, add every rule.
/// The kernel applies the batch as one transaction, so a reinstall never leaves the chain empty in between.
///
/// Two deliberate differences from flanneld's nftables code, both toward its iptables code: the kube-proxy mark is
/// tested as a bit (`meta mark & 0x4000 == 0x4000`, like `--mark 0x4000/0x4000`) rather than for equality, and the
/// "outside -> our pods" exemption is `ip saddr != <network> ip daddr <subnet>` (flanneld's nftables variant has
/// `ip saddr != <subnet> ip daddr <network>`, which also exempts the host's own traffic to remote pods and so never
/// reaches its last rule).
public final class NFTablesMasquerade: MasqueradeRules, Sendable {
    public static let family = "ip"
    public static let table = "flannel-ipv4"
    public static let postroutingChain = "postrtg"
    public static let forwardChain = "forward"
    /// flanneld's IPv6 table; flannel-udp is IPv4-only and only ever removes it (cleanup).
    public static let ipv6Table = "flannel-ipv6"

    public let spec: MasqueradeSpec
    public var backend: MasqueradeBackend { .nftables }
    public var objects: [String] {
        ["table \(Self.family) \(Self.table) (chains \(Self.postroutingChain), \(Self.forwardChain))"]
    }

    private let nft: NFTables
    /// The table as nft lists it right after our install: what `isInPlace` compares with.
    private let reference = Mutex<String?>(nil)

    public init(spec: MasqueradeSpec) throws(NetfilterError) {
        self.spec = spec
        nft = try NFTables()
    }

    private var tableRef: String { "\(Self.family) \(Self.table)" }

    /// The install batch, in nft's language. Pure, for tests.
    public static func installBatch(_ spec: MasqueradeSpec) -> String {
        let t = "\(family) \(table)"
        let net = spec.network.description
        let sub = spec.subnet.description
        let masq = spec.randomFully ? "masquerade fully-random" : "masquerade"
        let p = postroutingChain
        let f = forwardChain
        return """
            add table \(t) { comment "rules for \(table)"; }
            add chain \(t) \(p) { type nat hook postrouting priority srcnat; comment "chain to manage traffic masquerading by flannel"; }
            add chain \(t) \(f) { type filter hook forward priority filter; comment "chain to accept flannel traffic"; }
            flush chain \(t) \(p)
            flush chain \(t) \(f)
            add rule \(t) \(p) meta mark & \(MasqueradeSpec.kubeProxyMark) == \(MasqueradeSpec.kubeProxyMark) return
            add rule \(t) \(p) ip saddr \(sub) ip daddr \(net) return
            add rule \(t) \(p) ip saddr \(net) ip daddr \(sub) return
            add rule \(t) \(p) ip saddr != \(net) ip daddr \(sub) return
            add rule \(t) \(p) ip saddr \(net) ip daddr != \(MasqueradeSpec.multicast) \(masq)
            add rule \(t) \(p) ip saddr != \(net) ip daddr \(net) \(masq)
            add rule \(t) \(f) ip saddr \(net) accept
            add rule \(t) \(f) ip daddr \(net) accept

            """
    }

    /// Deleting a table that is not there is an error in nft; adding it first makes the batch succeed either way.
    public static func removeBatch(family: String, table: String) -> String {
        "add table \(family) \(table)\ndelete table \(family) \(table)\n"
    }

    public func install() throws(NetfilterError) {
        try nft.run(Self.installBatch(spec), operation: "install", object: "table \(tableRef)")
        let listing = try? nft.run("list table \(tableRef)\n", operation: "list", object: "table \(tableRef)")
        reference.withLock { $0 = listing }
    }

    public func isInPlace() -> Bool {
        guard let now = try? nft.run("list table \(tableRef)\n", operation: "list", object: "table \(tableRef)")
        else { return false }  // gone (or unreadable): reinstalling is the remedy either way
        return reference.withLock { $0 == now }
    }

    public func remove() throws(NetfilterError) {
        try nft.run(Self.removeBatch(family: Self.family, table: Self.table), operation: "remove",
                    object: "table \(tableRef)")
        reference.withLock { $0 = nil }
    }
}
