import Foundation
import Logging

/// Keeps the rules in place, as flanneld's `--iptables-resync` does: every `period` seconds checks them and, when
/// someone removed or changed them, reinstalls them (one transaction) and logs it.
public final class MasqueradeResync: @unchecked Sendable {  // mutable state guarded by `lock`
    public let rules: MasqueradeRules
    public let period: TimeInterval
    private let logger: Logger
    private let lock = NSLock()
    private var state: MasqueradeStatus
    private let wake = DispatchSemaphore(value: 0)
    private let finished = DispatchSemaphore(value: 0)
    private var stopping = false
    private var thread: Thread?

    public init(rules: MasqueradeRules, period: TimeInterval, logger: Logger) {
        self.rules = rules
        self.period = period
        self.logger = logger
        state = MasqueradeStatus(backend: rules.backend.rawValue, objects: rules.objects, inPlace: true,
                                 resyncSeconds: period, restored: 0, lastRestored: nil, lastError: nil)
    }

    public var status: MasqueradeStatus { lock.withLock { state } }

    /// One check: reinstalls when something is missing. Returns whether it had to. Called by the thread; public
    /// for tests.
    @discardableResult
    public func checkOnce() -> Bool {
        if rules.isInPlace() {
            lock.withLock {
                state.inPlace = true
                state.lastError = nil
            }
            return false
        }
        lock.withLock { state.inPlace = false }
        do {
            try rules.install()
            lock.withLock {
                state.inPlace = true
                state.restored += 1
                state.lastRestored = Date()
                state.lastError = nil
            }
            logger.warning("masquerade rules (\(rules.backend.rawValue): \(rules.objects.joined(separator: ", "))) were missing or changed; restored")
            return true
        } catch {
            lock.withLock { state.lastError = error.description }
            logger.error("masquerade rules are missing and could not be restored: \(error)")
            return false
        }
    }

    public func start() {
        let t = Thread { [self] in
            while wake.wait(timeout: .now() + period) == .timedOut {
                if lock.withLock({ stopping }) { break }
                checkOnce()
            }
            finished.signal()
        }
        t.name = "masquerade resync"
        lock.withLock { thread = t }
        t.start()
    }

    /// Stops the checks and waits for a check in progress to end, so nothing is reinstalled after this returns.
    public func stop() {
        let started: Bool = lock.withLock {
            stopping = true
            return thread != nil
        }
        guard started else { return }
        wake.signal()
        finished.wait()
        lock.withLock { thread = nil }
    }
}
