import Foundation
import XCTest
@testable import FlannelCore
#if canImport(Glibc)
import Glibc
#endif

/// The express lane's realtime priority, unprivileged: the decisions (`ExpressPriorityPolicy`), the parser of
/// /proc/stat's first line and the sampler over a real file. The thread's actual scheduling is tested as root in
/// ExpressLaneThreadTests.
final class ExpressPriorityTests: TemporaryDirectoryTestCase {
    func testALateDatagramRaisesOnceAndAnOnTimeOneDoesNot() {
        var p = ExpressPriorityPolicy()
        XCTAssertEqual(p.waited(1_000_000), .none, "exactly the limit is not late")
        XCTAssertEqual(p.waited(200_000), .none)
        XCTAssertEqual(p.waited(1_000_001), .raise)
        XCTAssertTrue(p.realtime)
        XCTAssertEqual(p.waited(5_000_000), .none, "already realtime")
    }

    /// The defence against a flood of short packets: 1 ms of running without sleeping lowers the thread, and it
    /// is held down, late datagrams or not, until the next tick; a contended tick may raise it again, for at most
    /// another millisecond.
    func testRunningTooLongLowersAndHoldsDownUntilTheNextTick() {
        var p = ExpressPriorityPolicy()
        XCTAssertEqual(p.ran(50_000_000, delta: 50_000_000), .none, "a normal thread is never lowered")
        XCTAssertEqual(p.waited(2_000_000), .raise)
        XCTAssertEqual(p.ran(900_000, delta: 900_000), .none)
        XCTAssertEqual(p.ran(1_000_001, delta: 100_001), .lower)
        XCTAssertFalse(p.realtime)
        XCTAssertTrue(p.heldDown)
        XCTAssertEqual(p.waited(9_000_000), .none, "held down: a flood's backlog makes every datagram late")
        XCTAssertEqual(p.tick(idleShare: 0.05), .raise, "the tick ends the hold; the CPUs are busy")
        XCTAssertFalse(p.heldDown)
        XCTAssertEqual(p.ran(1_500_000, delta: 1_500_000), .lower)
        XCTAssertTrue(p.heldDown)
    }

    /// The same defence against a flood that lets the thread sleep between short stretches: at most 12.5 ms of
    /// realtime between two ticks, however it is cut up. A tick starts the count again.
    func testShortStretchesAddUpToTheBudget() {
        var p = ExpressPriorityPolicy()
        XCTAssertEqual(p.waited(2_000_000), .raise)
        for _ in 0..<24 { XCTAssertEqual(p.ran(500_000, delta: 500_000), .none) }
        XCTAssertEqual(p.spent, 12_000_000)
        XCTAssertEqual(p.ran(600_000, delta: 600_000), .lower, "12.6 ms since the tick")
        XCTAssertTrue(p.heldDown)
        XCTAssertEqual(p.tick(idleShare: 0.3), .none)
        XCTAssertEqual(p.spent, 0)
        XCTAssertEqual(p.waited(2_000_000), .raise, "no longer held down")
        XCTAssertEqual(p.ran(900_000, delta: 900_000), .none)
    }

    func testTicksRaiseWhenTheCPUsAreBusyAndLowerWhenTheyAreIdle() {
        var p = ExpressPriorityPolicy()
        XCTAssertEqual(p.tick(idleShare: 0.3), .none, "between the thresholds: stays normal")
        XCTAssertEqual(p.tick(idleShare: 0.2), .raise)
        XCTAssertEqual(p.tick(idleShare: 0.1), .none)
        XCTAssertEqual(p.tick(idleShare: 0.4), .none, "between the thresholds: stays realtime")
        XCTAssertEqual(p.tick(idleShare: 0.5), .lower)
        XCTAssertEqual(p.tick(idleShare: 0.9), .none)
    }

    /// An unknown load (/proc/stat unreadable) counts as idle: a raised thread comes down at the next tick, so
    /// it is realtime only between a late datagram and a tick.
    func testAnUnknownLoadLowersAndNeverRaises() {
        var p = ExpressPriorityPolicy()
        XCTAssertEqual(p.tick(idleShare: nil), .none)
        XCTAssertEqual(p.waited(3_000_000), .raise)
        XCTAssertEqual(p.tick(idleShare: nil), .lower)
    }

    func testTheLateLimitIsTheOptions() {
        var p = ExpressPriorityPolicy(lateNanoseconds: 0)
        XCTAssertEqual(p.waited(1), .raise)
    }

    private func parse(_ text: String) -> CPUTimes? {
        Array(text.utf8).withUnsafeBytes { CPUTimes.parse($0) }
    }

    func testTheFirstLineOfProcStatIsParsed() {
        XCTAssertEqual(parse("cpu  10 2 30 400 5 6 7 8 9 10\ncpu0 1 2 3 4 5 6 7 8 9 10\nintr 1 2 3\n"),
                       CPUTimes(idle: 405, total: 468), "guest and guest_nice are already in user and nice")
        XCTAssertEqual(parse("cpu  1 2 3 4\n"), CPUTimes(idle: 4, total: 10), "an old kernel's four fields")
        XCTAssertEqual(parse("cpu  1 2 3 4"), CPUTimes(idle: 4, total: 10), "cut off before the newline")
        XCTAssertEqual(parse("cpu  0000000000000000007 0 0 0000000000000000003 0 0 0 0\n"), CPUTimes(idle: 3, total: 10))
    }

    func testMalformedStatTextIsRefusedNotTrusted() {
        for bad in ["", "cpu", "cpu0 1 2 3 4\n", "intr 1 2 3 4\n", "cpu  1 2 3\n", "cpu  1 2 x 4\n", "cpu  1 2 -3 4\n",
                    "cpu  18446744073709551616 0 0 0\n",  // 2^64
                    "cpu  18446744073709551615 1 0 0\n"] {  // a sum past 2^64
            XCTAssertNil(parse(bad), bad)
        }
    }

    /// The machine's own /proc/stat parses, and its counters only grow.
    func testTheRealProcStatParses() throws {
        let sampler = CPUIdleSampler(path: "/proc/stat")
        XCTAssertNil(sampler.openError)
        XCTAssertNil(sampler.idleShare(), "nothing to compare the first sample with")
        usleep(50_000)
        let share = try XCTUnwrap(sampler.idleShare())
        XCTAssertTrue((0...1).contains(share), "\(share)")
    }

    /// The sampler over a file of the same format: the share of idle time between two samples, read in place
    /// (the descriptor is opened once).
    func testTheSamplerReadsTheIdleShareBetweenTwoSamples() throws {
        let path = dir + "/stat"
        func write(_ text: String) {
            let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
            XCTAssertGreaterThanOrEqual(fd, 0)
            XCTAssertEqual(Array(text.utf8).withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }, text.utf8.count)
            close(fd)
        }
        write("cpu  100 0 100 800 0 0 0 0 0 0\n")
        let sampler = CPUIdleSampler(path: path)
        XCTAssertNil(sampler.idleShare())
        write("cpu  150 0 150 900 0 0 0 0 0 0\n")
        XCTAssertEqual(try XCTUnwrap(sampler.idleShare()), 0.5, accuracy: 1e-9)
        write("cpu  150 0 150 900 0 0 0 0 0 0\n")
        XCTAssertNil(sampler.idleShare(), "no time passed")
        write("garbage\n")
        XCTAssertNil(sampler.idleShare())
        write("cpu  160 0 150 900 0 0 0 0 0 0\n")
        XCTAssertNil(sampler.idleShare(), "after a bad sample it starts over")
        write("cpu  160 0 150 990 10 0 0 0 0 0\n")
        XCTAssertEqual(try XCTUnwrap(sampler.idleShare()), 1, accuracy: 1e-9)

        let missing = CPUIdleSampler(path: dir + "/nonexistent")
        XCTAssertEqual(missing.openError?.errno, ENOENT)
        XCTAssertNil(missing.idleShare())
    }
}
