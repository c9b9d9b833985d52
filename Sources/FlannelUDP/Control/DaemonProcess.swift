import CShims
#if canImport(Glibc)
import Glibc
#endif

/// Who answered on the control socket, once the client has checked it: root, and the very process the state file
/// records (same pid, same start time).
public struct DaemonIdentity: Equatable, Sendable {
    public let pid: pid_t
    public let startTicks: UInt64
}

/// A verified daemon held by a pidfd, so that a signal can only ever reach that process: a pid can be reused the
/// moment the daemon exits, a pidfd cannot.
public final class DaemonProcess {
    public let identity: DaemonIdentity
    private let pidfd: Int32

    /// Opens a pidfd for `identity.pid`, then checks that the process it names still started at
    /// `identity.startTicks` (checked after opening: from then on the pidfd cannot drift to another process).
    /// Nil when the process is gone (or is no longer the one that was verified): there is nothing to signal.
    /// pid 0, 1 and negative pids are refused outright.
    public init?(_ identity: DaemonIdentity) throws(FlannelError) {
        guard identity.pid > 1 else { throw .failed("refusing to signal pid \(identity.pid)") }
        let fd = fu_pidfd_open(identity.pid)
        if fd < 0 {
            if errno == ESRCH { return nil }
            throw .system(SystemError.current("pidfd_open", "pid \(identity.pid)"))
        }
        guard DaemonState.startTicks(of: identity.pid) == identity.startTicks else {
            _ = close(fd)
            return nil
        }
        self.identity = identity
        pidfd = fd
    }

    deinit { _ = close(pidfd) }

    /// Sends `signal` through the pidfd. A process that has already exited is not an error.
    public func send(_ signal: Int32) throws(SystemError) {
        if fu_pidfd_send_signal(pidfd, signal) != 0 && errno != ESRCH {
            throw SystemError.current("pidfd_send_signal \(signal) to", "pid \(identity.pid)")
        }
    }

    /// Waits up to `milliseconds` for the process to exit (the pidfd becomes readable); true once it has.
    public func waitForExit(milliseconds: Int) -> Bool {
        let deadline = MonotonicClock.milliseconds() + Int64(milliseconds)
        while true {
            var pfd = pollfd(fd: pidfd, events: Int16(POLLIN), revents: 0)
            let remaining = max(0, deadline - MonotonicClock.milliseconds())
            let n = poll(&pfd, 1, Int32(clamping: remaining))
            if n > 0 { return true }
            if n < 0 && errno == EINTR { continue }
            // poll on a pidfd cannot fail but for EINTR/ENOMEM; treat any failure like a timeout.
            return false
        }
    }
}
