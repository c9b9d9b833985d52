import CShims
#if canImport(Glibc)
import Glibc
#endif

/// A self-pipe for waking a thread that sleeps in poll(): the read end goes into the poll set, `wake()` makes it
/// readable and keeps it so (it is never drained), so every poller sees the stop request.
public final class WakePipe: @unchecked Sendable {  // both fds are immutable; write/poll on pipes are thread-safe
    public let readFD: Int32
    private let writeFD: Int32

    /// Both ends close-on-exec and non-blocking from the start (pipe2: no moment in which a child that another
    /// thread spawns could inherit them).
    public init() throws(SystemError) {
        var fds: [Int32] = [-1, -1]
        try syscall("create", "wake pipe") { fu_pipe2(&fds, O_CLOEXEC | O_NONBLOCK) }
        readFD = fds[0]
        writeFD = fds[1]
    }

    /// Makes `readFD` readable. Safe from any thread, any number of times.
    public func wake() {
        var b: UInt8 = 1
        _ = write(writeFD, &b, 1)
    }

    /// Empties the pipe, so that a thread started again after a `wake()` does not see it at once.
    public func drain() {
        var buffer = [UInt8](repeating: 0, count: 64)
        while read(readFD, &buffer, buffer.count) > 0 {}
    }

    deinit {
        _ = close(readFD)
        _ = close(writeFD)
    }
}
