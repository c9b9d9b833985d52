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
    /// Bytes per packet buffer. 65536 holds any IPv4 packet (and, later, a TSO super-packet plus its virtio
    /// header); a read that fills the whole buffer is treated as truncated.
    public var bufferSize: Int
    /// How long a worker waits for the socket to become writable when sendmmsg says EAGAIN, before dropping the
    /// rest of the batch as `sendFailed`. Never a busy retry.
    public var sendWaitMilliseconds: Int32
    /// Batches a worker processes per wakeup before it polls again (so a stop request is seen under load).
    public var batchesPerWakeup: Int

    public init(batchSize: Int = 64, bufferSize: Int = 65536, sendWaitMilliseconds: Int32 = 10,
                batchesPerWakeup: Int = 64) {
        precondition(batchSize >= 1 && bufferSize >= 576)
        self.batchSize = batchSize
        self.bufferSize = bufferSize
        self.sendWaitMilliseconds = sendWaitMilliseconds
        self.batchesPerWakeup = batchesPerWakeup
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

    /// The fatal error that stopped the forwarder, if one did.
    public var failure: SystemError? { failureState.withLock { $0 } }

    public convenience init(tun: TunDevice, socket: UDPSocket, table: RouteTable, config: ForwardingConfig,
                            counters: DataPlaneCounters, logger: Logger, options: ForwarderOptions = ForwarderOptions(),
                            onFailure: (@Sendable (SystemError) -> Void)? = nil) throws(SystemError) {
        // With IFF_VNET_HDR every packet carries a virtio-net header: not handled yet (the offload work will add
        // it in BatchBuffers and the workers, leaving the decisions as they are).
        guard !tun.vnetHeader else {
            throw SystemError("forward on", "\(tun.name) (IFF_VNET_HDR is not supported yet)", errno: EINVAL)
        }
        try self.init(tunFD: tun.fd, tunName: tun.name, tunDevice: tun, socket: socket, table: table, config: config,
                      counters: counters, logger: logger, options: options, onFailure: onFailure)
    }

    /// Runs the forwarder over any packet descriptor in place of a tun device: each read() returns one IPv4
    /// packet and each write() takes one (a tun, or in tests one end of an AF_UNIX SOCK_DGRAM socketpair).
    /// The descriptor is not closed by the forwarder.
    public init(tunFD: Int32, tunName: String, tunDevice: TunDevice? = nil, socket: UDPSocket, table: RouteTable,
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
        stopFD = try syscall("create eventfd", "for the forwarder") { fu_stop_eventfd() }
        let io = WorkerIO(tunFD: tunFD, tunName: tunName, socketFD: socket.fd, socketName: "\(socket.localEndpoint)",
                          stopFD: stopFD)
        tunToUDP = TunToUDPWorker(io: io, table: table, config: config, counters: counters, logger: logger,
                                  options: options)
        udpToTun = UDPToTunWorker(io: io, table: table, config: config, counters: counters, logger: logger,
                                  options: options)
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
                    metadata: ["batch": "\(options.batchSize)"])
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
    /// Processes input until it would block or `options.batchesPerWakeup` batches are done; returns the number
    /// of packets taken in. Throws only fatal errors.
    func drain() throws(SystemError) -> Int
}

extension ForwardingWorker {
    /// poll(input, stop) -> drain, until the stop eventfd is readable or a fatal error.
    func run() throws(SystemError) {
        var fds = [pollfd(fd: inputFD, events: Int16(POLLIN), revents: 0),
                   pollfd(fd: io.stopFD, events: Int16(POLLIN), revents: 0)]
        while true {
            let n = fds.withUnsafeMutableBufferPointer { poll($0.baseAddress, 2, -1) }
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
}

/// At most one log line per second per worker for per-packet errors, with the number suppressed since.
struct LogLimiter {
    private var last: UInt64 = 0
    private var suppressed: UInt64 = 0

    mutating func allow() -> (Bool, UInt64) {
        let now = ICMPRateLimiter.monotonicNanoseconds()
        if last != 0 && now &- last < 1_000_000_000 {
            suppressed &+= 1
            return (false, 0)
        }
        last = now
        defer { suppressed = 0 }
        return (true, suppressed)
    }
}

/// Buffers allocated once per worker: `count` packet buffers of `size` bytes each, and the message vectors that
/// point into them. The layout keeps batching (message vectors) apart from the per-packet decision, so IFF_VNET_HDR
/// and UDP GSO/GRO can later add a header area and control buffers here without touching the decisions.
final class BatchBuffers {
    let count: Int
    let size: Int
    let memory: UnsafeMutableRawBufferPointer
    let lengths: UnsafeMutablePointer<Int>
    let msgs: UnsafeMutablePointer<fu_mmsghdr>
    let iovs: UnsafeMutablePointer<iovec>
    let names: UnsafeMutablePointer<sockaddr_in>
    /// Per message: the peer index it goes to / came from.
    let peers: UnsafeMutablePointer<Int>
    /// ICMP errors are built here (576 bytes is the most they need).
    let scratch: UnsafeMutableRawBufferPointer

    init(count: Int, size: Int) {
        self.count = count
        self.size = size
        memory = .allocate(byteCount: count * size, alignment: 64)
        lengths = .allocate(capacity: count)
        lengths.initialize(repeating: 0, count: count)
        msgs = .allocate(capacity: count)
        msgs.initialize(repeating: fu_mmsghdr(), count: count)
        iovs = .allocate(capacity: count)
        iovs.initialize(repeating: iovec(), count: count)
        names = .allocate(capacity: count)
        names.initialize(repeating: sockaddr_in(), count: count)
        peers = .allocate(capacity: count)
        peers.initialize(repeating: 0, count: count)
        scratch = .allocate(byteCount: 2048, alignment: 64)
    }

    @inline(__always)
    func packet(_ i: Int) -> UnsafeMutableRawPointer { memory.baseAddress! + i &* size }

    deinit {
        memory.deallocate()
        lengths.deallocate()
        msgs.deallocate()
        iovs.deallocate()
        names.deallocate()
        peers.deallocate()
        scratch.deallocate()
    }
}

/// tun -> UDP: read() up to a batch of packets, decide each, one sendmmsg for all forwards, ICMP errors
/// written back into the tun.
final class TunToUDPWorker: ForwardingWorker {
    let threadName = "fu-tun-to-udp"
    let io: WorkerIO
    let options: ForwarderOptions
    var inputFD: Int32 { io.tunFD }
    private let table: RouteTable
    private let counters: DataPlaneCounters
    private let logger: Logger
    private var decider: PacketDecider
    private let b: BatchBuffers
    private var logLimiter = LogLimiter()

    init(io: WorkerIO, table: RouteTable, config: ForwardingConfig, counters: DataPlaneCounters, logger: Logger,
         options: ForwarderOptions) {
        self.io = io
        self.table = table
        self.counters = counters
        self.logger = logger
        self.options = options
        decider = PacketDecider(config: config)
        b = BatchBuffers(count: options.batchSize, size: options.bufferSize)
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
            if n < b.count { break }  // the tun is empty
        }
        return total
    }

    private func readBatch() throws(SystemError) -> Int {
        var count = 0
        while count < b.count {
            let n = Glibc.read(io.tunFD, b.packet(count), b.size)
            if n < 0 {
                let e = errno
                if e == EINTR { continue }
                if e == EAGAIN || e == EWOULDBLOCK { break }
                if e == ENOBUFS || e == ENOMEM { logPacketError("read from \(io.tunName)", e); break }
                throw SystemError("read from", io.tunName, errno: e)
            }
            b.lengths[count] = n
            count += 1
        }
        return count
    }

    private func forwardBatch(_ count: Int) throws(SystemError) {
        let snapshot = table.snapshot()
        var out = 0
        var i = 0
        while i < count {
            let length = b.lengths[i]
            let base = b.packet(i)
            i += 1
            if length >= b.size {  // filled the whole buffer: truncated
                counters.countDrop(.oversize)
                continue
            }
            switch decider.fromTun(UnsafeMutableRawBufferPointer(start: base, count: length), snapshot: snapshot,
                                   scratch: b.scratch) {
            case .forward(let peer, let len):
                b.names[out] = snapshot.peers[peer].sockaddr
                b.iovs[out] = iovec(iov_base: base, iov_len: len)
                b.msgs[out] = fu_mmsghdr(
                    msg_hdr: msghdr(msg_name: UnsafeMutableRawPointer(b.names + out),
                                    msg_namelen: socklen_t(MemoryLayout<sockaddr_in>.size),
                                    msg_iov: b.iovs + out, msg_iovlen: 1, msg_control: nil, msg_controllen: 0,
                                    msg_flags: 0),
                    msg_len: 0)
                b.peers[out] = peer
                out += 1
            case .icmpToTun(let len, let reason):
                counters.countDrop(reason)
                try writeICMPToTun(len)
            case .drop(let reason, let limited):
                counters.countDrop(reason)
                if limited { counters.icmpRateLimited.wrappingIncrement(ordering: .relaxed) }
            }
        }
        if out > 0 { try send(out, snapshot) }
    }

    /// One sendmmsg for the batch; a partial send continues where the kernel stopped. sendmmsg reports an error
    /// only for the first message it could not send: that one is counted as `sendFailed` and skipped. On EAGAIN
    /// (socket buffer full) wait for POLLOUT up to `sendWaitMilliseconds` once per batch, then drop the rest.
    private func send(_ out: Int, _ snapshot: RouteSnapshot) throws(SystemError) {
        var sent = 0
        var waited = false
        var packets: UInt64 = 0
        var bytes: UInt64 = 0
        while sent < out {
            let r = Int(fu_sendmmsg(io.socketFD, b.msgs + sent, UInt32(out - sent), 0))
            if r > 0 {
                var j = sent
                while j < sent + r {
                    let len = b.iovs[j].iov_len
                    snapshot.peers[b.peers[j]].counters.countTx(bytes: len)
                    bytes &+= UInt64(len)
                    j += 1
                }
                packets &+= UInt64(r)
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
                counters.countDrop(.sendFailed, UInt64(out - sent))
                logPacketError("sendmmsg on \(io.socketName) (socket buffer full, \(out - sent) dropped)", e)
                break
            }
            if Self.isFatal(e) { throw SystemError("sendmmsg on", io.socketName, errno: e) }
            counters.countDrop(.sendFailed)
            logPacketError("sendmmsg on \(io.socketName) to \(peerDescription(b.names[sent]))", e)
            sent += 1
        }
        counters.tunToUDPPackets.wrappingIncrement(by: packets, ordering: .relaxed)
        counters.tunToUDPBytes.wrappingIncrement(by: bytes, ordering: .relaxed)
    }

    private func writeICMPToTun(_ length: Int) throws(SystemError) {
        while true {
            let n = Glibc.write(io.tunFD, b.scratch.baseAddress!, length)
            if n >= 0 {
                counters.icmpSent.wrappingIncrement(ordering: .relaxed)
                return
            }
            let e = errno
            if e == EINTR { continue }
            if Self.isFatal(e) { throw SystemError("write to", io.tunName, errno: e) }
            counters.countDrop(.tunWriteFailed)
            logPacketError("write ICMP error to \(io.tunName)", e)
            return
        }
    }

    private func logPacketError(_ what: @autoclosure () -> String, _ e: Int32) {
        let (ok, suppressed) = logLimiter.allow()
        guard ok else { return }
        logger.warning("\(what()): \(SystemError.describe(e))",
                       metadata: suppressed > 0 ? ["suppressed": "\(suppressed)"] : [:])
    }
}

/// UDP -> tun: recvmmsg a batch with source addresses, decide each, write() deliverable packets into the tun,
/// send time-exceeded errors back to the peer with sendto.
final class UDPToTunWorker: ForwardingWorker {
    let threadName = "fu-udp-to-tun"
    let io: WorkerIO
    let options: ForwarderOptions
    var inputFD: Int32 { io.socketFD }
    private let table: RouteTable
    private let counters: DataPlaneCounters
    private let logger: Logger
    private var decider: PacketDecider
    private let b: BatchBuffers
    private var logLimiter = LogLimiter()

    init(io: WorkerIO, table: RouteTable, config: ForwardingConfig, counters: DataPlaneCounters, logger: Logger,
         options: ForwarderOptions) {
        self.io = io
        self.table = table
        self.counters = counters
        self.logger = logger
        self.options = options
        decider = PacketDecider(config: config)
        b = BatchBuffers(count: options.batchSize, size: options.bufferSize)
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
            if n < b.count { break }
        }
        return total
    }

    private func receiveBatch() throws(SystemError) -> Int {
        var i = 0
        while i < b.count {
            // The kernel overwrites msg_namelen, msg_flags and msg_len on every call.
            b.msgs[i] = fu_mmsghdr(
                msg_hdr: msghdr(msg_name: UnsafeMutableRawPointer(b.names + i),
                                msg_namelen: socklen_t(MemoryLayout<sockaddr_in>.size),
                                msg_iov: b.iovs + i, msg_iovlen: 1, msg_control: nil, msg_controllen: 0,
                                msg_flags: 0),
                msg_len: 0)
            i += 1
        }
        while true {
            let r = fu_recvmmsg(io.socketFD, b.msgs, UInt32(b.count), Int32(MSG_DONTWAIT))
            if r >= 0 { return Int(r) }
            let e = errno
            if e == EINTR { continue }
            if e == EAGAIN || e == EWOULDBLOCK { return 0 }
            if Self.isFatal(e) || e == EINVAL { throw SystemError("recvmmsg on", io.socketName, errno: e) }
            // A pending socket error (e.g. ECONNREFUSED queued by an ICMP port unreachable): consumed by this
            // call; log it and go on.
            logPacketError("recvmmsg on \(io.socketName)", e)
            return 0
        }
    }

    private func deliverBatch(_ count: Int) throws(SystemError) {
        let snapshot = table.snapshot()
        var packets: UInt64 = 0
        var bytes: UInt64 = 0
        var i = 0
        while i < count {
            let msg = b.msgs[i]
            let base = b.packet(i)
            let source = IPv4Address(networkOrder: b.names[i].sin_addr.s_addr)
            i += 1
            if msg.msg_hdr.msg_flags & Int32(MSG_TRUNC) != 0 {
                counters.countDrop(.oversize)
                continue
            }
            switch decider.fromUDP(UnsafeMutableRawBufferPointer(start: base, count: Int(msg.msg_len)),
                                   outerSource: source, snapshot: snapshot, scratch: b.scratch) {
            case .deliver(let peer, let len):
                if try writeToTun(base, len) {
                    snapshot.peers[peer].counters.countRx(bytes: len)
                    packets &+= 1
                    bytes &+= UInt64(len)
                }
            case .icmpToPeer(let len, let peer, let reason):
                counters.countDrop(reason)
                try sendICMP(len, to: snapshot.peers[peer])
            case .drop(let reason, let limited):
                counters.countDrop(reason)
                if limited { counters.icmpRateLimited.wrappingIncrement(ordering: .relaxed) }
            }
        }
        counters.udpToTunPackets.wrappingIncrement(by: packets, ordering: .relaxed)
        counters.udpToTunBytes.wrappingIncrement(by: bytes, ordering: .relaxed)
    }

    /// One write per packet (the tun takes one packet per write). A full tun queue (EAGAIN) is counted as
    /// `tunWriteFailed` and the packet dropped, never retried in a loop (flannel busy-retries here).
    private func writeToTun(_ base: UnsafeMutableRawPointer, _ length: Int) throws(SystemError) -> Bool {
        while true {
            let n = Glibc.write(io.tunFD, base, length)
            if n >= 0 { return true }
            let e = errno
            if e == EINTR { continue }
            if Self.isFatal(e) { throw SystemError("write to", io.tunName, errno: e) }
            counters.countDrop(.tunWriteFailed)
            logPacketError("write to \(io.tunName)", e)
            return false
        }
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
            let e = errno
            if e == EINTR { continue }
            if Self.isFatal(e) { throw SystemError("sendto on", io.socketName, errno: e) }
            counters.countDrop(.sendFailed)
            logPacketError("send ICMP error to \(peer.route.endpoint)", e)
            return
        }
    }

    private func logPacketError(_ what: @autoclosure () -> String, _ e: Int32) {
        let (ok, suppressed) = logLimiter.allow()
        guard ok else { return }
        logger.warning("\(what()): \(SystemError.describe(e))",
                       metadata: suppressed > 0 ? ["suppressed": "\(suppressed)"] : [:])
    }
}

private func peerDescription(_ sa: sockaddr_in) -> String {
    "\(IPv4Address(networkOrder: sa.sin_addr.s_addr)):\(UInt16(bigEndian: sa.sin_port))"
}
