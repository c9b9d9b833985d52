import XCTest
@testable import FlannelCore
@testable import FlannelUDP

/// The receive side's CoDel on a hand-driven clock: which packets of which flow it passes, drops or marks.
final class ReceiveCoDelTests: XCTestCase {
    static let ms: UInt64 = 1_000_000
    let parameters = CoDelParameters(targetNanoseconds: 250_000, intervalNanoseconds: 5 * ms, bulkBytes: 16 * 1024)

    /// A TCP packet of `size` bytes from 10.244.2.5:`port` to 10.244.1.2:5201, with ECN field `ecn`.
    func tcp(port: UInt16, size: Int = 1400, ecn: UInt8 = 0) -> [UInt8] {
        var payload = [UInt8](repeating: 0, count: size - 20)
        payload[0] = UInt8(port >> 8); payload[1] = UInt8(port & 0xFF); payload[2] = 0x14; payload[3] = 0x51
        var p = makeIPv4(source: ip("10.244.2.5"), destination: ip("10.244.1.2"), proto: 6, payload: payload)
        p[1] = ecn
        p[10] = 0; p[11] = 0
        let c = p.withUnsafeBytes { InternetChecksum.compute(UnsafeRawBufferPointer(rebasing: $0[0..<20])) }
        p[10] = UInt8(c >> 8); p[11] = UInt8(c & 0xFF)
        return p
    }

    func ping() -> [UInt8] {
        makeIPv4(source: ip("10.244.2.5"), destination: ip("10.244.1.2"), proto: 1,
                 payload: makeICMP(type: 8, data: filled(9, 56)))
    }

    func verdict(_ c: ReceiveCoDel, _ packet: inout [UInt8], sojourn: UInt64, now: UInt64) -> ReceiveCoDel.Verdict {
        packet.withUnsafeMutableBytes { c.verdict($0, sojourn: sojourn, now: now) }
    }

    /// A bulk flow (1400-byte packets every 10 us, ~1.1 Gbit/s) whose packets all waited `sojourn`, for
    /// `duration`; returns the times of its drops (or marks).
    func runBulk(_ c: ReceiveCoDel, port: UInt16 = 40000, ecn: UInt8 = 0, sojourn: UInt64, from start: UInt64 = 0,
                 duration: UInt64) -> (dropped: [UInt64], marked: [UInt64]) {
        var dropped: [UInt64] = [], marked: [UInt64] = []
        var t = start
        while t < start + duration {
            var p = tcp(port: port, ecn: ecn)
            switch verdict(c, &p, sojourn: sojourn, now: t) {
            case .drop: dropped.append(t)
            case .marked:
                marked.append(t)
                XCTAssertEqual(p[1] & 3, 3, "marked CE")
                XCTAssertEqual(p.withUnsafeBytes { InternetChecksum.compute(UnsafeRawBufferPointer(rebasing: $0[0..<20])) },
                               0, "header checksum still valid after the mark")
            case .pass: break
            }
            t += 10_000
        }
        return (dropped, marked)
    }

    func testBulkFlowBelowTargetIsNeverDropped() {
        let c = ReceiveCoDel(parameters)
        let r = runBulk(c, sojourn: 200_000, duration: 1_000 * Self.ms)
        XCTAssertEqual(r.dropped, [])
        XCTAssertEqual(r.marked, [])
    }

    func testBulkFlowAboveTargetIsDroppedAfterAnIntervalThenFaster() {
        let c = ReceiveCoDel(parameters)
        let r = runBulk(c, sojourn: 2 * Self.ms, duration: 100 * Self.ms)
        XCTAssertEqual(r.marked, [])
        XCTAssertGreaterThan(r.dropped.count, 3)
        // Not before the sojourn has stayed above the target for one interval (the flow turned bulk at once:
        // 16 KiB is a dozen packets, 120 us).
        XCTAssertGreaterThanOrEqual(r.dropped[0], 5 * Self.ms)
        XCTAssertLessThan(r.dropped[0], 6 * Self.ms)
        // Then interval / sqrt(count): the gaps shrink.
        let gaps = zip(r.dropped.dropFirst(), r.dropped).map { $0 - $1 }
        XCTAssertEqual(gaps[0], 5 * Self.ms, accuracy: 20_000)
        XCTAssertLessThan(gaps.last!, gaps[0])
        for (a, b) in zip(gaps.dropFirst(), gaps) { XCTAssertLessThanOrEqual(a, b + 10_000) }
    }

    func testDroppingEndsWhenTheSojournFallsBelowTarget() {
        let c = ReceiveCoDel(parameters)
        let high = runBulk(c, sojourn: 2 * Self.ms, duration: 50 * Self.ms)
        XCTAssertFalse(high.dropped.isEmpty)
        let low = runBulk(c, sojourn: 100_000, from: 50 * Self.ms, duration: 200 * Self.ms)
        XCTAssertEqual(low.dropped, [], "no drop once the queue is short")
    }

    func testECNCapableBulkFlowIsMarkedNotDropped() {
        let c = ReceiveCoDel(parameters)
        for ecn: UInt8 in [1, 2] {
            let r = runBulk(c, port: 40000 + UInt16(ecn), ecn: ecn, sojourn: 2 * Self.ms,
                            from: UInt64(ecn) * 1_000 * Self.ms, duration: 100 * Self.ms)
            XCTAssertEqual(r.dropped, [], "ECT(\(ecn))")
            XCTAssertGreaterThan(r.marked.count, 3, "ECT(\(ecn))")
        }
    }

    /// The attacker's view: a sparse flow (a ping every 10 ms) sharing the overloaded queue with a bulk flow sees
    /// the same sojourn, yet never loses a packet, while the bulk flow does.
    func testSparseFlowSharingTheQueueIsNeverDropped() {
        let c = ReceiveCoDel(parameters)
        var bulkDrops = 0, pingDrops = 0
        var t: UInt64 = 0
        while t < 2_000 * Self.ms {
            var p = tcp(port: 40000)
            if verdict(c, &p, sojourn: 3 * Self.ms, now: t) != .pass { bulkDrops += 1 }
            if t % (10 * Self.ms) == 0 {
                var q = ping()
                if verdict(c, &q, sojourn: 3 * Self.ms, now: t) != .pass { pingDrops += 1 }
            }
            t += 10_000
        }
        XCTAssertGreaterThan(bulkDrops, 100)
        XCTAssertEqual(pingDrops, 0)
    }

    /// Many flows (a port scan's worth) keep the table at its fixed size; a flow that finds no entry is passed.
    func testStateStaysBounded() {
        let c = ReceiveCoDel(parameters)
        var port: UInt16 = 1
        var drops = 0
        while port < 20000 {
            var p = tcp(port: port)
            if verdict(c, &p, sojourn: 10 * Self.ms, now: UInt64(port) * 1000) != .pass { drops += 1 }
            port += 1
        }
        XCTAssertLessThanOrEqual(c.flowsTracked, ReceiveCoDel.slots)
        XCTAssertGreaterThan(c.flowsTracked, ReceiveCoDel.slots / 2)
        XCTAssertEqual(drops, 0, "one packet per flow is never bulk")
    }

    func testOffDisablesIt() {
        XCTAssertFalse(CoDelParameters.off.isOn)
        XCTAssertTrue(CoDelParameters().isOn)
    }
}
