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
final class SecureDirectoryTests: XCTestCase {
    private var base = ""
    private let me = geteuid()

    override func setUpWithError() throws {
        base = NSTemporaryDirectory() + "secure-dir-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        XCTAssertEqual(mkdir(base, 0o700), 0)
    }

    override func tearDown() {
        _ = try? FileManager.default.removeItem(atPath: base)
    }

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
        XCTAssertThrowsError(try SecureDirectory.check(base + "/missing/dir", owner: me)) {
            XCTAssertEqual(($0 as? SystemError)?.errno, ENOENT, "\($0)")
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: base + "/missing"))
        XCTAssertEqual(mkdir(base + "/open", 0o700), 0)
        XCTAssertEqual(chmod(base + "/open", 0o777), 0)
        XCTAssertThrowsError(try SecureDirectory.check(base + "/open", owner: me)) {
            XCTAssertEqual(($0 as? SystemError)?.errno, EPERM, "\($0)")
        }
        XCTAssertEqual(chmod(base + "/open", 0o711), 0)
        try SecureDirectory.check(base + "/open", owner: me)
    }

    func testCreatesMissingComponents() throws {
        try SecureDirectory.ensure(base + "/a/b/c", mode: 0o700, owner: me)
        var st = stat()
        XCTAssertEqual(stat(base + "/a/b/c", &st), 0)
        XCTAssertEqual(st.st_mode & 0o777, 0o700)
        // Idempotent.
        try SecureDirectory.ensure(base + "/a/b/c", owner: me)
    }

    func testRefusesATargetOthersCanWrite() {
        XCTAssertEqual(mkdir(base + "/open", 0o700), 0)
        XCTAssertEqual(chmod(base + "/open", 0o777), 0)
        assertRefused(base + "/open", EPERM, "writable by other users")
        // Sticky does not make the target itself acceptable: others can still create names in it.
        XCTAssertEqual(chmod(base + "/open", 0o1777), 0)
        assertRefused(base + "/open", EPERM, "writable by other users")
    }

    func testAnAncestorOthersCanWriteMustBeSticky() throws {
        XCTAssertEqual(mkdir(base + "/shared", 0o700), 0)
        XCTAssertEqual(chmod(base + "/shared", 0o777), 0)
        // Someone else could rename base/shared/ours away and plant their own.
        assertRefused(base + "/shared/ours", EPERM, "\(base)/shared (mode 777")
        XCTAssertEqual(chmod(base + "/shared", 0o1777), 0)
        try SecureDirectory.ensure(base + "/shared/ours", owner: me)
    }

    func testRefusesAComponentOwnedBySomeoneElse() throws {
        try XCTSkipUnless(me == 0, "changing a directory's owner needs root")
        XCTAssertEqual(mkdir(base + "/theirs", 0o755), 0)
        XCTAssertEqual(chown(base + "/theirs", 65534, 65534), 0)
        assertRefused(base + "/theirs/run", EPERM, "owned by uid 65534")
        XCTAssertFalse(FileManager.default.fileExists(atPath: base + "/theirs/run"), "nothing created in it")
    }

    func testFollowsATrustedSymlinkAndChecksItsTarget() throws {
        XCTAssertEqual(mkdir(base + "/real", 0o755), 0)
        XCTAssertEqual(symlink(base + "/real", base + "/link"), 0)
        try SecureDirectory.ensure(base + "/link/sub", owner: me)
        XCTAssertTrue(FileManager.default.fileExists(atPath: base + "/real/sub"))
        // A trusted link to an untrusted place is refused at the place.
        XCTAssertEqual(mkdir(base + "/bad", 0o755), 0)
        XCTAssertEqual(chmod(base + "/bad", 0o777), 0)
        XCTAssertEqual(symlink(base + "/bad", base + "/link2"), 0)
        assertRefused(base + "/link2", EPERM, "\(base)/bad (mode 777")
    }

    func testRefusesASymlinkOwnedBySomeoneElse() throws {
        try XCTSkipUnless(me == 0, "changing a symlink's owner needs root")
        XCTAssertEqual(mkdir(base + "/real", 0o755), 0)
        XCTAssertEqual(symlink(base + "/real", base + "/planted"), 0)
        XCTAssertEqual(lchown(base + "/planted", 65534, 65534), 0)
        assertRefused(base + "/planted/x", EPERM, "a symlink owned by uid 65534")
    }

    func testRefusesAFileWhereADirectoryShouldBe() {
        XCTAssertTrue(FileManager.default.createFile(atPath: base + "/file", contents: Data()))
        assertRefused(base + "/file/x", ENOTDIR, base + "/file")
    }
}
