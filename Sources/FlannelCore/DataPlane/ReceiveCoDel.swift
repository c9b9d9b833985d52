//  CoDel on the receive side, fq_codel style, where the standing queue of a loaded overlay sits:
//
//      peer ──▶ kernel UDP socket queue (FIFO, up to the receive buffer) ──recvmmsg──▶ UDP -> tun worker ──▶ tun
//               each datagram timestamped on arrival        sojourn = dequeue time - arrival time
//               (SO_TIMESTAMPNS)                             per flow: CoDel's drop (or ECN CE mark) schedule
//
//  The UDP -> tun worker is the slowest stage of a loaded path, so the bulk flows fill its socket queue until the
//  kernel drops at the tail (a 16 MiB buffer: milliseconds of standing queue that every small flow waits behind).
//  We cannot reorder the kernel's FIFO, but we can keep it short: as CoDel does, a bulk flow whose packets have
//  waited longer than `target` for a whole `interval` loses one packet (or has it marked CE when its sender
//  negotiated ECN), then more often (interval / sqrt(count)) until the sojourn falls below the target. Its TCP
//  backs off, the queue drains, and the small flows' wait shrinks with it. As in fq_codel, sparse flows (under
//  `bulkBytes` in the current interval: pings, request/response traffic, DNS) are never dropped or marked.

/// The tunables of `ReceiveCoDel` (nanoseconds and bytes). The defaults (500 us, 10 ms) measured best on the
/// bench's 2-CPU machine with cubic senders: the loaded ping median fell from ~10-15 ms to ~1.2-1.5 ms; 250 us
/// and 5 ms gave ~1 ms but cost a single stream a third of its throughput (a cubic flow halving its window
/// against a queue shorter than its BDP). BBR senders ignore the drops (bench/README.md).
public struct CoDelParameters: Sendable, Equatable {
    /// The sojourn a bulk flow may see persistently; 0 turns the scheduler off.
    public var targetNanoseconds: UInt64
    /// How long the sojourn must stay above the target before the first drop, and the base of the drop schedule
    /// (about the worst round-trip time of the flows; a few milliseconds between nodes).
    public var intervalNanoseconds: UInt64
    /// A flow that has delivered more than this in the current or the previous interval is bulk; below it,
    /// sparse.
    public var bulkBytes: Int

    public init(targetNanoseconds: UInt64 = 500_000, intervalNanoseconds: UInt64 = 10_000_000,
                bulkBytes: Int = 16 * 1024) {
        precondition(intervalNanoseconds >= 1 && bulkBytes >= 1)
        self.targetNanoseconds = targetNanoseconds
        self.intervalNanoseconds = intervalNanoseconds
        self.bulkBytes = bulkBytes
    }

    public static let off = CoDelParameters(targetNanoseconds: 0)
    public var isOn: Bool { targetNanoseconds > 0 }
}

/// The per-flow CoDel state of one receive worker: a fixed table of `slots` flows (allocated once, two probes per
/// flow key, an entry idle for a second may be taken over), so any number of flows costs bounded memory. A flow
/// that finds no entry is left alone (never dropped): the table only ever makes bulk flows lose packets.
/// The clock is the caller's (the kernel's receive timestamps are CLOCK_REALTIME), so tests drive it by hand.
final class ReceiveCoDel {
    enum Verdict: Equatable {
        case pass
        /// The packet's ECN field was set to CE (it stays in the batch).
        case marked
        case drop
    }

    private struct Flow {
        var key: UInt32 = 0
        var inUse = false
        var lastSeen: UInt64 = 0
        var windowStart: UInt64 = 0
        var windowBytes = 0
        /// What the flow delivered in the interval before the current one.
        var previousWindowBytes = 0
        // RFC 8289's state.
        var firstAboveTime: UInt64 = 0
        var dropNext: UInt64 = 0
        var count: UInt32 = 0
        var lastCount: UInt32 = 0
        var dropping = false
    }

    static let slots = 256
    /// An entry whose flow sent nothing for this long may be given to another flow.
    static let idleNanoseconds: UInt64 = 1_000_000_000

    let parameters: CoDelParameters
    private let flows: UnsafeMutablePointer<Flow>

    init(_ parameters: CoDelParameters) {
        self.parameters = parameters
        flows = .allocate(capacity: Self.slots)
        flows.initialize(repeating: Flow(), count: Self.slots)
    }

    deinit {
        flows.deinitialize(count: Self.slots)
        flows.deallocate()
    }

    /// Flows that hold an entry now (for tests: the state stays bounded).
    var flowsTracked: Int {
        var n = 0
        var i = 0
        while i < Self.slots {
            if flows[i].inUse { n += 1 }
            i += 1
        }
        return n
    }

    /// The verdict on `packet` (a whole inner IPv4 packet, already accepted by the decider) that waited
    /// `sojourn` ns in the socket queue, dequeued at `now`. On `.marked` the packet's ECN field is CE now and its
    /// header checksum updated.
    func verdict(_ packet: UnsafeMutableRawBufferPointer, sojourn: UInt64, now: UInt64) -> Verdict {
        guard packet.count >= IPv4Header.minimumLength, let key = FlowSteering.key(UnsafeRawBufferPointer(packet)),
              let i = slot(for: key, now: now) else { return .pass }
        let p = parameters
        let sinceWindow = now &- flows[i].windowStart
        if sinceWindow >= p.intervalNanoseconds {
            flows[i].previousWindowBytes = sinceWindow < 2 &* p.intervalNanoseconds ? flows[i].windowBytes : 0
            flows[i].windowStart = now
            flows[i].windowBytes = 0
        }
        flows[i].windowBytes += packet.count
        flows[i].lastSeen = now
        let bulk = flows[i].windowBytes > p.bulkBytes || flows[i].previousWindowBytes > p.bulkBytes
        // codel_should_drop: above target for at least an interval (a sparse flow never is).
        var okToDrop = false
        if sojourn < p.targetNanoseconds || !bulk {
            flows[i].firstAboveTime = 0
        } else if flows[i].firstAboveTime == 0 {
            flows[i].firstAboveTime = now &+ p.intervalNanoseconds
        } else if now >= flows[i].firstAboveTime {
            okToDrop = true
        }
        if flows[i].dropping {
            if !okToDrop {
                flows[i].dropping = false
                return .pass
            }
            guard now >= flows[i].dropNext else { return .pass }
            flows[i].count &+= 1
            flows[i].dropNext = controlLaw(flows[i].dropNext, flows[i].count)
            return signal(packet)
        }
        guard okToDrop else { return .pass }
        flows[i].dropping = true
        // Resume near the last drop rate if the flow was in the dropping state recently.
        let delta = flows[i].count &- flows[i].lastCount
        if delta > 1 && delta < 1 << 30 && now &- flows[i].dropNext < 16 &* p.intervalNanoseconds {
            flows[i].count = delta
        } else {
            flows[i].count = 1
        }
        flows[i].dropNext = controlLaw(now, flows[i].count)
        flows[i].lastCount = flows[i].count
        return signal(packet)
    }

    /// Interval / sqrt(count) after `t`.
    @inline(__always)
    private func controlLaw(_ t: UInt64, _ count: UInt32) -> UInt64 {
        t &+ UInt64(Double(parameters.intervalNanoseconds) / Double(max(count, 1)).squareRoot())
    }

    /// CE on an ECN-capable packet (already CE: nothing to change), else drop.
    @inline(__always)
    private func signal(_ packet: UnsafeMutableRawBufferPointer) -> Verdict {
        let tos = packet[1]
        let ecn = tos & 0x03
        guard ecn != 0 else { return .drop }
        if ecn != 0x03 {
            let old = UInt16(packet[0]) << 8 | UInt16(tos)
            let new = old | 0x0003
            let checksum = UInt16(packet[10]) << 8 | UInt16(packet[11])
            let updated = InternetChecksum.update(checksum, oldWord: old, newWord: new)
            packet[1] = tos | 0x03
            packet[10] = UInt8(updated >> 8)
            packet[11] = UInt8(updated & 0xFF)
        }
        return .marked
    }

    /// The entry of `key`: its own, else a free or idle one of its two, else nil.
    @inline(__always)
    private func slot(for key: UInt32, now: UInt64) -> Int? {
        let h = key &* 0x9E37_79B1
        let a = Int(h >> 24)
        let b = Int((h >> 8) & 0xFF)
        if flows[a].inUse && flows[a].key == key { return a }
        if flows[b].inUse && flows[b].key == key { return b }
        if available(a, now) { return take(a, key, now) }
        if available(b, now) { return take(b, key, now) }
        return nil
    }

    @inline(__always)
    private func available(_ i: Int, _ now: UInt64) -> Bool {
        !flows[i].inUse || now &- flows[i].lastSeen > Self.idleNanoseconds
    }

    @inline(__always)
    private func take(_ i: Int, _ key: UInt32, _ now: UInt64) -> Int {
        flows[i] = Flow()
        flows[i].key = key
        flows[i].inUse = true
        flows[i].windowStart = now
        return i
    }
}
