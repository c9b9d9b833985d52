import Foundation
import XCTest
@testable import FlannelCore
@testable import FlannelUDP

/// The watchdog's evidence: each forwarding worker's heartbeat moves while it idles in its blocking receive (woken by its timer), and stops moving
/// once the worker is gone.
final class HeartbeatTests: LoopbackForwarderTestCase {
    func testHeartbeatsMoveWhileIdleAndStopWithTheWorkers() throws {
        let forwarder = try Forwarder(tunFD: pair[0], tunName: "test", socket: socket, table: table, config: config,
                                      counters: counters, logger: logger,
                                      options: ForwarderOptions(offloads: false, heartbeatMilliseconds: 10))
        try forwarder.start()
        let first = forwarder.heartbeats
        XCTAssertEqual(first.map(\.worker), ["fu-tun-to-udp", "fu-udp-to-tun"])
        XCTAssertTrue(heartbeatsMove(forwarder, from: first), "heartbeats did not move while idle: \(forwarder.heartbeats)")
        forwarder.stop()  // joins both workers: nothing bumps the heartbeats any more
        let stopped = forwarder.heartbeats.map(\.count)
        XCTAssertEqual(forwarder.heartbeats.map(\.count), stopped)
    }

    /// Both workers sleep in their blocking receive with a heartbeat timer an hour away: only the wake signal
    /// that stop() sends can end their waits. Without it stop() would hang (the 60 s is a liveness bound, not a
    /// measurement).
    func testStopWakesWorkersBlockedInTheirReceive() throws {
        let forwarder = try Forwarder(tunFD: pair[0], tunName: "test", socket: socket, table: table, config: config,
                                      counters: counters, logger: logger,
                                      options: ForwarderOptions(offloads: false, heartbeatMilliseconds: 3_600_000))
        XCTAssertEqual(try heartbeatsBeforeAStopThatWakes(forwarder), [1, 1], "each worker went round once and then blocked, idle")
    }

    func testWatchdogPingsOnlyWhileEveryWorkerMoves() {
        var monitor = HeartbeatMonitor([("a", 1), ("b", 1)])
        XCTAssertEqual(monitor.stuck([("a", 2), ("b", 5)]), [])
        XCTAssertEqual(monitor.stuck([("a", 3), ("b", 5)]), ["b"], "b is stuck: no ping")
        XCTAssertEqual(monitor.stuck([("a", 3), ("b", 6)]), ["a"])
        XCTAssertEqual(monitor.stuck([("a", 4), ("b", 7)]), [], "both moved again: ping")
        XCTAssertEqual(monitor.stuck([]), ["forwarder"], "no forwarder, no ping")
    }
}
