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
    /// It is one of the express lane's pair.
    let express: Bool
}

class ForwardingWorker {
    let threadName: String
    let options: ForwarderOptions
    /// Set (then the thread woken with the wake signal) by `Forwarder.stop()` or a failing worker.
    let stopRequested: ManagedAtomic<Bool>
    let table: RouteTable
    let counters: DataPlaneCounters
    /// Only this worker's thread uses it, one call at a time, and nothing it calls reaches back to it; so no
    /// run-time exclusivity check. The check cost every packet a tracked access (a thread-local look-up, an
    /// access-set insert and a removal); with the retains it was a third of the UDP -> tun thread's user time
    /// (bench/README.md, "The per-packet path").
    @exclusivity(unchecked) var decider: PacketDecider
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

    /// The descriptor it takes its batches from (a tun queue or a socket).
    var input: Int32 { preconditionFailure("a worker has an input") }

    /// Decides each packet of the batch just taken and hands it over.
    func handleBatch(_ count: Int) throws(SystemError) { preconditionFailure("a worker handles its batches") }

    /// Processes input until it would block or `limit` batches (default `options.batchesPerWakeup`) are done;
    /// returns the number of packets taken in. `wait`: the first batch blocks until there is one. Throws only
    /// fatal errors.
    final func drain(wait: Bool = false, batches limit: Int? = nil) throws(SystemError) -> Int {
        let limit = limit ?? options.batchesPerWakeup
        var total = 0
        var batches = 0
        var blocking = wait
        while batches < limit {
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
        try withHeartbeatTimer(threadName, options) { () throws(SystemError) in
            while true {
                heartbeat.wrappingIncrement(ordering: .relaxed)
                if stopRequested.load(ordering: .acquiring) { return }
                _ = try drain(wait: true)
                if hungUp { return }
            }
        }
    }
}

/// What a forwarding thread runs: one worker (`ForwardingWorker.run`), or both of the express lane's
/// (`DuplexLoop.run`).
protocol ForwardingThread: AnyObject {
    var threadName: String { get }
    func run() throws(SystemError)
}

extension ForwardingWorker: ForwardingThread {}

/// Runs `body` with this thread's heartbeat timer armed: the wake signal every `heartbeatMilliseconds`.
private func withHeartbeatTimer(_ threadName: String, _ options: ForwarderOptions,
                                _ body: () throws(SystemError) -> Void) throws(SystemError) {
    var timer: UnsafeMutableRawPointer?
    try syscall("create the heartbeat timer of", threadName) {
        fu_wake_timer_create(options.heartbeatMilliseconds, &timer)
    }
    defer { _ = fu_wake_timer_delete(timer) }
    try body()
}

/// Both workers of the express lane's pair on one thread: it sleeps in one poll() on the pair's tun queue and
/// socket and drains both without blocking, as flannel's proxy does with its one thread.
///
/// Why (bench/README, "Idle latency: one thread for the express lane"): a request that leaves through the lane is
/// usually answered through it. With a thread per direction, the node that receives the request wakes a second
/// sleeping thread for the answer; on a virtual machine that is an IPI to a halted vCPU. With one thread the
/// answer is already queued on the tun when the thread's write of the request returns (the kernel answers inside
/// that write), so the thread forwards it without sleeping. The flow pairs keep a thread per direction: they carry
/// the bulk, where two threads move more than one and a wake-up per batch is cheap. The lane carries short packets
/// only, so one thread for both of its directions is not what limits it.
///
/// Such a packet usually comes alone, after milliseconds in which the caches forgot the lane. So after a pass
/// that found an input empty, the next look at it takes one packet and sends it at once (`forwardOne`,
/// `deliverOne`: one read and one sendto, or one recvmmsg with one header and one write), past the batch
/// machinery, whose every line would be a miss. Once an input had packets, the next pass takes a batch again.
///
/// `options.expressSpinMicroseconds` (`up --express-spin`, 50 by default) makes the thread keep looking at both
/// inputs that long after its last packet, yielding the CPU between looks, before it sleeps: it shortens the idle
/// round trip (bench/README, "Idle: a spin within a budget") at up to that much CPU for every short packet that
/// arrives alone. It spins only while the flow pairs have been quiet (`FlowsQuiet`): with bulk flows running, a
/// spinning lane made more of their segments arrive out of order. `SpinBudget` bounds what it can cost: however
/// the lone packets come, the spin takes at most `options.expressSpinBudgetPerMille` of a CPU, past a burst.
/// (Before the thread went realtime under load, spinning also lengthened the loaded round trip: a thread that
/// spins loses the scheduler's preference for one that wakes up. bench/README measures both.)
final class DuplexLoop: ForwardingThread {
    let threadName: String
    private let first: TunToUDPWorker
    private let second: UDPToTunWorker
    private let spinNanoseconds: UInt64
    /// What the spin may still take (`SpinBudget`). Only this thread touches it, so no run-time exclusivity
    /// check (as for `ForwardingWorker.decider`).
    @exclusivity(unchecked) private var spinBudget: SpinBudget
    // What the spin did (`spinCounts`): written by this thread once per spin, read by `status`.
    private let spins = ManagedAtomic<UInt64>(0)
    private let spun = ManagedAtomic<UInt64>(0)
    private let spinsCut = ManagedAtomic<UInt64>(0)
    private let spinsHeld = ManagedAtomic<UInt64>(0)
    /// The flow pairs' counters, and whether they have been quiet long enough for a spin (`FlowsQuiet`).
    private let flows: [WorkerCounters]
    @exclusivity(unchecked) private var flowsQuiet: FlowsQuiet
    /// Raises the thread to a realtime priority while the CPUs are contended (nil: never).
    private let priority: ExpressPriority?

    /// Polls both workers' inputs (descriptors the forwarder left blocking: the workers read them with RWF_NOWAIT
    /// and MSG_DONTWAIT here, never blocking).
    /// `flows`: the other pairs' counters (the spin waits for them to be quiet).
    init(threadName: String, _ first: TunToUDPWorker, _ second: UDPToTunWorker, flows: [WorkerCounters],
         priority: ExpressPriority? = nil) {
        self.threadName = threadName
        self.first = first
        self.second = second
        self.flows = flows
        self.priority = priority
        let options = first.options
        let now = DuplexLoop.now()
        spinNanoseconds = UInt64(options.expressSpinMicroseconds) &* 1000
        spinBudget = SpinBudget(perMille: options.expressSpinBudgetPerMille,
                                capacity: ForwarderOptions.expressSpinBurstNanoseconds, now: now)
        flowsQuiet = FlowsQuiet(window: ForwarderOptions.expressSpinQuietNanoseconds,
                                total: DuplexLoop.packets(of: flows), now: now)
    }

    /// What the flow pairs have moved so far, both ways.
    @inline(__always)
    private static func packets(of flows: [WorkerCounters]) -> UInt64 {
        var total: UInt64 = 0
        var i = 0
        while i < flows.count {
            // An index loop: `for c in flows` allocated on every call in a debug build (the lane's zero-allocation
            // proof counted it).
            let pair = flows[i]
            total &+= pair.tunToUDPPackets.load(ordering: .relaxed) &+ pair.udpToTunPackets.load(ordering: .relaxed)
            i &+= 1
        }
        return total
    }

    /// Until the stop flag is set (the wake signal ends the poll with EINTR) or a fatal error, which stops the
    /// forwarder like any worker's. Both workers' heartbeats move on every pass, so the watchdog sees the lane as two
    /// workers that are both alive.
    func run() throws(SystemError) {
        try withHeartbeatTimer(threadName, first.options) { () throws(SystemError) in
            try priority?.probe()
            var fds = (pollfd(fd: first.input, events: Int16(POLLIN), revents: 0),
                       pollfd(fd: second.input, events: Int16(POLLIN), revents: 0))
            while true {
                if beat() { break }
                let rc = withUnsafeMutableBytes(of: &fds) { raw in
                    poll(raw.baseAddress!.assumingMemoryBound(to: pollfd.self), 2, -1)
                }
                if rc < 0 {
                    let e = errno
                    guard e == EINTR else { throw SystemError("poll", threadName, errno: e) }
                    // The wake signal: the heartbeat timer (a tick for the priority, when one is due) or a stop.
                    try priority?.tickIfDue(DuplexLoop.now())
                    continue
                }
                if try forwardWhileBusy() { break }
            }
            try priority?.lowerIfRaised()
        }
    }

    /// Moves both heartbeats; true when the stop flag is set.
    @inline(__always)
    private func beat() -> Bool {
        first.heartbeat.wrappingIncrement(ordering: .relaxed)
        second.heartbeat.wrappingIncrement(ordering: .relaxed)
        return first.stopRequested.load(ordering: .acquiring)
    }

    /// Drains both inputs, one batch of each per pass (one packet, after a pass that found the input empty), until
    /// neither has had anything for the spin time. Returns true when the thread should end: the stop flag is set
    /// (looked at on every pass, so a stop is seen under a flood too) or an input hung up (only a test socketpair's end
    /// does). After each pass the priority sees how long the datagrams waited and how long the thread has run since it
    /// woke. One batch each keeps a pass short (at most 2 x `batchSize` short packets, well under a millisecond), so
    /// the flood rule, which can only act between passes, lowers a flooded thread close to its 1 ms and 12.5 ms marks:
    /// with `batchesPerWakeup` batches each, a pass under a flood took up to 29-31 ms (measured), and a second of flood
    /// got the thread 81 ms of realtime instead of at most 5 x 12.5.
    ///
    /// The spin is the time from the first pass that finds both inputs empty until a packet comes or the thread
    /// gives up: charged to the budget either way, and it ends early when the budget runs out.
    func forwardWhileBusy() throws(SystemError) -> Bool {
        let woke = DuplexLoop.now()
        var lastPacket = woke
        var spinStart: UInt64 = 0  // 0: not spinning (CLOCK_MONOTONIC is never 0 here: it counts from boot)
        // Whether each input had packets on the last pass: if not, the next look takes one packet past the batch
        // machinery (`forwardOne`, `deliverOne`); if so, a batch.
        var tunBusy = false
        var socketBusy = false
        while true {
            let fromTun = try tunBusy ? first.drain(batches: 1) : first.forwardOne()
            let fromSocket = try socketBusy ? second.drain(batches: 1) : second.deliverOne()
            tunBusy = fromTun > 0
            socketBusy = fromSocket > 0
            let moved = fromTun &+ fromSocket
            if first.hungUp || second.hungUp { return true }
            if beat() { return true }
            let now = DuplexLoop.now()
            if let priority { try priority.passed(sojourn: second.takeLongestSojourn(), woke: woke, now: now) }
            if moved > 0 {
                if spinStart != 0 {
                    spinEnded(now &- spinStart, now: now, cut: false)
                    spinStart = 0
                }
                lastPacket = now
                continue
            }
            if spinNanoseconds == 0 { return false }
            if spinStart == 0 {
                guard flowsQuiet.isQuiet(total: DuplexLoop.packets(of: flows), now: now) else {
                    spinsHeld.wrappingIncrement(ordering: .relaxed)
                    return false
                }
                spinStart = now
            }
            if now &- lastPacket >= spinNanoseconds {
                spinEnded(now &- spinStart, now: now, cut: false)
                return false
            }
            if !spinBudget.allows(spun: now &- spinStart, now: now) {
                spinEnded(now &- spinStart, now: now, cut: true)
                return false
            }
            sched_yield()
        }
    }

    /// A spin of `length` ns is over: a packet came, the spin time passed, or (`cut`) the budget ran out.
    @inline(__always)
    private func spinEnded(_ length: UInt64, now: UInt64, cut: Bool) {
        spinBudget.charge(length, now: now)
        spins.wrappingIncrement(ordering: .relaxed)
        spun.wrappingIncrement(by: length, ordering: .relaxed)
        if cut { spinsCut.wrappingIncrement(ordering: .relaxed) }
    }

    /// What the spin has done so far (from any thread).
    var spinCounts: ExpressSpinCounts {
        ExpressSpinCounts(microseconds: Int(spinNanoseconds / 1000),
                          budgetPerMille: first.options.expressSpinBudgetPerMille,
                          spins: spins.load(ordering: .relaxed), spunNanoseconds: spun.load(ordering: .relaxed),
                          cut: spinsCut.load(ordering: .relaxed), held: spinsHeld.load(ordering: .relaxed))
    }

    @inline(__always)
    private static func now() -> UInt64 { MonotonicClock.nanoseconds() }
}

/// The clock of the express lane's spin (and of bench/tun-bound's, which spins the same way).
package enum MonotonicClock {
    /// CLOCK_MONOTONIC in nanoseconds (vDSO, no system call). Not the rate limiters' clock
    /// (`ICMPRateLimiter.coarseMonotonicNanoseconds`): it moves once per scheduler tick (4 ms at HZ=250), which
    /// would turn a 50 us spin into milliseconds.
    @inline(__always)
    package static func nanoseconds() -> UInt64 {
        var ts = timespec()
        _ = clock_gettime(CLOCK_MONOTONIC, &ts)  // cannot fail for CLOCK_MONOTONIC with a valid pointer
        return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
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
