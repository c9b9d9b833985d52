import ArgumentParser
import FlannelUDP
import Logging

extension Up {
    /// The paragraph of `up --help` (and the man page) about running under a service manager.
    static let serviceHelp = """
        Under systemd (NOTIFY_SOCKET set, a path or an @abstract name) a foreground 'up' sends READY=1 with a \
        STATUS= line once it forwards, RELOADING=1 and READY=1 around a SIGHUP re-read, STOPPING=1 on the way \
        down, and with WATCHDOG_USEC (WATCHDOG_PID, if set, must be ours) WATCHDOG=1 every half of it while \
        both forwarding threads make progress; a unit file is in contrib/systemd/. A daemon that replaces a \
        supervised one (--replace) reports to that daemon's service manager: the old one names it with \
        MAINPID= instead of STOPPING=1, and it sends the watchdog pings from then on. --metrics-addr serves \
        /healthz (200 while the data plane runs and, with etcd, the lease is held; 503 with the reason \
        otherwise; after a fatal stop such as a deleted lease the endpoint stays until that 503 was answered \
        once, at most 5 s) and /metrics (Prometheus text, from the same snapshot as 'status --json').
        """

    /// sd_notify and the watchdog (foreground only: a daemon started by --detach reports to its parent instead),
    /// and the metrics endpoint, bound before the node changes anything. A bad NOTIFY_SOCKET or WATCHDOG_USEC is
    /// a usage error naming the variable; a metrics port that cannot be bound is a system error.
    func startService(logger: Logger) throws -> NodeService {
        do throws(FlannelError) {
            return try NodeService.start(foreground: readyFD == nil, metricsAddress: metricsAddr,
                                             takeOver: replace, logger: logger)
        } catch {
            // A daemon started by --detach tells its parent why, as for any other failed start.
            Readiness(fd: readyFD).failed("\(error)")
            throw fail("up", error)
        }
    }
}
