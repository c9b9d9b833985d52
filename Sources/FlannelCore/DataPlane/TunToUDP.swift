//  tun -> UDP, one worker per tun queue:
//
//      tun queue ──read()×batch──▶ TunReader ─────────▶ decide ──forward──▶ UDPSender ──sendmmsg──▶ peers
//                                  virtio header         PacketDecider       TSO cut into datagrams
//                                  checksum completion   .fromTun            GSO grouping, its fallback
//                                  (drops: malformed,         │
//                                   oversize)                 └─icmpToTun─▶ TunWriter ──write──▶ tun
//                                                                           (net unreachable, time exceeded)
//
//  The worker only reads, decides and hands over; each stage owns its buffers (allocated once) and its system
//  calls (through `PacketIO`). Nothing is copied: a datagram is the bytes the tun wrote, or a header the cut
//  wrote plus a slice of them.

/// tun -> UDP: see the picture above.
final class TunToUDPWorker: ForwardingWorker {
    let reader: TunReader
    let sender: UDPSender
    private let icmpWriter: TunWriter

    init(reader: TunReader, sender: UDPSender, icmpWriter: TunWriter, _ setup: WorkerSetup) {
        self.reader = reader
        self.sender = sender
        self.icmpWriter = icmpWriter
        super.init(setup)
    }

    override func takeBatch(wait: Bool) throws(SystemError) -> (count: Int, drained: Bool) {
        let n = try reader.read(wait: wait)
        return (n, reader.isEmpty)
    }

    override var hungUp: Bool { reader.hungUp }

    override var input: Int32 { reader.fd }

    override func handleBatch(_ count: Int) throws(SystemError) { try forwardBatch(count) }

    /// Decides each packet of the batch once (for a super-packet: in the template of all its segments) and hands
    /// it over; one flush at the end.
    func forwardBatch(_ count: Int) throws(SystemError) {
        let snapshot = table.snapshot()
        var i = 0
        while i < count {
            defer { i += 1 }
            guard let packet = reader.packet(i) else { continue }
            try forward(packet, snapshot: snapshot, alone: false)
        }
        try sender.flush(snapshot)
    }

    /// The express lane's look at a tun that was empty on its last pass: one read, and the packet goes out at once
    /// (a whole packet with one sendto, `UDPSender.sendOne`; a TSO packet through the queue, flushed). So a packet
    /// that comes alone, the lane's usual case, pays for no batch machinery; if more follow, the lane's next pass
    /// takes them as a batch. Returns the packets read (0 or 1).
    func forwardOne() throws(SystemError) -> Int {
        guard try reader.read(limit: 1) == 1 else { return 0 }
        if let packet = reader.packet(0) { try forward(packet, snapshot: table.snapshot(), alone: true) }
        return 1
    }

    /// Decides one packet and hands it over: queued (`alone`: and sent at once).
    @inline(__always)
    private func forward(_ packet: TunPacket, snapshot: RouteSnapshot, alone: Bool) throws(SystemError) {
        var packet = packet
        switch decider.fromTun(packet.bytes, snapshot: snapshot, scratch: scratch) {
        case .forward(let peer, let length):
            packet.bytes = UnsafeMutableRawBufferPointer(rebasing: packet.bytes[0..<length])
            if alone && packet.gsoSize == 0 {
                try sender.sendOne(packet, peer: peer, snapshot: snapshot)
                return
            }
            try sender.append(packet, peer: peer, snapshot: snapshot)
            if alone { try sender.flush(snapshot) }
        case .icmpToTun(let length, let reason):
            counters.countDrop(reason)
            try icmpWriter.writeICMP(UnsafeMutableRawBufferPointer(rebasing: scratch[0..<length]))
        case .drop(let reason, let limited):
            dropped(reason, limited: limited)
        }
    }
}
