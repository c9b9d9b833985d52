import Foundation
import Logging
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// `up` under a service manager and a monitoring system: sd_notify messages at each step of the daemon's life,
/// watchdog pings while the data plane's workers prove they are alive, and the /healthz + /metrics endpoint.
///
///     daemon:   ready ───────────── SIGHUP ──────────── SIGTERM/down/lease lost ── teardown ── exit
///     notify:   READY=1, STATUS=    RELOADING=1 ...     STOPPING=1, STATUS=
///                                   READY=1
///     watchdog: WATCHDOG=1 every WATCHDOG_USEC/2 while every worker's heartbeat moved since the last ping
///     /healthz: 200 ok ───────────────────────────────  503 <reason> until the endpoint closes, last
///
/// Replaced (`up --replace`) under a service manager, the old daemon passes its manager on (`serviceManagerLink`)
/// and, when it lets go, tells the manager who its main process is now (`MAINPID=`, with a last `WATCHDOG=1`)
/// instead of `STOPPING=1`: the unit stays active and the manager supervises, stops and watches the successor.
/// A successor the manager did not start adopts the link; it sends no `READY=1` (the unit is active already),
/// only its watchdog pings, which the manager takes from the switch on.
public final class NodeService: DaemonObserver, @unchecked Sendable {  // mutable state behind `state` and `manager`
    /// The service manager: from the environment, or adopted from the daemon this one replaces.
    private struct Manager {
        var notifier: SystemdNotifier?
        /// Only ever set with a notifier (`init`, `adoptServiceManager`).
        var watchdog: WatchdogSettings?
        var adopted = false
        /// `MAINPID=` named the successor: the manager takes nothing more from this process. Set, and looked at
        /// by every send, under the lock, so that no watchdog ping can follow it.
        var handedOver = false
    }
    private let manager: Mutex<Manager>
    private let metricsServer: MetricsServer?
    private let logger: Logger
    private let wake: WakePipe
    private let answered = NSCondition()
    private var answeredUnhealthy = false  // behind `answered`

    private struct State {
        var daemon: Daemon?
        var ready = false
        var stopping = false
        /// Stopping because of a fatal error (unhealthy), not a signal or `down`.
        var fatal = false
    }
    private let state = Mutex(State())

    public var heartbeatMilliseconds: Int32 { manager.withLock { $0.watchdog?.heartbeatMilliseconds } ?? 1000 }

    /// sd_notify and the watchdog as the environment asks for them (`foreground` only: a daemon started by
    /// --detach reports to its parent instead), and the metrics endpoint on `metricsAddress` ("HOST:PORT"). A bad
    /// NOTIFY_SOCKET, WATCHDOG_USEC or address is `.usage`, naming it; a socket or port that cannot be had is not.
    /// `takeOver`: this daemon replaces one running for the device (`up --replace`), whose metrics endpoint it
    /// joins on the same address (see `MetricsServer.init`).
    public static func start(foreground: Bool, metricsAddress: String?, takeOver: Bool = false,
                             logger: Logger) throws(FlannelError) -> NodeService {
        var notifier: SystemdNotifier?
        var watchdog: WatchdogSettings?
        if foreground {
            notifier = try SystemdNotifier.fromEnvironment()
            do { watchdog = try WatchdogSettings.fromEnvironment() } catch { throw .usage(error.description) }
        }
        var address: MetricsAddress?
        if let metricsAddress {
            do { address = try MetricsAddress(parsing: metricsAddress) } catch { throw .usage(error.description) }
        }
        return try NodeService(notifier: notifier, watchdog: watchdog, metricsAddress: address, takeOver: takeOver,
                               logger: logger)
    }

    /// Binds the metrics endpoint (before anything else changes, so a taken port changes nothing).
    public init(notifier: SystemdNotifier?, watchdog: WatchdogSettings?, metricsAddress: MetricsAddress?,
                takeOver: Bool = false, logger: Logger) throws(FlannelError) {
        manager = Mutex(Manager(notifier: notifier, watchdog: notifier == nil ? nil : watchdog))
        self.logger = logger
        wake = try FlannelError.system(try WakePipe())
        metricsServer = try metricsAddress.map { (address) throws(FlannelError) in
            try MetricsServer(address: address, takeOver: takeOver, logger: logger)
        }
        metricsServer?.start(health: { [weak self] in self?.answerHealth() ?? DaemonHealth(healthy: false, reason: "stopped") },
                             metrics: { [weak self] in self?.metrics() ?? "" })
    }

    /// How long the endpoint stays up after a fatal stop (a lost lease, a failed worker) for /healthz to say why.
    public static let unhealthyLinger: TimeInterval = 5

    /// Closes the metrics endpoint and stops the watchdog. Call after the daemon has returned (torn down).
    ///
    /// After a fatal stop the endpoint first lingers until /healthz has answered 503 with the reason once, or
    /// `unhealthyLinger` has passed: the teardown takes milliseconds, and a health checker should learn why the
    /// node went away rather than only find the port closed. A normal stop (SIGTERM, `down`) does not wait.
    public func shutdown() {
        wake.wake()
        if metricsServer != nil && state.withLock({ $0.fatal }) {
            let deadline = Date().addingTimeInterval(Self.unhealthyLinger)
            answered.lock()
            while !answeredUnhealthy && answered.wait(until: deadline) {}
            answered.unlock()
        }
        metricsServer?.stop()
    }

    // MARK: - DaemonObserver

    public func daemonReady(_ daemon: Daemon) {
        state.withLock {
            $0.daemon = daemon
            $0.ready = true
        }
        let (watchdog, adopted) = manager.withLock { ($0.watchdog, $0.adopted) }
        // Adopted: the unit is active already, and the manager takes our messages only once the old daemon has
        // named us its main process (with a ping of its own); the watchdog pings after that are what it needs.
        if !adopted { notify(["READY=1", SystemdNotifier.status(summary(daemon))]) }
        if let watchdog { startWatchdog(watchdog, daemon, pingAtOnce: !adopted) }
    }

    public func daemonReloading(_ daemon: Daemon) {
        notify(["RELOADING=1", SystemdNotifier.monotonicNow(), SystemdNotifier.status("reloading the peers file")])
    }

    public func daemonReloaded(_ daemon: Daemon) {
        notify(["READY=1", SystemdNotifier.status(summary(daemon))])
    }

    public func daemonStopping(_ daemon: Daemon) {
        let health = daemon.health
        state.withLock {
            $0.stopping = true
            $0.fatal = !health.healthy
        }
        wake.wake()
        // Not sent once handed over (`notify`): the unit goes on under its new main process.
        notify(["STOPPING=1", SystemdNotifier.status(health.healthy ? "stopping" : "stopping: \(health.reason)")])
    }

    public var serviceManagerLink: ServiceManagerLink? {
        manager.withLock { m in
            m.notifier.map { ServiceManagerLink(notifySocket: $0.socketPath, watchdogMicroseconds: m.watchdog?.timeoutMicroseconds) }
        }
    }

    public func adoptServiceManager(_ link: ServiceManagerLink) {
        let notifier: SystemdNotifier
        do { notifier = try SystemdNotifier(socketPath: link.notifySocket) } catch {
            logger.warning("the daemon replaced reports to a service manager, but its socket is unusable here: \(error); not reporting to it")
            return
        }
        let adopted = manager.withLock { m -> Bool in
            guard m.notifier == nil else { return false }  // ours, from our own environment, wins
            let watchdog = link.watchdogMicroseconds.flatMap { $0 > 0 ? WatchdogSettings(timeoutMicroseconds: $0) : nil }
            m = Manager(notifier: notifier, watchdog: watchdog, adopted: true)
            return true
        }
        if adopted { logger.info("reporting to the service manager of the daemon replaced (\(link.notifySocket)) once it hands over") }
    }

    public func daemonHandedOver(_ daemon: Daemon, to pid: pid_t) {
        notify(["MAINPID=\(pid)", "WATCHDOG=1", SystemdNotifier.status("handed over to pid \(pid)")], last: true)
        wake.wake()  // the watchdog's thread ends (its pings would be dropped from here on anyway)
    }

    // MARK: - pieces

    /// Sends `assignments` unless there is no manager or this daemon has handed over; `last`: nothing after it.
    private func notify(_ assignments: [String], last: Bool = false) {
        manager.withLock { m in
            guard let notifier = m.notifier, !m.handedOver else { return }
            if last { m.handedOver = true }
            do { try notifier.send(assignments) } catch {
                logger.warning("sd_notify: \(error)")
            }
        }
    }

    /// "forwarding flannel0 10.244.1.0/24 in 10.244.0.0/16 on 192.168.77.1:8285 with 2 peers"
    private func summary(_ daemon: Daemon) -> String {
        guard let s = daemon.statusSnapshot() else { return "forwarding" }
        return "forwarding \(s.device) \(s.subnet) in \(s.network) on \(s.listen) with \(s.routes.count) peer(s)"
    }

    /// `health` for a /healthz request; records that a stopping node's 503 has been seen (see `shutdown`).
    func answerHealth() -> DaemonHealth {
        let h = health
        if !h.healthy && state.withLock({ $0.stopping }) {
            answered.lock()
            answeredUnhealthy = true
            answered.signal()
            answered.unlock()
        }
        return h
    }

    var health: DaemonHealth {
        let (daemon, ready, stopping) = state.withLock { ($0.daemon, $0.ready, $0.stopping) }
        guard let daemon, ready else { return DaemonHealth(healthy: false, reason: "starting") }
        let health = daemon.health
        if !health.healthy { return health }
        if stopping { return DaemonHealth(healthy: false, reason: "stopping") }
        return health
    }

    /// Prometheus text; before the daemon is ready only build info and health.
    func metrics() -> String {
        let (daemon, ready) = state.withLock { ($0.daemon, $0.ready) }
        let snapshot = ready ? daemon?.statusSnapshot() : nil
        return PrometheusText.render(status: snapshot, health: health, version: Daemon.version)
    }

    /// Every half of WATCHDOG_USEC: WATCHDOG=1 if every forwarding worker's heartbeat moved since the last check.
    /// A stuck worker (or a stopped one) withholds the ping, and the service manager restarts the node.
    private func startWatchdog(_ settings: WatchdogSettings, _ daemon: Daemon, pingAtOnce: Bool) {
        let interval = Int32(max(1, min(Double(Int32.max), settings.pingIntervalSeconds * 1000)))
        let wakeFD = wake.readFD
        let thread = Thread { [weak self, weak daemon] in
            var monitor = HeartbeatMonitor(daemon?.heartbeats ?? [])
            if pingAtOnce { self?.notify(["WATCHDOG=1"]) }
            var quiet: Set<String> = []
            while true {
                var pfd = pollfd(fd: wakeFD, events: Int16(POLLIN), revents: 0)
                let n = poll(&pfd, 1, interval)
                if n < 0 && errno == EINTR { continue }
                if n != 0 { return }  // woken to stop (or poll failed: stop pinging, the manager will notice)
                guard let self, let daemon else { return }
                let stuck = monitor.stuck(daemon.heartbeats)
                if stuck.isEmpty {
                    self.notify(["WATCHDOG=1"])
                    quiet.removeAll()
                } else {
                    for w in stuck where !quiet.contains(w) {
                        self.logger.error("watchdog: forwarding worker \(w) made no progress for \(settings.pingIntervalSeconds) s; withholding WATCHDOG=1")
                        quiet.insert(w)
                    }
                }
            }
        }
        thread.name = "fu-watchdog"
        thread.start()
    }
}

/// The watchdog's decision at each tick: the workers whose heartbeat has not moved since the previous tick. Ping
/// only when there are none; no heartbeats at all (the forwarder is gone) counts as stuck.
public struct HeartbeatMonitor: Sendable {
    private var last: [String: UInt64]

    public init(_ beats: [(worker: String, count: UInt64)]) {
        last = Dictionary(beats.map { ($0.worker, $0.count) }, uniquingKeysWith: { $1 })
    }

    public mutating func stuck(_ beats: [(worker: String, count: UInt64)]) -> [String] {
        defer { last = Dictionary(beats.map { ($0.worker, $0.count) }, uniquingKeysWith: { $1 }) }
        if beats.isEmpty { return ["forwarder"] }
        return beats.filter { last[$0.worker] == $0.count }.map(\.worker)
    }
}
