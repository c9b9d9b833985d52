import Foundation
import Logging
import Synchronization

/// flannel's etcd registry as a `PeerSource`: the network from `<prefix>/config`, this node's subnet as a lease
/// under `<prefix>/subnets/`, kept alive, and every other node's lease as a peer route (`EtcdRegistry` does the
/// etcd side; this is the daemon's view of it).
public final class EtcdPeerSource: PeerSource {
    public let options: EtcdOptions
    private let logger: Logger
    private let state = Mutex(State())

    private struct State {
        var registry: EtcdRegistry?
        var watch: Task<Void, Never>?
    }

    public init(options: EtcdOptions, logger: Logger) {
        self.options = options
        self.logger = logger
    }

    /// The registry once `join` has created it (tests and the service layer read the lease through it).
    public var registry: EtcdRegistry? { state.withLock { $0.registry } }

    /// Reads the network config and takes a lease, retrying while etcd is unreachable (logging each attempt). A
    /// config that cannot work here (bad JSON, a network that covers the underlay) is `.usage`; a signal or `down`
    /// while waiting is `.stopped`. A registry created here is closed by `leave`, which the caller owes on every
    /// way out, a failed `join` included.
    public func join(underlay: IPv4Address, publicIP: IPv4Address, previous: SubnetFile?) throws(FlannelError) -> Membership {
        let registry = try open(publicIP: publicIP)
        do {
            let network = try Blocking.run { try await registry.loadConfig() }
            // Before the lease: a registry whose Network would swallow the underlay changes nothing here.
            if let problem = PeerRouteRules.checkNetwork(network.network, underlay: underlay, publicIP: publicIP) {
                throw NetworkConfigError(problem)
            }
            // Our subnet from before (the subnet file), if it is in this network: flannel asks for it back.
            let previousSubnet = previous.flatMap { file in
                file.network == network.network
                    ? IPv4Network(address: file.subnet.address, prefixLength: file.subnet.prefixLength) : nil
            }
            let lease = try Blocking.run { try await registry.acquireLease(config: network, previousSubnet: previousSubnet) }
            logger.info("etcd: network \(network.network), leased \(lease.subnet) for \(publicIP) until \(lease.expiration)")
            return Membership(network: network.network, subnet: lease.subnet, port: network.port,
                              leaseLength: network.subnetLength)
        } catch let error as NetworkConfigError {
            throw .usage("etcd config \(options.prefix)/config: \(error)")
        } catch let error as Blocking.Interrupted {
            throw .stopped("\(error)")
        } catch {
            throw .failed("etcd: \(error)")
        }
    }

    /// The client for `publicIP`'s lease, kept for `watch` and `leave` (which closes it).
    private func open(publicIP: IPv4Address) throws(FlannelError) -> EtcdRegistry {
        let registry: EtcdRegistry
        do { registry = try EtcdRegistry(options: options, publicIP: publicIP, logger: logger) } catch {
            throw .usage("etcd: \(error)")
        }
        state.withLock { $0.registry = registry }
        return registry
    }

    /// Applies every change of the other nodes' leases until `leave`; `onLost` if our own lease disappears (the
    /// daemon then stops, as flanneld does) or the watch fails for good.
    public func watch(onPeers: @escaping @Sendable ([PeerRoute]) -> Void, onLost: @escaping @Sendable (String) -> Void) {
        guard let registry else { return }
        let task = Task.detached {
            do {
                try await registry.run(onPeers: onPeers, onLeaseLost: {
                    onLost("etcd: our lease was removed from the registry")
                })
            } catch is CancellationError {
            } catch {
                if !Task.isCancelled { onLost("etcd watch failed: \(error)") }
            }
        }
        state.withLock { $0.watch = task }
    }

    /// Stops the watch, gives the lease back unless `keep`, and closes the client (which must always be shut down).
    public func leave(keep: Bool) {
        pauseWatch()
        let registry = state.withLock { s in
            defer { s.registry = nil }
            return s.registry
        }
        guard let registry else { return }
        let release = !keep && registry.currentLease != nil
        _ = try? Blocking.run { [logger] in
            if release {
                do { try await registry.releaseLease() } catch { logger.warning("etcd: releasing the lease failed: \(error)") }
            }
            try await registry.shutdown()
        }
        if release { logger.info("etcd: lease released") }
    }

    public var handoverLease: HandoverLease? {
        registry?.currentLease.map { HandoverLease($0) }
    }

    /// Stops the watch and waits for it, keeping the lease and the client (a handover, and `leave` first).
    public func pauseWatch() {
        let task = state.withLock { s in
            defer { s.watch = nil }
            return s.watch
        }
        task?.cancel()
        _ = try? Blocking.run { await task?.value }
    }

    /// The network config from etcd, and the running daemon's lease checked there (our key, our public IP, that
    /// etcd lease) and kept: renewed by us from `watch` on. Nothing is written.
    public func adopt(_ held: HandoverLease?, underlay: IPv4Address, publicIP: IPv4Address) throws(FlannelError) -> Membership {
        guard let held else { throw .usage("the running daemon does not use etcd and this one would") }
        let registry = try open(publicIP: publicIP)
        do {
            let subnet = try IPv4Network(parsing: held.subnet)
            let network = try Blocking.run { try await registry.loadConfig(maxAttempts: 3) }
            let lease = try Blocking.run {
                try await registry.adoptLease(config: network, subnet: subnet, etcdLeaseID: held.etcdLeaseID)
            }
            return Membership(network: network.network, subnet: lease.subnet, port: network.port,
                              leaseLength: network.subnetLength)
        } catch {
            throw .failed("etcd: \(error)")
        }
    }

    public var lease: LeaseInfo? {
        registry?.currentLease.map {
            LeaseInfo(subnet: $0.subnet.description, expires: $0.expiration, endpoints: options.endpoints)
        }
    }

    public var unhealthyReason: String? {
        guard let registry else { return nil }
        guard let lease = registry.currentLease else { return "etcd: no lease held" }
        if lease.expiration < Date() { return "etcd: lease \(lease.subnet) expired at \(lease.expiration)" }
        return nil
    }
}
