import Atomics
import CShims
import Logging
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The data plane's lifecycle: it builds the workers (`TunToUDPWorker`, `UDPToTunWorker`, each over its I/O
/// stages), starts one thread per worker (the express lane's pair shares one, `DuplexLoop`), stops and joins them,
/// and keeps the first fatal error. What the workers do is drawn at the top of TunToUDP.swift and UDPToTun.swift;
/// flannel's wire format is in WireFormat.swift.
///
/// Errors: per-packet errors (a failed send, a full tun queue) are counted by reason and logged at most once a
/// second per worker; they never stop a worker. Fatal errors (EBADF, the tun device deleted, ...) stop both
/// workers, are kept in `failure`, and are passed to `onFailure` so the daemon can exit non-zero.
///
/// `@unchecked Sendable`: the mutable state (threads, failure) is behind `Mutex`es; each worker's buffers are
/// touched only by that worker's thread between `start()` and the join in `stop()`/`wait()`.
public final class Forwarder: @unchecked Sendable {
    public let table: RouteTable
    public let counters: DataPlaneCounters
    public let config: ForwardingConfig
    public let options: ForwarderOptions
    private let logger: Logger
    private let tunFDs: [Int32]
    private let tunName: String
    private let tunDevice: TunDevice?
    private let sockets: [UDPSocket]
    /// Set by `stop()` or a failing worker; each worker then gets the wake signal (`fu_wake_signal`).
    private let stopRequested: ManagedAtomic<Bool>
    private let onFailure: (@Sendable (SystemError) -> Void)?

    private struct State {
        var started = false
        var threads: [pthread_t] = []
        /// Per thread: its worker has returned (it may then be joined, and must not be signalled any more).
        var exited: [Bool] = []
        var joined = false
    }
    private let state = Mutex(State())
    private let joinLock = Mutex(())
    private let failureState = Mutex<SystemError?>(nil)

    /// The worker pairs: pair k reads tun queue k and socket k, and writes the same two.
    let pairs: [(tunToUDP: TunToUDPWorker, udpToTun: UDPToTunWorker)]
    private let workerCounters: [WorkerCounters]
    let offloads: OffloadState
    /// The first pair (the only one with one queue), for tests that drive the workers by hand.
    var tunToUDP: TunToUDPWorker { pairs[0].tunToUDP }
    var udpToTun: UDPToTunWorker { pairs[0].udpToTun }
    private var workers: [ForwardingWorker] { pairs.flatMap { [$0.tunToUDP, $0.udpToTun] } }
    /// What each forwarding thread runs, in start order: the workers of the flow pairs, one each, and the express
    /// lane's pair on one thread.
    let threads: [ForwardingThread]
    /// The express lane thread's realtime priority (nil: no lane, or `options.expressPriority` is 0).
    let expressPriority: ExpressPriority?

    /// The fatal error that stopped the forwarder, if one did.
    public var failure: SystemError? { failureState.withLock { $0 } }

    /// The offloads in use, for `status`: "batching" (recvmmsg/sendmmsg, always), "tso" (the tun hands out TCP
    /// super-packets that are segmented here), "gso" (UDP_SEGMENT on send), "gro" (UDP_GRO on receive),
    /// "coalesce" (TCP segments merged into super-packets written to the tun). "gso" disappears when the kernel
    /// refuses the first GSO send.
    public var activeOffloads: [String] { offloads.active }

    /// The offloads in use and what they have done so far (see `OffloadStatistics`).
    public var offloadStatistics: OffloadStatistics { offloads.statistics }

    /// What each worker pair moved, in pair order.
    public var workerCounts: [WorkerCounts] {
        workerCounters.enumerated().map { $0.element.snapshot($0.offset, express: Forwarder.isExpress($0.offset, of: pairs.count, options)) }
    }

    /// What the express lane's thread has done with its realtime priority (nil: no lane, or none asked for).
    public var expressPriorityCounts: ExpressPriorityCounts? { expressPriority?.counts }

    /// What the express lane's spin has done (nil: no lane).
    public var expressSpinCounts: ExpressSpinCounts? {
        for case let lane as DuplexLoop in threads { return lane.spinCounts }
        return nil
    }

    /// Each worker's loop count: it moves at least every `options.heartbeatMilliseconds` while the worker runs,
    /// and stops moving when the worker is stuck or gone.
    public var heartbeats: [(worker: String, count: UInt64)] {
        workers.map { ($0.threadName, $0.heartbeat.load(ordering: .relaxed)) }
    }

    /// One worker pair per tun queue and socket: `tun.queueFDs.count` must equal `sockets.count` (the sockets of
    /// one reuseport group, `UDPSocket.group`).
    public convenience init(tun: TunDevice, sockets: [UDPSocket], table: RouteTable, config: ForwardingConfig,
                            counters: DataPlaneCounters, logger: Logger, options: ForwarderOptions = ForwarderOptions(),
                            onFailure: (@Sendable (SystemError) -> Void)? = nil) throws(SystemError) {
        precondition(tun.queueFDs.count == sockets.count, "one socket per tun queue")
        try self.init(tunFDs: tun.queueFDs, tunName: tun.name, tunDevice: tun, vnetHeader: tun.vnetHeader,
                      sockets: sockets, table: table, config: config, counters: counters, logger: logger,
                      options: options, onFailure: onFailure)
    }

    /// One worker pair over the tun's first queue.
    public convenience init(tun: TunDevice, socket: UDPSocket, table: RouteTable, config: ForwardingConfig,
                            counters: DataPlaneCounters, logger: Logger, options: ForwarderOptions = ForwarderOptions(),
                            onFailure: (@Sendable (SystemError) -> Void)? = nil) throws(SystemError) {
        try self.init(tunFDs: [tun.fd], tunName: tun.name, tunDevice: tun, vnetHeader: tun.vnetHeader,
                      sockets: [socket], table: table, config: config, counters: counters, logger: logger,
                      options: options, onFailure: onFailure)
    }

    /// Runs the forwarder over any packet descriptor in place of a tun device: each read() returns one IPv4
    /// packet and each write() takes one (a tun, or in tests one end of an AF_UNIX SOCK_DGRAM socketpair).
    /// The descriptor is not closed by the forwarder. `vnetHeader`: every read and write carries a
    /// virtio_net_hdr (a tun opened with IFF_VNET_HDR); the offloads of the tun need it.
    public convenience init(tunFD: Int32, tunName: String, tunDevice: TunDevice? = nil, vnetHeader: Bool = false,
                            socket: UDPSocket, table: RouteTable,
                            config: ForwardingConfig, counters: DataPlaneCounters, logger: Logger,
                            options: ForwarderOptions = ForwarderOptions(),
                            onFailure: (@Sendable (SystemError) -> Void)? = nil) throws(SystemError) {
        try self.init(tunFDs: [tunFD], tunName: tunName, tunDevice: tunDevice, vnetHeader: vnetHeader,
                      sockets: [socket], table: table, config: config, counters: counters, logger: logger,
                      options: options, onFailure: onFailure)
    }

    init(tunFDs: [Int32], tunName: String, tunDevice: TunDevice?, vnetHeader: Bool, sockets: [UDPSocket],
         table: RouteTable, config: ForwardingConfig, counters: DataPlaneCounters, logger: Logger,
         options: ForwarderOptions, onFailure: (@Sendable (SystemError) -> Void)?) throws(SystemError) {
        precondition(!tunFDs.isEmpty && tunFDs.count == sockets.count)
        self.table = table
        self.counters = counters
        self.config = config
        self.options = options
        self.logger = logger
        self.tunFDs = tunFDs
        self.tunName = tunName
        self.tunDevice = tunDevice
        self.sockets = sockets
        self.onFailure = onFailure
        offloads = try OffloadState.probe(tunFD: tunFDs[0], tunName: tunName, vnetHeader: vnetHeader,
                                          sockets: sockets, enabled: options.offloads, logger: logger)
        let stopRequested = ManagedAtomic<Bool>(false)
        self.stopRequested = stopRequested
        workerCounters = sockets.map { _ in WorkerCounters() }
        var pairs: [(tunToUDP: TunToUDPWorker, udpToTun: UDPToTunWorker)] = []
        var threads: [ForwardingThread] = []
        var expressPriority: ExpressPriority?
        precondition(options.express == nil || sockets.count >= 2, "the express lane is a pair beside the others")
        for (k, (tunFD, socket)) in zip(tunFDs, sockets).enumerated() {
            // The express lane: the last pair, for short packets only (nothing to coalesce, no bulk to drop).
            let express = Forwarder.isExpress(k, of: sockets.count, options)
            let vnet = offloads.vnetHeader
            let worker = workerCounters[k]
            let tun = StageIO(fd: tunFD, name: tunName, counters: counters, worker: worker, offloads: offloads,
                              logger: logger)
            let udp = StageIO(fd: socket.fd, name: "\(socket.localEndpoint)", counters: counters, worker: worker,
                              offloads: offloads, logger: logger)
            let suffix = express || k == 0 ? "" : "\(k)"  // thread names: at most 15 bytes
            func setup(_ name: String) -> WorkerSetup {
                WorkerSetup(threadName: (express ? "fu-x-" : "fu-") + name + suffix, stopRequested: stopRequested,
                            table: table, config: config, counters: counters, options: options, express: express)
            }
            pairs.append((
                TunToUDPWorker(
                    reader: TunReader(tun, vnet: vnet, options: options),
                    sender: UDPSender(udp, options: options),
                    icmpWriter: TunWriter(tun, vnet: vnet, coalesce: false),
                    setup("tun-to-udp")),
                UDPToTunWorker(
                    // Timestamps for CoDel on the flow pairs, and for the express lane's priority (late datagrams).
                    receiver: try UDPReceiver(udp, options: options,
                                              timestamps: express ? options.expressPriority > 0 : options.codel.isOn),
                    writer: TunWriter(tun, vnet: vnet, coalesce: offloads.coalesce && !express),
                    icmpSender: UDPSender(udp, options: options, queueCapacity: 1),
                    setup("udp-to-tun"))))
            // A thread per worker, but the express lane's pair shares one (`DuplexLoop`).
            let (tunToUDP, udpToTun) = pairs[k]
            if express {
                let name = "fu-express"
                let priority = options.expressPriority == 0 ? nil
                    : ExpressPriority(priority: options.expressPriority, threadName: name,
                                      statPath: options.cpuStatPath, lateNanoseconds: options.expressLateNanoseconds,
                                      logger: logger)
                expressPriority = priority
                threads.append(DuplexLoop(threadName: name, tunToUDP, udpToTun, flows: Array(workerCounters[..<k]),
                                          priority: priority))
            } else {
                threads += [tunToUDP, udpToTun]
            }
        }
        self.pairs = pairs
        self.threads = threads
        self.expressPriority = expressPriority
    }

    deinit { stop() }

    /// Whether pair `k` of `count` is the express lane's: the last one, when `options.express` is set.
    private static func isExpress(_ k: Int, of count: Int, _ options: ForwarderOptions) -> Bool {
        options.express != nil && k == count - 1
    }

    /// Makes the tun queues and the sockets blocking (each worker waits in its one receive call; see
    /// `ForwardingWorker.run`, `DuplexLoop.run`) and starts two threads per flow pair, one for the express lane's.
    /// - Throws: `SystemError` when the descriptor cannot be switched or a thread cannot be created (then
    ///   nothing is left running).
    public func start() throws(SystemError) {
        let already = state.withLock { s -> Bool in
            defer { s.started = true }
            return s.started
        }
        precondition(!already, "Forwarder.start() called twice")
        // A stop() before start() had nothing to stop: clear its flag so the workers do not exit at once.
        stopRequested.store(false, ordering: .releasing)
        // The workers block in their receive (read on a tun queue, recvmmsg on a socket) and do every other call
        // with RWF_NOWAIT or MSG_DONTWAIT, so the descriptors are made blocking; the wake signal ends a wait.
        try syscall("install the wake signal of", "the forwarding threads") { fu_install_wake_signal() }
        for fd in tunFDs { try Forwarder.clearNonBlocking(fd, tunName) }
        for socket in sockets { try Forwarder.clearNonBlocking(socket.fd, "UDP socket \(socket.localEndpoint)") }
        // Sized before any thread exists: a worker that fails at once marks itself exited (runWorker) before this
        // loop has recorded its thread.
        state.withLock { $0.exited = Array(repeating: false, count: threads.count) }
        for (index, worker) in threads.enumerated() {
            let context = ThreadContext(worker: worker, index: index, forwarder: self)
            var tid = pthread_t()
            let raw = Unmanaged.passRetained(context).toOpaque()
            let rc = pthread_create(&tid, nil, { arg in
                let ctx = Unmanaged<ThreadContext>.fromOpaque(arg!).takeRetainedValue()
                ctx.forwarder.runWorker(ctx.worker, index: ctx.index)
                return nil
            }, raw)
            if rc != 0 {
                Unmanaged<ThreadContext>.fromOpaque(raw).release()
                stop()
                throw SystemError("start forwarding thread", worker.threadName, errno: rc)
            }
            state.withLock { $0.threads.append(tid) }
        }
        logger.info("forwarding between \(tunName) and \(sockets[0].localEndpoint)",
                    metadata: ["batch": "\(options.batchSize)", "workers": "\(pairs.count)",
                               "offloads": "\(activeOffloads.joined(separator: ","))"])
    }

    /// Asks every worker to stop and waits for them. Idempotent; safe from any thread but a worker's own.
    /// Call it before closing the tun device or the socket: a worker reading a closed descriptor fails (EBADF).
    /// The running threads keep the forwarder alive, so dropping the last reference does not stop it.
    public func stop() {
        requestStop()
        _ = wait()
    }

    /// Sets the stop flag and wakes every worker still running from its blocking receive (EINTR). A wake that
    /// lands just before a worker enters its wait is repeated by the worker's heartbeat timer.
    private func requestStop() {
        stopRequested.store(true, ordering: .releasing)
        state.withLock { s in
            // Under the lock a worker not yet marked exited has not returned, so it is not joined either.
            for (t, exited) in zip(s.threads, s.exited) where !exited { _ = pthread_kill(t, fu_wake_signal()) }
        }
    }

    private static func clearNonBlocking(_ fd: Int32, _ name: String) throws(SystemError) {
        let flags = try syscall("get flags of", name) { fcntl(fd, F_GETFL) }
        try syscall("clear O_NONBLOCK on", name) { fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) }
    }

    /// Waits until every worker has stopped (after `stop()` or a fatal error); returns the fatal error if any.
    @discardableResult
    public func wait() -> SystemError? {
        joinLock.withLock { _ in
            let threads = state.withLock { s -> [pthread_t] in
                // Before start() there is nothing to join, and marking it joined would orphan the threads
                // start() creates later.
                if s.joined || !s.started { return [] }
                s.joined = true
                return s.threads
            }
            for t in threads { pthread_join(t, nil) }
        }
        return failure
    }

    private func runWorker(_ worker: ForwardingThread, index: Int) {
        _ = fu_set_thread_name(worker.threadName)
        defer { state.withLock { $0.exited[index] = true } }
        do throws(SystemError) {
            try worker.run()
        } catch {
            let first = failureState.withLock { f -> Bool in
                if f == nil { f = error; return true }
                return false
            }
            logger.error("forwarding stopped: \(error)", metadata: ["worker": "\(worker.threadName)"])
            // Take the other worker down too: a half-working data plane is worse than a daemon that exits.
            requestStop()
            if first { onFailure?(error) }
        }
    }
}

private final class ThreadContext {
    let worker: ForwardingThread
    let index: Int
    let forwarder: Forwarder
    init(worker: ForwardingThread, index: Int, forwarder: Forwarder) {
        self.worker = worker
        self.index = index
        self.forwarder = forwarder
    }
}

