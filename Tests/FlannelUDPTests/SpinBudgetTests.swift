import Foundation
import XCTest
@testable import FlannelCore

/// The express lane's spin budget (`SpinBudget`) on a clock driven by hand.
final class SpinBudgetTests: XCTestCase {
    private let ms: UInt64 = 1_000_000
    private let us: UInt64 = 1_000

    /// After a quiet spell the bucket holds `capacity`: spins go on until they have taken it, then none may start.
    func testAFullBucketAllowsItsCapacityThenNothing() {
        var b = SpinBudget(perMille: 20, capacity: 10 * ms, now: 1_000 * ms)
        XCTAssertTrue(b.allows(spun: 0, now: 1_000 * ms))
        XCTAssertTrue(b.allows(spun: 10 * ms - 1, now: 1_000 * ms))
        XCTAssertFalse(b.allows(spun: 10 * ms, now: 1_000 * ms))
        b.charge(10 * ms, now: 1_000 * ms)
        XCTAssertEqual(b.tokens, 0)
        XCTAssertFalse(b.allows(spun: 0, now: 1_000 * ms), "an empty bucket allows no spin at all")
    }

    /// It fills at `perMille` of the time that passes, and never beyond `capacity`, however long the quiet.
    func testItRefillsAtItsShareOfTheTimeUpToItsCapacity() {
        var b = SpinBudget(perMille: 20, capacity: 10 * ms, now: 5 * ms)
        b.charge(10 * ms, now: 5 * ms)
        XCTAssertTrue(b.allows(spun: 0, now: 105 * ms))
        XCTAssertEqual(b.tokens, Int64(2 * ms), "100 ms at 2 %")
        b.charge(500 * us, now: 105 * ms)
        XCTAssertEqual(b.tokens, Int64(1_500 * us))
        _ = b.allows(spun: 0, now: 3_600_000 * ms)  // an hour
        XCTAssertEqual(b.tokens, Int64(10 * ms))
        _ = b.allows(spun: 0, now: UInt64.max)  // the clamp keeps the product from overflowing
        XCTAssertEqual(b.tokens, Int64(10 * ms))
    }

    /// A spin that overshot what was left is owed: no spin starts until it is repaid.
    func testAnOvershootIsRepaidBeforeTheNextSpin() {
        var b = SpinBudget(perMille: 20, capacity: 10 * ms, now: 1 * ms)
        b.charge(9 * ms, now: 1 * ms)
        XCTAssertTrue(b.allows(spun: 0, now: 1 * ms))
        b.charge(3 * ms, now: 1 * ms)  // the spin was seen to end 2 ms past what was left
        XCTAssertEqual(b.tokens, -Int64(2 * ms))
        XCTAssertFalse(b.allows(spun: 0, now: 51 * ms), "1 ms repaid of 2")
        XCTAssertFalse(b.allows(spun: 0, now: 101 * ms), "repaid, nothing left yet")
        XCTAssertTrue(b.allows(spun: 0, now: 102 * ms))
        b.charge(UInt64.max, now: 102 * ms)
        XCTAssertEqual(b.tokens, Int64(20 * us) - Int64(10 * ms), "one spin is charged at most one capacity")
        b.charge(UInt64.max, now: 102 * ms)
        XCTAssertEqual(b.tokens, -Int64(10 * ms), "what it owes is at most one capacity")
    }

    /// A clock read that goes backwards (a test, or a read taken before another) neither adds nor traps.
    func testAnEarlierClockReadAddsNothing() {
        var b = SpinBudget(perMille: 20, capacity: 10 * ms, now: 50 * ms)
        b.charge(4 * ms, now: 50 * ms)
        b.charge(1 * ms, now: 40 * ms)
        XCTAssertEqual(b.tokens, Int64(5 * ms))
        _ = b.allows(spun: 0, now: 100 * ms)
        XCTAssertEqual(b.tokens, Int64(6 * ms), "50 ms at 2 % since the latest read")
    }

    /// The attacker's case: a lone packet every 60 us, each followed by a 50 us spin that nothing ends, each
    /// spin seen to end only 3 us after it should. Without the budget the thread would spin 50 of every 60 us (83 %
    /// of a CPU). With it, over 10 s, the spins take the capacity plus 2 % of the time, and one overshoot more.
    func testLonePacketsCannotMakeItSpinMoreThanItsShare() {
        let spin = 50 * us
        var b = SpinBudget(perMille: 20, capacity: 10 * ms, now: 1 * ms)
        var cycle = 1 * ms
        var spun: UInt64 = 0
        while cycle < 10_001 * ms {
            let start = cycle + 5 * us  // after the packet's pass
            var now = start
            var going = b.allows(spun: 0, now: now)
            while going {
                now += 3 * us  // a yield and one more look at both inputs
                going = now - start < spin && b.allows(spun: now - start, now: now)
            }
            b.charge(now - start, now: now)
            spun += now - start
            cycle += 60 * us
        }
        XCTAssertLessThanOrEqual(spun, 10 * ms + 200 * ms + 3 * us, "spun \(spun / us) us in 10 s")
        XCTAssertGreaterThan(spun, 190 * ms, "the share is used, not withheld: spun \(spun / us) us")
    }

    /// 0 per mille: no spin ever, not even a first burst.
    func testZeroPerMilleNeverSpins() {
        var b = SpinBudget(perMille: 0, capacity: 10 * ms, now: 1 * ms)
        XCTAssertFalse(b.allows(spun: 0, now: 1 * ms))
        XCTAssertFalse(b.allows(spun: 0, now: 100_000 * ms))
    }
}

/// Whether the flow pairs have been quiet long enough for the lane to spin (`FlowsQuiet`), on a clock and packet
/// totals driven by hand.
final class FlowsQuietTests: XCTestCase {
    private let ms: UInt64 = 1_000_000

    /// Quiet once nothing has moved for the window, counted from the start.
    func testQuietOnceTheWindowHasPassedWithoutAPacket() {
        var q = FlowsQuiet(window: 10 * ms, total: 0, now: 100 * ms)
        XCTAssertFalse(q.isQuiet(total: 0, now: 109 * ms))
        XCTAssertTrue(q.isQuiet(total: 0, now: 110 * ms))
        XCTAssertTrue(q.isQuiet(total: 0, now: 5_000 * ms))
    }

    /// Packets moved since the last look could have moved just now: the window starts again at this look, however
    /// long ago the last one was.
    func testAnyPacketStartsTheWindowAgain() {
        var q = FlowsQuiet(window: 10 * ms, total: 7, now: 0)
        XCTAssertTrue(q.isQuiet(total: 7, now: 1_000 * ms))
        XCTAssertFalse(q.isQuiet(total: 8, now: 2_000 * ms), "one packet since the last look, a second ago")
        XCTAssertFalse(q.isQuiet(total: 8, now: 2_009 * ms))
        XCTAssertTrue(q.isQuiet(total: 8, now: 2_010 * ms))
        // A bulk flow: its pair moves packets between every two looks, so the lane never spins.
        var total: UInt64 = 8
        for k in UInt64(0)..<50 {
            total += 45
            XCTAssertFalse(q.isQuiet(total: total, now: 2_011 * ms + k * 20 * ms))
        }
        // The counters wrap (they are relaxed wrapping atomics): a change all the same.
        var w = FlowsQuiet(window: 10 * ms, total: .max, now: 0)
        XCTAssertFalse(w.isQuiet(total: 0, now: 100 * ms))
    }

    /// A clock read earlier than the last look is not quiet yet, and does not trap.
    func testAnEarlierClockReadIsNotQuiet() {
        var q = FlowsQuiet(window: 10 * ms, total: 0, now: 50 * ms)
        XCTAssertFalse(q.isQuiet(total: 0, now: 40 * ms))
        XCTAssertTrue(q.isQuiet(total: 0, now: 60 * ms))
    }
}

/// What `status` carries of the spin (`ExpressSpinCounts`).
final class ExpressSpinCountsTests: XCTestCase {
    /// The counts as `status --json` carries them: a daemon from before `held` sends none, and the CLI reads 0
    /// rather than refusing the whole status.
    func testSpinCountsOfAnOlderDaemonReadHeldAsZero() throws {
        let old = #"{"microseconds":50,"budgetPerMille":20,"spins":9,"spunNanoseconds":1500,"cut":4}"#
        let counts = try JSONDecoder().decode(ExpressSpinCounts.self, from: Data(old.utf8))
        XCTAssertEqual(counts, ExpressSpinCounts(microseconds: 50, budgetPerMille: 20, spins: 9, spunNanoseconds: 1500,
                                                 cut: 4, held: 0))
        let now = ExpressSpinCounts(microseconds: 50, budgetPerMille: 20, spins: 9, spunNanoseconds: 1500, cut: 4, held: 6)
        XCTAssertEqual(try JSONDecoder().decode(ExpressSpinCounts.self, from: JSONEncoder().encode(now)), now)
        XCTAssertThrowsError(try JSONDecoder().decode(ExpressSpinCounts.self, from: Data(#"{"microseconds":50}"#.utf8)),
                             "the other counts are required")
    }
}
