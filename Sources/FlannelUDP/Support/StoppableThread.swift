import Foundation
import Synchronization

/// A named thread running one loop, and a stop that waits for it: nothing the loop does happens after `stop`
/// returns. May be started again after a stop. How the loop is told to end is its owner's (a WakePipe, a
/// semaphore): `stop` takes that as `wake`.
final class StoppableThread: Sendable {
    private let name: String
    /// Whether the thread was started (and not yet stopped).
    private let started = Mutex(false)
    private let finished = DispatchSemaphore(value: 0)

    init(name: String) { self.name = name }

    func start(_ loop: @escaping @Sendable () -> Void) {
        let t = Thread { [finished] in
            loop()
            finished.signal()
        }
        t.name = name
        started.withLock { $0 = true }
        t.start()
    }

    /// Calls `wake`, which must make the loop return, and waits until it has; does nothing if not started.
    func stop(wake: () -> Void) {
        guard started.withLock({ $0 }) else { return }
        wake()
        finished.wait()
        started.withLock { $0 = false }
    }
}
