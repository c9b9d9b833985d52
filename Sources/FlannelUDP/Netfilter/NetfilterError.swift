/// A failed netfilter operation: what was attempted, on which table or chain, and what nftables or iptables said.
/// Reads like the tools themselves: "nftables: install table ip flannel-ipv4: Error: Could not process rule: ...".
public struct NetfilterError: Error, CustomStringConvertible, Sendable, Equatable {
    /// The operation in words ("install", "list", "remove", "run iptables-restore").
    public var operation: String
    /// What it was applied to ("table ip flannel-ipv4", "nat chain FLANNEL-POSTRTG").
    public var object: String
    /// The library's or the tool's own error text (nft's error buffer, iptables-restore's stderr), or the errno text.
    public var reason: String

    public init(_ operation: String, _ object: String, _ reason: String) {
        self.operation = operation
        self.object = object
        self.reason = reason.trimmingCharacters(in: .whitespacesAndNewlines)
    }

    public var description: String {
        let head = object.isEmpty ? operation : "\(operation) \(object)"
        return reason.isEmpty ? head : "\(head): \(reason)"
    }
}
