//  UDP -> tun, one worker per socket of the port:
//
//      peers ──recvmmsg──▶ UDPReceiver ─────────▶ decide ───deliver──▶ TunWriter ──write/writev──▶ tun queue
//                          source addresses        PacketDecider        TCP coalescing into
//                          GRO split into          .fromUDP             super-packets
//                          datagrams                    │
//                          (drops: oversize,            └─icmpToPeer─▶ UDPSender ──sendto──▶ peer
//                           malformed)                                 (time exceeded)
//
//  The worker only reads, decides and hands over; each stage owns its buffers (allocated once) and its system
//  calls (through `PacketIO`). Nothing is copied: the tun gets the bytes recvmmsg wrote.

/// UDP -> tun: see the picture above.
final class UDPToTunWorker: ForwardingWorker {
    let receiver: UDPReceiver
    let writer: TunWriter
    private let icmpSender: UDPSender

    init(receiver: UDPReceiver, writer: TunWriter, icmpSender: UDPSender, _ setup: WorkerSetup) {
        self.receiver = receiver
        self.writer = writer
        self.icmpSender = icmpSender
        super.init(setup)
    }

    override var inputFD: Int32 { receiver.fd }

    override func takeBatch() throws(SystemError) -> (count: Int, drained: Bool) {
        let n = try receiver.receive()
        return (n, n < receiver.batchSize)
    }

    override func handleBatch(_ count: Int) throws(SystemError) { try deliverBatch() }

    /// Decides each datagram of the batch and hands it over; the tun writer's open group is written at the end.
    func deliverBatch() throws(SystemError) {
        let snapshot = table.snapshot()
        while let datagram = receiver.next() {
            switch decider.fromUDP(datagram.bytes, outerSource: datagram.source, snapshot: snapshot,
                                   scratch: scratch) {
            case .deliver(let peer, let length):
                try writer.deliver(UnsafeMutableRawBufferPointer(rebasing: datagram.bytes[0..<length]), peer: peer,
                                   snapshot: snapshot)
            case .icmpToPeer(let length, let peer, let reason):
                counters.countDrop(reason)
                try icmpSender.sendNow(UnsafeRawBufferPointer(rebasing: scratch[0..<length]),
                                       to: snapshot.peers[peer])
            case .drop(let reason, let limited):
                dropped(reason, limited: limited)
            }
        }
        try writer.endBatch(snapshot)
    }
}
