import Foundation
import Logging
import Synchronization

/// flannel's etcd subnet registry, for one node: reads the network config, leases this node a subnet under
/// `<prefix>/subnets/`, keeps the lease alive, and turns every other node's lease into a peer route. Keys and
/// values are flannel's, so flannel nodes and flannel-udp nodes can share one registry.
///
/// Call `shutdown()` when done: it closes the HTTP connections.
public final class EtcdRegistry: Sendable {
    public let options: EtcdOptions
    public let publicIP: IPv4Address
    private let client: EtcdClient
    private let logger: Logger
    private let state = Mutex(State())

    /// How many times a lost creation race is retried (flannel gives up after 10 as well).
    public static let raceRetries = 10

    private struct State {
        var config: NetworkConfig?
        var lease: SubnetLease?
    }

    public init(options: EtcdOptions, publicIP: IPv4Address, logger: Logger) throws {
        var options = options
        options.prefix = try EtcdOptions.normalizePrefix(options.prefix)
        guard options.leaseTTL > options.renewMargin, options.renewMargin > .zero else {
            throw EtcdError.invalidOption(
                "etcd lease renew margin \(options.renewMargin) must be positive and below the TTL \(options.leaseTTL)")
        }
        self.options = options
        self.publicIP = publicIP
        self.logger = logger
        client = try EtcdClient(options: options, logger: logger)
    }

    /// `<prefix>/config`.
    public var configKey: String { options.prefix + "/config" }
    /// `<prefix>/subnets/`: every lease key starts with it.
    public var subnetsPrefix: String { options.prefix + "/subnets/" }

    /// The lease this node holds, with its current expiration.
    public var currentLease: SubnetLease? { state.withLock { $0.lease } }

    /// Closes the connections to etcd. The registry cannot be used afterwards.
    public func shutdown() async throws {
        try await client.shutdown()
    }

    // MARK: Config

    /// Reads and validates `<prefix>/config`. While etcd cannot be reached or the key does not exist yet, tries
    /// again with a growing delay (1 s doubling to 10 s), logging each failed attempt, until `maxAttempts` (no
    /// limit by default) or cancellation. An invalid config, or a refusal such as bad credentials, is thrown at
    /// once.
    public func loadConfig(maxAttempts: Int? = nil) async throws -> NetworkConfig {
        var delay = Duration.seconds(1)
        var attempt = 0
        while true {
            attempt += 1
            do {
                let (kvs, _) = try await client.range(configKey)
                guard let value = kvs.first?.value else { throw EtcdError.configNotFound(key: configKey) }
                let config: NetworkConfig
                do {
                    config = try NetworkConfig(json: value.data)
                } catch {
                    throw NetworkConfigError("\(error.message) (etcd key \(configKey))")
                }
                logger.info("etcd: network config from \(configKey): \(config)")
                state.withLock { $0.config = config }
                return config
            } catch let error as EtcdError where error.isTransient || error == .configNotFound(key: configKey) {
                if let maxAttempts, attempt >= maxAttempts { throw error }
                logger.warning("etcd: attempt \(attempt) to read the network config failed: \(error); retrying in \(delay)")
                try await Task.sleep(for: delay)
                delay = min(delay * 2, .seconds(10))
            }
        }
    }

    // MARK: Lease

    /// Leases this node a subnet, flannel's way (see `SubnetAllocator`): our existing lease (re-put on a fresh
    /// etcd lease; a reservation, a key without an etcd lease, is kept that way), else `previousSubnet` if
    /// free, else a random free subnet. A new key is created only if absent (an etcd txn), on a fresh etcd lease
    /// of `options.leaseTTL`; when another node creates the same key first, the choice is made again from a
    /// fresh listing, up to `raceRetries` times.
    public func acquireLease(config: NetworkConfig, previousSubnet: IPv4Network?) async throws -> SubnetLease {
        let allocator = SubnetAllocator(config: config)
        let attributes = LeaseAttributes.udp(publicIP: publicIP)
        let ttl = Int64(options.leaseTTL.components.seconds)
        for attempt in 1...Self.raceRetries {
            let (leases, raw, _) = try await listLeases()
            let plan = try allocator.plan(leases: leases, publicIP: publicIP, previous: previousSubnet)
            for subnet in plan.delete {
                logger.info("etcd: our lease \(subnet) does not fit the config (\(config)); deleting it")
                try await client.delete(SubnetKey.key(prefix: options.prefix, subnet: subnet))
            }
            if let subnet = plan.reuse {
                let key = SubnetKey.key(prefix: options.prefix, subnet: subnet)
                let oldLease = raw[subnet]?.lease?.value ?? 0
                if oldLease == 0 {
                    // A reservation: an operator's key without an etcd lease. flannel keeps it permanent.
                    try await client.put(key, value: attributes.json)
                    logger.info("etcd: found reservation \(subnet) for \(publicIP), using it")
                    return hold(SubnetLease(subnet: subnet, attributes: attributes, expiration: .distantFuture,
                                            etcdLeaseID: 0), config: config)
                }
                let grant = try await client.grant(ttl: ttl)
                do {
                    try await client.put(key, value: attributes.json, lease: grant.id)
                } catch {
                    try? await client.revoke(grant.id)
                    throw error
                }
                // The key now hangs on the new etcd lease; the old one has nothing left to expire.
                if oldLease != grant.id {
                    try? await client.revoke(oldLease)
                }
                logger.info("etcd: found our lease \(subnet) for \(publicIP), reusing it")
                return hold(subnet, attributes: attributes, grant: grant, config: config)
            }
            guard let subnet = plan.create else { continue }
            if subnet == previousSubnet {
                logger.info("etcd: previous subnet \(subnet) is free, requesting it")
            }
            let key = SubnetKey.key(prefix: options.prefix, subnet: subnet)
            let grant = try await client.grant(ttl: ttl)
            let created: Bool
            do {
                created = try await client.create(key, value: attributes.json, lease: grant.id)
            } catch {
                try? await client.revoke(grant.id)
                throw error
            }
            guard created else {
                try? await client.revoke(grant.id)
                logger.info("etcd: \(subnet) was taken by another node first (attempt \(attempt)); choosing again")
                continue
            }
            let lease = hold(subnet, attributes: attributes, grant: grant, config: config)
            logger.info("etcd: leased \(subnet) to \(publicIP) until \(lease.expiration)")
            return lease
        }
        throw EtcdError.contention(attempts: Self.raceRetries)
    }

    /// `subnet` on the etcd lease `grant`, from now for the grant's TTL, as this node's lease under `config`.
    private func hold(_ subnet: IPv4Network, attributes: LeaseAttributes, grant: (id: Int64, ttl: Int64),
                      config: NetworkConfig) -> SubnetLease {
        hold(SubnetLease(subnet: subnet, attributes: attributes,
                         expiration: Date().addingTimeInterval(TimeInterval(grant.ttl)), etcdLeaseID: grant.id),
             config: config)
    }

    /// Records `lease` and `config` as this node's.
    private func hold(_ lease: SubnetLease, config: NetworkConfig) -> SubnetLease {
        state.withLock { $0.lease = lease; $0.config = config }
        return lease
    }

    /// Takes over the lease another daemon of this node holds (`up --replace`): `subnet`'s key must be in the
    /// registry, with our public IP, on the etcd lease `etcdLeaseID` (what the old daemon said is checked, not
    /// believed). `run` then keeps that etcd lease alive; nothing is written.
    public func adoptLease(config: NetworkConfig, subnet: IPv4Network, etcdLeaseID: Int64) async throws -> SubnetLease {
        let (leases, raw, _) = try await listLeases()
        guard let attributes = leases[subnet], attributes.publicIP == publicIP else {
            throw EtcdError.notOurs("no lease of \(subnet) for \(publicIP) in the registry")
        }
        guard (raw[subnet]?.lease?.value ?? 0) == etcdLeaseID else {
            throw EtcdError.notOurs("the key of \(subnet) is not on etcd lease \(String(etcdLeaseID, radix: 16))")
        }
        guard subnet.prefixLength == config.subnetLength, config.network.contains(subnet) else {
            throw EtcdError.notOurs("\(subnet) does not fit the config (\(config))")
        }
        let ttl = etcdLeaseID == 0 ? 0 : try await client.keepAlive(etcdLeaseID)
        if etcdLeaseID != 0 && ttl <= 0 {
            throw EtcdError.notOurs("etcd lease \(String(etcdLeaseID, radix: 16)) expired or was revoked")
        }
        let lease = hold(SubnetLease(subnet: subnet, attributes: attributes,
                                     expiration: etcdLeaseID == 0 ? .distantFuture : Date().addingTimeInterval(TimeInterval(ttl)),
                                     etcdLeaseID: etcdLeaseID),
                         config: config)
        logger.info("etcd: took over lease \(subnet) (etcd lease \(String(etcdLeaseID, radix: 16))) until \(lease.expiration)")
        return lease
    }

    /// Deletes our subnet key and revokes its etcd lease, so the subnet is free at once. (flannel itself leaves
    /// the lease to expire, so that a restarted node gets the same subnet back; the caller chooses.)
    public func releaseLease() async throws {
        guard let lease = state.withLock({ $0.lease }) else { throw EtcdError.noLease }
        let key = SubnetKey.key(prefix: options.prefix, subnet: lease.subnet)
        try await client.delete(key)
        if lease.etcdLeaseID != 0 { try? await client.revoke(lease.etcdLeaseID) }
        state.withLock { $0.lease = nil }
        logger.info("etcd: released lease \(lease.subnet)")
    }

    /// Every parseable lease under `<prefix>/subnets/`, with the raw pairs and the revision of the listing.
    /// Keys or values that are not flannel's are skipped with a warning, as flannel does.
    func listLeases() async throws -> ([IPv4Network: LeaseAttributes], [IPv4Network: EtcdGateway.KeyValue], Int64) {
        let (kvs, revision) = try await client.range(subnetsPrefix, prefix: true)
        var leases: [IPv4Network: LeaseAttributes] = [:]
        var raw: [IPv4Network: EtcdGateway.KeyValue] = [:]
        for kv in kvs {
            guard let (subnet, attributes) = parse(kv) else { continue }
            leases[subnet] = attributes
            raw[subnet] = kv
        }
        return (leases, raw, revision)
    }

    private func parse(_ kv: EtcdGateway.KeyValue) -> (IPv4Network, LeaseAttributes)? {
        let key = kv.key.string
        guard let subnet = SubnetKey.parse(key) else {
            logger.warning("etcd: ignoring \(key): not a subnet key")
            return nil
        }
        do {
            return (subnet, try LeaseAttributes(json: kv.value?.data ?? Data()))
        } catch {
            logger.warning("etcd: ignoring lease \(key): \(error)")
            return nil
        }
    }

    // MARK: Renew and watch

    /// Keeps our lease alive and follows the other nodes' leases until cancelled (then returns normally).
    ///
    /// `onPeers` receives the full list of other nodes' routes (subnet -> PublicIP:Backend.Port), sorted by
    /// subnet, first from the initial listing and then every time it changes. `onLeaseLost` is called once if our
    /// own key is deleted, taken over by another node, or its etcd lease expires; `run` then returns.
    public func run(onPeers: @escaping @Sendable ([PeerRoute]) -> Void,
                    onLeaseLost: @escaping @Sendable () -> Void) async throws {
        try await run(snapshot: nil, onPeers: onPeers, onLeaseLost: onLeaseLost)
    }

    /// `run`, starting from a listing taken earlier (leases and the revision they are as of) instead of a fresh
    /// one: the watch then resumes from that revision, which is how a test makes it meet a compacted history.
    func run(snapshot: (leases: [IPv4Network: LeaseAttributes], revision: Int64)?,
             onPeers: @escaping @Sendable ([PeerRoute]) -> Void,
             onLeaseLost: @escaping @Sendable () -> Void) async throws {
        guard let (lease, config) = state.withLock({ s in s.lease.flatMap { l in s.config.map { (l, $0) } } }) else {
            throw EtcdError.noLease
        }
        let lost = Mutex(false)
        let reportLost: @Sendable (String) -> Void = { [logger] reason in
            let first = lost.withLock { done in
                defer { done = true }
                return !done
            }
            guard first else { return }
            logger.error("etcd: lost our subnet lease \(lease.subnet): \(reason); stopping")
            onLeaseLost()
        }
        do {
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await self.renewLoop(lease: lease, reportLost: reportLost) }
                group.addTask {
                    try await self.watchLoop(lease: lease, config: config, snapshot: snapshot, onPeers: onPeers,
                                             reportLost: reportLost)
                }
                // Either loop returns only when the lease is lost; then the other one is stopped.
                try await group.next()
                group.cancelAll()
            }
        } catch where Task.isCancelled {
            // Cancelled: the HTTP client reports this as its own error as often as a CancellationError.
            return
        }
    }

    private func renewLoop(lease: SubnetLease, reportLost: @Sendable (String) -> Void) async throws {
        let margin = options.renewMargin
        let retryDelay = min(Duration.seconds(60), margin / 2)
        var expiration = lease.expiration
        while lease.etcdLeaseID == 0 {
            // A reservation never expires: nothing to renew; the watch still notices if it is deleted.
            try await Task.sleep(for: .seconds(3600))
        }
        while true {
            let wait = expiration.timeIntervalSinceNow - Self.seconds(margin)
            if wait > 0 {
                logger.debug("etcd: renewing lease \(lease.subnet) in \(Int(wait)) s")
                try await Task.sleep(for: .milliseconds(Int64(wait * 1000)))
            }
            do {
                let ttl = try await client.keepAlive(lease.etcdLeaseID)
                guard ttl > 0 else {
                    reportLost("etcd lease \(String(lease.etcdLeaseID, radix: 16)) expired or was revoked")
                    return
                }
                expiration = Date().addingTimeInterval(TimeInterval(ttl))
                state.withLock { $0.lease?.expiration = expiration }
                logger.info("etcd: renewed lease \(lease.subnet), new expiration \(expiration)")
            } catch where !Task.isCancelled {
                logger.error("etcd: renewing lease \(lease.subnet) failed: \(error); trying again in \(retryDelay)")
                expiration = Date().addingTimeInterval(Self.seconds(margin) + Self.seconds(retryDelay))
            }
        }
    }

    /// Lists the leases, reports them, then watches from the listing's revision + 1. A broken watch is resumed
    /// from the last revision seen (with backoff while etcd is unreachable); if etcd has compacted that revision
    /// away, the leases are listed again and the difference applied.
    private func watchLoop(lease: SubnetLease, config: NetworkConfig,
                           snapshot: (leases: [IPv4Network: LeaseAttributes], revision: Int64)?,
                           onPeers: @Sendable ([PeerRoute]) -> Void,
                           reportLost: @Sendable (String) -> Void) async throws {
        var tracker = PeerTracker(own: lease.subnet, publicIP: publicIP, port: config.port)
        var revision: Int64 = 0
        var backoff = Duration.milliseconds(100)
        var needsListing = true
        if let snapshot {
            _ = tracker.reset(to: snapshot.leases)
            revision = snapshot.revision
            needsListing = false
        }

        func publish() {
            guard let routes = tracker.takeChangedRoutes() else { return }
            onPeers(routes)
        }

        if !needsListing { publish() }
        while true {
            try Task.checkCancellation()
            do {
                if needsListing {
                    let (leases, _, listed) = try await listLeases()
                    for change in tracker.reset(to: leases) { logger.info("etcd: \(change)") }
                    if tracker.ownLeaseMissing {
                        reportLost("its key \(SubnetKey.key(prefix: options.prefix, subnet: lease.subnet)) is gone")
                        return
                    }
                    if let other = tracker.ownLeaseTakenBy {
                        reportLost("its key now belongs to \(other)")
                        return
                    }
                    publish()
                    revision = listed
                    needsListing = false
                }
                var lostReason: String?
                try await client.watch(prefix: subnetsPrefix, startRevision: revision + 1) { response in
                    if let compacted = response.compact_revision?.value, compacted > 0 {
                        logger.warning("""
                            etcd: watch from revision \(revision + 1) is older than the compacted revision \
                            \(compacted); listing the leases again
                            """)
                        needsListing = true
                        return false
                    }
                    if response.canceled == true {
                        logger.warning("etcd: watch cancelled by the server: \(response.cancel_reason ?? "no reason")")
                        return false
                    }
                    if response.created == true {
                        logger.debug("etcd: watching \(subnetsPrefix) from revision \(revision + 1)")
                        backoff = .milliseconds(100)
                        return true
                    }
                    let events = response.events ?? []
                    guard !events.isEmpty else {
                        // A progress notification: everything up to the header revision has been seen.
                        revision = max(revision, response.header?.revision?.value ?? 0)
                        return true
                    }
                    for event in events {
                        revision = max(revision, event.kv.mod_revision?.value ?? revision)
                        let key = event.kv.key.string
                        guard let subnet = SubnetKey.parse(key) else {
                            logger.warning("etcd: ignoring \(key): not a subnet key")
                            continue
                        }
                        if event.type == "DELETE" {
                            if subnet == lease.subnet {
                                lostReason = "its key \(key) was deleted"
                                return false
                            }
                            if let change = tracker.remove(subnet) { logger.info("etcd: \(change)") }
                        } else {
                            let attributes: LeaseAttributes
                            do {
                                attributes = try LeaseAttributes(json: event.kv.value?.data ?? Data())
                            } catch {
                                logger.warning("etcd: ignoring lease \(key): \(error)")
                                continue
                            }
                            if subnet == lease.subnet {
                                if attributes.publicIP != publicIP {
                                    lostReason = "its key \(key) now belongs to \(attributes.publicIP)"
                                    return false
                                }
                                continue
                            }
                            if let change = tracker.set(subnet, attributes) { logger.info("etcd: \(change)") }
                        }
                    }
                    publish()
                    return true
                }
                if let lostReason {
                    reportLost(lostReason)
                    return
                }
                if !needsListing {
                    logger.warning("etcd: watch stream ended; resuming from revision \(revision + 1) in \(backoff)")
                    try await Task.sleep(for: backoff)
                    backoff = min(backoff * 2, .seconds(5))
                }
            } catch let error where !(error is CancellationError) && !Task.isCancelled {
                logger.warning("""
                    etcd: watch of \(subnetsPrefix) failed: \(error); resuming from revision \(revision + 1) \
                    in \(backoff)
                    """)
                try await Task.sleep(for: backoff)
                backoff = min(backoff * 2, .seconds(5))
            }
        }
    }

    static func seconds(_ d: Duration) -> TimeInterval {
        TimeInterval(d.components.seconds) + TimeInterval(d.components.attoseconds) / 1e18
    }
}

/// The other nodes' leases as last seen, and the routes they make. Separate from the watch loop so that the
/// listing/diff rules are unit-tested.
struct PeerTracker: Sendable {
    let own: IPv4Network
    let publicIP: IPv4Address
    let port: UInt16
    private(set) var peers: [IPv4Network: LeaseAttributes] = [:]
    private var published: [PeerRoute]?
    /// After `reset`: our own key was not in the listing.
    private(set) var ownLeaseMissing = false
    /// After `reset`: our own key carries another node's address.
    private(set) var ownLeaseTakenBy: IPv4Address?

    init(own: IPv4Network, publicIP: IPv4Address, port: UInt16) {
        self.own = own
        self.publicIP = publicIP
        self.port = port
    }

    /// Replaces the peers with a full listing (our own subnet left out); returns what changed, in words.
    mutating func reset(to leases: [IPv4Network: LeaseAttributes]) -> [String] {
        ownLeaseMissing = leases[own] == nil
        ownLeaseTakenBy = leases[own].flatMap { $0.publicIP == publicIP ? nil : $0.publicIP }
        var changes: [String] = []
        for subnet in peers.keys.sorted(by: { $0.address < $1.address }) where leases[subnet] == nil || subnet == own {
            if let c = remove(subnet) { changes.append(c) }
        }
        for (subnet, attributes) in leases.sorted(by: { $0.key.address < $1.key.address }) where subnet != own {
            if let c = set(subnet, attributes) { changes.append(c) }
        }
        return changes
    }

    mutating func set(_ subnet: IPv4Network, _ attributes: LeaseAttributes) -> String? {
        guard subnet != own else { return nil }
        let old = peers.updateValue(attributes, forKey: subnet)
        if old == nil { return "peer \(subnet) via \(attributes.publicIP):\(port) added" }
        if old?.publicIP != attributes.publicIP {
            return "peer \(subnet) moved from \(old!.publicIP) to \(attributes.publicIP):\(port)"
        }
        return nil
    }

    mutating func remove(_ subnet: IPv4Network) -> String? {
        guard let old = peers.removeValue(forKey: subnet) else { return nil }
        return "peer \(subnet) via \(old.publicIP):\(port) removed"
    }

    var routes: [PeerRoute] {
        peers.map { PeerRoute(subnet: $0.key, endpoint: Endpoint(address: $0.value.publicIP, port: port)) }
            .sorted { ($0.subnet.address, $0.subnet.prefixLength) < ($1.subnet.address, $1.subnet.prefixLength) }
    }

    /// The routes if they differ from those last taken (always on the first call), else nil.
    mutating func takeChangedRoutes() -> [PeerRoute]? {
        let current = routes
        if let published, published == current { return nil }
        published = current
        return current
    }
}
