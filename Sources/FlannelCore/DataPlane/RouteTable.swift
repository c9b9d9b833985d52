import Atomics
#if canImport(Glibc)
import Glibc
#endif

/// The peer table the data plane forwards by: the control side publishes whole tables, the workers read them
/// without locks.
///
/// Memory safety: the current table is an immutable `RouteSnapshot` held in a `ManagedAtomic` strong reference
/// (swift-atomics' atomic strong references). `snapshot()` returns a +1 reference that the atomic load itself
/// retained, so a worker that loaded a snapshot keeps it alive for as long as it uses it, however many
/// `publish` calls replace it meanwhile; the old table is freed when its last reader lets go. Nothing in a
/// snapshot is mutable except the per-peer counters, which are atomics. Readers never block publishers and
/// publishers never block readers: a worker loads the snapshot once per batch.
public final class RouteTable: Sendable {
    private let current: ManagedAtomic<RouteSnapshot>

    public init(_ routes: [PeerRoute] = []) {
        current = ManagedAtomic(RouteSnapshot(routes: routes, previous: nil))
    }

    /// Replaces the whole table with `routes`, atomically: a worker sees either the old table or the new one.
    /// A subnet present in both keeps its `PeerCounters` object (and so its counts), even when its endpoint
    /// changed. If two routes name the same subnet, the later one wins. Concurrent publishers are safe (the
    /// swap is a compare-and-exchange retried on the table that is actually replaced, so no counters are lost).
    public func publish(_ routes: [PeerRoute]) {
        var old = current.load(ordering: .acquiring)
        while true {
            let new = RouteSnapshot(routes: routes, previous: old)
            let (done, seen) = current.compareExchange(expected: old, desired: new, ordering: .acquiringAndReleasing)
            if done { return }
            old = seen
        }
    }

    /// The table as it stands; hold on to it for a batch, not longer.
    public func snapshot() -> RouteSnapshot { current.load(ordering: .acquiring) }

    /// The routes of the current table, in the order they were published (duplicates removed).
    public var routes: [PeerRoute] { snapshot().peers.map(\.route) }
}

/// One peer of a `RouteSnapshot`: its route, its counters (shared with later snapshots while the subnet stays),
/// and its endpoint as a ready-made `sockaddr_in` for sendmmsg/sendto.
public final class PeerEntry: Sendable {
    public let route: PeerRoute
    public let counters: PeerCounters
    /// `route.endpoint` in network byte order, for the kernel.
    public let sockaddr: sockaddr_in

    package init(route: PeerRoute, counters: PeerCounters) {
        self.route = route
        self.counters = counters
        sockaddr = route.endpoint.socketAddress
    }
}

/// An immutable peer table with longest-prefix-match lookups that neither lock nor allocate.
///
/// Layout: one open-addressing hash table keyed by (prefix length, masked network), and the list of prefix
/// lengths present, longest first. A lookup probes one hash slot chain per distinct prefix length, so its cost
/// grows with the number of different lengths (usually one or two), not with the number of peers.
/// (flannel's proxy scans its routes and takes the first match, which picks 10.244.0.0/16 over a more specific
/// 10.244.10.0/24 listed after it; this does not.)
public final class RouteSnapshot: Sendable, AtomicReference {
    public let peers: [PeerEntry]
    /// Distinct prefix lengths in the table, longest first.
    public let prefixLengths: [Int]
    package let networks: FlatIndex
    package let peerAddresses: FlatIndex

    package init(routes: [PeerRoute], previous: RouteSnapshot?) {
        // Counters survive for every subnet the previous table had.
        var oldCounters: [IPv4Network: PeerCounters] = [:]
        for p in previous?.peers ?? [] { oldCounters[p.route.subnet] = p.counters }

        // De-duplicate by subnet, the later route winning but keeping the first one's position.
        var position: [IPv4Network: Int] = [:]
        var unique: [PeerRoute] = []
        for r in routes {
            if let i = position[r.subnet] {
                unique[i] = r
            } else {
                position[r.subnet] = unique.count
                unique.append(r)
            }
        }
        peers = unique.map { PeerEntry(route: $0, counters: oldCounters[$0.subnet] ?? PeerCounters()) }
        prefixLengths = Set(unique.map(\.subnet.prefixLength)).sorted(by: >)

        networks = FlatIndex(unique.enumerated().map {
            (RouteSnapshot.networkKey($0.element.subnet.address.value, length: $0.element.subnet.prefixLength),
             Int32($0.offset))
        })
        peerAddresses = FlatIndex(unique.enumerated().map {
            (RouteSnapshot.addressKey($0.element.endpoint.address.value), Int32($0.offset))
        })
    }

    package static func networkKey(_ network: UInt32, length: Int) -> UInt64 {
        // Length + 1 in the high word keeps every key non-zero (0 marks an empty slot), /0 included.
        UInt64(length &+ 1) << 32 | UInt64(network)
    }

    package static func addressKey(_ address: UInt32) -> UInt64 { 1 << 32 | UInt64(address) }

    /// The index in `peers` of the route with the longest prefix containing `destination`, or nil.
    public func lookup(_ destination: IPv4Address) -> Int? {
        // An index loop rather than `for length in prefixLengths`: an unoptimised (debug) build allocates for the
        // iterator, and the allocation tests run debug builds.
        var i = 0
        let count = prefixLengths.count
        while i < count {
            let length = prefixLengths[i]
            let found = networks.find(RouteSnapshot.networkKey(destination.value & IPv4Network.mask(length),
                                                               length: length))
            if found >= 0 { return Int(found) }
            i += 1
        }
        return nil
    }

    /// True when some peer's endpoint has address `address` (any port).
    public func isPeerAddress(_ address: IPv4Address) -> Bool {
        peerAddresses.find(RouteSnapshot.addressKey(address.value)) >= 0
    }

    /// The peer's entry for exactly `subnet`, if any (for `status` and `route list`).
    public func entry(for subnet: IPv4Network) -> PeerEntry? {
        let i = networks.find(RouteSnapshot.networkKey(subnet.address.value, length: subnet.prefixLength))
        return i >= 0 ? peers[Int(i)] : nil
    }
}

/// A fixed-size open-addressing hash map from non-zero UInt64 keys to Int32 values (linear probing, load factor
/// at most 1/2), built once from all its entries and then only read; `find` does not allocate.
package struct FlatIndex: Sendable {
    package let keys: [UInt64]
    package let values: [Int32]
    package let shift: UInt64
    package let mask: Int

    /// Builds the index; for a key given more than once the first value is kept.
    package init(_ entries: [(key: UInt64, value: Int32)]) {
        var size = 8
        while size < entries.count * 2 { size <<= 1 }
        let mask = size - 1
        let shift = UInt64(64 - size.trailingZeroBitCount)
        var keys = [UInt64](repeating: 0, count: size)
        var values = [Int32](repeating: -1, count: size)
        for (key, value) in entries {
            precondition(key != 0, "0 marks an empty slot")
            var i = FlatIndex.hash(key, shift: shift)
            while keys[i] != 0 && keys[i] != key { i = (i &+ 1) & mask }
            if keys[i] == 0 {
                keys[i] = key
                values[i] = value
            }
        }
        self.keys = keys
        self.values = values
        self.shift = shift
        self.mask = mask
    }

    /// Fibonacci hashing: the top bits of key * 2^64/phi.
    package static func hash(_ key: UInt64, shift: UInt64) -> Int {
        Int(truncatingIfNeeded: (key &* 0x9E37_79B9_7F4A_7C15) >> shift)
    }

    /// The value for `key`, or -1.
    package func find(_ key: UInt64) -> Int32 {
        var i = FlatIndex.hash(key, shift: shift)
        while true {
            let k = keys[i]
            if k == key { return values[i] }
            if k == 0 { return -1 }
            i = (i &+ 1) & mask
        }
    }
}
