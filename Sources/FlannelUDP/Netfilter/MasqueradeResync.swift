import Foundation
import Synchronization
import Logging

/// Keeps the rules in place, as flanneld's `--iptables-resync` does: every `period` seconds checks them and, when
/// someone removed or changed them, reinstalls them (one transaction) and logs it.
public final class MasqueradeResync: @unchecked Sendable {  // mutable state in `guarded`
    public let rules: MasqueradeRules
    public let period: TimeInterval
    private let logger: Logger
    private struct Guarded {
        var state: MasqueradeStatus
        var stopping = false
    }
    private let guarded: Mutex<Guarded>
    private let wake = DispatchSemaphore(value: 0)
    private let thread = StoppableThread(name: "masquerade resync")

    public init(rules: MasqueradeRules, period: TimeInterval, logger: Logger) {
        self.rules = rules
        self.period = period
        self.logger = logger
        guarded = Mutex(Guarded(state: MasqueradeStatus(
            backend: rules.backend.rawValue, objects: rules.objects, inPlace: true, resyncSeconds: period,
            restored: 0, lastRestored: nil, lastError: nil)))
    }

    public var status: MasqueradeStatus { guarded.withLock { $0.state } }

    /// One check: reinstalls when something is missing. Returns whether it had to. Called by the thread; public
    /// for tests.
    @discardableResult
    public func checkOnce() -> Bool {
        if rules.isInPlace() {
            guarded.withLock {
                $0.state.inPlace = true
                $0.state.lastError = nil
            }
            return false
        }
        guarded.withLock { $0.state.inPlace = false }
        do {
            try rules.install()
            guarded.withLock {
                $0.state.inPlace = true
                $0.state.restored += 1
                $0.state.lastRestored = Date()
                $0.state.lastError = nil
            }
            logger.warning("masquerade rules (\(rules.backend.rawValue): \(rules.objects.joined(separator: ", "))) were missing or changed; restored")
            return true
        } catch {
            guarded.withLock { $0.state.lastError = error.description }
            logger.error("masquerade rules are missing and could not be restored: \(error)")
            return false
        }
    }

    public func start() {
        thread.start { [self] in
            while wake.wait(timeout: .now() + period) == .timedOut {
                if guarded.withLock({ $0.stopping }) { break }
                checkOnce()
            }
        }
    }

    /// Stops the checks and waits for a check in progress to end, so nothing is reinstalled after this returns.
    public func stop() {
        guarded.withLock { $0.stopping = true }
        thread.stop(wake: { _ = wake.signal() })
    }
}
