import CShims
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// One packet from the tun with the tun's offloads undone: whole IPv4 bytes with a complete checksum, or a TCP
/// super-packet (TSO) whose segments are cut only when it is queued for sending (`cut(into:)`), in place.
struct TunPacket {
    var bytes: UnsafeMutableRawBufferPointer
    /// The segment payload size of a TCP super-packet; 0 for one packet.
    let gsoSize: Int

    /// The datagrams it makes on flannel's wire (`WireFormat`): 1, or one per TSO segment.
    var datagrams: Int {
        gsoSize == 0 ? 1 : TCPSegmenter.segmentCount(UnsafeRawBufferPointer(bytes), gsoSize: gsoSize)
    }
}

/// The tun's reading side, as wireguard-go keeps it inside its tun device: read() a batch of packets (up to
/// `batchSize` packets or `readBytesPerBatch` bytes), and with IFF_VNET_HDR parse each virtio_net_hdr, complete
/// the checksums the kernel left partial (TUN_F_CSUM), accept only TCPv4 super-packets (TUN_F_TSO4). What cannot be
/// parsed is dropped here and counted (`malformed`, `oversize`); `packet(_:)` then returns nil.
final class TunReader {
    let vnet: Bool
    private let buffers: PacketBuffers
    private let budget: Int
    private let io: StageIO
    /// The tun queue it reads.
    var fd: Int32 { io.fd }
    private var logLimiter = LogLimiter()
    /// The last `read()` stopped because the tun had nothing more (not because the batch was full).
    private(set) var isEmpty = false
    /// A read returned 0 bytes: the other end of a test socketpair went away (a tun never does that).
    private(set) var hungUp = false

    init(_ io: StageIO, vnet: Bool, options: ForwarderOptions) {
        self.io = io
        self.vnet = vnet
        budget = options.readBytesPerBatch
        buffers = PacketBuffers(count: options.batchSize,
                                size: options.bufferSize + (vnet ? VirtioNetHeader.length : 0))
    }

    /// Reads up to a batch; returns the number of reads. `wait`: the first read blocks (the descriptor is left
    /// blocking by `Forwarder.start`) until a packet comes or the wake signal interrupts it; every other read
    /// never blocks (RWF_NOWAIT). ENOBUFS/ENOMEM end the batch with a log line.
    /// `limit`: at most this many reads (1 for the express lane's first look after a quiet spell).
    func read(wait: Bool = false, limit: Int? = nil) throws(SystemError) -> Int {
        var count = 0
        var left = budget
        let most = min(limit ?? buffers.count, buffers.count)
        isEmpty = false
        while count < most {
            let p = buffers.packet(count)
            let size = buffers.size
            let blocking = wait && count == 0
            switch try PacketIO.call("read from", io.name, interruptible: blocking, {
                blocking ? Glibc.read(io.fd, p, size) : fu_read_nowait(io.fd, p, size)
            }) {
            case .done(0):
                hungUp = true
                isEmpty = true
                return count
            case .done(let n):
                buffers.lengths[count] = n
                count += 1
                left -= n
                if left <= 0 { return count }
            case .wouldBlock:
                isEmpty = true
                return count
            case .failed(let e):
                guard e == ENOBUFS || e == ENOMEM else { throw SystemError("read from", io.name, errno: e) }
                logLimiter.warn(io.logger, "read from \(io.name)", e)
                isEmpty = true
                return count
            }
        }
        return count
    }

    /// Read `i` of the last batch, its virtio header parsed and its checksum completed; nil when it was dropped.
    func packet(_ i: Int) -> TunPacket? {
        var length = buffers.lengths[i]
        var base = buffers.packet(i)
        if length >= buffers.size {  // filled the whole buffer: truncated
            io.counters.countDrop(.oversize)
            return nil
        }
        guard vnet else { return TunPacket(bytes: UnsafeMutableRawBufferPointer(start: base, count: length), gsoSize: 0) }
        guard length >= VirtioNetHeader.length else {
            io.counters.countDrop(.malformed)
            return nil
        }
        let h = VirtioNetHeader(from: base)
        base += VirtioNetHeader.length
        length -= VirtioNetHeader.length
        let bytes = UnsafeMutableRawBufferPointer(start: base, count: length)
        let gsoType = h.gsoType & ~VirtioNetHeader.gsoECN
        if gsoType == VirtioNetHeader.gsoTCPv4 { return TunPacket(bytes: bytes, gsoSize: Int(h.gsoSize)) }
        guard gsoType == VirtioNetHeader.gsoNone else {
            io.counters.countDrop(.malformed)  // only TSO4 is switched on
            return nil
        }
        // A packet the kernel left with a partial checksum (TUN_F_CSUM): complete it, or the peer's kernel drops it.
        if h.needsChecksum && !InternetChecksum.complete(bytes, start: Int(h.checksumStart),
                                                         offset: Int(h.checksumOffset)) {
            io.counters.countDrop(.malformed)
            return nil
        }
        return TunPacket(bytes: bytes, gsoSize: 0)
    }
}

extension TunPacket {
    /// Appends the packet to `queue` for `peer`: as it is, or (TSO) cut into whole IPv4 packets of at most
    /// `gsoSize` payload bytes, headers written into the queue's slots, payload left in place. Tagged with its
    /// flow key, so that a GSO message carries one flow only (see `SendQueue`).
    /// - Precondition: the queue has room for `datagrams`, or is empty.
    func cut(into queue: SendQueue, peer: Int, name: sockaddr_in) -> TCPSegmenter.Outcome {
        let flow = FlowSteering.key(UnsafeRawBufferPointer(bytes)) ?? 0
        if gsoSize == 0 {
            queue.append(peer: peer, name: name, first: bytes.baseAddress!, firstLength: bytes.count, flow: flow)
            return .segmented(1)
        }
        return TCPSegmenter.segment(bytes, gsoSize: gsoSize, peer: peer, name: name, into: queue, flow: flow)
    }
}
