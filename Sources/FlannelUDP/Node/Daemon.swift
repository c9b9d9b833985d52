import Foundation
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// Tells the process that started a detached daemon whether start-up worked: one line on an inherited pipe,
/// `READY` or `ERROR <message>`, then the pipe is closed.
public struct Readiness: Sendable {
    public let fd: Int32?
    public init(fd: Int32?) { self.fd = fd }

    public func ready() { send("READY") }
    public func failed(_ message: String) { send("ERROR \(message)") }

    private func send(_ line: String) {
        guard let fd else { return }
        let bytes = Array((line.replacingOccurrences(of: "\n", with: " ") + "\n").utf8)
        _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress!, $0.count) }
        _ = close(fd)
    }
}

/// The running node: device and route (NodeSetup), control endpoint, peer table, data plane, signals.
///
/// Threads: the caller's thread waits for signals (SIGINT/SIGTERM stop, SIGHUP re-reads the peers file); the
/// control endpoint has its own thread; the data plane has one per direction. Shutdown from any of them goes
/// through SIGTERM to the process, so there is exactly one way out and it always tears down.
public final class Daemon: ControlHandler, @unchecked Sendable {  // mutable state is set before threads start
    public enum Failure: Error, CustomStringConvertible {
        case usage(String)
        case alreadyRunning(String)
        case system(String)
        public var description: String {
            switch self {
            case .usage(let m), .alreadyRunning(let m), .system(let m): return m
            }
        }
    }

    public static let version = "0.1.0"

    private var config: NodeConfig
    private let registrySettings: EtcdOptions?
    private var registry: EtcdRegistry?
    private var registryTask: Task<Void, Never>?
    private let keepLeaseLock = NSLock()
    private var keepLease = false
    private let logger: Logger
    private let paths: RuntimePaths
    private let startedAt = Date()
    private var plan: NodeSetup.Plan?
    private let table = RouteTable()
    /// The registry config's SubnetLen, once joined: every lease must be of that size.
    private var registrySubnetLength: Int?
    /// Created on first use, which must come after `plan` (network, subnet and public IP are final then).
    private lazy var store: RouteStore = {
        assert(plan != nil, "the peer table's rules need the plan")
        return RouteStore(publisher: table, rules: PeerRouteRules(
            network: config.network, ownSubnet: config.subnet, publicIP: plan?.publicIP ?? config.publicIP,
            subnetLength: registrySubnetLength))
    }()
    private let counters = DataPlaneCounters()
    private var forwarder: Forwarder?
    private let fatalLock = NSLock()
    private var fatalError: String?

    /// - Parameter etcd: take the network from etcd's config key and the subnet from a lease there (flannel's
    ///   registry); `config.network` and `config.subnet` are then ignored.
    public init(config: NodeConfig, logger: Logger, etcd: EtcdOptions? = nil) {
        self.config = config
        registrySettings = etcd
        self.logger = logger
        paths = RuntimePaths(device: config.device)
    }

    /// Blocks SIGINT, SIGTERM and SIGHUP in the calling thread; every thread started afterwards inherits the mask,
    /// so the signals stay pending until `run` collects them with sigwait. Call before any thread exists.
    public static func blockSignals() {
        var set = sigset_t()
        sigemptyset(&set)
        for s in [SIGINT, SIGTERM, SIGHUP] { sigaddset(&set, s) }
        pthread_sigmask(SIG_BLOCK, &set, nil)
    }

    /// Runs the node until SIGINT/SIGTERM or `down`. Everything set up is torn down before this returns, also on
    /// failure. Start-up success or failure is reported on `readiness`.
    public func run(readiness: Readiness) throws(Failure) {
        Daemon.blockSignals()
        do {
            try runLocked(readiness: readiness)
        } catch {
            readiness.failed(error.description)
            throw error
        }
    }

    private func runLocked(readiness: Readiness) throws(Failure) {
        // Peers file first: a bad line must stop `up` before anything changes. Its routes are checked against
        // the rules once the plan is made (the network may come from the registry), still before any change.
        var fileRoutes: [PeerRoute] = []
        if let path = config.peersFile {
            do { fileRoutes = try PeersFile.load(path: path, defaultPort: config.port) } catch { throw .usage(error.description) }
        }
        // The control socket name is the lock against a second daemon on this device in this namespace.
        let control: ControlServer
        do { control = try ControlServer(name: paths.controlSocketName, logger: logger) } catch {
            if case .alreadyRunning = error {
                let pid = DaemonState.load(path: paths.stateFile).map { " (pid \($0.pid))" } ?? ""
                throw .alreadyRunning("flannel-udp is already running for \(config.device) in this network namespace\(pid)")
            }
            throw .system(error.description)
        }
        defer { control.stop() }

        let setup: NodeSetup
        do { setup = try NodeSetup(logger: logger) } catch { throw .system(error.description) }
        var leaseHeld = false
        defer {
            // Reached on every way out, a failed start included: give the lease back (unless
            // `down --keep-lease`) and close the client (which must always be shut down).
            if let registry { leaveRegistry(registry, release: leaseHeld) }
        }
        if let settings = registrySettings {
            try joinRegistry(settings, setup: setup)
            leaseHeld = true
        }

        let plan: NodeSetup.Plan
        do { plan = try setup.plan(config) } catch {
            if case .invalid(let m) = error { throw .usage(m) }
            throw .system(error.description)
        }
        self.plan = plan
        if let path = config.peersFile {
            for r in fileRoutes {
                do { try store.check(r, origin: .file) } catch { throw .usage("\(path): \(error)") }
            }
        }

        // Bind the UDP port before touching any device, so "address in use" changes nothing.
        let socket: UDPSocket
        do { socket = try UDPSocket(bind: plan.listen) } catch { throw .system(error.description) }

        let tun: TunDevice
        do { tun = try setup.bringUp(plan) } catch { throw .system(error.description) }
        var forwarderStarted = false
        defer {
            if forwarderStarted { forwarder?.stop() }
            setup.tearDown()
            removeState()
        }

        do { try store.replace(fileRoutes, origin: .file) } catch { throw .usage(error.description) }

        let fwd: Forwarder
        do {
            fwd = try Forwarder(tun: tun, socket: socket, table: table,
                                config: ForwardingConfig(network: config.network, subnet: config.subnet,
                                                         peerCheck: config.peerCheck),
                                counters: counters, logger: logger,
                                options: ForwarderOptions(offloads: config.offloads),
                                onFailure: { [weak self] error in self?.fail("forwarder stopped: \(error)") })
            try fwd.start()
        } catch {
            throw .system("start forwarder: \(error)")
        }
        forwarder = fwd
        forwarderStarted = true

        if let registry {
            startRegistryWatch(registry)
        }
        writeState(plan: plan)
        control.start(handler: self)
        logger.info("flannel-udp \(Daemon.version) up: \(config.device) \(config.subnet) in \(config.network), listening on \(plan.listen), mtu \(plan.mtu), \(fileRoutes.count) peer route(s) from file")
        readiness.ready()

        waitForSignals()
        leaseHeld = !keepLeaseLock.withLock { keepLease }
        if let message = fatalLock.withLock({ fatalError }) {
            throw .system(message)
        }
    }

    // MARK: - etcd registry

    /// Reads the network config from etcd and takes a lease, then fills in network, subnet and port. Retries while
    /// etcd is unreachable (logging each attempt); a bad config is a usage error.
    private func joinRegistry(_ settings: EtcdOptions, setup: NodeSetup) throws(Failure) {
        let underlay: (link: Link, address: IPv4Address)
        do { underlay = try setup.resolveUnderlay(config.underlay) } catch {
            if case .invalid(let m) = error { throw .usage(m) }
            throw .system(error.description)
        }
        let publicIP = config.publicIP ?? underlay.address
        let registry: EtcdRegistry
        do { registry = try EtcdRegistry(options: settings, publicIP: publicIP, logger: logger) } catch {
            throw .usage("etcd: \(error)")
        }
        self.registry = registry
        do {
            let network = try Blocking.run { try await registry.loadConfig() }
            // Before the lease: a registry whose Network would swallow the underlay changes nothing here.
            if let problem = PeerRouteRules.checkNetwork(network.network, underlay: underlay.address, publicIP: publicIP) {
                throw NetworkConfigError(problem)
            }
            registrySubnetLength = network.subnetLength
            var previous: IPv4Network?
            if let path = config.subnetFile, let file = try? SubnetFile.load(path: path), file.network == network.network {
                previous = IPv4Network(address: file.subnet.address, prefixLength: file.subnet.prefixLength)
            }
            let previousSubnet = previous
            let lease = try Blocking.run { try await registry.acquireLease(config: network, previousSubnet: previousSubnet) }
            config.network = network.network
            config.subnet = lease.subnet
            config.port = network.port
            config.publicIP = publicIP
            logger.info("etcd: network \(network.network), leased \(lease.subnet) for \(publicIP) until \(lease.expiration)")
        } catch let error as NetworkConfigError {
            throw .usage("etcd config \(settings.prefix)/config: \(error)")
        } catch {
            throw .system("etcd: \(error)")
        }
    }

    /// Applies every change of the other nodes' leases to the peer table until the daemon stops; stops the
    /// daemon if our own lease disappears (as flanneld does).
    private func startRegistryWatch(_ registry: EtcdRegistry) {
        let store = self.store
        let logger = self.logger
        let filter = RegistryRouteFilter()
        let fail: @Sendable (String) -> Void = { [weak self] message in self?.fail(message) }
        registryTask = Task.detached {
            do {
                try await registry.run(onPeers: { routes in
                    let (usable, refused) = filter.filter(routes, store: store)
                    for error in refused { logger.warning("etcd: ignoring a lease: \(error)") }
                    try? store.replace(usable, origin: .registry)
                    logger.info("etcd: \(usable.count) peer route(s)")
                }, onLeaseLost: {
                    fail("etcd: our lease was removed from the registry")
                })
            } catch is CancellationError {
            } catch {
                if !Task.isCancelled { fail("etcd watch failed: \(error)") }
            }
        }
    }

    private func leaveRegistry(_ registry: EtcdRegistry, release: Bool) {
        registryTask?.cancel()
        let task = registryTask
        _ = try? Blocking.run {
            await task?.value
            if release {
                do { try await registry.releaseLease() } catch { self.logger.warning("etcd: releasing the lease failed: \(error)") }
            }
            try await registry.shutdown()
        }
        if release { logger.info("etcd: lease released") }
    }

    /// Records a fatal data-plane error and asks the main thread to shut down.
    private func fail(_ message: String) {
        fatalLock.withLock { if fatalError == nil { fatalError = message } }
        logger.error("\(message); shutting down")
        kill(getpid(), SIGTERM)
    }

    private func waitForSignals() {
        var set = sigset_t()
        sigemptyset(&set)
        for s in [SIGINT, SIGTERM, SIGHUP] { sigaddset(&set, s) }
        while true {
            var sig: Int32 = 0
            guard sigwait(&set, &sig) == 0 else { continue }
            if sig == SIGHUP {
                logger.info("SIGHUP: re-reading peers file")
                if case .error(let m) = reloadPeers() { logger.error("\(m)") }
                continue
            }
            logger.info("signal \(sig == SIGINT ? "SIGINT" : "SIGTERM"): shutting down")
            return
        }
    }

    private func writeState(plan: NodeSetup.Plan) {
        let state = DaemonState(pid: getpid(), startTicks: DaemonState.startTicks(of: getpid()) ?? 0,
                                device: config.device, network: config.network.description,
                                subnet: config.subnet.description, subnetFile: config.subnetFile,
                                listen: plan.listen.description, startedAt: startedAt)
        do {
            try AtomicFile.makeDirectories(paths.stateDirectory, mode: 0o700)
            try state.write(to: paths.stateFile)
        } catch {
            logger.warning("cannot write state file: \(error)")
        }
    }

    private func removeState() {
        if unlink(paths.stateFile) == 0 { rmdir(paths.stateDirectory) }  // rmdir fails harmlessly if not empty
    }

    // MARK: - control requests

    public func handle(_ request: ControlRequest) -> ControlResponse {
        switch request {
        case .status:
            return .status(status())
        case .routeList:
            return .routes(routeInfos())
        case .routeAdd(let subnetText, let endpointText):
            do {
                let subnet = try IPv4Network(parsing: subnetText)
                let endpoint = try Endpoint(parsing: endpointText, defaultPort: config.port)
                try store.add(PeerRoute(subnet: subnet, endpoint: endpoint), origin: .manual)
                logger.info("route add \(subnet) via \(endpoint)")
                return .ok
            } catch {
                return .error("\(error)")
            }
        case .routeDel(let subnetText):
            do {
                let subnet = try IPv4Network(parsing: subnetText)
                try store.removeAny(subnet)
                logger.info("route del \(subnet)")
                return .ok
            } catch {
                return .error("\(error)")
            }
        case .reloadPeers:
            return reloadPeers()
        case .shutdown(let keep):
            keepLeaseLock.withLock { keepLease = keep }
            logger.info("shutdown requested over the control socket\(keep ? " (keeping the lease)" : "")")
            kill(getpid(), SIGTERM)
            return .ok
        }
    }

    private func reloadPeers() -> ControlResponse {
        guard let path = config.peersFile else { return .error("no peers file was given to 'up'") }
        do {
            let routes = try PeersFile.load(path: path, defaultPort: config.port)
            do { try store.replace(routes, origin: .file) } catch {
                return .error("\(path): \(error); the peer table is unchanged")
            }
            logger.info("loaded \(routes.count) peer route(s) from \(path)")
            return .ok
        } catch {
            return .error("\(error); the peer table is unchanged")
        }
    }

    private func routeInfos() -> [RouteInfo] {
        let snapshot = table.snapshot()
        return store.entries().map { entry in
            var info = RouteInfo(subnet: entry.route.subnet.description, endpoint: entry.route.endpoint.description,
                                 origin: entry.origin.rawValue)
            if let peer = snapshot.entry(for: entry.route.subnet) {
                let c = peer.counters.snapshot
                info.txPackets = c.txPackets
                info.txBytes = c.txBytes
                info.rxPackets = c.rxPackets
                info.rxBytes = c.rxBytes
            }
            return info
        }
    }

    private func status() -> DaemonStatus {
        var status = DaemonStatus(
            pid: getpid(), version: Daemon.version, startedAt: startedAt,
            uptimeSeconds: Date().timeIntervalSince(startedAt), device: config.device,
            network: config.network.description, subnet: config.subnet.description, mtu: plan?.mtu ?? 0,
            listen: plan?.listen.description ?? "", publicIP: plan?.publicIP.description ?? "",
            underlay: plan?.underlay.name ?? "", subnetFile: config.subnetFile, peersFile: config.peersFile,
            peerCheck: config.peerCheck.rawValue, routes: routeInfos(), counters: counters.snapshot(),
            offloads: forwarder?.activeOffloads ?? [],
            lease: registry?.currentLease.map {
                LeaseInfo(subnet: $0.subnet.description, expires: $0.expiration, endpoints: registrySettings?.endpoints ?? [])
            })
        status.offloadStatistics = forwarder?.offloadStatistics
        return status
    }
}
