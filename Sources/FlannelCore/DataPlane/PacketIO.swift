import Logging
#if canImport(Glibc)
import Glibc
#endif

/// The one funnel of the data path's system calls (read/write/writev on the tun, recvmmsg/sendmmsg/sendto on the
/// socket) and its one errno policy, so no call site judges an errno on its own:
///
/// - EINTR: retried here, except in a call made `interruptible` (a worker's blocking receive, which the wake signal
///   interrupts): `.wouldBlock`, so the worker looks at its stop flag and bumps its heartbeat.
/// - EAGAIN/EWOULDBLOCK: `.wouldBlock` (the input is drained, or the output full for now).
/// - EBADF, EBADFD, EFAULT, ENOTSOCK, ENXIO, ENODEV (plus what a call site names as fatal for it): the descriptor
///   is unusable or this is a bug; thrown as `SystemError` naming the call, its object and the errno. The worker
///   stops and takes the data plane down with it.
/// - Anything else: `.failed(errno)`, a per-packet failure (a full tun queue, an unreachable peer, a refused GSO
///   send): the caller counts the packet by drop reason and logs at most once a second (`dropped`).
enum PacketIO {
    enum Result {
        case done(Int)
        case wouldBlock
        case failed(Int32)
    }

    /// Errors after which a descriptor is unusable: stop the worker rather than spin on them.
    static func isFatal(_ e: Int32) -> Bool {
        e == EBADF || e == EBADFD || e == EFAULT || e == ENOTSOCK || e == ENXIO || e == ENODEV
    }

    /// Runs `body` (a syscall returning -1 with errno set on failure) under the policy above. `alsoFatal`: one
    /// more errno that is fatal for this call (EINVAL for recvmmsg: its arguments are ours).
    @inline(__always)
    static func call(_ operation: StaticString, _ object: String, alsoFatal: Int32 = 0, interruptible: Bool = false,
                     _ body: () -> Int) throws(SystemError) -> Result {
        while true {
            let n = body()
            if n >= 0 { return .done(n) }
            let e = errno
            if e == EINTR {
                if interruptible { return .wouldBlock }
                continue
            }
            if e == EAGAIN || e == EWOULDBLOCK { return .wouldBlock }
            if isFatal(e) || (alsoFatal != 0 && e == alsoFatal) {
                throw SystemError("\(operation)", object, errno: e)
            }
            return .failed(e)
        }
    }

    /// A one-packet write or send that did not go through (`.wouldBlock` or `.failed`): counted as `reason` and
    /// logged at most once a second as `what`. The packet is dropped, never retried in a loop (flannel
    /// busy-retries a full tun).
    static func dropped(_ result: Result, _ reason: DropReason, _ what: @autoclosure () -> String,
                        _ limiter: inout LogLimiter, _ io: StageIO) {
        io.counters.countDrop(reason)
        switch result {
        case .failed(let e): limiter.warn(io.logger, what(), e)
        case .wouldBlock: limiter.warn(io.logger, what(), EAGAIN)
        case .done: break
        }
    }
}

/// What each I/O stage of a worker pair (`TunReader`, `UDPSender`, `UDPReceiver`, `TunWriter`) works with: its
/// descriptor (a tun queue or a socket) and the name its errors and log lines give it, and where it counts and
/// logs: the data plane's counters, the pair's own, the offloads' evidence, the logger. Built by `Forwarder`; each
/// stage keeps its own `LogLimiter` beside it.
struct StageIO {
    let fd: Int32
    let name: String
    let counters: DataPlaneCounters
    let worker: WorkerCounters
    let offloads: OffloadState
    let logger: Logger
}

/// At most one log line per second (or per `intervalNanoseconds`) for per-packet errors, with the number
/// suppressed since. One per worker stage; the control endpoint uses one for refused clients.
package struct LogLimiter {
    private var last: UInt64 = 0
    private var suppressed: UInt64 = 0
    private let interval: UInt64

    package init(intervalNanoseconds: UInt64 = 1_000_000_000) { interval = intervalNanoseconds }

    package mutating func allow() -> (Bool, UInt64) {
        let now = ICMPRateLimiter.coarseMonotonicNanoseconds()
        if last != 0 && now &- last < interval {
            suppressed &+= 1
            return (false, 0)
        }
        last = now
        defer { suppressed = 0 }
        return (true, suppressed)
    }

    /// Logs a per-packet error as a warning, at most once a second, with how many were suppressed since.
    mutating func warn(_ logger: Logger, _ what: @autoclosure () -> String, _ e: Int32) {
        let (ok, suppressed) = allow()
        guard ok else { return }
        logger.warning("\(what()): \(SystemError.describe(e))",
                       metadata: suppressed > 0 ? ["suppressed": "\(suppressed)"] : [:])
    }
}
