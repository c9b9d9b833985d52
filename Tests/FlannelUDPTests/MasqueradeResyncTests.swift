import Foundation
import Logging
import XCTest
@testable import FlannelCore
@testable import FlannelUDP
import TestSupport

/// The resync loop against a fake backend: no root, no netfilter.
final class MasqueradeResyncTests: XCTestCase {
    final class FakeRules: MasqueradeRules, @unchecked Sendable {
        let lock = NSLock()
        var present = true
        var installs = 0
        var failInstall = false
        var backend: MasqueradeBackend { .nftables }
        var objects: [String] { ["table ip fake"] }
        func install() throws(NetfilterError) {
            lock.lock()
            defer { lock.unlock() }
            if failInstall { throw NetfilterError("nftables: install", "table ip fake", "Error: Operation not supported") }
            installs += 1
            present = true
        }
        func isInPlace() -> Bool { lock.withLock { present } }
        func remove() throws(NetfilterError) { lock.withLock { present = false } }
    }

    func testMissingRulesAreReinstalledCountedAndAFailureIsKeptUntilTheNextSuccess() {
        let rules = FakeRules()
        let resync = MasqueradeResync(rules: rules, period: 3600, logger: Logger(label: "test"))
        XCTAssertFalse(resync.checkOnce(), "nothing to do when the rules are there")
        XCTAssertEqual(rules.installs, 0)

        rules.present = false
        XCTAssertTrue(resync.checkOnce())
        XCTAssertEqual(rules.installs, 1)
        var status = resync.status
        XCTAssertEqual(status.restored, 1)
        XCTAssertTrue(status.inPlace)
        XCTAssertNotNil(status.lastRestored)
        XCTAssertEqual(status.backend, "nftables")

        rules.present = false
        rules.failInstall = true
        XCTAssertFalse(resync.checkOnce())
        status = resync.status
        XCTAssertFalse(status.inPlace)
        XCTAssertEqual(status.restored, 1)
        XCTAssertEqual(status.lastError, "nftables: install table ip fake: Error: Operation not supported")

        rules.failInstall = false
        XCTAssertTrue(resync.checkOnce())
        XCTAssertNil(resync.status.lastError)
        XCTAssertEqual(resync.status.restored, 2)
    }

    func testTheThreadRestoresWithinThePeriodAndNothingAfterStop() throws {
        let rules = FakeRules()
        let resync = MasqueradeResync(rules: rules, period: 0.05, logger: Logger(label: "test"))
        resync.start()
        rules.lock.withLock { rules.present = false }
        _ = waitUntil(interval: 0.005) { rules.lock.withLock { rules.installs } > 0 }
        XCTAssertEqual(rules.lock.withLock { rules.installs }, 1)
        resync.stop()
        // stop returns after the thread has ended, so nothing can reinstall what is removed now.
        try rules.remove()
        XCTAssertEqual(rules.lock.withLock { rules.installs }, 1)
        XCTAssertFalse(rules.isInPlace())
        resync.stop()  // twice is harmless
    }
}
