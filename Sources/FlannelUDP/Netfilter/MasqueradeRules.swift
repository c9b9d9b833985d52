import Foundation

/// What the rules say, the same for both backends (flanneld's pkg/trafficmngr, the iptables variant's semantics):
///
/// postrouting (nftables chain `postrtg`, iptables nat chain `FLANNEL-POSTRTG` jumped to from POSTROUTING):
///   1. packets marked by kube-proxy (mark 0x4000/0x4000) are left alone (it masquerades them itself);
///   2. this node's pods -> the network: no NAT (pod-to-pod keeps the pod's address);
///   3. the network -> this node's pods: no NAT;
///   4. outside the network -> this node's pods: no NAT (external traffic arriving for a pod keeps its source);
///   5. the network -> anything but multicast: masquerade (a pod reaching the outside world leaves with the node's
///      address), fully-random ports;
///   6. outside the network -> the network: masquerade (the host itself talking to a remote pod).
/// forward (nftables chain `forward`, iptables filter chain `FLANNEL-FWD` jumped to from FORWARD): accept
/// everything from or to the network, so a FORWARD policy of DROP does not cut the overlay off.
public struct MasqueradeSpec: Sendable, Equatable {
    /// The whole overlay network (flanneld's cluster CIDR).
    public var network: IPv4Network
    /// This node's subnet (flanneld's pod CIDR).
    public var subnet: IPv4Network
    /// `masquerade fully-random` / `--random-fully`, as flanneld uses whenever the kernel has it.
    public var randomFully: Bool

    public init(network: IPv4Network, subnet: IPv4Network, randomFully: Bool = true) {
        self.network = network
        self.subnet = subnet
        self.randomFully = randomFully
    }

    /// kube-proxy's masquerade mark and mask.
    public static let kubeProxyMark = "0x4000"
    public static let multicast = "224.0.0.0/4"
}

/// One set of masquerade/forward rules in one backend. Every method is one atomic change or one read; none adds or
/// removes a single rule on its own, so no method ever leaves a moment without masquerading.
public protocol MasqueradeRules: AnyObject, Sendable {
    var backend: MasqueradeBackend { get }
    /// What the rules are called there, for logs and status: ["table ip flannel-ipv4 (chains postrtg, forward)"].
    var objects: [String] { get }
    /// Installs or replaces all our rules in one transaction (creating the table or chains when missing).
    func install() throws(NetfilterError)
    /// Whether everything `install` put there is still there, unchanged (false when something is missing, was
    /// added to, or cannot be read).
    func isInPlace() -> Bool
    /// Removes all our rules, tables and chains; succeeds when they are already gone.
    func remove() throws(NetfilterError)
}

/// Makes the rules for a backend.
public func makeMasqueradeRules(_ backend: MasqueradeBackend, spec: MasqueradeSpec) throws(NetfilterError)
    -> MasqueradeRules {
    switch backend {
    case .nftables: return try NFTablesMasquerade(spec: spec)
    case .iptables: return IPTablesMasquerade(spec: spec)
    }
}
