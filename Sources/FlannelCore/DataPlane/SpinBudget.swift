/// How much CPU the express lane's spin may take (`DuplexLoop`): a token bucket of spin time that fills at
/// `perMille` thousandths of the time that passes, up to `capacity`.
///
/// A spin pays off when the next packet comes within it; on an idle node it does (bench/README, "Idle: a spin
/// within a budget"). It costs its whole length when nothing comes, and lone short packets are
/// something any pod, or a stranger on the underlay (a datagram is read before it is refused), can send at will:
/// one every 60 us would keep the thread spinning 50 us of every 60, most of a CPU. The bucket bounds that to
/// `perMille` of one CPU over any stretch longer than `capacity` takes to fill, while an idle node's spins (a ping
/// every 10 ms spins about 1 % on each node) stay within it.
///
/// A spin is only seen to have ended after it has (one more look at both inputs), so it can take a little more
/// than the bucket held: that overshoot is owed, the bucket going below empty, and repaid before the next spin.
///
/// Pure arithmetic on the caller's clock (CLOCK_MONOTONIC nanoseconds), so tests drive it by hand.
struct SpinBudget {
    /// Thousandths of one CPU the spin may take in the long run (0-1000; 0: no spin at all).
    let perMille: Int64
    /// The most spin time the bucket holds (ns): how long the spin may take all the CPU it wants after a quiet
    /// spell.
    let capacity: Int64
    /// Spin time left (ns); below 0 when a spin overshot what was left.
    private(set) var tokens: Int64
    /// When `tokens` was last brought up to date.
    private var updated: UInt64

    /// Starts full (empty for good when `perMille` is 0): the first spins after the daemon starts are not held back.
    init(perMille: Int, capacity: UInt64, now: UInt64) {
        self.perMille = Int64(min(max(perMille, 0), 1000))
        self.capacity = Int64(min(capacity, UInt64(Int64.max / 2000)))
        tokens = perMille <= 0 ? 0 : self.capacity
        updated = now
    }

    /// Whether a spin that has taken `spun` ns so far may go on.
    @inline(__always)
    mutating func allows(spun: UInt64, now: UInt64) -> Bool {
        refill(now)
        return tokens > 0 && spun < UInt64(tokens)
    }

    /// Takes a spin that lasted `spun` ns out of the bucket. What it owes is at most one capacity.
    @inline(__always)
    mutating func charge(_ spun: UInt64, now: UInt64) {
        refill(now)
        tokens = max(tokens &- Int64(min(spun, UInt64(capacity))), -capacity)
    }

    @inline(__always)
    private mutating func refill(_ now: UInt64) {
        guard now > updated && perMille > 0 else { return }  // a clock read earlier than the last adds nothing
        // Past the time a refill from the deepest debt takes, the bucket is full: clamp first, so the product
        // cannot overflow.
        let elapsed = Int64(min(now &- updated, UInt64(2 &* capacity &* 1000 / perMille &+ 1)))
        tokens = min(capacity, tokens &+ elapsed &* perMille / 1000)
        updated = now
    }
}

/// Whether the flow pairs have been quiet long enough for the express lane to spin (`DuplexLoop`): no packet moved
/// by any of them for `window`.
///
/// A bulk flow's own short segments (the tail of a write) take the lane, and a spinning lane forwards them at once
/// while the flow's full-size segments wait for a flow worker to wake: with several worker pairs, runs with the
/// spin measured more of bulk flows' segments out of order, and more retransmits (bench/README, "Off by default
/// again" and "On again, only while the flows are quiet"). An idle node, where the spin pays, moves nothing
/// through the flow pairs; a node carrying bulk does. So the lane spins only while the flow pairs have been still
/// for `window`.
///
/// The lane looks only when a spin would start. Packets counted since the last look could have moved at any time
/// since, so they count as moving now. Pure arithmetic on the caller's clock and totals, so tests drive it by hand.
struct FlowsQuiet {
    /// How long the flow pairs must have moved nothing (ns).
    let window: UInt64
    /// The flow pairs' packet total at the last look, and since when it has not changed.
    private var seen: UInt64
    private var since: UInt64

    init(window: UInt64, total: UInt64, now: UInt64) {
        self.window = window
        seen = total
        since = now
    }

    /// Whether the flow pairs, which have moved `total` packets so far, have been quiet for the window.
    @inline(__always)
    mutating func isQuiet(total: UInt64, now: UInt64) -> Bool {
        if total != seen {
            seen = total
            since = now
            return false
        }
        return now >= since && now &- since >= window  // a clock read earlier than the last is not quiet yet
    }
}

/// What the express lane's spin has done, for `status` and `/metrics`.
public struct ExpressSpinCounts: Codable, Equatable, Sendable {
    /// The longest spin (`--express-spin`, us; 0: it never spins) and its budget, in thousandths of a CPU.
    public var microseconds: Int
    public var budgetPerMille: Int
    /// Spins so far, and the time they took in all (ns).
    public var spins: UInt64
    public var spunNanoseconds: UInt64
    /// Spins the budget ended early or did not let start: while this grows, lone short packets are arriving
    /// faster than the budget refills, and the lane sleeps instead of spinning.
    public var cut: UInt64
    /// Spins not started because the flow pairs were moving packets (`FlowsQuiet`): while bulk flows run, this
    /// grows and the lane sleeps after each packet.
    public var held: UInt64

    public init(microseconds: Int, budgetPerMille: Int, spins: UInt64, spunNanoseconds: UInt64, cut: UInt64,
                held: UInt64) {
        self.microseconds = microseconds
        self.budgetPerMille = budgetPerMille
        self.spins = spins
        self.spunNanoseconds = spunNanoseconds
        self.cut = cut
        self.held = held
    }

    private enum CodingKeys: String, CodingKey { case microseconds, budgetPerMille, spins, spunNanoseconds, cut, held }

    /// `held` is absent in the status of a daemon from before it (the CLI may be upgraded first): read as 0.
    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        microseconds = try c.decode(Int.self, forKey: .microseconds)
        budgetPerMille = try c.decode(Int.self, forKey: .budgetPerMille)
        spins = try c.decode(UInt64.self, forKey: .spins)
        spunNanoseconds = try c.decode(UInt64.self, forKey: .spunNanoseconds)
        cut = try c.decode(UInt64.self, forKey: .cut)
        held = try c.decodeIfPresent(UInt64.self, forKey: .held) ?? 0
    }
}
