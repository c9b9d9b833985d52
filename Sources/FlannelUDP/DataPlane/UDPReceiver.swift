import CShims
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// One datagram from a peer: one IPv4 packet on flannel's wire (`WireFormat`), and who sent it.
struct Datagram {
    let bytes: UnsafeMutableRawBufferPointer
    let source: IPv4Address
}

/// The socket's receiving side, as wireguard-go keeps it inside its bind: one recvmmsg for a batch with source
/// addresses and, with UDP GRO, the segment size of each coalesced buffer; `next()` hands out the datagrams one by
/// one, GRO buffers split back into theirs (`GROSplit`). Truncated and empty datagrams are dropped and counted
/// here. Without GRO each message is one datagram (the fallback and `--no-offload`).
final class UDPReceiver {
    let fd: Int32
    let name: String
    let gro: Bool
    /// Messages per recvmmsg: `batchSize`, or `groBatchSize` when each may be a 64 KiB GRO buffer.
    let batchSize: Int
    private let buffers: PacketBuffers
    private let msgs: UnsafeMutablePointer<fu_mmsghdr>
    private let iovs: UnsafeMutablePointer<iovec>
    private let names: UnsafeMutablePointer<sockaddr_in>
    /// Per message: room for one control message carrying an int (UDP_GRO's segment size).
    private let controls: UnsafeMutableRawPointer
    private let controlStride: Int
    private let counters: DataPlaneCounters
    private let offloads: OffloadState
    private let logger: Logger
    private var logLimiter = LogLimiter()
    private var largest = 0
    // The cursor of `next()`: messages received, the next one, and the split of the current one.
    private var received = 0
    private var message = 0
    private var split = GROSplit(total: 0, segmentSize: 0)
    private var base = UnsafeMutableRawPointer(bitPattern: 1)!
    private var source = IPv4Address(0)

    init(socket fd: Int32, name: String, options: ForwarderOptions, counters: DataPlaneCounters,
         offloads: OffloadState, logger: Logger) {
        self.fd = fd
        self.name = name
        self.counters = counters
        self.offloads = offloads
        self.logger = logger
        gro = offloads.udpGRO
        batchSize = gro ? min(options.batchSize, options.groBatchSize) : options.batchSize
        buffers = PacketBuffers(count: batchSize, size: options.bufferSize)
        msgs = .allocate(count: batchSize, initializedTo: fu_mmsghdr())
        iovs = .allocate(count: batchSize, initializedTo: iovec())
        names = .allocate(count: batchSize, initializedTo: sockaddr_in())
        controlStride = fu_cmsg_space(MemoryLayout<Int32>.size)
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

    /// One recvmmsg; returns the number of messages (0 when nothing is waiting). A pending socket error (e.g.
    /// ECONNREFUSED queued by an ICMP port unreachable) is consumed by the call: logged, and 0 returned.
    func receive() throws(SystemError) -> Int {
        var i = 0
        while i < batchSize {
            // The kernel overwrites msg_namelen, msg_controllen, msg_flags and msg_len on every call.
            msgs[i] = fu_mmsghdr(
                msg_hdr: msghdr(msg_name: UnsafeMutableRawPointer(names + i),
                                msg_namelen: socklen_t(MemoryLayout<sockaddr_in>.size),
                                msg_iov: iovs + i, msg_iovlen: 1,
                                msg_control: gro ? controls + i &* controlStride : nil,
                                msg_controllen: gro ? controlStride : 0,
                                msg_flags: 0),
                msg_len: 0)
            i += 1
        }
        let count = UInt32(batchSize)
        received = 0
        message = 0
        split = GROSplit(total: 0, segmentSize: 0)
        switch try PacketIO.call("recvmmsg on", name, alsoFatal: EINVAL, {
            Int(fu_recvmmsg(fd, msgs, count, Int32(MSG_DONTWAIT)))
        }) {
        case .done(let n): received = n
        case .wouldBlock: break
        case .failed(let e): logLimiter.warn(logger, "recvmmsg on \(name)", e)
        }
        return received
    }

    /// The next datagram of the last batch, or nil when the batch is done.
    func next() -> Datagram? {
        while true {
            if let range = split.next() {
                return Datagram(bytes: UnsafeMutableRawBufferPointer(start: base + range.lowerBound,
                                                                     count: range.count), source: source)
            }
            guard message < received else { return nil }
            let i = message
            message += 1
            if msgs[i].msg_hdr.msg_flags & Int32(MSG_TRUNC) != 0 {
                counters.countDrop(.oversize)
                continue
            }
            let total = Int(msgs[i].msg_len)
            if total == 0 {
                // An empty datagram carries no packet at all: malformed, and counted like any other drop.
                counters.countDrop(.malformed)
                continue
            }
            // With GRO the buffer holds datagrams of `segmentSize` bytes back to back (the last may be shorter).
            split = GROSplit(total: total, segmentSize: groSegmentSize(i))
            if split.isCoalesced { offloads.groBuffers.wrappingIncrement(ordering: .relaxed) }
            if min(split.step, total) > largest {
                largest = min(split.step, total)
                offloads.largestDatagramReceived.store(UInt64(largest), ordering: .relaxed)
            }
            base = buffers.packet(i)
            source = IPv4Address(networkOrder: names[i].sin_addr.s_addr)
        }
    }

    /// The UDP_GRO segment size of message `i`, or 0 when it holds one datagram.
    @inline(__always)
    private func groSegmentSize(_ i: Int) -> Int {
        guard gro else { return 0 }
        var c = fu_cmsg_firsthdr(&msgs[i].msg_hdr)
        while let cmsg = c {
            if cmsg.pointee.cmsg_level == Int32(FU_SOL_UDP) && cmsg.pointee.cmsg_type == Int32(FU_UDP_GRO) {
                return Int(UnsafeRawPointer(fu_cmsg_data(cmsg)!).loadUnaligned(as: Int32.self))
            }
            c = fu_cmsg_nxthdr(&msgs[i].msg_hdr, cmsg)
        }
        return 0
    }
}
