#if canImport(Glibc)
import Glibc
#endif

/// The daemon's signals, taken synchronously: SIGINT and SIGTERM stop it, SIGHUP re-reads the peers file. They
/// are blocked in every thread (`block()` before any thread exists, so all inherit the mask) and collected by one
/// thread with sigwait, so no handler runs at an arbitrary point and a signal sent before the wait stays pending.
enum ProcessSignals {
    static let handled = [SIGINT, SIGTERM, SIGHUP]

    private static var set: sigset_t {
        var set = sigset_t()
        sigemptyset(&set)
        for s in handled { sigaddset(&set, s) }
        return set
    }

    /// Blocks the handled signals in the calling thread and, through inheritance, in every thread it starts.
    static func block() {
        var set = self.set
        pthread_sigmask(SIG_BLOCK, &set, nil)
    }

    /// Waits until SIGINT or SIGTERM arrives and returns it; calls `reload` for each SIGHUP meanwhile.
    static func wait(reload: () -> Void) -> Int32 {
        var set = self.set
        while true {
            var sig: Int32 = 0
            guard sigwait(&set, &sig) == 0 else { continue }
            if sig == SIGHUP {
                reload()
                continue
            }
            return sig
        }
    }
}
