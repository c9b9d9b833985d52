import Atomics
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// What every forwarding worker has and does: a thread name, the descriptor it waits on, the stop eventfd, a
/// heartbeat, its `PacketDecider` and the scratch buffer it builds ICMP errors in, and the loop that waits, takes
/// a batch in and hands it on. The two directions (`TunToUDPWorker`, `UDPToTunWorker`) say only how a batch comes
/// in and what becomes of each packet; the I/O and the offloads live in their stages (`TunReader`, `UDPSender`,
/// `UDPReceiver`, `TunWriter`).
/// What a worker is told about its place: its thread's name, the stop eventfd, and what every decision needs.
struct WorkerSetup {
    let threadName: String
    let stopFD: Int32
    let table: RouteTable
    let config: ForwardingConfig
    let counters: DataPlaneCounters
    let options: ForwarderOptions
}

class ForwardingWorker {
    let threadName: String
    let options: ForwarderOptions
    let stopFD: Int32
    let table: RouteTable
    let counters: DataPlaneCounters
    var decider: PacketDecider
    /// Where the decider builds ICMP errors (576 bytes is the most they need).
    let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: 2048, alignment: 64)
    /// Bumped (relaxed, no lock) on every pass of the poll loop; see `Forwarder.heartbeats`.
    let heartbeat = ManagedAtomic<UInt64>(0)

    init(_ setup: WorkerSetup) {
        threadName = setup.threadName
        stopFD = setup.stopFD
        table = setup.table
        counters = setup.counters
        options = setup.options
        decider = PacketDecider(config: setup.config)
    }

    deinit { scratch.deallocate() }

    /// The descriptor whose readability means work.
    var inputFD: Int32 { preconditionFailure("a worker names its input") }

    /// Takes one batch in: how many packets or datagrams (0 when nothing was waiting), and whether the input has
    /// nothing more for now.
    func takeBatch() throws(SystemError) -> (count: Int, drained: Bool) {
        preconditionFailure("a worker takes its batches in")
    }

    /// Decides each packet of the batch just taken and hands it over.
    func handleBatch(_ count: Int) throws(SystemError) { preconditionFailure("a worker handles its batches") }

    /// Processes input until it would block or `options.batchesPerWakeup` batches are done; returns the number
    /// of packets taken in. Throws only fatal errors.
    final func drain() throws(SystemError) -> Int {
        var total = 0
        var batches = 0
        while batches < options.batchesPerWakeup {
            let (n, drained) = try takeBatch()
            if n == 0 { break }
            total += n
            try handleBatch(n)
            batches += 1
            if drained { break }
        }
        return total
    }

    /// A packet the decider dropped: counted by reason (and as rate-limited when an ICMP error was suppressed).
    @inline(__always)
    final func dropped(_ reason: DropReason, limited: Bool) {
        counters.countDrop(reason)
        if limited { counters.icmpRateLimited.wrappingIncrement(ordering: .relaxed) }
    }

    /// poll(input, stop) -> drain, until the stop eventfd is readable or a fatal error. The poll times out after
    /// `options.heartbeatMilliseconds`, so the heartbeat moves while the input is idle.
    final func run() throws(SystemError) {
        var fds = [pollfd(fd: inputFD, events: Int16(POLLIN), revents: 0),
                   pollfd(fd: stopFD, events: Int16(POLLIN), revents: 0)]
        let timeout = options.heartbeatMilliseconds
        while true {
            heartbeat.wrappingIncrement(ordering: .relaxed)
            let n = fds.withUnsafeMutableBufferPointer { poll($0.baseAddress, 2, timeout) }
            if n < 0 {
                let e = errno
                if e == EINTR { continue }
                throw SystemError("poll", threadName, errno: e)
            }
            if fds[1].revents != 0 { return }
            let revents = Int32(fds[0].revents)
            if revents & Int32(POLLNVAL) != 0 { throw SystemError("poll", threadName, errno: EBADF) }
            if revents & Int32(POLLIN) != 0 || revents & Int32(POLLERR) != 0 {
                _ = try drain()
            } else if revents & Int32(POLLHUP) != 0 {
                // The other end of a test socketpair went away (a tun never hangs up): nothing more will come.
                return
            }
        }
    }
}

/// `count` packet buffers of `size` bytes each, allocated once per stage, and the length of what each holds.
final class PacketBuffers {
    let count: Int
    let size: Int
    let memory: UnsafeMutableRawBufferPointer
    let lengths: UnsafeMutablePointer<Int>

    init(count: Int, size: Int) {
        self.count = count
        self.size = size
        memory = .allocate(byteCount: count * size, alignment: 64)
        lengths = .allocate(count: count, initializedTo: 0)
    }

    @inline(__always)
    func packet(_ i: Int) -> UnsafeMutableRawPointer { memory.baseAddress! + i &* size }

    deinit {
        memory.deallocate()
        lengths.deallocate()
    }
}
