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
    /// Drops or marks bulk flows' packets that waited too long in the socket queue (nil: off, or no timestamps).
    let codel: ReceiveCoDel?
    /// The longest a datagram handed over since `takeLongestSojourn()` waited in the socket (ns; 0 without
    /// timestamps). The express lane's thread reads it to see that it waits for a CPU (`ExpressPriority`).
    private var longestSojourn: UInt64 = 0

    init(receiver: UDPReceiver, writer: TunWriter, icmpSender: UDPSender, _ setup: WorkerSetup) {
        self.receiver = receiver
        self.writer = writer
        self.icmpSender = icmpSender
        codel = setup.options.codel.isOn && receiver.timestamps && !setup.express ? ReceiveCoDel(setup.options.codel) : nil
        super.init(setup)
    }

    override func takeBatch(wait: Bool) throws(SystemError) -> (count: Int, drained: Bool) {
        let n = try receiver.receive(wait: wait)
        return (n, n < receiver.batchSize)
    }

    override func handleBatch(_ count: Int) throws(SystemError) { try deliverBatch() }

    override var input: Int32 { receiver.fd }

    /// The longest sojourn since the last call, and starts over.
    @inline(__always)
    func takeLongestSojourn() -> UInt64 {
        defer { longestSojourn = 0 }
        return longestSojourn
    }

    /// The express lane's look at a socket that was empty on its last pass: one message (`UDPReceiver.receive`
    /// sets up only its header), delivered at once. If more follow, the lane's next pass takes them as a batch.
    /// Returns the messages received (0 or 1; a GRO buffer is one).
    func deliverOne() throws(SystemError) -> Int {
        let n = try receiver.receive(limit: 1)
        if n > 0 { try deliverBatch() }
        return n
    }

    /// Decides each datagram of the batch and hands it over; the tun writer's open group is written at the end.
    func deliverBatch() throws(SystemError) {
        let snapshot = table.snapshot()
        while let datagram = receiver.next() {
            if datagram.sojourn > longestSojourn { longestSojourn = datagram.sojourn }
            switch decider.fromUDP(datagram.bytes, outerSource: datagram.source, snapshot: snapshot,
                                   scratch: scratch) {
            case .deliver(let peer, let length):
                let packet = UnsafeMutableRawBufferPointer(rebasing: datagram.bytes[0..<length])
                // Optional chaining, not `if let`: a binding costs every packet a retain and a release.
                switch codel?.verdict(packet, sojourn: datagram.sojourn, now: receiver.batchTime) {
                case .pass?, nil: break
                case .marked?: counters.codelMarks.wrappingIncrement(ordering: .relaxed)
                case .drop?:
                    counters.countDrop(.codel)
                    continue
                }
                try writer.deliver(packet, peer: peer, snapshot: snapshot)
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
