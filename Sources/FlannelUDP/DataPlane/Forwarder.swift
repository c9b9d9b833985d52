import Atomics
import CShims
import Logging
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// Tunables of the forwarding loop.
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
    /// The longest a worker sleeps in poll() with nothing to do. Each pass of its loop bumps its heartbeat
    /// (`Forwarder.heartbeats`), so an idle worker still proves it is alive at least this often; the systemd
    /// watchdog pings only while every heartbeat moves.
    public var heartbeatMilliseconds: Int32

    public init(batchSize: Int = 64, bufferSize: Int = 65536, sendWaitMilliseconds: Int32 = 10,
                batchesPerWakeup: Int = 64, offloads: Bool = true, sendQueueCapacity: Int = 1024,
                readBytesPerBatch: Int = 256 * 1024, groBatchSize: Int = 8, heartbeatMilliseconds: Int32 = 1000) {
        precondition(batchSize >= 1 && bufferSize >= 576 && sendQueueCapacity >= 1 && readBytesPerBatch >= 1
                     && groBatchSize >= 1 && heartbeatMilliseconds >= 1)
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

/// The data plane: two threads, tun -> UDP and UDP -> tun, each polling its input and a stop eventfd, draining
/// the input in batches, deciding each packet with a `PacketDecider` (pure, in place), and doing the I/O in as
/// few system calls as the kernel allows (one sendmmsg per batch; one recvmmsg per batch).
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
    private let tunFD: Int32
    private let tunName: String
    private let tunDevice: TunDevice?
    private let socket: UDPSocket
    private let stopFD: Int32
    private let onFailure: (@Sendable (SystemError) -> Void)?

    private struct State {
        var started = false
        var threads: [pthread_t] = []
        var joined = false
    }
    private let state = Mutex(State())
    private let joinLock = Mutex(())
    private let failureState = Mutex<SystemError?>(nil)

    let tunToUDP: TunToUDPWorker
    let udpToTun: UDPToTunWorker
    let offloads: OffloadState

    /// The fatal error that stopped the forwarder, if one did.
    public var failure: SystemError? { failureState.withLock { $0 } }

    /// The offloads in use, for `status`: "batching" (recvmmsg/sendmmsg, always), "tso" (the tun hands out TCP
    /// super-packets that are segmented here), "gso" (UDP_SEGMENT on send), "gro" (UDP_GRO on receive),
    /// "coalesce" (TCP segments merged into super-packets written to the tun). "gso" disappears when the kernel
    /// refuses the first GSO send.
    public var activeOffloads: [String] { offloads.active }

    /// The offloads in use and what they have done so far (see `OffloadStatistics`).
    public var offloadStatistics: OffloadStatistics { offloads.statistics }

    /// Each worker's loop count: it moves at least every `options.heartbeatMilliseconds` while the worker runs,
    /// and stops moving when the worker is stuck or gone.
    public var heartbeats: [(worker: String, count: UInt64)] {
        [tunToUDP as ForwardingWorker, udpToTun as ForwardingWorker].map {
            ($0.threadName, $0.heartbeat.load(ordering: .relaxed))
        }
    }

    public convenience init(tun: TunDevice, socket: UDPSocket, table: RouteTable, config: ForwardingConfig,
                            counters: DataPlaneCounters, logger: Logger, options: ForwarderOptions = ForwarderOptions(),
                            onFailure: (@Sendable (SystemError) -> Void)? = nil) throws(SystemError) {
        try self.init(tunFD: tun.fd, tunName: tun.name, tunDevice: tun, vnetHeader: tun.vnetHeader, socket: socket,
                      table: table, config: config, counters: counters, logger: logger, options: options,
                      onFailure: onFailure)
    }

    /// Runs the forwarder over any packet descriptor in place of a tun device: each read() returns one IPv4
    /// packet and each write() takes one (a tun, or in tests one end of an AF_UNIX SOCK_DGRAM socketpair).
    /// The descriptor is not closed by the forwarder. `vnetHeader`: every read and write carries a
    /// virtio_net_hdr (a tun opened with IFF_VNET_HDR); the offloads of the tun need it.
    public init(tunFD: Int32, tunName: String, tunDevice: TunDevice? = nil, vnetHeader: Bool = false,
                socket: UDPSocket, table: RouteTable,
                config: ForwardingConfig, counters: DataPlaneCounters, logger: Logger,
                options: ForwarderOptions = ForwarderOptions(),
                onFailure: (@Sendable (SystemError) -> Void)? = nil) throws(SystemError) {
        self.table = table
        self.counters = counters
        self.config = config
        self.options = options
        self.logger = logger
        self.tunFD = tunFD
        self.tunName = tunName
        self.tunDevice = tunDevice
        self.socket = socket
        self.onFailure = onFailure
        offloads = try OffloadState.probe(tunFD: tunFD, tunName: tunName, vnetHeader: vnetHeader, socket: socket,
                                          enabled: options.offloads, logger: logger)
        stopFD = try syscall("create eventfd", "for the forwarder") { fu_stop_eventfd() }
        let io = WorkerIO(tunFD: tunFD, tunName: tunName, socketFD: socket.fd, socketName: "\(socket.localEndpoint)",
                          stopFD: stopFD)
        tunToUDP = TunToUDPWorker(io: io, table: table, config: config, counters: counters, logger: logger,
                                  options: options, offloads: offloads)
        udpToTun = UDPToTunWorker(io: io, table: table, config: config, counters: counters, logger: logger,
                                  options: options, offloads: offloads)
    }

    deinit {
        stop()
        _ = Glibc.close(stopFD)
    }

    /// Makes the tun descriptor non-blocking and starts the two worker threads.
    /// - Throws: `SystemError` when the descriptor cannot be switched or a thread cannot be created (then
    ///   nothing is left running).
    public func start() throws(SystemError) {
        let already = state.withLock { s -> Bool in
            defer { s.started = true }
            return s.started
        }
        precondition(!already, "Forwarder.start() called twice")
        // A stop() before start() had nothing to stop: clear its signal so the workers do not exit at once.
        var pending: UInt64 = 0
        _ = Glibc.read(stopFD, &pending, 8)
        let flags = try syscall("get flags of", tunName) { fcntl(tunFD, F_GETFL) }
        try syscall("set O_NONBLOCK on", tunName) { fcntl(tunFD, F_SETFL, flags | O_NONBLOCK) }
        for worker in [tunToUDP as ForwardingWorker, udpToTun as ForwardingWorker] {
            let context = ThreadContext(worker: worker, forwarder: self)
            var tid = pthread_t()
            let raw = Unmanaged.passRetained(context).toOpaque()
            let rc = pthread_create(&tid, nil, { arg in
                let ctx = Unmanaged<ThreadContext>.fromOpaque(arg!).takeRetainedValue()
                ctx.forwarder.runWorker(ctx.worker)
                return nil
            }, raw)
            if rc != 0 {
                Unmanaged<ThreadContext>.fromOpaque(raw).release()
                stop()
                throw SystemError("start forwarding thread", worker.threadName, errno: rc)
            }
            state.withLock { $0.threads.append(tid) }
        }
        logger.info("forwarding between \(tunName) and \(socket.localEndpoint)",
                    metadata: ["batch": "\(options.batchSize)", "offloads": "\(activeOffloads.joined(separator: ","))"])
    }

    /// Asks both workers to stop and waits for them. Idempotent; safe from any thread but a worker's own.
    /// Call it before closing the tun device or the socket: a worker reading a closed descriptor fails (EBADF).
    /// The running threads keep the forwarder alive, so dropping the last reference does not stop it.
    public func stop() {
        var one: UInt64 = 1
        _ = Glibc.write(stopFD, &one, 8)
        _ = wait()
    }

    /// Waits until both workers have stopped (after `stop()` or a fatal error); returns the fatal error if any.
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

    private func runWorker(_ worker: ForwardingWorker) {
        _ = fu_set_thread_name(worker.threadName)
        do throws(SystemError) {
            try worker.run()
        } catch {
            let first = failureState.withLock { f -> Bool in
                if f == nil { f = error; return true }
                return false
            }
            logger.error("forwarding stopped: \(error)", metadata: ["worker": "\(worker.threadName)"])
            // Take the other worker down too: a half-working data plane is worse than a daemon that exits.
            var one: UInt64 = 1
            _ = Glibc.write(stopFD, &one, 8)
            if first { onFailure?(error) }
        }
    }
}

private final class ThreadContext {
    let worker: ForwardingWorker
    let forwarder: Forwarder
    init(worker: ForwardingWorker, forwarder: Forwarder) {
        self.worker = worker
        self.forwarder = forwarder
    }
}

/// The descriptors a worker uses, and their names for error messages.
struct WorkerIO {
    let tunFD: Int32
    let tunName: String
    let socketFD: Int32
    let socketName: String
    let stopFD: Int32
}

/// What both workers share: the poll loop and error classification.
protocol ForwardingWorker: AnyObject {
    var threadName: String { get }
    var io: WorkerIO { get }
    var inputFD: Int32 { get }
    var options: ForwarderOptions { get }
    /// Bumped (relaxed, no lock) on every pass of the poll loop; see `Forwarder.heartbeats`.
    var heartbeat: ManagedAtomic<UInt64> { get }
    /// Processes input until it would block or `options.batchesPerWakeup` batches are done; returns the number
    /// of packets taken in. Throws only fatal errors.
    func drain() throws(SystemError) -> Int
}

extension ForwardingWorker {
    /// poll(input, stop) -> drain, until the stop eventfd is readable or a fatal error. The poll times out after
    /// `options.heartbeatMilliseconds`, so the heartbeat moves while the input is idle.
    func run() throws(SystemError) {
        var fds = [pollfd(fd: inputFD, events: Int16(POLLIN), revents: 0),
                   pollfd(fd: io.stopFD, events: Int16(POLLIN), revents: 0)]
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

    /// Errors after which a descriptor is unusable: stop the worker rather than spin on them.
    static func isFatal(_ e: Int32) -> Bool {
        e == EBADF || e == EBADFD || e == EFAULT || e == ENOTSOCK || e == ENXIO || e == ENODEV
    }

    /// The errno of a failed one-packet write or send: true to retry it (EINTR); a fatal errno is thrown as
    /// "`operation` `object`: ..."; anything else is counted as `drop`, logged at most once a second as `what`,
    /// and false returned: the packet is dropped, never retried in a loop (flannel busy-retries a full tun).
    static func packetIOFailed(_ e: Int32, _ operation: String, _ object: String, counting drop: DropReason,
                               in counters: DataPlaneCounters, log what: @autoclosure () -> String,
                               _ limiter: inout LogLimiter, _ logger: Logger) throws(SystemError) -> Bool {
        if e == EINTR { return true }
        if isFatal(e) { throw SystemError(operation, object, errno: e) }
        counters.countDrop(drop)
        limiter.warn(logger, what(), e)
        return false
    }
}

/// At most one log line per second (or per `intervalNanoseconds`) for per-packet errors, with the number
/// suppressed since. One per worker; the control endpoint uses one for refused clients.
struct LogLimiter {
    private var last: UInt64 = 0
    private var suppressed: UInt64 = 0
    private let interval: UInt64

    init(intervalNanoseconds: UInt64 = 1_000_000_000) { interval = intervalNanoseconds }

    mutating func allow() -> (Bool, UInt64) {
        let now = ICMPRateLimiter.monotonicNanoseconds()
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

/// Buffers allocated once per worker: `count` packet buffers of `size` bytes each, and the message vectors that
/// point into them, kept apart from the per-packet decisions.
final class BatchBuffers {
    let count: Int
    let size: Int
    let memory: UnsafeMutableRawBufferPointer
    let lengths: UnsafeMutablePointer<Int>
    let msgs: UnsafeMutablePointer<fu_mmsghdr>
    let iovs: UnsafeMutablePointer<iovec>
    let names: UnsafeMutablePointer<sockaddr_in>
    /// Per message: room for one control message carrying an int (UDP_GRO's segment size).
    let controls: UnsafeMutableRawPointer
    let controlStride: Int
    /// ICMP errors are built here (576 bytes is the most they need).
    let scratch: UnsafeMutableRawBufferPointer
    /// The virtio_net_hdr written before a packet into the tun, and the two-piece iovec for that write.
    let header: UnsafeMutableRawPointer
    let writeIovs: UnsafeMutablePointer<iovec>

    init(count: Int, size: Int) {
        self.count = count
        self.size = size
        memory = .allocate(byteCount: count * size, alignment: 64)
        lengths = .allocate(count: count, initializedTo: 0)
        msgs = .allocate(count: count, initializedTo: fu_mmsghdr())
        iovs = .allocate(count: count, initializedTo: iovec())
        names = .allocate(count: count, initializedTo: sockaddr_in())
        controlStride = fu_cmsg_space(MemoryLayout<Int32>.size)
        controls = .allocate(byteCount: count * controlStride, alignment: 16)
        controls.initializeMemory(as: UInt8.self, repeating: 0, count: count * controlStride)
        scratch = .allocate(byteCount: 2048, alignment: 64)
        header = .allocate(byteCount: 16, alignment: 16)
        header.initializeMemory(as: UInt8.self, repeating: 0, count: 16)
        writeIovs = .allocate(count: 2, initializedTo: iovec())
    }

    @inline(__always)
    func packet(_ i: Int) -> UnsafeMutableRawPointer { memory.baseAddress! + i &* size }

    deinit {
        memory.deallocate()
        lengths.deallocate()
        msgs.deallocate()
        iovs.deallocate()
        names.deallocate()
        controls.deallocate()
        scratch.deallocate()
        header.deallocate()
        writeIovs.deallocate()
    }
}

/// Writes one packet into the tun: as it is, or after a virtio_net_hdr (`header`, already filled in) when the tun
/// has IFF_VNET_HDR (one writev: the tun takes one packet per write, header included).
/// - Returns: the result of write/writev, errno set on -1.
@inline(__always)
private func writePacket(_ fd: Int32, vnet: Bool, _ b: BatchBuffers, _ packet: UnsafeRawPointer, _ length: Int)
    -> Int {
    if !vnet { return Glibc.write(fd, packet, length) }
    b.writeIovs[0] = iovec(iov_base: b.header, iov_len: VirtioNetHeader.length)
    b.writeIovs[1] = iovec(iov_base: UnsafeMutableRawPointer(mutating: packet), iov_len: length)
    return Glibc.writev(fd, b.writeIovs, 2)
}

/// tun -> UDP: read() up to a batch of packets, decide each, queue the datagrams (TCP super-packets cut into
/// segments), one sendmmsg for the queue (UDP GSO grouping runs of equal-size segments to one peer), ICMP errors
/// written back into the tun.
final class TunToUDPWorker: ForwardingWorker {
    let threadName = "fu-tun-to-udp"
    let heartbeat = ManagedAtomic<UInt64>(0)
    let io: WorkerIO
    let options: ForwarderOptions
    var inputFD: Int32 { io.tunFD }
    private let table: RouteTable
    private let counters: DataPlaneCounters
    private let logger: Logger
    private let offloads: OffloadState
    private let vnet: Bool
    private var decider: PacketDecider
    private let b: BatchBuffers
    let queue: SendQueue
    private var logLimiter = LogLimiter()
    /// The last `readBatch` stopped because the tun had nothing more (not because the batch was full).
    private var tunEmpty = false

    init(io: WorkerIO, table: RouteTable, config: ForwardingConfig, counters: DataPlaneCounters, logger: Logger,
         options: ForwarderOptions, offloads: OffloadState) {
        self.io = io
        self.table = table
        self.counters = counters
        self.logger = logger
        self.options = options
        self.offloads = offloads
        vnet = offloads.vnetHeader
        decider = PacketDecider(config: config)
        b = BatchBuffers(count: options.batchSize,
                         size: options.bufferSize + (offloads.vnetHeader ? VirtioNetHeader.length : 0))
        queue = SendQueue(capacity: max(options.sendQueueCapacity, options.batchSize),
                          gso: offloads.udpGSO.load(ordering: .relaxed))
    }

    func drain() throws(SystemError) -> Int {
        var total = 0
        var batches = 0
        while batches < options.batchesPerWakeup {
            let n = try readBatch()
            if n == 0 { break }
            total += n
            try forwardBatch(n)
            batches += 1
            if tunEmpty { break }  // the tun is empty
        }
        return total
    }

    private func readBatch() throws(SystemError) -> Int {
        var count = 0
        var budget = options.readBytesPerBatch
        tunEmpty = false
        while count < b.count {
            let n = Glibc.read(io.tunFD, b.packet(count), b.size)
            if n < 0 {
                let e = errno
                if e == EINTR { continue }
                if e == EAGAIN || e == EWOULDBLOCK { tunEmpty = true; break }
                if e == ENOBUFS || e == ENOMEM {
                    logLimiter.warn(logger, "read from \(io.tunName)", e)
                    tunEmpty = true
                    break
                }
                throw SystemError("read from", io.tunName, errno: e)
            }
            b.lengths[count] = n
            count += 1
            budget -= n
            if budget <= 0 { break }
        }
        return count
    }

    func forwardBatch(_ count: Int) throws(SystemError) {
        let snapshot = table.snapshot()
        var i = 0
        while i < count {
            var length = b.lengths[i]
            var base = b.packet(i)
            i += 1
            if length >= b.size {  // filled the whole buffer: truncated
                counters.countDrop(.oversize)
                continue
            }
            var gsoType = VirtioNetHeader.gsoNone
            var gsoSize = 0
            if vnet {
                guard length >= VirtioNetHeader.length else {
                    counters.countDrop(.malformed)
                    continue
                }
                let h = VirtioNetHeader(from: base)
                base += VirtioNetHeader.length
                length -= VirtioNetHeader.length
                gsoType = h.gsoType & ~VirtioNetHeader.gsoECN
                gsoSize = Int(h.gsoSize)
                if gsoType == VirtioNetHeader.gsoNone {
                    // A packet the kernel left with a partial checksum (TUN_F_CSUM): complete it, or the peer's
                    // kernel drops it.
                    if h.needsChecksum && !InternetChecksum.complete(
                        UnsafeMutableRawBufferPointer(start: base, count: length), start: Int(h.checksumStart),
                        offset: Int(h.checksumOffset)) {
                        counters.countDrop(.malformed)
                        continue
                    }
                } else if gsoType != VirtioNetHeader.gsoTCPv4 {
                    counters.countDrop(.malformed)  // only TSO4 is switched on
                    continue
                }
            }
            // Route, TTL and ICMP once per packet read: for a super-packet, in the template of all its segments.
            switch decider.fromTun(UnsafeMutableRawBufferPointer(start: base, count: length), snapshot: snapshot,
                                   scratch: b.scratch) {
            case .forward(let peer, let len):
                let name = snapshot.peers[peer].sockaddr
                let packet = UnsafeMutableRawBufferPointer(start: base, count: len)
                if gsoType == VirtioNetHeader.gsoTCPv4 {
                    let needed = TCPSegmenter.segmentCount(UnsafeRawBufferPointer(packet), gsoSize: gsoSize)
                    if needed > queue.free { try send(snapshot) }
                    switch TCPSegmenter.segment(packet, gsoSize: gsoSize, peer: peer, name: name, into: queue) {
                    case .segmented: offloads.superPacketsSegmented.wrappingIncrement(ordering: .relaxed)
                    case .invalid: counters.countDrop(.malformed)
                    case .tooManySegments: counters.countDrop(.oversize)
                    }
                } else {
                    if queue.free == 0 { try send(snapshot) }
                    queue.append(peer: peer, name: name, first: base, firstLength: len)
                }
            case .icmpToTun(let len, let reason):
                counters.countDrop(reason)
                try writeICMPToTun(len)
            case .drop(let reason, let limited):
                counters.countDrop(reason)
                if limited { counters.icmpRateLimited.wrappingIncrement(ordering: .relaxed) }
            }
        }
        if !queue.isEmpty { try send(snapshot) }
    }

    /// One sendmmsg for the queue; a partial send continues where the kernel stopped. sendmmsg reports an error
    /// only for the first message it could not send: that one is counted as `sendFailed` (all its segments) and
    /// skipped. On EAGAIN (socket buffer full) wait for POLLOUT up to `sendWaitMilliseconds` once per call, then
    /// drop the rest. A GSO message refused with EIO (the route's device cannot checksum UDP, the one refusal
    /// that only GSO gets): GSO goes off for good, with one log line. With EINVAL (also what a segment larger
    /// than the route's MTU gets, so not proof that GSO is unusable): this queue only. Either way the rest of the
    /// queue is sent again one datagram per packet.
    private func send(_ snapshot: RouteSnapshot) throws(SystemError) {
        defer {
            queue.reset()
            queue.gso = offloads.udpGSO.load(ordering: .relaxed)
        }
        queue.prepareMessages()
        var sent = 0
        var waited = false
        var packets: UInt64 = 0
        var bytes: UInt64 = 0
        while sent < queue.messageCount {
            let r = Int(fu_sendmmsg(io.socketFD, queue.msgs + sent, UInt32(queue.messageCount - sent), 0))
            if r > 0 {
                var j = sent
                while j < sent + r {
                    let n = queue.messageSegments[j]
                    let len = queue.messageBytes[j]
                    snapshot.peers[queue.messagePeer[j]].counters.countTx(packets: n, bytes: len)
                    packets &+= UInt64(n)
                    bytes &+= UInt64(len)
                    j += 1
                }
                sent += r
                continue
            }
            let e = errno
            if e == EINTR { continue }
            if e == EAGAIN || e == EWOULDBLOCK {
                if !waited {
                    waited = true
                    var pfd = pollfd(fd: io.socketFD, events: Int16(POLLOUT), revents: 0)
                    _ = poll(&pfd, 1, options.sendWaitMilliseconds)
                    continue
                }
                var dropped = 0
                var j = sent
                while j < queue.messageCount { dropped += queue.messageSegments[j]; j += 1 }
                counters.countDrop(.sendFailed, UInt64(dropped))
                logLimiter.warn(logger, "sendmmsg on \(io.socketName) (socket buffer full, \(dropped) dropped)", e)
                break
            }
            if Self.isFatal(e) { throw SystemError("sendmmsg on", io.socketName, errno: e) }
            if queue.gso && queue.messageSegments[sent] > 1 && (e == EIO || e == EINVAL) {
                let to = peerDescription(queue.names[sent])
                if e == EIO {
                    offloads.udpGSO.store(false, ordering: .relaxed)
                    let why = SystemError.describe(e)
                    logger.warning("""
                        offload gso off: the kernel refused a UDP GSO send on \(io.socketName) to \(to) (\(why)); \
                        sending one datagram per packet
                        """)
                } else {
                    logLimiter.warn(logger, "UDP GSO send on \(io.socketName) to \(to) refused, resent one datagram each", e)
                }
                queue.splitMessages(from: sent)
                queue.prepareMessages(from: sent)
                continue
            }
            counters.countDrop(.sendFailed, UInt64(queue.messageSegments[sent]))
            logLimiter.warn(logger, "sendmmsg on \(io.socketName) to \(peerDescription(queue.names[sent]))", e)
            sent += 1
        }
        counters.tunToUDPPackets.wrappingIncrement(by: packets, ordering: .relaxed)
        counters.tunToUDPBytes.wrappingIncrement(by: bytes, ordering: .relaxed)
    }

    private func writeICMPToTun(_ length: Int) throws(SystemError) {
        VirtioNetHeader.none.store(to: b.header)
        while true {
            if writePacket(io.tunFD, vnet: vnet, b, b.scratch.baseAddress!, length) >= 0 {
                counters.icmpSent.wrappingIncrement(ordering: .relaxed)
                return
            }
            guard try Self.packetIOFailed(errno, "write to", io.tunName, counting: .tunWriteFailed, in: counters,
                                          log: "write ICMP error to \(io.tunName)", &logLimiter, logger)
            else { return }
        }
    }
}

/// UDP -> tun: recvmmsg a batch with source addresses (and, with UDP GRO, the segment size of each coalesced
/// buffer), split each buffer back into its datagrams, decide each, write deliverable packets into the tun (runs
/// of one TCP flow merged into one super-packet when coalescing is on), send time-exceeded errors back to the
/// peer with sendto.
final class UDPToTunWorker: ForwardingWorker {
    let threadName = "fu-udp-to-tun"
    let heartbeat = ManagedAtomic<UInt64>(0)
    let io: WorkerIO
    let options: ForwarderOptions
    var inputFD: Int32 { io.socketFD }
    private let table: RouteTable
    private let counters: DataPlaneCounters
    private let logger: Logger
    private let vnet: Bool
    private let gro: Bool
    private let offloads: OffloadState
    private var largest = 0
    private var decider: PacketDecider
    private let b: BatchBuffers
    private let coalescer: TCPCoalescer?
    /// Messages per recvmmsg: `batchSize`, or `groBatchSize` when each may be a 64 KiB GRO buffer.
    private let receiveCount: Int
    // The open coalescing group: its peer, packets and bytes as received (for the counters).
    private var groupPeer = 0
    private var groupPackets = 0
    private var groupBytes = 0
    private var delivered: UInt64 = 0
    private var deliveredBytes: UInt64 = 0
    private var logLimiter = LogLimiter()

    init(io: WorkerIO, table: RouteTable, config: ForwardingConfig, counters: DataPlaneCounters, logger: Logger,
         options: ForwarderOptions, offloads: OffloadState) {
        self.io = io
        self.table = table
        self.counters = counters
        self.logger = logger
        self.options = options
        self.offloads = offloads
        vnet = offloads.vnetHeader
        gro = offloads.udpGRO
        decider = PacketDecider(config: config)
        b = BatchBuffers(count: options.batchSize, size: options.bufferSize)
        coalescer = offloads.coalesce ? TCPCoalescer() : nil
        receiveCount = gro ? min(options.batchSize, options.groBatchSize) : options.batchSize
        var i = 0
        while i < b.count {
            b.iovs[i] = iovec(iov_base: b.packet(i), iov_len: b.size)
            i += 1
        }
    }

    func drain() throws(SystemError) -> Int {
        var total = 0
        var batches = 0
        while batches < options.batchesPerWakeup {
            let n = try receiveBatch()
            if n == 0 { break }
            total += n
            try deliverBatch(n)
            batches += 1
            if n < receiveCount { break }
        }
        return total
    }

    private func receiveBatch() throws(SystemError) -> Int {
        var i = 0
        while i < receiveCount {
            // The kernel overwrites msg_namelen, msg_controllen, msg_flags and msg_len on every call.
            b.msgs[i] = fu_mmsghdr(
                msg_hdr: msghdr(msg_name: UnsafeMutableRawPointer(b.names + i),
                                msg_namelen: socklen_t(MemoryLayout<sockaddr_in>.size),
                                msg_iov: b.iovs + i, msg_iovlen: 1,
                                msg_control: gro ? b.controls + i &* b.controlStride : nil,
                                msg_controllen: gro ? b.controlStride : 0,
                                msg_flags: 0),
                msg_len: 0)
            i += 1
        }
        while true {
            let r = fu_recvmmsg(io.socketFD, b.msgs, UInt32(receiveCount), Int32(MSG_DONTWAIT))
            if r >= 0 { return Int(r) }
            let e = errno
            if e == EINTR { continue }
            if e == EAGAIN || e == EWOULDBLOCK { return 0 }
            if Self.isFatal(e) || e == EINVAL { throw SystemError("recvmmsg on", io.socketName, errno: e) }
            // A pending socket error (e.g. ECONNREFUSED queued by an ICMP port unreachable): consumed by this
            // call; log it and go on.
            logLimiter.warn(logger, "recvmmsg on \(io.socketName)", e)
            return 0
        }
    }

    /// The UDP_GRO segment size of message `i`, or 0 when it holds one datagram.
    @inline(__always)
    private func groSegmentSize(_ i: Int) -> Int {
        guard gro else { return 0 }
        var c = fu_cmsg_firsthdr(&b.msgs[i].msg_hdr)
        while let cmsg = c {
            if cmsg.pointee.cmsg_level == Int32(FU_SOL_UDP) && cmsg.pointee.cmsg_type == Int32(FU_UDP_GRO) {
                return Int(UnsafeRawPointer(fu_cmsg_data(cmsg)!).loadUnaligned(as: Int32.self))
            }
            c = fu_cmsg_nxthdr(&b.msgs[i].msg_hdr, cmsg)
        }
        return 0
    }

    func deliverBatch(_ count: Int) throws(SystemError) {
        let snapshot = table.snapshot()
        delivered = 0
        deliveredBytes = 0
        var i = 0
        while i < count {
            let msg = b.msgs[i]
            let base = b.packet(i)
            let source = IPv4Address(networkOrder: b.names[i].sin_addr.s_addr)
            let segmentSize = groSegmentSize(i)
            i += 1
            if msg.msg_hdr.msg_flags & Int32(MSG_TRUNC) != 0 {
                counters.countDrop(.oversize)
                continue
            }
            // With GRO the buffer holds datagrams of `segmentSize` bytes back to back (the last may be shorter),
            // each one IPv4 packet: decide them one by one.
            let total = Int(msg.msg_len)
            if total == 0 {
                // An empty datagram carries no packet at all: malformed, and counted like any other drop.
                counters.countDrop(.malformed)
                continue
            }
            var split = GROSplit(total: total, segmentSize: segmentSize)
            if split.isCoalesced { offloads.groBuffers.wrappingIncrement(ordering: .relaxed) }
            if min(split.step, total) > largest {
                largest = min(split.step, total)
                offloads.largestDatagramReceived.store(UInt64(largest), ordering: .relaxed)
            }
            while let datagram = split.next() {
                try deliver(base + datagram.lowerBound, datagram.count, source: source, snapshot: snapshot)
            }
        }
        if let c = coalescer, c.isOpen { try flushGroup(c, snapshot) }
        counters.udpToTunPackets.wrappingIncrement(by: delivered, ordering: .relaxed)
        counters.udpToTunBytes.wrappingIncrement(by: deliveredBytes, ordering: .relaxed)
    }

    @inline(__always)
    private func deliver(_ base: UnsafeMutableRawPointer, _ length: Int, source: IPv4Address,
                         snapshot: RouteSnapshot) throws(SystemError) {
        switch decider.fromUDP(UnsafeMutableRawBufferPointer(start: base, count: length), outerSource: source,
                               snapshot: snapshot, scratch: b.scratch) {
        case .deliver(let peer, let len):
            if let c = coalescer {
                let packet = UnsafeMutableRawBufferPointer(start: base, count: len)
                if c.isOpen {
                    if c.append(UnsafeRawBufferPointer(packet)) {
                        groupPackets += 1
                        groupBytes += len
                        return
                    }
                    try flushGroup(c, snapshot)
                }
                if TCPCoalescer.isCandidate(UnsafeRawBufferPointer(packet)) {
                    c.begin(packet)
                    groupPeer = peer
                    groupPackets = 1
                    groupBytes = len
                    return
                }
            }
            VirtioNetHeader.none.store(to: b.header)
            if try writeToTun(base, len) {
                snapshot.peers[peer].counters.countRx(bytes: len)
                delivered &+= 1
                deliveredBytes &+= UInt64(len)
            }
        case .icmpToPeer(let len, let peer, let reason):
            counters.countDrop(reason)
            try sendICMP(len, to: snapshot.peers[peer])
        case .drop(let reason, let limited):
            counters.countDrop(reason)
            if limited { counters.icmpRateLimited.wrappingIncrement(ordering: .relaxed) }
        }
    }

    /// Writes the open coalescing group (one super-packet, or its single packet as it came).
    private func flushGroup(_ c: TCPCoalescer, _ snapshot: RouteSnapshot) throws(SystemError) {
        let pieces = c.finish(header: b.header)
        let packets = groupPackets
        if packets > 1 { offloads.superPacketsCoalesced.wrappingIncrement(ordering: .relaxed) }
        if try writeToTun(pieces) {
            snapshot.peers[groupPeer].counters.countRx(packets: packets, bytes: groupBytes)
            delivered &+= UInt64(packets)
            deliveredBytes &+= UInt64(groupBytes)
        } else if packets > 1 {
            counters.countDrop(.tunWriteFailed, UInt64(packets - 1))  // writeToTun counted one
        }
        groupPackets = 0
        groupBytes = 0
    }

    /// One write per packet (the tun takes one packet per write), after the virtio header already in
    /// `b.header` when the tun has one. A full tun queue (EAGAIN) is counted as `tunWriteFailed` and the packet
    /// dropped, never retried in a loop (flannel busy-retries here).
    private func writeToTun(_ base: UnsafeMutableRawPointer, _ length: Int) throws(SystemError) -> Bool {
        while true {
            let n = writePacket(io.tunFD, vnet: vnet, b, base, length)
            if n >= 0 { return true }
            guard try tunWriteFailed(errno) else { return false }
        }
    }

    /// One writev of a coalesced group's gather list (virtio header first), with `writeToTun`'s error handling.
    private func writeToTun(_ pieces: UnsafeBufferPointer<iovec>) throws(SystemError) -> Bool {
        while true {
            let n = Glibc.writev(io.tunFD, pieces.baseAddress!, Int32(pieces.count))
            if n >= 0 { return true }
            guard try tunWriteFailed(errno) else { return false }
        }
    }

    private func tunWriteFailed(_ e: Int32) throws(SystemError) -> Bool {
        try Self.packetIOFailed(e, "write to", io.tunName, counting: .tunWriteFailed, in: counters,
                                log: "write to \(io.tunName)", &logLimiter, logger)
    }

    private func sendICMP(_ length: Int, to peer: PeerEntry) throws(SystemError) {
        var sa = peer.sockaddr
        while true {
            let n = withUnsafePointer(to: &sa) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    sendto(io.socketFD, b.scratch.baseAddress!, length, 0, $0,
                           socklen_t(MemoryLayout<sockaddr_in>.size))
                }
            }
            if n >= 0 {
                counters.icmpSent.wrappingIncrement(ordering: .relaxed)
                return
            }
            guard try Self.packetIOFailed(errno, "sendto on", io.socketName, counting: .sendFailed, in: counters,
                                          log: "send ICMP error to \(peer.route.endpoint)", &logLimiter, logger)
            else { return }
        }
    }
}

private func peerDescription(_ sa: sockaddr_in) -> String {
    "\(IPv4Address(networkOrder: sa.sin_addr.s_addr)):\(UInt16(bigEndian: sa.sin_port))"
}
