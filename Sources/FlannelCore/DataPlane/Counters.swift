import Atomics

/// Why the data plane dropped a packet. Each reason has its own counter, shown by `status`.
public enum DropReason: String, CaseIterable, Codable, Sendable {
    /// An IPv4 packet with a bad IHL or a total length that does not fit the bytes read.
    case malformed
    /// Not IPv4 at all (e.g. the IPv6 router solicitations the kernel sends on a new device).
    case notIPv4
    /// tun -> UDP: no peer route covers the destination.
    case noRoute
    /// The TTL would reach 0.
    case ttlExpired
    /// UDP -> tun: the datagram's source address is not the address of any peer.
    case unknownPeer
    /// UDP -> tun: a known peer sent a packet whose inner source lies outside that peer's subnet.
    case spoofedSource
    /// Larger than the data plane's maximum packet length, or truncated by the receive buffer.
    case oversize
    /// sendmmsg/sendto failed for the packet (e.g. ENOBUFS, EHOSTUNREACH) or the socket stayed full.
    case sendFailed
    /// write() into the tun failed (e.g. its queue was full: EAGAIN).
    case tunWriteFailed
    /// UDP -> tun: the inner destination lies outside the overlay network (the node's underlay, the node itself,
    /// the world). A peer is trusted only to reach pods, never to have its packets forwarded by this node.
    case outsideNetwork
    /// UDP -> tun: a bulk flow's packet dropped by the receive side's CoDel (`ReceiveCoDel`) because the flow's
    /// packets kept waiting in the socket queue longer than the target; its sender backs off.
    case codel

    /// Dense index for counter arrays.
    public var index: Int {
        switch self {
        case .malformed: return 0
        case .notIPv4: return 1
        case .noRoute: return 2
        case .ttlExpired: return 3
        case .unknownPeer: return 4
        case .spoofedSource: return 5
        case .oversize: return 6
        case .sendFailed: return 7
        case .tunWriteFailed: return 8
        case .outsideNetwork: return 9
        case .codel: return 10
        }
    }
}

/// Packet and byte counts in one direction.
public struct DirectionCounts: Codable, Equatable, Sendable {
    public var packets: UInt64
    public var bytes: UInt64
    public init(packets: UInt64 = 0, bytes: UInt64 = 0) {
        self.packets = packets
        self.bytes = bytes
    }
}

/// The data plane's global counters. Each is a relaxed atomic: the workers add to them (once per batch where
/// they can), and `status` reads them from another thread. Relaxed ordering is enough because no counter is used
/// to publish other memory; a reader may see two counters from slightly different moments, never a torn value.
public final class DataPlaneCounters: Sendable {
    public let tunToUDPPackets = ManagedAtomic<UInt64>(0)
    public let tunToUDPBytes = ManagedAtomic<UInt64>(0)
    public let udpToTunPackets = ManagedAtomic<UInt64>(0)
    public let udpToTunBytes = ManagedAtomic<UInt64>(0)
    /// ICMP errors the data plane generated (into the tun, or back to a peer).
    public let icmpSent = ManagedAtomic<UInt64>(0)
    /// ICMP errors that the rules allowed but the rate limit suppressed. Not a drop: the offending packet is
    /// counted under its own reason as well.
    public let icmpRateLimited = ManagedAtomic<UInt64>(0)
    /// Packets of ECN-capable bulk flows the receive side's CoDel marked CE instead of dropping (delivered).
    public let codelMarks = ManagedAtomic<UInt64>(0)
    private let drops: [ManagedAtomic<UInt64>]

    public init() {
        drops = DropReason.allCases.map { _ in ManagedAtomic<UInt64>(0) }
    }

    public func countDrop(_ reason: DropReason, _ n: UInt64 = 1) {
        dropCounter(reason).wrappingIncrement(by: n, ordering: .relaxed)
    }

    package func dropCounter(_ reason: DropReason) -> ManagedAtomic<UInt64> { drops[reason.index] }

    public func drops(_ reason: DropReason) -> UInt64 { drops[reason.index].load(ordering: .relaxed) }

    public func snapshot() -> DataPlaneCountersSnapshot {
        var d: [String: UInt64] = [:]
        for r in DropReason.allCases { d[r.rawValue] = drops(r) }
        return DataPlaneCountersSnapshot(
            tunToUDP: DirectionCounts(packets: tunToUDPPackets.load(ordering: .relaxed),
                                      bytes: tunToUDPBytes.load(ordering: .relaxed)),
            udpToTun: DirectionCounts(packets: udpToTunPackets.load(ordering: .relaxed),
                                      bytes: udpToTunBytes.load(ordering: .relaxed)),
            icmpSent: icmpSent.load(ordering: .relaxed),
            icmpRateLimited: icmpRateLimited.load(ordering: .relaxed),
            codelMarks: codelMarks.load(ordering: .relaxed),
            drops: d)
    }
}

/// A point-in-time copy of `DataPlaneCounters`, for `status` and `status --json`. `drops` is keyed by
/// `DropReason.rawValue` and always has every reason, zeros included, so scripts can rely on the keys.
public struct DataPlaneCountersSnapshot: Codable, Equatable, Sendable {
    public var tunToUDP: DirectionCounts
    public var udpToTun: DirectionCounts
    public var icmpSent: UInt64
    public var icmpRateLimited: UInt64
    /// See `DataPlaneCounters.codelMarks`; 0 when read from a daemon that predates it.
    public var codelMarks: UInt64
    public var drops: [String: UInt64]

    public init(tunToUDP: DirectionCounts, udpToTun: DirectionCounts, icmpSent: UInt64, icmpRateLimited: UInt64,
                codelMarks: UInt64 = 0, drops: [String: UInt64]) {
        self.tunToUDP = tunToUDP
        self.udpToTun = udpToTun
        self.icmpSent = icmpSent
        self.icmpRateLimited = icmpRateLimited
        self.codelMarks = codelMarks
        self.drops = drops
    }

    private enum CodingKeys: String, CodingKey {
        case tunToUDP, udpToTun, icmpSent, icmpRateLimited, codelMarks, drops
    }

    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        tunToUDP = try c.decode(DirectionCounts.self, forKey: .tunToUDP)
        udpToTun = try c.decode(DirectionCounts.self, forKey: .udpToTun)
        icmpSent = try c.decode(UInt64.self, forKey: .icmpSent)
        icmpRateLimited = try c.decode(UInt64.self, forKey: .icmpRateLimited)
        codelMarks = try c.decodeIfPresent(UInt64.self, forKey: .codelMarks) ?? 0
        drops = try c.decode([String: UInt64].self, forKey: .drops)
    }

    public func drops(_ reason: DropReason) -> UInt64 { drops[reason.rawValue] ?? 0 }
}

/// Traffic counters of one peer, kept across route table updates for as long as the peer's subnet stays in the
/// table. tx is written by the tun -> UDP worker, rx by the UDP -> tun worker; anyone may read.
public final class PeerCounters: Sendable {
    public let txPackets = ManagedAtomic<UInt64>(0)
    public let txBytes = ManagedAtomic<UInt64>(0)
    public let rxPackets = ManagedAtomic<UInt64>(0)
    public let rxBytes = ManagedAtomic<UInt64>(0)

    public init() {}

    public func countTx(bytes: Int) {
        txPackets.wrappingIncrement(ordering: .relaxed)
        txBytes.wrappingIncrement(by: UInt64(bytes), ordering: .relaxed)
    }

    public func countRx(bytes: Int) {
        rxPackets.wrappingIncrement(ordering: .relaxed)
        rxBytes.wrappingIncrement(by: UInt64(bytes), ordering: .relaxed)
    }

    /// `packets` packets of `bytes` bytes in all, sent as one batch (a GSO message, a segmented super-packet).
    public func countTx(packets: Int, bytes: Int) {
        txPackets.wrappingIncrement(by: UInt64(packets), ordering: .relaxed)
        txBytes.wrappingIncrement(by: UInt64(bytes), ordering: .relaxed)
    }

    /// `packets` packets of `bytes` bytes in all, written as one (a coalesced super-packet).
    public func countRx(packets: Int, bytes: Int) {
        rxPackets.wrappingIncrement(by: UInt64(packets), ordering: .relaxed)
        rxBytes.wrappingIncrement(by: UInt64(bytes), ordering: .relaxed)
    }

    public var snapshot: PeerCountersSnapshot {
        PeerCountersSnapshot(txPackets: txPackets.load(ordering: .relaxed), txBytes: txBytes.load(ordering: .relaxed),
                             rxPackets: rxPackets.load(ordering: .relaxed), rxBytes: rxBytes.load(ordering: .relaxed))
    }
}

public struct PeerCountersSnapshot: Codable, Equatable, Sendable {
    public var txPackets: UInt64
    public var txBytes: UInt64
    public var rxPackets: UInt64
    public var rxBytes: UInt64

    public init(txPackets: UInt64 = 0, txBytes: UInt64 = 0, rxPackets: UInt64 = 0, rxBytes: UInt64 = 0) {
        self.txPackets = txPackets
        self.txBytes = txBytes
        self.rxPackets = rxPackets
        self.rxBytes = rxBytes
    }
}

/// What one worker pair moved (worker k: tun queue k and socket k), beside the global `DataPlaneCounters`: for
/// `status`, to see the load spread over the workers and one flow stay on one worker.
public final class WorkerCounters: Sendable {
    public let tunToUDPPackets = ManagedAtomic<UInt64>(0)
    public let udpToTunPackets = ManagedAtomic<UInt64>(0)

    public init() {}

    public func snapshot(_ index: Int, express: Bool = false) -> WorkerCounts {
        WorkerCounts(worker: index, tunToUDPPackets: tunToUDPPackets.load(ordering: .relaxed),
                     udpToTunPackets: udpToTunPackets.load(ordering: .relaxed), express: express ? true : nil)
    }
}

/// A point-in-time copy of one worker pair's `WorkerCounters`.
public struct WorkerCounts: Codable, Equatable, Sendable {
    public var worker: Int
    public var tunToUDPPackets: UInt64
    public var udpToTunPackets: UInt64
    /// true for the express lane's pair (`ForwarderOptions.express`); absent for the others.
    public var express: Bool?
}
