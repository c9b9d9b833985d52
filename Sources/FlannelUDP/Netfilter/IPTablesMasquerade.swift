import Foundation
import Synchronization

/// The masquerade and forward rules as flanneld's iptables mode has them: nat chain `FLANNEL-POSTRTG` jumped to
/// from POSTROUTING, filter chain `FLANNEL-FWD` jumped to from FORWARD, every rule commented "flanneld masq" or
/// "flanneld forward".
///
/// Every change is one `iptables-restore --noflush` run: declaring our chain (`:FLANNEL-POSTRTG - [0:0]`) creates
/// it or flushes it, and the rules that follow refill it, all in the table's one commit; jump rules already there
/// are deleted in the same commit before the one jump is appended, so repeated installs never pile them up.
public final class IPTablesMasquerade: MasqueradeRules, Sendable {
    public static let natChain = "FLANNEL-POSTRTG"
    public static let forwardChain = "FLANNEL-FWD"
    public static let masqComment = "\"flanneld masq\""
    public static let forwardComment = "\"flanneld forward\""

    public let spec: MasqueradeSpec
    public var backend: MasqueradeBackend { .iptables }
    public var objects: [String] {
        ["nat chain \(Self.natChain) (from POSTROUTING)", "filter chain \(Self.forwardChain) (from FORWARD)"]
    }

    /// Our lines as iptables-save printed them right after our install: what `isInPlace` compares with.
    private let reference = Mutex<[String]?>(nil)

    public init(spec: MasqueradeSpec) {
        self.spec = spec
    }

    /// Our rules per table, in iptables-save's form (`-A CHAIN spec`). Pure, for tests.
    public static func rules(_ spec: MasqueradeSpec) -> (nat: [IPTablesSave.Rule], filter: [IPTablesSave.Rule]) {
        let net = spec.network.description
        let sub = spec.subnet.description
        let m = "-m comment --comment \(masqComment)"
        let f = "-m comment --comment \(forwardComment)"
        let masq = spec.randomFully ? "-j MASQUERADE --random-fully" : "-j MASQUERADE"
        let mark = "\(MasqueradeSpec.kubeProxyMark)/\(MasqueradeSpec.kubeProxyMark)"
        let nat: [IPTablesSave.Rule] = [
            .init(chain: "POSTROUTING", spec: "\(m) -j \(natChain)"),
            .init(chain: natChain, spec: "-m mark --mark \(mark) \(m) -j RETURN"),
            .init(chain: natChain, spec: "-s \(sub) -d \(net) \(m) -j RETURN"),
            .init(chain: natChain, spec: "-s \(net) -d \(sub) \(m) -j RETURN"),
            .init(chain: natChain, spec: "! -s \(net) -d \(sub) \(m) -j RETURN"),
            .init(chain: natChain, spec: "-s \(net) ! -d \(MasqueradeSpec.multicast) \(m) \(masq)"),
            .init(chain: natChain, spec: "! -s \(net) -d \(net) \(m) \(masq)"),
        ]
        let filter: [IPTablesSave.Rule] = [
            .init(chain: "FORWARD", spec: "\(f) -j \(forwardChain)"),
            .init(chain: forwardChain, spec: "-s \(net) \(f) -j ACCEPT"),
            .init(chain: forwardChain, spec: "-d \(net) \(f) -j ACCEPT"),
        ]
        return (nat, filter)
    }

    /// The iptables-restore --noflush input that installs or replaces our rules, given the tables as they are now
    /// (for the jump rules to delete first). Pure, for tests.
    public static func restoreInput(_ spec: MasqueradeSpec, nat: IPTablesSave, filter: IPTablesSave) -> String {
        let ours = rules(spec)
        func block(_ table: String, _ current: IPTablesSave, chain: String, _ rules: [IPTablesSave.Rule]) -> [String] {
            ["*\(table)", ":\(chain) - [0:0]"]
                + current.jumps(to: chain).map { "-D \($0.chain) \($0.spec)" }
                + rules.map(\.line)
                + ["COMMIT"]
        }
        return (block("nat", nat, chain: natChain, ours.nat)
                + block("filter", filter, chain: forwardChain, ours.filter)).joined(separator: "\n") + "\n"
    }

    /// The iptables-restore --noflush input that removes our chains and every jump to them; nil when there is
    /// nothing to remove. Pure, for tests.
    public static func removalInput(nat: IPTablesSave, filter: IPTablesSave) -> String? {
        var lines: [String] = []
        for current in [nat, filter] {
            let removal = [natChain, forwardChain].flatMap { current.removalLines(for: $0) }
            if !removal.isEmpty { lines += ["*\(current.table)"] + removal + ["COMMIT"] }
        }
        return lines.isEmpty ? nil : lines.joined(separator: "\n") + "\n"
    }

    /// - Parameter ipv6: ip6tables-save instead (flanneld's IPv6 chains, which only cleanup touches).
    static func save(_ table: String, ipv6: Bool = false) throws(NetfilterError) -> IPTablesSave {
        IPTablesSave.parse(try ExternalTool.run(ipv6 ? "ip6tables-save" : "iptables-save", ["-t", table]), table: table)
    }

    static func restore(_ input: String, operation: String, ipv6: Bool = false) throws(NetfilterError) {
        let tool = ipv6 ? "ip6tables" : "iptables"
        do {
            _ = try ExternalTool.run("\(tool)-restore", ["-w", "5", "--noflush"], input: input)
        } catch {
            throw NetfilterError("\(tool): \(operation)", "chains \(natChain), \(forwardChain)",
                                 "\(error.description)\ninput was:\n\(input)")
        }
    }

    /// Our lines in the tables as they are now: the jumps to our chains and the rules in them.
    private static func ourLines(nat: IPTablesSave, filter: IPTablesSave) -> [String] {
        var lines: [String] = []
        for (current, chain) in [(nat, natChain), (filter, forwardChain)] {
            lines += current.chains.contains(chain) ? [":\(current.table) \(chain)"] : []
            lines += current.jumps(to: chain).map(\.line) + current.rules(in: chain).map(\.line)
        }
        return lines
    }

    public func install() throws(NetfilterError) {
        let input = Self.restoreInput(spec, nat: try Self.save("nat"), filter: try Self.save("filter"))
        try Self.restore(input, operation: "install")
        let now = try? Self.ourLines(nat: Self.save("nat"), filter: Self.save("filter"))
        reference.withLock { $0 = now }
    }

    public func isInPlace() -> Bool {
        guard let nat = try? Self.save("nat"), let filter = try? Self.save("filter") else { return false }
        let now = Self.ourLines(nat: nat, filter: filter)
        return reference.withLock { $0 == now }
    }

    public func remove() throws(NetfilterError) {
        if let input = Self.removalInput(nat: try Self.save("nat"), filter: try Self.save("filter")) {
            try Self.restore(input, operation: "remove")
        }
        reference.withLock { $0 = nil }
    }
}
