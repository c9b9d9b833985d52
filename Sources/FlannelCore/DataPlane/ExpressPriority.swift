import Atomics
import CShims
import Logging
#if canImport(Glibc)
import Glibc
#endif

//  The express lane's thread at a realtime priority, while the CPUs are contended (`up --express-priority`).
//
//  Why: on a busy node a sparse packet waits for the lane's thread to get a CPU. Under a 4-stream iperf3 between
//  two pods a ping's p99 was 4-8 ms, and it stayed at 3-4 ms with nice -20 or a 0.1 ms EEVDF slice
//  (sched_setattr). As SCHED_FIFO the lane's thread runs before every normal task: the p99 fell below 1 ms
//  (bench/README, "Loaded latency: a realtime express lane").
//
//  Why not always: on an idle machine a SCHED_FIFO thread wakes on the CPU it last ran on (the normal scheduler
//  often wakes a thread on its waker's), so more hops wake a halted vCPU with an IPI: a round trip took 60-80 us
//  longer, with five times the IPIs. So the thread is realtime only while the CPUs are busy:
//
//      normal ──a datagram waited > 1 ms in the lane's socket (the thread waits for a CPU)──▶ realtime
//      normal ──a tick finds the CPUs < 25 % idle─────────────────────────────────────────────▶ realtime
//      realtime ──a tick finds the CPUs >= 50 % idle (or cannot read /proc/stat)──────────────▶ normal
//      realtime ──ran 1 ms without sleeping, or 12.5 ms since the last tick (a flood)──▶ normal, held there until
//                                                                                       the next tick
//
//  Ticks come at most once per 250 ms, when the thread is awake anyway (a packet, or its heartbeat timer). The flood
//  rule is the defence: a pod or a peer that floods the lane with short packets gets at most 12.5 ms of realtime
//  per tick (5 % of a CPU), never more than 1 ms at a stretch, then competes like any other thread.
//  SCHED_RESET_ON_FORK keeps the priority from leaking into anything forked.

/// The decisions, without the system calls (so they can be tested without privileges).
struct ExpressPriorityPolicy: Equatable {
    enum Change: Equatable { case none, raise, lower }

    /// A datagram that waited longer than this in the lane's socket shows the thread waiting for a CPU.
    var lateNanoseconds: UInt64 = ExpressPriorityPolicy.defaultLateNanoseconds
    static let defaultLateNanoseconds: UInt64 = 1_000_000
    /// The longest the thread may run at realtime without sleeping.
    var floodNanoseconds: UInt64 = 1_000_000
    /// The most it may run at realtime between two ticks, sleeps or not: 5 % of a 250 ms tick. Sparse traffic
    /// uses a fraction of it (a ping's pass takes 30-100 us).
    var budgetNanoseconds: UInt64 = 12_500_000
    /// Below this share of idle CPU time a tick raises the thread; at or above `quietIdleShare` it lowers it.
    static let contendedIdleShare = 0.25
    static let quietIdleShare = 0.5

    private(set) var realtime = false
    /// Lowered for running too long: not raised again before the next tick.
    private(set) var heldDown = false
    /// How long it has run at realtime since the last tick.
    private(set) var spent: UInt64 = 0

    /// A batch came in whose longest wait in the socket was `sojourn` ns.
    mutating func waited(_ sojourn: UInt64) -> Change {
        guard !realtime && !heldDown && sojourn > lateNanoseconds else { return .none }
        realtime = true
        return .raise
    }

    /// The thread has run `busy` ns since it last woke, without sleeping, `delta` of them since the last call.
    mutating func ran(_ busy: UInt64, delta: UInt64) -> Change {
        guard realtime else { return .none }
        spent &+= delta
        guard busy > floodNanoseconds || spent > budgetNanoseconds else { return .none }
        realtime = false
        heldDown = true
        return .lower
    }

    /// A tick: `idleShare` is the share of CPU time the machine spent idle since the last one (nil: unknown,
    /// which counts as idle, so an unreadable /proc/stat leaves the thread realtime for one tick at most).
    mutating func tick(idleShare: Double?) -> Change {
        heldDown = false
        spent = 0
        let idle = idleShare ?? 1
        if realtime && idle >= ExpressPriorityPolicy.quietIdleShare {
            realtime = false
            return .lower
        }
        if !realtime && idle < ExpressPriorityPolicy.contendedIdleShare {
            realtime = true
            return .raise
        }
        return .none
    }
}

/// The machine's CPU time so far, from the first line of /proc/stat, in clock ticks.
struct CPUTimes: Equatable {
    /// idle + iowait.
    var idle: UInt64
    /// user + nice + system + idle + iowait + irq + softirq + steal (guest time is already in user and nice).
    var total: UInt64

    /// Parses "cpu  user nice system idle [iowait irq softirq steal ...]\n..." (the first line only); nil when the
    /// text does not start with that line or a number does not fit.
    static func parse(_ text: UnsafeRawBufferPointer) -> CPUTimes? {
        // Byte by byte, no allocation: it runs on the lane's thread.
        guard text.count > 4, text[0] == UInt8(ascii: "c"), text[1] == UInt8(ascii: "p"), text[2] == UInt8(ascii: "u"),
              text[3] == UInt8(ascii: " ") else { return nil }
        var idle: UInt64 = 0
        var total: UInt64 = 0
        var count = 0
        var value: UInt64 = 0
        var inNumber = false
        var i = 4
        while i <= text.count {
            let byte: UInt8 = i < text.count ? text[i] : UInt8(ascii: "\n")
            if byte >= UInt8(ascii: "0") && byte <= UInt8(ascii: "9") {
                let (times10, o1) = value.multipliedReportingOverflow(by: 10)
                let (sum, o2) = times10.addingReportingOverflow(UInt64(byte &- UInt8(ascii: "0")))
                if o1 || o2 { return nil }
                value = sum
                inNumber = true
            } else if byte == UInt8(ascii: " ") || byte == UInt8(ascii: "\n") {
                if inNumber {
                    if count < 8 {  // user nice system idle iowait irq softirq steal
                        let (t, o) = total.addingReportingOverflow(value)
                        if o { return nil }
                        total = t
                        if count == 3 || count == 4 { idle &+= value }  // <= total, so it cannot overflow
                    }
                    count += 1
                    value = 0
                    inNumber = false
                }
                if byte == UInt8(ascii: "\n") { break }
            } else {
                return nil
            }
            i += 1
        }
        return count >= 4 ? CPUTimes(idle: idle, total: total) : nil
    }
}

/// Reads the machine's idle share between two calls from /proc/stat (or, in tests, any file in its format). The
/// file is opened once; each sample is one pread into a buffer allocated once.
final class CPUIdleSampler {
    private let fd: Int32
    /// Why the file could not be opened, when it could not.
    let openError: SystemError?
    private let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 8)
    private var last: CPUTimes?

    init(path: String) {
        fd = open(path, O_RDONLY | O_CLOEXEC)
        openError = fd < 0 ? SystemError("open", path, errno: errno) : nil
    }

    deinit {
        if fd >= 0 { close(fd) }
        buffer.deallocate()
    }

    /// The share of CPU time spent idle since the previous call (0...1); nil on the first call, when the file
    /// cannot be read or parsed, or when no time has passed.
    func idleShare() -> Double? {
        guard fd >= 0 else { return nil }
        let n = pread(fd, buffer.baseAddress, buffer.count, 0)
        guard n > 0, let now = CPUTimes.parse(UnsafeRawBufferPointer(rebasing: buffer[0..<n])) else {
            last = nil
            return nil
        }
        defer { last = now }
        guard let last, now.total > last.total, now.idle >= last.idle else { return nil }
        return min(1, Double(now.idle - last.idle) / Double(now.total - last.total))
    }
}

/// What the express lane's thread has done with its priority, for `status` and `/metrics`.
public struct ExpressPriorityCounts: Codable, Equatable, Sendable {
    /// The SCHED_FIFO priority it takes when raised.
    public var priority: Int
    /// It runs at that priority now.
    public var realtime: Bool
    /// Times it was raised, and times it was lowered for a flood (1 ms without sleeping, or its 12.5 ms of
    /// realtime per tick spent).
    public var raised: UInt64
    public var floodLowered: UInt64
    /// The kernel refused the priority (the error, once); the thread then keeps the normal scheduler.
    public var refused: String?
}

/// The express lane thread's side of it: applies `ExpressPriorityPolicy` to the calling thread. Used only by that
/// thread (`DuplexLoop`), except the atomics and `refusal`, which `counts` reads from anywhere.
final class ExpressPriority: @unchecked Sendable {
    let priority: Int32
    private let threadName: String
    private var policy: ExpressPriorityPolicy
    private let sampler: CPUIdleSampler
    private let tickNanoseconds: UInt64 = 250_000_000
    private var nextTick: UInt64 = 0
    /// The time of the last pass (`passed`).
    private var lastPass: UInt64 = 0
    private let logger: Logger
    private let realtime = ManagedAtomic<Bool>(false)
    private let raised = ManagedAtomic<UInt64>(0)
    private let floodLowered = ManagedAtomic<UInt64>(0)
    /// Set once, when the kernel refuses the priority; from then on the thread stays normal.
    private let refusal = ManagedAtomic<Bool>(false)
    private var refusalText: String?

    init(priority: Int32, threadName: String, statPath: String, lateNanoseconds: UInt64, logger: Logger) {
        precondition(priority >= 1 && priority <= 99)
        self.priority = priority
        self.threadName = threadName
        self.logger = logger
        sampler = CPUIdleSampler(path: statPath)
        policy = ExpressPriorityPolicy(lateNanoseconds: lateNanoseconds)
        if let error = sampler.openError {
            logger.warning("the express lane cannot watch the CPUs' load: \(error); it is raised only by late packets, and lowered at every tick")
        }
    }

    var counts: ExpressPriorityCounts {
        ExpressPriorityCounts(priority: Int(priority), realtime: realtime.load(ordering: .relaxed),
                              raised: raised.load(ordering: .relaxed),
                              floodLowered: floodLowered.load(ordering: .relaxed),
                              refused: refusal.load(ordering: .acquiring) ? refusalText : nil)
    }

    /// After each pass of the lane's loop: the longest wait of a datagram it received (ns, 0 if none), when the
    /// thread last woke and the time now (CLOCK_MONOTONIC ns).
    @inline(__always)
    func passed(sojourn: UInt64, woke: UInt64, now: UInt64) throws(SystemError) {
        if sojourn != 0 { try apply(policy.waited(sojourn), flood: false) }
        let since = max(lastPass, woke)
        lastPass = now
        try apply(policy.ran(now &- woke, delta: now &- since), flood: true)
        try tickIfDue(now)
    }

    /// Once the tick interval has passed since the last tick: samples the CPUs' idle share and applies the policy.
    @inline(__always)
    func tickIfDue(_ now: UInt64) throws(SystemError) {
        guard now >= nextTick else { return }
        nextTick = now &+ tickNanoseconds
        try apply(policy.tick(idleShare: sampler.idleShare()), flood: false)
    }

    /// At the thread's start: raises and lowers it once, so that a kernel that refuses the priority says so in the
    /// log when the daemon starts, not at the first busy moment (and the policy stops trying).
    func probe() throws(SystemError) {
        if raise() { try setScheduler(realtime: false) }
    }

    /// Drops to the normal scheduler when the thread ends (a thread's policy would not outlive it anyway, but a
    /// test that runs the loop on its own thread must get that thread back as it was).
    func lowerIfRaised() throws(SystemError) {
        if realtime.load(ordering: .relaxed) { try setScheduler(realtime: false) }
    }

    private func apply(_ change: ExpressPriorityPolicy.Change, flood: Bool) throws(SystemError) {
        switch change {
        case .none: return
        case .raise:
            if raise() { raised.wrappingIncrement(ordering: .relaxed) }
        case .lower:
            guard realtime.load(ordering: .relaxed) else { return }
            // Fatal when refused: a thread stuck at realtime under a flood would starve its CPU.
            try setScheduler(realtime: false)
            if flood { floodLowered.wrappingIncrement(ordering: .relaxed) }
        }
    }

    /// SCHED_FIFO, unless the kernel has refused it before; true when the thread is now realtime. A refusal is not
    /// fatal (the lane forwards as before, at the normal scheduler's latency) and is said once.
    private func raise() -> Bool {
        guard !refusal.load(ordering: .relaxed) else { return false }
        do throws(SystemError) {
            try setScheduler(realtime: true)
            return true
        } catch {
            refusalText = "\(error)"
            refusal.store(true, ordering: .releasing)
            logger.warning("the express lane keeps the normal scheduler: \(error) (SCHED_FIFO needs CAP_SYS_NICE or RLIMIT_RTPRIO >= \(priority), e.g. systemd's LimitRTPRIO=, and no RestrictRealtime=; with realtime group scheduling, realtime runtime in the cgroup)")
            return false
        }
    }

    /// SCHED_RESET_ON_FORK, or'ed into both policies (and into what sched_getscheduler reports).
    static let resetOnFork = Int32(FU_SCHED_RESET_ON_FORK)

    /// sched_setscheduler on the calling thread (pid 0): SCHED_FIFO at `priority`, or SCHED_OTHER.
    private func setScheduler(realtime on: Bool) throws(SystemError) {
        var param = sched_param(sched_priority: on ? priority : 0)
        let policy = (on ? SCHED_FIFO : SCHED_OTHER) | ExpressPriority.resetOnFork
        if sched_setscheduler(0, policy, &param) != 0 {
            throw SystemError(on ? "sched_setscheduler SCHED_FIFO \(priority)" : "sched_setscheduler SCHED_OTHER",
                              threadName, errno: errno)
        }
        realtime.store(on, ordering: .relaxed)
    }
}
