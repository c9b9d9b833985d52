import Foundation

/// What a node is part of once it has joined: the overlay network, this node's subnet in it, and the UDP port the
/// peers send to. Given on the command line, or learnt from a registry (its config key and our lease there).
public struct Membership: Sendable, Equatable {
    public var network: IPv4Network
    public var subnet: IPv4Network
    public var port: UInt16
    /// The size every peer's subnet must have (the registry's SubnetLen); nil where peers are not leases.
    public var leaseLength: Int?

    public init(network: IPv4Network, subnet: IPv4Network, port: UInt16, leaseLength: Int? = nil) {
        self.network = network
        self.subnet = subnet
        self.port = port
        self.leaseLength = leaseLength
    }

    /// The tun device's address: the subnet's network address as a /32 (10.244.1.0/24 -> 10.244.1.0/32).
    public var tunAddress: IPv4Address { subnet.address }

    /// Checks what needs no system access: the subnet inside the network, the network's size and range, the port.
    /// Each message names the value and what is wrong with it.
    public func validate() -> String? {
        if !network.contains(subnet) || subnet.prefixLength <= network.prefixLength {
            return "subnet \(subnet) is not inside network \(network)"
        }
        if network.prefixLength > 30 { return "network \(network) is too small for an overlay (at most /30)" }
        if let problem = PeerRouteRules.checkNetwork(network) { return problem }
        if port == 0 { return "port 0 is not a valid UDP port (1-65535)" }
        return nil
    }
}

/// Where a node learns its network and its own subnet, and then the other nodes' subnets: flanneld's
/// `subnet.Manager`. `StaticPeerSource` is the command line's `--network`/`--subnet`; `EtcdPeerSource` is flannel's
/// etcd registry; a Kubernetes node watcher would be a third. The peers file and `route add` are not sources of
/// membership: they add routes on top of any source (origins `.file` and `.manual` in `RouteStore`).
///
/// The daemon calls `join` once before it changes anything, `watch` once the data plane runs, and `leave` on
/// every way out once `join` was called, a failed or interrupted one included. The routes `watch` delivers are recorded with origin `.registry`.
public protocol PeerSource: AnyObject, Sendable {
    /// Learns the network and takes this node's subnet. `publicIP` is the address the peers will send to;
    /// `previous` the subnet this node had before (from the subnet file), which a registry gives back if free.
    /// `.usage` when what the source says cannot work here; `.failed` when it cannot be reached or was stopped.
    func join(underlay: IPv4Address, publicIP: IPv4Address, previous: SubnetFile?) throws(FlannelError) -> Membership

    /// Delivers the whole peer set now and on every change, until `leave`. `onLost` is called once if this node
    /// may no longer use its subnet (its lease was taken away), or the source failed for good.
    func watch(onPeers: @escaping @Sendable ([PeerRoute]) -> Void, onLost: @escaping @Sendable (String) -> Void)

    /// Stops watching and gives this node's subnet back, unless `keep` (`down --keep-lease`).
    func leave(keep: Bool)

    /// This node's lease, for `status` and /healthz; nil for a source without leases.
    var lease: LeaseInfo? { get }
    /// Why the node is not healthy as far as the source goes (no lease, or one past its expiry); nil if it is.
    var unhealthyReason: String? { get }

    // `up --replace` (Node/Handover.swift); a source without leases has nothing to hand over.

    /// What a replacing daemon needs to keep this node's lease; nil without one.
    var handoverLease: HandoverLease? { get }
    /// Stops watching, keeping the lease (a handover began); `watch` may be called again if it does not happen.
    func pauseWatch()
    /// `join` for a replacing daemon: the membership of the node `lease` (the running daemon's) belongs to,
    /// keeping that lease rather than taking one. `.usage` when the sources do not match (one has a lease).
    func adopt(_ lease: HandoverLease?, underlay: IPv4Address, publicIP: IPv4Address) throws(FlannelError) -> Membership
}

extension PeerSource {
    public var handoverLease: HandoverLease? { nil }
    public func pauseWatch() {}
    public func adopt(_ lease: HandoverLease?, underlay: IPv4Address, publicIP: IPv4Address) throws(FlannelError) -> Membership {
        if lease != nil { throw .usage("the running daemon takes its subnet from etcd and this one would not") }
        return try join(underlay: underlay, publicIP: publicIP, previous: nil)
    }
}

/// The command line's `--network` and `--subnet` (and `--port`): membership without a registry. The peer set
/// comes only from the peers file and `route add`, so `watch` has nothing to deliver.
public final class StaticPeerSource: PeerSource {
    public let membership: Membership

    public init(_ membership: Membership) { self.membership = membership }

    public func join(underlay: IPv4Address, publicIP: IPv4Address, previous: SubnetFile?) throws(FlannelError) -> Membership {
        membership
    }

    public func watch(onPeers: @escaping @Sendable ([PeerRoute]) -> Void, onLost: @escaping @Sendable (String) -> Void) {}
    public func leave(keep: Bool) {}
    public var lease: LeaseInfo? { nil }
    public var unhealthyReason: String? { nil }
}
