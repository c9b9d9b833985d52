import Foundation
import Synchronization

/// What the service layer (sd_notify, watchdog, health and metrics endpoint) is told by the running daemon.
/// Called on the daemon's main thread; implementations return quickly.
public protocol DaemonObserver: AnyObject, Sendable {
    /// How long a forwarding worker may sit in its blocking receive between heartbeats (`ForwarderOptions`).
    var heartbeatMilliseconds: Int32 { get }
    /// The forwarder runs with its routes in place: traffic can pass.
    func daemonReady(_ daemon: Daemon)
    /// SIGHUP: a re-read starts ...
    func daemonReloading(_ daemon: Daemon)
    /// ... and is done (whether or not it worked; the log says).
    func daemonReloaded(_ daemon: Daemon)
    /// The daemon is about to tear everything down (a signal, `down`, or a fatal error such as a lost lease).
    func daemonStopping(_ daemon: Daemon)

    /// The service manager this daemon reports to, for a successor (`up --replace`); nil without one.
    var serviceManagerLink: ServiceManagerLink? { get }
    /// A replacing daemon learned its predecessor's service manager (right after the handover began, before its
    /// forwarder is built, so that the heartbeat suits that manager's watchdog). It reports to it from then on,
    /// unless it has a service manager of its own.
    func adoptServiceManager(_ link: ServiceManagerLink)
    /// The old daemon lets go: the successor (`pid`) has taken the node over. What follows is no stop.
    func daemonHandedOver(_ daemon: Daemon, to pid: pid_t)
}

/// Whether the node does its job, for /healthz.
public struct DaemonHealth: Equatable, Sendable {
    public var healthy: Bool
    /// "ok", or why not ("etcd: our lease was removed from the registry", "the forwarder stopped: ...").
    public var reason: String
}

extension Daemon {
    /// The status as `status --json` shows it: the one snapshot that /metrics is rendered from too.
    public func statusSnapshot() -> DaemonStatus? {
        if case .status(let s) = handle(.status) { return s }
        return nil
    }

    /// Each forwarding worker's heartbeat (see `Forwarder.heartbeats`); empty before the forwarder starts.
    public var heartbeats: [(worker: String, count: UInt64)] { forwarder?.heartbeats ?? [] }

    /// Healthy while the data plane runs and, in cluster mode, our lease is held and not past its expiry. A
    /// fatal error (the lease removed from etcd, a failed worker) makes it unhealthy at once, before the daemon
    /// starts tearing down.
    public var health: DaemonHealth {
        if let fatal = fatalError.withLock({ $0 }) { return DaemonHealth(healthy: false, reason: fatal) }
        guard let forwarder else { return DaemonHealth(healthy: false, reason: "the data plane is not running yet") }
        if let failure = forwarder.failure {
            return DaemonHealth(healthy: false, reason: "the data plane stopped: \(failure)")
        }
        if let reason = source.unhealthyReason { return DaemonHealth(healthy: false, reason: reason) }
        return DaemonHealth(healthy: true, reason: "ok")
    }
}
