import Foundation
import Synchronization
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// What `up` installed and the guard keeps in place: the device (by index: a new device under the same name is
/// not ours), its /32 address, its MTU, up, and the overlay route through it.
public struct OverlayDevice: Sendable, Equatable {
    public var name: String
    public var index: Int32
    public var address: InterfaceAddress
    public var mtu: Int
    public var route: Route

    public init(name: String, index: Int32, address: InterfaceAddress, mtu: Int, route: Route) {
        self.name = name
        self.index = index
        self.address = address
        self.mtu = mtu
        self.route = route
    }
}

/// Keeps the overlay device as `up` configured it (issue 13, self-healing): listens to the kernel's link, address
/// and route notifications and, when one touches the device or the overlay route (or notifications were lost),
/// re-reads the real state and puts back what is missing: MTU, up, address, route, in that order (bringing a link
/// up or re-adding its last address does not bring its routes back; the kernel flushed them). It also checks every
/// `checkInterval` seconds without being told.
///
/// Each repair is logged once and counted. A repair that fails is retried with a doubling delay (1 s up to a
/// minute) instead of on every notification, so the guard does not fight someone who keeps changing it back.
///
/// The device itself cannot be recreated here: the forwarder's tun queues went with it. When it disappears (or
/// a different device now has its name) the guard calls `onDeviceGone` with the reason and stops.
///
/// Threads: one, its own. `stop()` wakes it at once (WakePipe) and waits for it; nothing is repaired after
/// `stop()` returns, so teardown's own changes are never undone.
public final class NodeGuard: @unchecked Sendable {  // mutable state in `guarded`; sockets used by the thread only
    public let device: OverlayDevice
    public let checkInterval: TimeInterval
    private let logger: Logger
    private let onDeviceGone: @Sendable (String) -> Void
    private let netlink: Netlink
    private let subscription: NetlinkSubscription
    private let wake: WakePipe
    private struct Guarded {
        var state: RepairStatus
        var backoff: [Repair.Kind: (failures: Int, retryAt: Double)] = [:]
    }
    private let guarded: Mutex<Guarded>
    private let thread = StoppableThread(name: "node guard")

    /// Longest wait between attempts at a repair that keeps failing.
    static let maxBackoff: Double = 60

    /// Opens the sockets in the calling thread's network namespace (that of the device). Subscribes at once, so
    /// changes made between now and `start()` are not missed.
    public init(device: OverlayDevice, checkInterval: TimeInterval = 5, logger: Logger,
                onDeviceGone: @escaping @Sendable (String) -> Void) throws(SystemError) {
        self.device = device
        self.checkInterval = checkInterval
        self.logger = logger
        self.onDeviceGone = onDeviceGone
        subscription = try NetlinkSubscription()
        netlink = try Netlink()
        wake = try WakePipe()
        guarded = Mutex(Guarded(state: RepairStatus(checkSeconds: checkInterval)))
    }

    public var status: RepairStatus { guarded.withLock { $0.state } }

    // MARK: - Decisions (pure)

    /// One thing to put back.
    enum Repair: Equatable {
        case mtu(found: Int)
        case linkUp
        case address
        case route
        /// The device is gone, or its name now belongs to another device.
        case deviceGone(String)

        enum Kind: Hashable { case mtu, linkUp, address, route, device }
        var kind: Kind {
            switch self {
            case .mtu: return .mtu
            case .linkUp: return .linkUp
            case .address: return .address
            case .route: return .route
            case .deviceGone: return .device
            }
        }
    }

    /// The state read from the kernel.
    struct Observed: Equatable {
        /// The link with our index; nil when there is none.
        var link: Link?
        /// The IPv4 addresses on it.
        var addresses: [InterfaceAddress]
        /// The main table's routes to the overlay network (any device, any gateway).
        var overlayRoutes: [Route]
    }

    /// What has to be done to get from `observed` back to `device`, in the order it has to be done.
    static func decide(_ device: OverlayDevice, _ observed: Observed) -> [Repair] {
        guard let link = observed.link else {
            return [.deviceGone("device \(device.name) (ifindex \(device.index)) was deleted")]
        }
        if link.name != device.name {
            return [.deviceGone("device \(device.name) (ifindex \(device.index)) was renamed to \(link.name)")]
        }
        var repairs: [Repair] = []
        if link.mtu != device.mtu { repairs.append(.mtu(found: link.mtu)) }
        if !link.isUp { repairs.append(.linkUp) }
        if !observed.addresses.contains(where: {
            $0.address == device.address.address && $0.prefixLength == device.address.prefixLength
        }) {
            repairs.append(.address)
        }
        if !observed.overlayRoutes.contains(where: {
            $0.destination == device.route.destination && $0.outputInterface == device.index && $0.gateway == nil
        }) {
            repairs.append(.route)
        }
        return repairs
    }

    /// The delay before the next attempt after `failures` failed attempts in a row: 1, 2, 4, ... up to a minute.
    static func retryDelay(failures: Int) -> Double {
        guard failures > 0 else { return 0 }
        return min(maxBackoff, Double(1 << min(failures - 1, 16)))
    }

    // MARK: - Reconciling

    /// Reads the state and repairs what is missing. Returns false once the device is gone (nothing more to
    /// guard). Called by the guard's thread; internal for tests.
    func reconcile() -> Bool {
        let observed: Observed
        do {
            var o = Observed(link: try netlink.link(index: device.index), addresses: [], overlayRoutes: [])
            if o.link != nil {
                o.addresses = try netlink.addresses(index: device.index)
                o.overlayRoutes = try netlink.routes().filter { $0.destination == device.route.destination }
            }
            observed = o
        } catch {
            guarded.withLock { $0.state.lastError = "check \(device.name): \(error)" }
            logger.error("self-healing: cannot read the state of \(device.name): \(error)")
            return true
        }
        let repairs = NodeGuard.decide(device, observed)
        // A back-off ends when its problem went away on its own (someone else fixed it).
        guarded.withLock { g in g.backoff = g.backoff.filter { entry in repairs.contains { $0.kind == entry.key } } }
        var failed = false
        for repair in repairs {
            if case .deviceGone(let what) = repair {
                onDeviceGone(NodeGuard.explainDeviceGone(what))
                return false
            }
            if !apply(repair) { failed = true }
        }
        if !failed { guarded.withLock { $0.state.lastError = nil } }
        return true
    }

    /// Makes one repair unless its kind is waiting out a back-off; logs and counts it. Returns false on failure.
    private func apply(_ repair: Repair) -> Bool {
        let kind = repair.kind
        let now = MonotonicClock.seconds()
        if let b = guarded.withLock({ $0.backoff[kind] }), now < b.retryAt { return false }
        let name = device.name
        let line: String
        do throws(SystemError) {
            switch repair {
            case .mtu(let found):
                try netlink.setMTU(device.mtu, index: device.index)
                line = "restored mtu \(device.mtu) on \(name) (someone set it to \(found))"
            case .linkUp:
                try netlink.setUp(true, index: device.index)
                line = "set \(name) up again (someone set it down)"
            case .address:
                do throws(SystemError) { try netlink.addAddress(device.address) } catch where error.errno == EEXIST {}
                line = "restored address \(device.address) on \(name) (someone deleted it)"
            case .route:
                try addRoute()
                line = "restored route \(device.route.description(device: name)) (it was missing)"
            case .deviceGone:
                return false
            }
        } catch {
            let failures = (guarded.withLock { $0.backoff[kind]?.failures } ?? 0) + 1
            let delay = NodeGuard.retryDelay(failures: failures)
            guarded.withLock {
                $0.backoff[kind] = (failures, now + delay)
                $0.state.lastError = "\(error)"
            }
            logger.error("self-healing: \(error); retrying in \(Int(delay)) s (attempt \(failures))")
            return false
        }
        let when = Date()
        guarded.withLock { g in
            g.backoff[kind] = nil
            switch kind {
            case .mtu: g.state.mtu += 1
            case .linkUp: g.state.linkUp += 1
            case .address: g.state.address += 1
            case .route: g.state.route += 1
            case .device: break
            }
            g.state.last = line
            g.state.lastAt = when
        }
        logger.warning("self-healing: \(line)")
        return true
    }

    /// Adds the overlay route; an identical one already there is fine (someone restored it first).
    private func addRoute() throws(SystemError) {
        do throws(SystemError) {
            try netlink.addRoute(device.route)
        } catch where error.errno == EEXIST {
            let same = try netlink.routes().contains {
                $0.destination == device.route.destination && $0.outputInterface == device.index && $0.gateway == nil
            }
            if !same { throw error }
        }
    }

    /// Why the forwarder failed, when the reason is that the device is gone: for the daemon, so that a tun read
    /// failing on a deleted device and the guard noticing the deletion give the same explanation, whichever comes
    /// first. Nil when the device is still there or its state cannot be read. Safe from any thread (it opens its
    /// own socket).
    public func deviceGoneReason() -> String? {
        do {
            let nl = try Netlink()
            let link = try nl.link(index: device.index)
            for case .deviceGone(let what) in NodeGuard.decide(device, Observed(link: link, addresses: [], overlayRoutes: [])) {
                return NodeGuard.explainDeviceGone(what)
            }
        } catch {}
        return nil
    }

    static func explainDeviceGone(_ what: String) -> String {
        "\(what) by someone else; its tun queues went with it and the forwarder cannot be reattached, so flannel-udp stops instead of forwarding into nothing (run 'flannel-udp up' again)"
    }

    /// Seconds until the earliest back-off ends, if any.
    private func nextRetry(now: Double) -> Double? {
        guarded.withLock { $0.backoff.values.map { max(0, $0.retryAt - now) }.min() }
    }

    // MARK: - Thread

    /// Checks once (so anything lost before the start is repaired), then watches until `stop()`. May be started
    /// again after `stop()` (a handover that did not happen resumes the guard).
    public func start() {
        wake.drain()
        thread.start { [self] in run() }
    }

    private func run() {
        guard reconcile() else { return }
        var nextCheck = MonotonicClock.seconds() + checkInterval
        // Cleared when the notification socket fails for good: the periodic check then carries on alone (poll
        // ignores a negative fd), rather than spinning on a socket that stays readable with an error.
        var listening = true
        while true {
            let now = MonotonicClock.seconds()
            var wait = max(0, nextCheck - now)
            if let retry = nextRetry(now: now) { wait = min(wait, retry) }
            var fds = [pollfd(fd: listening ? subscription.fd : -1, events: Int16(POLLIN), revents: 0),
                       pollfd(fd: wake.readFD, events: Int16(POLLIN), revents: 0)]
            let rc = poll(&fds, nfds_t(fds.count), Int32(min(wait * 1000, 3_600_000)) + 1)
            if rc < 0 {
                let error = Glibc.errno
                if error == EINTR { continue }
                // poll on two valid descriptors fails only for lack of memory: log it, go on with the periodic
                // check.
                logger.error("self-healing: \(SystemError("poll", "netlink notifications", errno: error))")
                nextCheck = MonotonicClock.seconds()
                fds[0].revents = 0
                fds[1].revents = 0
            }
            if fds[1].revents != 0 { return }
            var check = MonotonicClock.seconds() >= nextCheck || nextRetry(now: MonotonicClock.seconds()) == 0
            if fds[0].revents != 0 {
                switch drainNotifications() {
                case .relevant: check = true
                case .irrelevant: break
                case .failed(let error):
                    listening = false
                    check = true
                    logger.error("self-healing: \(error); from now on checking every \(Int(checkInterval)) s only")
                }
            }
            if check {
                guard reconcile() else { return }
                nextCheck = MonotonicClock.seconds() + checkInterval
            }
        }
    }

    private enum Drained {
        case relevant, irrelevant
        case failed(SystemError)
    }

    /// Reads every queued notification: relevant when any may concern the device or its route, or some were lost.
    private func drainNotifications() -> Drained {
        var relevant = false
        while true {
            let received: NetlinkSubscription.Received
            do { received = try subscription.receive() } catch { return .failed(error) }
            switch received {
            case .empty:
                return relevant ? .relevant : .irrelevant
            case .overrun:
                relevant = true
            case .events(nil):
                relevant = true
            case .events(let events?):
                if events.contains(where: { $0.concerns(index: device.index, network: device.route.destination) }) {
                    relevant = true
                }
            }
        }
    }

    /// Stops watching and waits for a check in progress to end: nothing is repaired after this returns.
    public func stop() {
        thread.stop(wake: wake.wake)
    }
}
