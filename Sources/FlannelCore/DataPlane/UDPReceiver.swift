import CShims
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// One datagram from a peer: one IPv4 packet on flannel's wire (`WireFormat`), and who sent it.
struct Datagram {
    let bytes: UnsafeMutableRawBufferPointer
    let source: IPv4Address
    /// How long it waited in the socket queue (ns; 0 when the receiver does not timestamp).
    let sojourn: UInt64
}

/// The socket's receiving side, as wireguard-go keeps it inside its bind: one recvmmsg for a batch with source
/// addresses and, with UDP GRO, the segment size of each coalesced buffer; `next()` hands out the datagrams one by
/// one, GRO buffers split back into theirs (`GROSplit`). Truncated and empty datagrams are dropped and counted
/// here. Without GRO each message is one datagram (the fallback and `--no-offload`). With `timestamps` each
/// message also carries the kernel's arrival time (SO_TIMESTAMPNS), and each datagram its sojourn in the queue.
final class UDPReceiver {
    let gro: Bool
    let timestamps: Bool
    /// When the last batch was dequeued (CLOCK_REALTIME ns, the clock of the kernel's timestamps).
    private(set) var batchTime: UInt64 = 0
    /// Messages per recvmmsg: `batchSize`, or `groBatchSize` when each may be a 64 KiB GRO buffer.
    let batchSize: Int
    private let buffers: PacketBuffers
    private let msgs: UnsafeMutablePointer<fu_mmsghdr>
    private let iovs: UnsafeMutablePointer<iovec>
    private let names: UnsafeMutablePointer<sockaddr_in>
    /// Per message: room for one control message carrying an int (UDP_GRO's segment size) and one carrying a
    /// timespec (SCM_TIMESTAMPNS).
    private let controls: UnsafeMutableRawPointer
    private let controlStride: Int
    private let io: StageIO
    /// The socket it receives on.
    var fd: Int32 { io.fd }
    private var logLimiter = LogLimiter()
    private var largest = 0
    // The cursor of `next()`: messages received, the next one, and the split of the current one.
    private var received = 0
    private var message = 0
    private var split = GROSplit(total: 0, segmentSize: 0)
    private var base = UnsafeMutableRawPointer(bitPattern: 1)!
    private var source = IPv4Address(0)
    private var sojourn: UInt64 = 0

    /// - Throws: `SystemError` when `timestamps` is asked for and the socket refuses SO_TIMESTAMPNS.
    init(_ io: StageIO, options: ForwarderOptions, timestamps: Bool = false) throws(SystemError) {
        if timestamps {
            var one: Int32 = 1
            try syscall("set SO_TIMESTAMPNS on UDP socket", io.name) {
                setsockopt(io.fd, SOL_SOCKET, Int32(FU_SO_TIMESTAMPNS), &one, socklen_t(MemoryLayout<Int32>.size))
            }
        }
        self.timestamps = timestamps
        self.io = io
        gro = io.offloads.udpGRO
        batchSize = gro ? min(options.batchSize, options.groBatchSize) : options.batchSize
        buffers = PacketBuffers(count: batchSize, size: options.bufferSize)
        msgs = .allocate(count: batchSize, initializedTo: fu_mmsghdr())
        iovs = .allocate(count: batchSize, initializedTo: iovec())
        names = .allocate(count: batchSize, initializedTo: sockaddr_in())
        controlStride = fu_cmsg_space(MemoryLayout<Int32>.size) + fu_cmsg_space(MemoryLayout<timespec>.size)
        controls = .allocate(byteCount: batchSize * controlStride, alignment: 16)
        controls.initializeMemory(as: UInt8.self, repeating: 0, count: batchSize * controlStride)
        var i = 0
        while i < batchSize {
            iovs[i] = iovec(iov_base: buffers.packet(i), iov_len: buffers.size)
            i += 1
        }
    }

    deinit {
        msgs.deallocate()
        iovs.deallocate()
        names.deallocate()
        controls.deallocate()
    }

    /// One recvmmsg; returns the number of messages (0 when nothing is waiting). `wait`: block until the first
    /// datagram (MSG_WAITFORONE on the socket `Forwarder.start` left blocking) or the wake signal; else never
    /// block. A pending socket error (e.g. ECONNREFUSED queued by an ICMP port unreachable) is consumed by the
    /// call: logged, and 0 returned.
    /// `limit`: at most this many messages (1 for the express lane's first look after a quiet spell: only the
    /// headers it may fill are set up).
    func receive(wait: Bool = false, limit: Int? = nil) throws(SystemError) -> Int {
        let vlen = min(limit ?? batchSize, batchSize)
        var i = 0
        while i < vlen {
            // The kernel overwrites msg_namelen, msg_controllen, msg_flags and msg_len on every call.
            msgs[i] = fu_mmsghdr(
                msg_hdr: msghdr(msg_name: UnsafeMutableRawPointer(names + i),
                                msg_namelen: socklen_t(MemoryLayout<sockaddr_in>.size),
                                msg_iov: iovs + i, msg_iovlen: 1,
                                msg_control: gro || timestamps ? controls + i &* controlStride : nil,
                                msg_controllen: gro || timestamps ? controlStride : 0,
                                msg_flags: 0),
                msg_len: 0)
            i += 1
        }
        let count = UInt32(vlen)
        received = 0
        message = 0
        split = GROSplit(total: 0, segmentSize: 0)
        let flags = wait ? Int32(MSG_WAITFORONE) : Int32(MSG_DONTWAIT)
        switch try PacketIO.call("recvmmsg on", io.name, alsoFatal: EINVAL, interruptible: wait, {
            Int(fu_recvmmsg(io.fd, msgs, count, flags))
        }) {
        case .done(let n): received = n
        case .wouldBlock: break
        case .failed(let e): logLimiter.warn(io.logger, "recvmmsg on \(io.name)", e)
        }
        if timestamps && received > 0 { batchTime = UDPReceiver.realtimeNanoseconds() }
        return received
    }

    /// The next datagram of the last batch, or nil when the batch is done.
    func next() -> Datagram? {
        while true {
            if let range = split.next() {
                return Datagram(bytes: UnsafeMutableRawBufferPointer(start: base + range.lowerBound,
                                                                     count: range.count), source: source,
                                sojourn: sojourn)
            }
            guard message < received else { return nil }
            let i = message
            message += 1
            if msgs[i].msg_hdr.msg_flags & Int32(MSG_TRUNC) != 0 {
                io.counters.countDrop(.oversize)
                continue
            }
            let total = Int(msgs[i].msg_len)
            if total == 0 {
                // An empty datagram carries no packet at all: malformed, and counted like any other drop.
                io.counters.countDrop(.malformed)
                continue
            }
            // With GRO the buffer holds datagrams of `segmentSize` bytes back to back (the last may be shorter).
            let (segmentSize, arrival) = controlMessages(i)
            split = GROSplit(total: total, segmentSize: segmentSize)
            sojourn = arrival != 0 && batchTime > arrival ? batchTime &- arrival : 0
            if split.isCoalesced { io.offloads.groBuffers.wrappingIncrement(ordering: .relaxed) }
            if min(split.step, total) > largest {
                largest = min(split.step, total)
                io.offloads.largestDatagramReceived.store(UInt64(largest), ordering: .relaxed)
            }
            base = buffers.packet(i)
            source = IPv4Address(networkOrder: names[i].sin_addr.s_addr)
        }
    }

    /// The UDP_GRO segment size of message `i` (0 when it holds one datagram) and its arrival time (CLOCK_REALTIME
    /// ns; 0 when not timestamped).
    @inline(__always)
    private func controlMessages(_ i: Int) -> (segmentSize: Int, arrival: UInt64) {
        guard gro || timestamps else { return (0, 0) }
        var segmentSize = 0
        var arrival: UInt64 = 0
        var c = fu_cmsg_firsthdr(&msgs[i].msg_hdr)
        while let cmsg = c {
            let data = UnsafeRawPointer(fu_cmsg_data(cmsg)!)
            if cmsg.pointee.cmsg_level == Int32(FU_SOL_UDP) && cmsg.pointee.cmsg_type == Int32(FU_UDP_GRO) {
                segmentSize = Int(data.loadUnaligned(as: Int32.self))
            } else if cmsg.pointee.cmsg_level == SOL_SOCKET && cmsg.pointee.cmsg_type == Int32(FU_SO_TIMESTAMPNS)
                        && cmsg.pointee.cmsg_len >= fu_cmsg_len(MemoryLayout<timespec>.size) {
                let ts = data.loadUnaligned(as: timespec.self)
                arrival = UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
            }
            c = fu_cmsg_nxthdr(&msgs[i].msg_hdr, cmsg)
        }
        return (segmentSize, arrival)
    }

    /// CLOCK_REALTIME in ns (the clock SO_TIMESTAMPNS stamps with; vDSO, no system call).
    static func realtimeNanoseconds() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
    }
}
