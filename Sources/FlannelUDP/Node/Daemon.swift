import Foundation
import Synchronization
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// The running node, composed of its parts: device and route (NodeSetup), control endpoint (DaemonInstance), peer
/// source, peer table (PeerTable), data plane (Forwarder), self-healing (NodeGuard), signals (ProcessSignals),
/// status (StatusReport). Daemon wires them together and decides the lifecycle: start-up, running, shutdown.
///
/// Threads: the caller's thread waits for signals (SIGINT/SIGTERM stop, SIGHUP re-reads the peers file); the
/// control endpoint has its own thread; the data plane has one per direction; self-healing (`NodeGuard`) has one.
/// Shutdown from any of them goes through SIGTERM to the process, so there is exactly one way out and it always
/// tears down.
public final class Daemon: ControlHandler, @unchecked Sendable {  // mutable state is set before threads start
    /// `.usage` for bad input (nothing was changed), `.system` or `.failed` for everything else.
    public typealias Failure = FlannelError

    public static let version = "0.1.0"

    let config: NodeConfig
    /// Where the network, our subnet and the peers come from (the command line or etcd); internal: the service
    /// hooks read its health (Service/DaemonService.swift).
    let source: any PeerSource
    /// The network, our subnet and the port: from the command line at once, from a registry once it answers.
    var membership: Membership?
    let keepLease = Mutex(false)
    let logger: Logger
    let paths: RuntimePaths
    var plan: NodeSetup.Plan?
    /// Created on first use, which must come after `plan` (network, subnet and public IP are final then).
    lazy var peers: PeerTable = {
        guard let plan else { preconditionFailure("the peer table's rules need the plan") }
        return PeerTable(plan: plan, peersFile: config.peersFile, logger: logger)
    }()
    private let counters = DataPlaneCounters()
    private let report: StatusReport
    var forwarder: Forwarder?
    var masquerade: MasqueradeResync?
    var nodeGuard: NodeGuard?
    let fatalError = Mutex<String?>(nil)
    /// sd_notify, watchdog and the health/metrics endpoint (Service/); set before `run`.
    public var observer: DaemonObserver?
    /// False until start-up is complete: control requests other than status and shutdown are refused till then,
    /// and status reads nothing that start-up is still writing.
    private let running = Mutex(false)
    /// `up --replace`: take over from a daemon running for the device (Handover.swift), else start as `up` does.
    public var replace = false
    /// The tun queues and sockets the forwarder runs on, and the device as installed (a handover needs them).
    var dataPlane: (tun: TunDevice, sockets: [UDPSocket])?
    var overlay: OverlayDevice?
    /// Where a handover to a replacing daemon stands.
    let outgoing = OutgoingHandover()

    /// The peer source is the one `config.source` names (`NodeConfig.peerSource`).
    public convenience init(config: NodeConfig, logger: Logger) {
        self.init(config: config, source: config.peerSource(logger: logger), logger: logger)
    }

    public init(config: NodeConfig, source: any PeerSource, logger: Logger) {
        self.config = config
        self.source = source
        self.logger = logger
        paths = RuntimePaths(device: config.device)
        report = StatusReport(config: config, startedAt: Date(), counters: counters)
        if let fixed = source as? StaticPeerSource { membership = fixed.membership }
    }

    /// Runs the node until SIGINT/SIGTERM or `down`. Everything set up is torn down before this returns, also on
    /// failure. Start-up success or failure is reported on `readiness`.
    public func run(readiness: Readiness) throws(Failure) {
        ProcessSignals.block()
        // A closed pipe (the readiness pipe, a control client that left) must be an error return, never death.
        signal(SIGPIPE, SIG_IGN)
        do {
            try runLocked(readiness: readiness)
        } catch {
            if case .stopped = error {
                // `down` (or SIGTERM/SIGINT) while the registry was still being waited for: everything taken is
                // released.
                logger.info("stopped during start-up")
                reportReadiness(readiness.failed("stopped during start-up"))
                return
            }
            reportReadiness(readiness.failed(error.description))
            throw error
        }
    }

    private func reportReadiness(_ error: SystemError?) {
        if let error { logger.warning("\(error) (the process that started the daemon is gone); running on") }
    }

    private func runLocked(readiness: Readiness) throws(Failure) {
        // Peers file first: a bad line must stop `up` before anything changes. Its routes are checked against
        // the rules once the plan is made (the network may come from the registry), still before any change.
        var fileRoutes: [PeerRoute] = []
        if let path = config.peersFile {
            do { fileRoutes = try PeersFile.load(path: path, defaultPort: config.port) } catch { throw .usage(error.description) }
        }
        // The lock against a second daemon on this device in this namespace, and the control endpoint, served from
        // here on so that `status` and `down` work during a slow start (DaemonInstance).
        guard let instance = try Failure.system(try DaemonInstance(paths: paths, initialState: state(plan: nil),
                                                                   logger: logger)) else {
            if replace { return try runReplacing(readiness: readiness, fileRoutes: fileRoutes) }
            let pid = DaemonState.load(path: paths.stateFile)?.pid
            throw .failed("flannel-udp is already running for \(config.device) in this network namespace\(pid.map { " (pid \($0))" } ?? "")")
        }
        defer { instance.release(handingOver: outgoing.handedOver) }
        // Where we will write, checked while nothing has changed yet.
        try Failure.system(try NodeSetup.checkPaths(subnetFile: config.subnetFile, runDirectory: paths.runDirectory))
        instance.control.start(handler: self)

        let setup = try Failure.system(try NodeSetup(logger: logger))
        defer {
            // Reached on every way out, a failed start included: give the lease back (unless
            // `down --keep-lease`, or handed over) and close the registry's client (which must always be shut down).
            source.leave(keep: keepLease.withLock { $0 } || outgoing.handedOver)
        }
        let underlay = try setup.resolveUnderlay(config.underlay)
        let joined = try source.join(underlay: underlay.address, publicIP: config.publicIP ?? underlay.address,
                                     previous: config.subnetFile.flatMap { try? SubnetFile.load(path: $0) })
        membership = joined

        let plan: NodeSetup.Plan
        plan = try setup.plan(config, membership: joined)
        self.plan = plan
        if let path = config.peersFile {
            for r in fileRoutes {
                do { try peers.store.check(r, origin: .file) } catch { throw .usage("\(path): \(error)") }
            }
        }

        // Bind the UDP port before touching any device, so "address in use" changes nothing. One socket per worker,
        // each inner flow steered to one of them, and the express lane's (FlowSteering).
        let sockets: [UDPSocket] = try Failure.system(try UDPSocket.group(bind: plan.listen, count: config.pairs,
                                                                          express: config.express))

        let tun: TunDevice
        tun = try setup.bringUp(plan)
        steerTun(tun)
        masquerade = setup.masquerade
        overlay = setup.installed
        dataPlane = (tun, sockets)
        // Recorded as soon as the subnet file is written, so that `down` after a SIGKILL from here on knows
        // what this daemon wrote and may remove.
        instance.record(state(plan: plan))
        var forwarderStarted = false
        defer {
            // First, so that teardown's own changes are not taken for damage and put back.
            nodeGuard?.stop()
            if forwarderStarted { forwarder?.stop() }
            // Handed over: everything stays, the successor's now.
            if outgoing.handedOver { masquerade?.stop() } else { setup.tearDown() }
        }

        try peers.store.replace(fileRoutes, origin: .file)

        // Self-healing: subscribed before the forwarder starts, watching from right after it has.
        try startGuard(setup)
        forwarder = try makeForwarder(tun: tun, sockets: sockets, membership: joined)
        try start(forwarder)
        forwarderStarted = true
        nodeGuard?.start()

        watchPeers()
        serve(readiness: readiness, setup: setup, plan: plan, fileRoutes: fileRoutes.count)
        try throwIfFailed()
    }

    /// Creates (does not start) the self-healing guard of the device `setup` installed or adopted.
    func startGuard(_ setup: NodeSetup) throws(Failure) {
        if let installed = setup.installed {
            do {
                nodeGuard = try NodeGuard(device: installed, logger: logger,
                                          onDeviceGone: { [weak self] reason in self?.fail(reason) })
            } catch { throw .failed("start self-healing: \(error)") }
        }
    }

    func makeForwarder(tun: TunDevice, sockets: [UDPSocket], membership joined: Membership) throws(Failure) -> Forwarder {
        do {
            return try Forwarder(tun: tun, sockets: sockets, table: peers.table,
                                config: ForwardingConfig(network: joined.network, subnet: joined.subnet,
                                                         peerCheck: config.peerCheck),
                                counters: counters, logger: logger,
                                options: ForwarderOptions(offloads: config.offloads,
                                                          heartbeatMilliseconds: observer?.heartbeatMilliseconds ?? 1000,
                                                          codel: config.codel, express: config.express,
                                                          expressSpinMicroseconds: config.expressSpinMicroseconds,
                                                          expressPriority: config.expressPriority),
                                onFailure: { [weak self] error in
                                    // A deleted device fails the tun reads too; say so rather than only the errno.
                                    self?.fail(self?.nodeGuard?.deviceGoneReason() ?? "forwarder stopped: \(error)")
                                })
        } catch {
            throw .failed("start forwarder: \(error)")
        }
    }

    /// Has the tun pick its queues as the sockets do (`FlowSteering.tunProgram`) when there is an express lane,
    /// else leaves it to the kernel's flow hash (detaching the program a daemon before may have left). A kernel
    /// that refuses the program costs the express lane its tun side, not the node: the kernel's hash then spreads
    /// the packets over every queue, the express lane's included, which forwards whatever it gets.
    func steerTun(_ tun: TunDevice) {
        do {
            try tun.steer(workers: config.express == nil ? nil : config.workers, express: config.express)
        } catch {
            logger.error("\(error) (packets are spread over the tun's queues by the kernel's hash)")
        }
    }

    /// Steers the port's sockets and the tun for this daemon's layout once it forwards on descriptors another
    /// daemon steered too (`up --replace`, or taking back after a successor died). A refusal is logged, not fatal:
    /// the kernel's hashes then spread the packets, and every pair forwards whatever it gets.
    func steer(_ tun: TunDevice, _ sockets: [UDPSocket]) {
        do { try UDPSocket.steer(sockets, express: config.express) } catch {
            logger.error("\(error) (datagrams are spread by the kernel's hash)")
        }
        steerTun(tun)
    }

    func start(_ forwarder: Forwarder?) throws(Failure) {
        do { try forwarder?.start() } catch { throw .failed("start forwarder: \(error)") }
    }

    /// Up: reports readiness, then runs until a signal.
    func serve(readiness: Readiness, setup: NodeSetup, plan: NodeSetup.Plan, fileRoutes: Int) {
        running.withLock { $0 = true }
        logger.info("flannel-udp \(Daemon.version) up: \(config.device) \(plan.membership.subnet) in \(plan.membership.network), listening on \(plan.listen), mtu \(plan.mtu), \(fileRoutes) peer route(s) from file")
        reportReadiness(readiness.ready())
        setup.started()
        observer?.daemonReady(self)

        waitForSignals()
        observer?.daemonStopping(self)
    }

    /// After a run: the fatal error that ended it, if one did.
    func throwIfFailed() throws(Failure) {
        if let message = fatalError.withLock({ $0 }) {
            throw .failed(message)
        }
    }

    // MARK: - peer source

    /// The peer table follows the source's peer set until the daemon stops; the daemon stops if the source says
    /// our subnet is lost (as flanneld does).
    func watchPeers() {
        peers.follow(source, onLost: { [weak self] message in self?.fail(message) })
    }

    /// Records a fatal data-plane error and asks the main thread to shut down.
    func fail(_ message: String) {
        // Handing over: our queues and sockets go away on purpose.
        if outgoing.leaving { return }
        let repeated = fatalError.withLock { fatalError -> Bool in
            if fatalError == nil { fatalError = message; return false }
            return fatalError == message
        }
        // The guard and the forwarder both notice a deleted device, with the same reason: say it once.
        if repeated { return }
        logger.error("\(message); shutting down")
        kill(getpid(), SIGTERM)
    }

    /// Until SIGINT or SIGTERM (every way out ends there, see the type's comment); SIGHUP re-reads the peers file.
    private func waitForSignals() {
        let stop = ProcessSignals.wait { [self] in
            logger.info("SIGHUP: re-reading peers file")
            observer?.daemonReloading(self)
            if case .error(let m) = peers.reload() { logger.error("\(m)") }
            observer?.daemonReloaded(self)
        }
        logger.info("signal \(stop == SIGINT ? "SIGINT" : "SIGTERM"): shutting down")
    }

    /// The state file's record (StatusReport.state) with the membership as it stands.
    func state(plan: NodeSetup.Plan?) -> DaemonState {
        report.state(membership: membership, plan: plan)
    }

    // MARK: - control requests

    /// The answer to what only a running daemon can do (route changes, a handover) while start-up goes on.
    private var stillStarting: ControlResponse {
        .error("the daemon for \(paths.device) is still starting; try again when it is up")
    }

    /// A handover (Handover.swift), once start-up is complete.
    public func handle(_ request: HandoverRequest, from pid: pid_t) -> HandoverReply {
        if !running.withLock({ $0 }) { return HandoverReply(stillStarting) }
        return handleHandover(request, from: pid)
    }

    /// Status and shutdown at any time; the peer table's requests once start-up is complete.
    public func handle(_ request: ControlRequest) -> ControlResponse {
        let isRunning = running.withLock { $0 }
        switch request {
        case .status:
            guard isRunning else { return .status(report.starting()) }
            return .status(report.running(StatusReport.Parts(
                membership: membership, plan: plan, routes: peers.routeInfos(), lease: source.lease,
                forwarder: forwarder, masquerade: masquerade, nodeGuard: nodeGuard, phase: outgoing.reportedPhase)))
        case .routeList:
            guard isRunning else { return stillStarting }
            return .routes(peers.routeInfos())
        case .routeAdd(let subnet, let endpoint):
            guard isRunning else { return stillStarting }
            return peers.add(subnet: subnet, endpoint: endpoint)
        case .routeDel(let subnet):
            guard isRunning else { return stillStarting }
            return peers.delete(subnet: subnet)
        case .reloadPeers:
            guard isRunning else { return stillStarting }
            return peers.reload()
        case .shutdown(let keep):
            keepLease.withLock { $0 = keep }
            logger.info("shutdown requested over the control socket\(keep ? " (keeping the lease)" : "")")
            kill(getpid(), SIGTERM)
            return .ok
        }
    }
}
