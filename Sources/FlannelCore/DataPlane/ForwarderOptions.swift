import CShims

/// Tunables of the data plane's workers.
public struct ForwarderOptions: Sendable {
    /// Packets per batch: tun reads before one sendmmsg, datagrams per recvmmsg.
    public var batchSize: Int
    /// Bytes per packet buffer. 65536 holds any IPv4 packet, TSO super-packets and UDP GRO buffers included (the
    /// tun -> UDP buffers get room for the virtio header on top); a read that fills the whole buffer is treated
    /// as truncated.
    public var bufferSize: Int
    /// How long a worker waits for the socket to become writable when sendmmsg says EAGAIN, before dropping the
    /// rest of the batch as `sendFailed`. Never a busy retry.
    public var sendWaitMilliseconds: Int32
    /// Batches a worker processes per wakeup before it polls again (so a stop request is seen under load).
    public var batchesPerWakeup: Int
    /// Kernel offloads, each probed at start and left off when the kernel refuses it: TSO from the tun (needs a
    /// tun opened with `vnetHeader: true`) with segmentation here, UDP GSO on send, UDP GRO on receive, TCP
    /// coalescing into the tun (needs the vnet header too). False forces the plain path: one packet per read,
    /// write and datagram, as flannel's proxy does (`--no-offload`).
    public var offloads: Bool
    /// Segments the tun -> UDP worker queues before it must send them (one sendmmsg).
    public var sendQueueCapacity: Int
    /// Bytes the tun -> UDP worker reads from the tun before it sends what it has (a batch ends at `batchSize`
    /// packets or at this many bytes, whichever comes first). With TSO one read is a 64 KiB super-packet, so 64
    /// reads would be 4 MiB: more than a core's L2 cache, and the segments would be sent long after they were
    /// read, from memory that has gone cold. A few super-packets per sendmmsg keep both the copy-out and the
    /// pipeline to the peer short. Small packets still batch up to `batchSize`.
    public var readBytesPerBatch: Int
    /// Datagram buffers per recvmmsg when UDP GRO is on (each may hold up to 64 KiB of coalesced datagrams), for
    /// the same reason: 8 keeps a batch in cache between the copy in and the copy out to the tun.
    public var groBatchSize: Int
    /// The longest a worker sleeps in its blocking receive with nothing to do (its timer then wakes it with the
    /// wake signal). Each pass of its loop bumps its heartbeat
    /// (`Forwarder.heartbeats`), so an idle worker still proves it is alive at least this often; the systemd
    /// watchdog pings only while every heartbeat moves.
    public var heartbeatMilliseconds: Int32
    /// The receive side's CoDel (`ReceiveCoDel`): how long bulk flows may keep waiting in the socket queue
    /// before they lose (or get CE on) a packet. `.off` leaves the queue to the kernel's tail drop.
    public var codel: CoDelParameters
    /// The express lane (see `FlowSteering`): IPv4 packets of at most this many bytes, in both directions, go to
    /// the last worker pair, which then carries nothing else (its tun writes are never coalesced and CoDel does
    /// not watch it). nil: no express lane, every pair carries flows.
    public var express: Int?
    /// How long the express lane's thread keeps looking at its tun queue and socket after it last forwarded a
    /// packet, before it sleeps in poll() again (`DuplexLoop`). 0: it sleeps as soon as both are empty.
    public var expressSpinMicroseconds: Int
    /// The most of one CPU, in thousandths, that the spin takes past a burst (`SpinBudget`), whatever the traffic.
    public var expressSpinBudgetPerMille = ForwarderOptions.defaultExpressSpinBudgetPerMille
    /// The SCHED_FIFO priority (1-99) the express lane's thread takes while the CPUs are contended
    /// (`ExpressPriority`); 0: it always keeps the normal scheduler.
    public var expressPriority: Int32
    /// A datagram that waited longer than this in the express lane's socket raises its thread
    /// (`ExpressPriorityPolicy.lateNanoseconds`; tests set 0, so that any datagram does).
    public var expressLateNanoseconds = ExpressPriorityPolicy.defaultLateNanoseconds
    /// Where the express lane reads the machine's CPU times (tests give a file of their own).
    public var cpuStatPath = "/proc/stat"

    /// The express lane's default length: a ping (84 bytes), a handshake, a short DNS query or request; no
    /// full-size segment of any flow (and never a bare TCP acknowledgement, `FlowSteering.takesExpressLane`).
    public static let defaultExpressLength = 128
    /// The express lane's default spin: 50 us made an idle round trip about a fifth shorter here, at about the same
    /// CPU per ping (bench/README, "Idle: a spin within a budget"). It spins only while the flow pairs are quiet
    /// (`expressSpinQuietNanoseconds`), and its cost in CPU has a bound whatever the traffic:
    /// `defaultExpressSpinBudgetPerMille`.
    public static let defaultExpressSpinMicroseconds = 50
    /// The spin's share of one CPU past a burst: 2 %. A ping every 10 ms spins about 1 % on each node (50 us).
    public static let defaultExpressSpinBudgetPerMille = 20
    /// The spin time the budget holds after a quiet spell (`SpinBudget.capacity`): 200 spins of 50 us in a row.
    static let expressSpinBurstNanoseconds: UInt64 = 10_000_000
    /// How long the flow pairs must have moved nothing before the lane spins (`FlowsQuiet`): 10 ms, a ping
    /// interval; under bulk load a flow pair moves packets far more often than that.
    static let expressSpinQuietNanoseconds: UInt64 = 10_000_000
    /// The longest `expressSpinMicroseconds` accepted.
    public static let maximumExpressSpinMicroseconds = 1000
    /// `up --express-priority`'s default: low among realtime threads, below the kernel's interrupt threads (50).
    /// The library's default is 0 (off), as it is for the express lane itself.
    public static let defaultExpressPriority: Int32 = 10
    /// The priorities `expressPriority` accepts, 0 (off) included: SCHED_FIFO's.
    public static let expressPriorityRange: ClosedRange<Int32> = 0...99

    /// nil when `us` is a valid `expressSpinMicroseconds`, else why not (named as the option, without its "--").
    public static func expressSpinProblem(_ us: Int) -> String? {
        (0...maximumExpressSpinMicroseconds).contains(us) ? nil
            : "express-spin \(us) is outside 0-\(maximumExpressSpinMicroseconds) microseconds"
    }

    /// nil when `priority` is a valid `expressPriority`, else why not (named as the option, without its "--").
    public static func expressPriorityProblem(_ priority: Int32) -> String? {
        expressPriorityRange.contains(priority) ? nil
            : "express-priority \(priority) is outside \(expressPriorityRange.lowerBound)-\(expressPriorityRange.upperBound) (0: never realtime)"
    }

    public init(batchSize: Int = 64, bufferSize: Int = 65536, sendWaitMilliseconds: Int32 = 10,
                batchesPerWakeup: Int = 64, offloads: Bool = true, sendQueueCapacity: Int = 1024,
                readBytesPerBatch: Int = 256 * 1024, groBatchSize: Int = 8, heartbeatMilliseconds: Int32 = 1000,
                codel: CoDelParameters = CoDelParameters(), express: Int? = nil,
                expressSpinMicroseconds: Int = ForwarderOptions.defaultExpressSpinMicroseconds,
                expressPriority: Int32 = 0) {
        precondition(batchSize >= 1 && bufferSize >= 576 && sendQueueCapacity >= 1 && readBytesPerBatch >= 1
                     && groBatchSize >= 1 && heartbeatMilliseconds >= 1)
        precondition(express.map { $0 >= IPv4Header.minimumLength && $0 <= Int(UInt16.max) } ?? true)
        precondition((0...ForwarderOptions.maximumExpressSpinMicroseconds).contains(expressSpinMicroseconds))
        precondition(ForwarderOptions.expressPriorityRange.contains(expressPriority))
        self.expressPriority = expressPriority
        self.codel = codel
        self.express = express
        self.expressSpinMicroseconds = expressSpinMicroseconds
        self.heartbeatMilliseconds = heartbeatMilliseconds
        self.readBytesPerBatch = readBytesPerBatch
        self.groBatchSize = groBatchSize
        self.batchSize = batchSize
        self.bufferSize = bufferSize
        self.sendWaitMilliseconds = sendWaitMilliseconds
        self.batchesPerWakeup = batchesPerWakeup
        self.offloads = offloads
        self.sendQueueCapacity = sendQueueCapacity
    }
}

/// How many worker pairs a node runs (`up --workers`).
public enum Workers {
    /// The most `--workers` accepts: a tun has at most 256 queues, and beyond a few dozen threads per direction
    /// the steering program's spread, not the cores, is what limits.
    public static let maximum = 64
    /// The default's cap: one pair per CPU up to this many. Past it each pair adds memory (its buffers: ~4 MiB
    /// for the tun reads and the GRO receives) and the kernel's own per-packet work, not the workers, dominates.
    public static let defaultCap = 8

    /// One pair per CPU this process may run on (sched_getaffinity: a container's or taskset's CPU set, not the
    /// machine's), at most `defaultCap`; 1 if the kernel will not say.
    public static func defaultCount() -> Int {
        let cpus = fu_available_cpus()
        return cpus < 1 ? 1 : min(Int(cpus), defaultCap)
    }

    /// nil when `n` is a valid worker count, else why not.
    public static func validate(_ n: Int) -> String? {
        (1...maximum).contains(n) ? nil : "--workers must be between 1 and \(maximum), not \(n)"
    }
}
