import Atomics
import Logging

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
    let threadName: String
    let heartbeat = ManagedAtomic<UInt64>(0)
    let options: ForwarderOptions
    let stopFD: Int32
    var inputFD: Int32 { reader.fd }
    let reader: TunReader
    let sender: UDPSender
    private let icmpWriter: TunWriter
    private let table: RouteTable
    private let counters: DataPlaneCounters
    private var decider: PacketDecider
    private let scratch = allocateScratch()

    init(reader: TunReader, sender: UDPSender, icmpWriter: TunWriter, stopFD: Int32, threadName: String,
         table: RouteTable, config: ForwardingConfig, counters: DataPlaneCounters, options: ForwarderOptions) {
        self.reader = reader
        self.sender = sender
        self.icmpWriter = icmpWriter
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
            let n = try reader.read()
            if n == 0 { break }
            total += n
            try forwardBatch(n)
            batches += 1
            if reader.isEmpty { break }
        }
        return total
    }

    /// Decides each packet of the batch once (for a super-packet: in the template of all its segments) and hands
    /// it over; one flush at the end.
    func forwardBatch(_ count: Int) throws(SystemError) {
        let snapshot = table.snapshot()
        var i = 0
        while i < count {
            defer { i += 1 }
            guard var packet = reader.packet(i) else { continue }
            switch decider.fromTun(packet.bytes, snapshot: snapshot, scratch: scratch) {
            case .forward(let peer, let length):
                packet.bytes = UnsafeMutableRawBufferPointer(rebasing: packet.bytes[0..<length])
                try sender.append(packet, peer: peer, snapshot: snapshot)
            case .icmpToTun(let length, let reason):
                counters.countDrop(reason)
                try icmpWriter.writeICMP(UnsafeMutableRawBufferPointer(rebasing: scratch[0..<length]))
            case .drop(let reason, let limited):
                counters.countDrop(reason)
                if limited { counters.icmpRateLimited.wrappingIncrement(ordering: .relaxed) }
            }
        }
        try sender.flush(snapshot)
    }
}
