import Foundation
import XCTest
@testable import FlannelUDP

/// How a replacing daemon settles a commit whose answer was lost (Node/HandoverCommit.swift): by watching the old
/// daemon, here played by real processes (`sleep`) read through the real process-state reader. The phase is what
/// the old daemon's `status` would say (nil: it does not answer).
final class HandoverCommitTests: XCTestCase {
    func spawn(seconds: String) throws -> (Process, DaemonIdentity) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/bin/sleep")
        p.arguments = [seconds]
        try ProcessLaunch.run(p)
        addTeardownBlock { if p.isRunning { p.terminate() }; p.waitUntilExit() }
        let ticks = try XCTUnwrap(DaemonState.startTicks(of: p.processIdentifier))
        return (p, DaemonIdentity(pid: p.processIdentifier, startTicks: ticks))
    }

    func reason(_ outcome: CommitOutcome) -> String {
        switch outcome {
        case .committed(let why), .notCommitted(let why): why
        }
    }

    /// An old daemon that exits after the commit let go (or died: either way the node is the new daemon's), even
    /// while it still said "handing over" before it went.
    func testAnOldDaemonThatExitsHasLetGo() throws {
        let (old, identity) = try spawn(seconds: "600")
        var asked = 0
        let outcome = CommitSettlement.watch(identity, milliseconds: 60_000) {
            asked += 1
            if asked == 3 {
                old.terminate()
                old.waitUntilExit()
            }
            return .handingOver
        }
        guard case .committed = outcome else { return XCTFail("\(outcome)") }
        XCTAssertTrue(reason(outcome).contains("pid \(identity.pid)) has exited"), reason(outcome))
        XCTAssertEqual(asked, 3)
    }

    /// The same process number with another start time is another process: the old daemon is gone.
    func testARecycledPidIsNotTheOldDaemon() throws {
        let (_, identity) = try spawn(seconds: "600")
        let other = DaemonIdentity(pid: identity.pid, startTicks: identity.startTicks + 1)
        let outcome = CommitSettlement.watch(other, milliseconds: 60_000) { .running }
        XCTAssertEqual(outcome, .committed(because: "the old daemon (pid \(identity.pid)) has exited"))
    }

    /// Alive and saying "running": it abandoned the handover (a committed one never goes back) and forwards on.
    /// Alive and saying "handed over": it took the commit and is on its way out.
    func testWhatALiveOldDaemonSaysDecides() throws {
        let (old, identity) = try spawn(seconds: "600")
        var phases: [DaemonPhase] = [.handingOver, .handingOver, .running]
        let abandoned = CommitSettlement.watch(identity, milliseconds: 60_000) { phases.removeFirst() }
        guard case .notCommitted = abandoned else { return XCTFail("\(abandoned)") }
        XCTAssertTrue(reason(abandoned).contains("says it is running"), reason(abandoned))
        XCTAssertTrue(phases.isEmpty)

        var answers: [DaemonPhase?] = [nil, .handingOver, .handedOver]
        let committed = CommitSettlement.watch(identity, milliseconds: 60_000) { answers.removeFirst() }
        XCTAssertEqual(committed, .committed(because: "the old daemon (pid \(identity.pid)) says it has handed over"))
        XCTAssertTrue(answers.isEmpty)
        XCTAssertTrue(old.isRunning)
    }

    /// Alive, neither leaving nor saying "running" until the bound: not taken for committed (it resumes by itself
    /// once the new daemon exits), and the reason says what was seen.
    func testAnOldDaemonThatStaysWithoutAWordDidNotLetGo() throws {
        let (old, identity) = try spawn(seconds: "600")
        let silent = CommitSettlement.watch(identity, milliseconds: 200) { nil }
        XCTAssertEqual(silent, .notCommitted(because: "the old daemon (pid \(identity.pid)) is still there after 200 ms, not answering"))
        let stuck = CommitSettlement.watch(identity, milliseconds: 200) { .handingOver }
        XCTAssertEqual(stuck, .notCommitted(because: "the old daemon (pid \(identity.pid)) is still there after 200 ms, last saying 'handing over'"))
        XCTAssertTrue(old.isRunning)
    }
}
