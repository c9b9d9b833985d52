import CShims
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// The tun's writing side, as wireguard-go keeps it inside its tun device: one packet per write (after a
/// virtio_net_hdr when the tun has IFF_VNET_HDR), and with coalescing on, runs of one TCP flow merged into one
/// super-packet (`TCPCoalescer`) written with one writev. `deliver` may hold a packet back in the open group;
/// `endBatch` writes it and publishes the batch's counts. A full tun queue (EAGAIN) drops the packet as
/// `tunWriteFailed`, never retried in a loop (flannel busy-retries here).
final class TunWriter {
    let vnet: Bool
    /// Whether runs of one TCP flow are merged (`coalescer` is allocated either way: an optional would cost every
    /// packet a retain and a release when it is unwrapped).
    private let coalesce: Bool
    private let coalescer = TCPCoalescer()
    private let io: StageIO
    private var logLimiter = LogLimiter()
    /// The virtio_net_hdr written before a packet, and the two-piece iovec for that write.
    private let header: UnsafeMutableRawPointer
    private let iovs: UnsafeMutablePointer<iovec>
    // The open coalescing group: its peer, packets and bytes as received (for the counters).
    private var groupPeer = 0
    private var groupPackets = 0
    private var groupBytes = 0
    private var delivered: UInt64 = 0
    private var deliveredBytes: UInt64 = 0

    init(_ io: StageIO, vnet: Bool, coalesce: Bool) {
        self.io = io
        self.vnet = vnet
        self.coalesce = coalesce
        header = .allocate(byteCount: 16, alignment: 16)
        header.initializeMemory(as: UInt8.self, repeating: 0, count: 16)
        iovs = .allocate(count: 2, initializedTo: iovec())
    }

    deinit {
        header.deallocate()
        iovs.deallocate()
    }

    /// Hands `packet` (from `peer`) to the tun: into the open coalescing group, as the start of a new one, or
    /// written at once.
    func deliver(_ packet: UnsafeMutableRawBufferPointer, peer: Int, snapshot: RouteSnapshot) throws(SystemError) {
        if coalesce {
            let c = coalescer
            if c.isOpen {
                if c.append(UnsafeRawBufferPointer(packet)) {
                    groupPackets += 1
                    groupBytes += packet.count
                    return
                }
                try flushGroup(c, snapshot)
            }
            if TCPCoalescer.isCandidate(UnsafeRawBufferPointer(packet)) {
                c.begin(packet)
                groupPeer = peer
                groupPackets = 1
                groupBytes = packet.count
                return
            }
        }
        if try write(packet) {
            snapshot.peers[peer].counters.countRx(bytes: packet.count)
            delivered &+= 1
            deliveredBytes &+= UInt64(packet.count)
        }
    }

    /// Writes the open group, and adds what this batch delivered to the direction's counters.
    func endBatch(_ snapshot: RouteSnapshot) throws(SystemError) {
        if coalescer.isOpen { try flushGroup(coalescer, snapshot) }  // only ever open when coalescing
        io.counters.udpToTunPackets.wrappingIncrement(by: delivered, ordering: .relaxed)
        io.counters.udpToTunBytes.wrappingIncrement(by: deliveredBytes, ordering: .relaxed)
        io.worker.udpToTunPackets.wrappingIncrement(by: delivered, ordering: .relaxed)
        delivered = 0
        deliveredBytes = 0
    }

    /// Writes an ICMP error the sending side built (counted as `icmpSent`, not as delivered).
    func writeICMP(_ packet: UnsafeMutableRawBufferPointer) throws(SystemError) {
        if try write(packet) { io.counters.icmpSent.wrappingIncrement(ordering: .relaxed) }
    }

    /// Writes the open coalescing group (one super-packet, or its single packet as it came).
    private func flushGroup(_ c: TCPCoalescer, _ snapshot: RouteSnapshot) throws(SystemError) {
        let pieces = c.finish(header: header)
        let packets = groupPackets
        if packets > 1 { io.offloads.superPacketsCoalesced.wrappingIncrement(ordering: .relaxed) }
        if try write(pieces) {
            snapshot.peers[groupPeer].counters.countRx(packets: packets, bytes: groupBytes)
            delivered &+= UInt64(packets)
            deliveredBytes &+= UInt64(groupBytes)
        } else if packets > 1 {
            io.counters.countDrop(.tunWriteFailed, UInt64(packets - 1))  // the failed write counted one
        }
        groupPackets = 0
        groupBytes = 0
    }

    /// One packet, after a virtio_net_hdr saying "nothing to do" when the tun has one.
    private func write(_ packet: UnsafeMutableRawBufferPointer) throws(SystemError) -> Bool {
        guard vnet else {
            iovs[0] = iovec(iov_base: packet.baseAddress, iov_len: packet.count)
            return try write(UnsafeBufferPointer(start: iovs, count: 1))
        }
        VirtioNetHeader.none.store(to: header)
        iovs[0] = iovec(iov_base: header, iov_len: VirtioNetHeader.length)
        iovs[1] = iovec(iov_base: packet.baseAddress, iov_len: packet.count)
        return try write(UnsafeBufferPointer(start: iovs, count: 2))
    }

    /// One writev of a gather list (virtio header first when the tun has one), never blocking (the descriptor
    /// itself blocks, for the reader's sake): a full queue is EAGAIN.
    private func write(_ pieces: UnsafeBufferPointer<iovec>) throws(SystemError) -> Bool {
        try written(PacketIO.call("write to", io.name) {
            fu_writev_nowait(io.fd, pieces.baseAddress!, Int32(pieces.count))
        })
    }

    private func written(_ result: PacketIO.Result) -> Bool {
        if case .done = result { return true }
        PacketIO.dropped(result, .tunWriteFailed, "write to \(io.name)", &logLimiter, io)
        return false
    }
}
