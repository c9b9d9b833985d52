import Atomics
import Logging

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
    let threadName: String
    let heartbeat = ManagedAtomic<UInt64>(0)
    let options: ForwarderOptions
    let stopFD: Int32
    var inputFD: Int32 { receiver.fd }
    let receiver: UDPReceiver
    let writer: TunWriter
    private let icmpSender: UDPSender
    private let table: RouteTable
    private let counters: DataPlaneCounters
    private var decider: PacketDecider
    private let scratch = allocateScratch()

    init(receiver: UDPReceiver, writer: TunWriter, icmpSender: UDPSender, stopFD: Int32, threadName: String,
         table: RouteTable, config: ForwardingConfig, counters: DataPlaneCounters, options: ForwarderOptions) {
        self.receiver = receiver
        self.writer = writer
        self.icmpSender = icmpSender
        self.stopFD = stopFD
        self.threadName = threadName
        self.table = table
        self.counters = counters
        self.options = options
        decider = PacketDecider(config: config)
    }

    deinit { scratch.deallocate() }

    func drain() throws(SystemError) -> Int {
        var total = 0
        var batches = 0
        while batches < options.batchesPerWakeup {
            let n = try receiver.receive()
            if n == 0 { break }
            total += n
            try deliverBatch()
            batches += 1
            if n < receiver.batchSize { break }
        }
        return total
    }

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
                counters.countDrop(reason)
                if limited { counters.icmpRateLimited.wrappingIncrement(ordering: .relaxed) }
            }
        }
        try writer.endBatch(snapshot)
    }
}
