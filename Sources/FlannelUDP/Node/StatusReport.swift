import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// What the daemon says about itself: the answer to `status` and the record in the state file. Each is built at
/// the moment it is asked for, from the parts the daemon composes, so it holds nothing that could go stale.
struct StatusReport: Sendable {
    /// The options the daemon runs with (device, subnet and peers files, peer check).
    let config: NodeConfig
    /// When the daemon started, as the state file and `status` show it (wall clock).
    let startedAt: Date
    /// The same moment on the monotonic clock, which uptime counts from: setting the wall clock does not change it.
    private let startedMonotonic: Double
    /// The data plane's, read anew for each status.
    let counters: DataPlaneCounters

    init(config: NodeConfig, startedAt: Date, counters: DataPlaneCounters) {
        self.config = config
        self.startedAt = startedAt
        self.counters = counters
        startedMonotonic = MonotonicClock.seconds()
    }

    private var uptimeSeconds: Double { MonotonicClock.seconds() - startedMonotonic }

    /// The running daemon's parts a status reads; nil where start-up has not made them.
    struct Parts {
        var membership: Membership?
        var plan: NodeSetup.Plan?
        var routes: [RouteInfo]
        var lease: LeaseInfo?
        var forwarder: Forwarder?
        var masquerade: MasqueradeResync?
        var nodeGuard: NodeGuard?
        var phase: DaemonPhase
    }

    /// Status while starting: only what start-up does not change.
    func starting() -> DaemonStatus {
        var status = DaemonStatus(
            pid: getpid(), version: Daemon.version, startedAt: startedAt,
            uptimeSeconds: uptimeSeconds, device: config.device, network: "", subnet: "", mtu: 0,
            listen: "", publicIP: "", underlay: "", subnetFile: nil, peersFile: nil, peerCheck: "", routes: [],
            counters: counters.snapshot(), offloads: [], lease: nil)
        status.phase = .starting
        return status
    }

    /// Status once start-up is complete.
    func running(_ parts: Parts) -> DaemonStatus {
        let plan = parts.plan
        var status = DaemonStatus(
            pid: getpid(), version: Daemon.version, startedAt: startedAt,
            uptimeSeconds: uptimeSeconds, device: config.device,
            network: parts.membership?.network.description ?? "", subnet: parts.membership?.subnet.description ?? "",
            mtu: plan?.mtu ?? 0, listen: plan?.listen.description ?? "", publicIP: plan?.publicIP.description ?? "",
            underlay: plan?.underlay.name ?? "", subnetFile: config.subnetFile, peersFile: config.peersFile,
            peerCheck: config.peerCheck.rawValue, routes: parts.routes, counters: counters.snapshot(),
            offloads: parts.forwarder?.activeOffloads ?? [], lease: parts.lease)
        status.offloadStatistics = parts.forwarder?.offloadStatistics
        status.workers = parts.forwarder?.workerCounts
        status.expressPriority = parts.forwarder?.expressPriorityCounts
        status.expressSpin = parts.forwarder?.expressSpinCounts
        status.masquerade = parts.masquerade?.status
        status.repairs = parts.nodeGuard?.status
        status.phase = parts.phase
        return status
    }

    /// What the state file records: pid and start time first (clients verify who answers with them); network,
    /// subnet and the subnet file's contents once the plan is made (from etcd they are not known at first).
    func state(membership: Membership?, plan: NodeSetup.Plan?) -> DaemonState {
        DaemonState(pid: getpid(), startTicks: DaemonState.startTicks(of: getpid()) ?? 0,
                    device: config.device, network: membership?.network.description ?? "",
                    subnet: membership?.subnet.description ?? "", subnetFile: config.subnetFile,
                    listen: plan?.listen.description ?? "", startedAt: startedAt,
                    subnetFileContents: config.subnetFile == nil ? nil : plan?.subnetFileContents)
    }
}
