import CShims
import Atomics
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// What every forwarding worker has and does: a thread name, the stop flag, a heartbeat, its `PacketDecider` and
/// the scratch buffer it builds ICMP errors in, and the loop that blocks for a batch, takes it in and hands it on. The two directions (`TunToUDPWorker`, `UDPToTunWorker`) say only how a batch comes
/// in and what becomes of each packet; the I/O and the offloads live in their stages (`TunReader`, `UDPSender`,
/// `UDPReceiver`, `TunWriter`).
/// What a worker is told about its place: its thread's name, the stop flag, and what every decision needs.
struct WorkerSetup {
    let threadName: String
    let stopRequested: ManagedAtomic<Bool>
    let table: RouteTable
    let config: ForwardingConfig
    let counters: DataPlaneCounters
    let options: ForwarderOptions
}

class ForwardingWorker {
    let threadName: String
    let options: ForwarderOptions
    /// Set (then the thread woken with the wake signal) by `Forwarder.stop()` or a failing worker.
    let stopRequested: ManagedAtomic<Bool>
    let table: RouteTable
    let counters: DataPlaneCounters
    var decider: PacketDecider
    /// Where the decider builds ICMP errors (576 bytes is the most they need).
    let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: 2048, alignment: 64)
    /// Bumped (relaxed, no lock) on every pass of the loop; see `Forwarder.heartbeats`.
    let heartbeat = ManagedAtomic<UInt64>(0)

    init(_ setup: WorkerSetup) {
        threadName = setup.threadName
        stopRequested = setup.stopRequested
        table = setup.table
        counters = setup.counters
        options = setup.options
        decider = PacketDecider(config: setup.config)
    }

    deinit { scratch.deallocate() }

    /// Takes one batch in: how many packets or datagrams (0 when nothing was waiting, or the wait was
    /// interrupted), and whether the input has nothing more for now. `wait`: block until the first one arrives
    /// (or the wake signal comes); else never block.
    func takeBatch(wait: Bool) throws(SystemError) -> (count: Int, drained: Bool) {
        preconditionFailure("a worker takes its batches in")
    }

    /// The input reported its end (only the other end of a test socketpair going away; a tun never does).
    var hungUp: Bool { false }

    /// Decides each packet of the batch just taken and hands it over.
    func handleBatch(_ count: Int) throws(SystemError) { preconditionFailure("a worker handles its batches") }

    /// Processes input until it would block or `options.batchesPerWakeup` batches are done; returns the number
    /// of packets taken in. `wait`: the first batch blocks until there is one. Throws only fatal errors.
    final func drain(wait: Bool = false) throws(SystemError) -> Int {
        var total = 0
        var batches = 0
        var blocking = wait
        while batches < options.batchesPerWakeup {
            let (n, drained) = try takeBatch(wait: blocking)
            blocking = false
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

    /// Blocking receive -> drain, until the stop flag is set or a fatal error. An idle worker sleeps in its one
    /// blocking call (read on the tun, recvmmsg with MSG_WAITFORONE on the socket): a packet costs no poll and no
    /// extra call that finds the input empty. The wake signal ends the wait with EINTR: sent by `stop()`, and
    /// every `options.heartbeatMilliseconds` by this thread's timer, so the heartbeat moves while the input is
    /// idle, and a stop that raced with the start of the wait is seen at the next tick at the latest.
    final func run() throws(SystemError) {
        var timer: UnsafeMutableRawPointer?
        try syscall("create the heartbeat timer of", threadName) {
            fu_wake_timer_create(options.heartbeatMilliseconds, &timer)
        }
        defer { _ = fu_wake_timer_delete(timer) }
        while true {
            heartbeat.wrappingIncrement(ordering: .relaxed)
            if stopRequested.load(ordering: .acquiring) { return }
            _ = try drain(wait: true)
            if hungUp { return }
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
