import Foundation
import XCTest
@testable import FlannelCore
@testable import FlannelUDP
#if canImport(Glibc)
import Glibc
#endif

/// The "already running" lock: held until released (or the holder dies), never through a symlink, and safe
/// against the lock file being removed under a waiting opener. flock() locks belong to open file descriptions,
/// so two acquisitions in one process contend like two processes would.
final class DaemonLockTests: TemporaryDirectoryTestCase {
    override class var directoryPrefix: String { "daemon-lock" }

    func testSecondHolderIsRefusedUntilTheFirstReleases() throws {
        let path = dir + "/flannel0.lock"
        let first = try XCTUnwrap(try DaemonLock.acquire(path))
        XCTAssertNil(try DaemonLock.acquire(path), "a second holder got the lock")
        first.release(removingFile: true)
        XCTAssertFalse(FileManager.default.fileExists(atPath: path))
        let second = try XCTUnwrap(try DaemonLock.acquire(path))
        XCTAssertNil(try DaemonLock.acquire(path))
        second.release(removingFile: false)
        XCTAssertTrue(FileManager.default.fileExists(atPath: path))
    }

    func testSymlinkAtTheLockPathIsNotFollowed() throws {
        let target = dir + "/elsewhere"
        XCTAssertEqual(symlink(target, dir + "/flannel0.lock"), 0)
        XCTAssertThrowsError(try DaemonLock.acquire(dir + "/flannel0.lock")) {
            XCTAssertEqual(($0 as? SystemError)?.errno, ELOOP, "\($0)")
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: target), "the symlink's target was created")
    }

    /// A lock file replaced after it was locked (as `down` removes a dead daemon's while holding it): the next
    /// holder locks the file that is at the path now, not the removed one.
    func testLockFollowsTheFileAtThePath() throws {
        let path = dir + "/flannel0.lock"
        let first = try XCTUnwrap(try DaemonLock.acquire(path))
        XCTAssertEqual(unlink(path), 0)  // removed under the holder
        let second = try XCTUnwrap(try DaemonLock.acquire(path), "the new file at the path is free")
        XCTAssertNil(try DaemonLock.acquire(path))
        first.release(removingFile: false)
        XCTAssertNil(try DaemonLock.acquire(path), "releasing the removed file's lock freed the path")
        second.release(removingFile: true)
    }
}
