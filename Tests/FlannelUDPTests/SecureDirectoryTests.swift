import Foundation
import XCTest
@testable import FlannelCore
@testable import FlannelUDP
#if canImport(Glibc)
import Glibc
#endif

/// The directory check that every file root creates goes through: a directory another user can change (or a
/// symlink another user owns) is refused before anything is created in it. Runs without privileges: the test's
/// own uid stands in for root as the trusted owner, and a uid that is neither plays the other user.
final class SecureDirectoryTests: TemporaryDirectoryTestCase {
    override class var directoryPrefix: String { "secure-dir" }
    private let me = geteuid()

    private func assertRefused(_ path: String, _ errno: Int32, _ fragment: String,
                               file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertThrowsError(try SecureDirectory.ensure(path, owner: me), file: file, line: line) { error in
            guard let e = error as? SystemError else { return XCTFail("\(error)", file: file, line: line) }
            XCTAssertEqual(e.errno, errno, "\(e)", file: file, line: line)
            XCTAssertTrue(e.description.contains(fragment), "\(e)", file: file, line: line)
        }
    }

    /// The reader's variant (the CLI before it trusts a control socket): the same checks, nothing created.
    func testCheckCreatesNothingAndAppliesTheSameRules() throws {
        XCTAssertThrowsError(try SecureDirectory.check(dir + "/missing/dir", owner: me)) {
            XCTAssertEqual(($0 as? SystemError)?.errno, ENOENT, "\($0)")
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/missing"))
        XCTAssertEqual(mkdir(dir + "/open", 0o700), 0)
        XCTAssertEqual(chmod(dir + "/open", 0o777), 0)
        XCTAssertThrowsError(try SecureDirectory.check(dir + "/open", owner: me)) {
            XCTAssertEqual(($0 as? SystemError)?.errno, EPERM, "\($0)")
        }
        XCTAssertEqual(chmod(dir + "/open", 0o711), 0)
        try SecureDirectory.check(dir + "/open", owner: me)
    }

    func testCreatesMissingComponents() throws {
        try SecureDirectory.ensure(dir + "/a/b/c", mode: 0o700, owner: me)
        var st = stat()
        XCTAssertEqual(stat(dir + "/a/b/c", &st), 0)
        XCTAssertEqual(st.st_mode & 0o777, 0o700)
        // Idempotent.
        try SecureDirectory.ensure(dir + "/a/b/c", owner: me)
    }

    func testRefusesATargetOthersCanWrite() {
        XCTAssertEqual(mkdir(dir + "/open", 0o700), 0)
        XCTAssertEqual(chmod(dir + "/open", 0o777), 0)
        assertRefused(dir + "/open", EPERM, "writable by other users")
        // Sticky does not make the target itself acceptable: others can still create names in it.
        XCTAssertEqual(chmod(dir + "/open", 0o1777), 0)
        assertRefused(dir + "/open", EPERM, "writable by other users")
    }

    func testAnAncestorOthersCanWriteMustBeSticky() throws {
        XCTAssertEqual(mkdir(dir + "/shared", 0o700), 0)
        XCTAssertEqual(chmod(dir + "/shared", 0o777), 0)
        // Someone else could rename dir/shared/ours away and plant their own.
        assertRefused(dir + "/shared/ours", EPERM, "\(dir)/shared (mode 777")
        XCTAssertEqual(chmod(dir + "/shared", 0o1777), 0)
        try SecureDirectory.ensure(dir + "/shared/ours", owner: me)
    }

    func testRefusesAComponentOwnedBySomeoneElse() throws {
        try XCTSkipUnless(me == 0, "changing a directory's owner needs root")
        XCTAssertEqual(mkdir(dir + "/theirs", 0o755), 0)
        XCTAssertEqual(chown(dir + "/theirs", 65534, 65534), 0)
        assertRefused(dir + "/theirs/run", EPERM, "owned by uid 65534")
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/theirs/run"), "nothing created in it")
    }

    func testFollowsATrustedSymlinkAndChecksItsTarget() throws {
        XCTAssertEqual(mkdir(dir + "/real", 0o755), 0)
        XCTAssertEqual(symlink(dir + "/real", dir + "/link"), 0)
        try SecureDirectory.ensure(dir + "/link/sub", owner: me)
        XCTAssertTrue(FileManager.default.fileExists(atPath: dir + "/real/sub"))
        // A trusted link to an untrusted place is refused at the place.
        XCTAssertEqual(mkdir(dir + "/bad", 0o755), 0)
        XCTAssertEqual(chmod(dir + "/bad", 0o777), 0)
        XCTAssertEqual(symlink(dir + "/bad", dir + "/link2"), 0)
        assertRefused(dir + "/link2", EPERM, "\(dir)/bad (mode 777")
    }

    func testRefusesASymlinkOwnedBySomeoneElse() throws {
        try XCTSkipUnless(me == 0, "changing a symlink's owner needs root")
        XCTAssertEqual(mkdir(dir + "/real", 0o755), 0)
        XCTAssertEqual(symlink(dir + "/real", dir + "/planted"), 0)
        XCTAssertEqual(lchown(dir + "/planted", 65534, 65534), 0)
        assertRefused(dir + "/planted/x", EPERM, "a symlink owned by uid 65534")
    }

    func testRefusesAFileWhereADirectoryShouldBe() {
        XCTAssertTrue(FileManager.default.createFile(atPath: dir + "/file", contents: Data()))
        assertRefused(dir + "/file/x", ENOTDIR, dir + "/file")
    }
}
