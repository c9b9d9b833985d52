import CShims
import Foundation
import XCTest
@testable import FlannelCore
@testable import FlannelUDP
#if canImport(Glibc)
import Glibc
#endif

/// AtomicFile against a local user who plants files and symlinks where root is about to write: the temporary name
/// cannot be guessed, a name that exists is never reused, no symlink is followed, and a directory another user can
/// write is refused. Runs unprivileged: the test's uid stands in for root as the trusted owner.
final class AtomicFileTests: TemporaryDirectoryTestCase {
    override class var directoryPrefix: String { "fu-atomic" }
    override class var directoryMode: mode_t { 0o755 }
    private var decoy = ""
    private let decoyText = "decoy: must never change\n"

    override func setUpWithError() throws {
        try super.setUpWithError()
        XCTAssertEqual(mkdir(dir + "/elsewhere", 0o755), 0)
        decoy = dir + "/elsewhere/decoy"
        try decoyText.write(toFile: decoy, atomically: false, encoding: .utf8)
    }

    private func assertDecoyUnchanged(file: StaticString = #filePath, line: UInt = #line) throws {
        XCTAssertEqual(try String(contentsOfFile: decoy, encoding: .utf8), decoyText, "the decoy was written through",
                       file: file, line: line)
    }

    private func entries() throws -> [String] {
        try FileManager.default.contentsOfDirectory(atPath: dir).filter { $0 != "elsewhere" }.sorted()
    }

    /// The name the old code used, `<path>.tmp.<pid>`, is exactly what an attacker plants: a hard link to the
    /// decoy there would have been truncated and written, a symlink followed.
    func testThePredictablePidNameIsNotUsed() throws {
        let path = dir + "/subnet.env"
        XCTAssertEqual(link(decoy, "\(path).tmp.\(getpid())"), 0)
        XCTAssertEqual(symlink(decoy, "\(path).tmp.\(getpid() + 1)"), 0)
        try AtomicFile.write("mine\n", to: path, mode: 0o644)
        try assertDecoyUnchanged()
        XCTAssertEqual(try String(contentsOfFile: path, encoding: .utf8), "mine\n")
    }

    /// The new contents are written and synced to an unnamed file (O_TMPFILE) and named only then, so a writer
    /// killed while writing (a full disk's slow fsync, a SIGKILL) leaves nothing in the directory. The fallback,
    /// which names its temporary file from the start, shows what the same moment looked like before.
    func testTheContentsAreWrittenBeforeAnyNameExists() throws {
        let probe = fu_open_tmpfile(dir, 0o600)
        try XCTSkipIf(probe < 0 && (errno == EOPNOTSUPP || errno == EISDIR),
                      "the test directory's filesystem has no O_TMPFILE (AtomicFile falls back to a named file)")
        XCTAssertGreaterThanOrEqual(probe, 0, "O_TMPFILE in \(dir): errno \(errno)")
        _ = close(probe)
        let path = dir + "/subnet.env"
        var seen = ["(beforeNaming was not called)"]
        try AtomicFile.write("mine\n", to: path, mode: 0o640, owner: geteuid(), suffix: AtomicFile.randomSuffix,
                             beforeNaming: { seen = (try? self.entries()) ?? ["(unreadable)"] })
        XCTAssertEqual(seen, [], "nothing is in the directory while the contents are written")
        XCTAssertEqual(try entries(), ["subnet.env"])
        XCTAssertEqual(try String(contentsOfFile: path, encoding: .utf8), "mine\n")
        var st = stat()
        XCTAssertEqual(lstat(path, &st), 0)
        XCTAssertEqual(st.st_mode & 0o777, 0o640, "the mode is exactly the one asked for")

        try AtomicFile.write("again\n", to: path, mode: 0o644, owner: geteuid(), suffix: AtomicFile.randomSuffix,
                             unnamed: false, beforeNaming: { seen = (try? self.entries()) ?? ["(unreadable)"] })
        XCTAssertEqual(seen.count, 2, "the fallback: the target and the named temporary file, \(seen)")
        XCTAssertTrue(seen.contains { $0.hasPrefix(".subnet.env.") && $0.hasSuffix(".tmp") }, "\(seen)")
        XCTAssertEqual(try entries(), ["subnet.env"])
        XCTAssertEqual(try String(contentsOfFile: path, encoding: .utf8), "again\n")
    }

    /// Without /proc (a minimal container or chroot) an unnamed file cannot be named: the write takes the named
    /// fallback from the start instead of failing after the contents are written.
    func testWithoutProcTheWriteFallsBackToANamedFile() throws {
        let path = dir + "/subnet.env"
        let missing = dir + "/no-proc/self/fd"
        var seen = ["(beforeNaming was not called)"]
        try AtomicFile.write("mine\n", to: path, mode: 0o640, owner: geteuid(), suffix: AtomicFile.randomSuffix,
                             descriptors: missing, beforeNaming: { seen = (try? self.entries()) ?? ["(unreadable)"] })
        XCTAssertTrue(seen.contains { $0.hasPrefix(".subnet.env.") && $0.hasSuffix(".tmp") },
                      "the named temporary file was there while the contents were written: \(seen)")
        XCTAssertEqual(try entries(), ["subnet.env"])
        XCTAssertEqual(try String(contentsOfFile: path, encoding: .utf8), "mine\n")
    }

    func testTemporaryNamesAreRandom() {
        let names = Set((0..<64).map { _ in AtomicFile.randomSuffix() })
        XCTAssertEqual(names.count, 64)
        XCTAssertTrue(names.allSatisfy { $0.count == 16 && $0.allSatisfy(\.isHexDigit) }, "\(names)")
    }

    /// A file (or symlink) already at the temporary name is skipped (O_EXCL|O_NOFOLLOW), another name is tried.
    func testAnExistingTemporaryNameIsNeverReused() throws {
        let path = dir + "/subnet.env"
        XCTAssertEqual(link(decoy, dir + "/.subnet.env.aaaa.tmp"), 0)
        XCTAssertEqual(symlink(decoy, dir + "/.subnet.env.bbbb.tmp"), 0)
        var suffixes = ["aaaa", "bbbb", "cccc"].makeIterator()
        try AtomicFile.write("mine\n", to: path, mode: 0o640, owner: geteuid(), suffix: { suffixes.next()! })
        try assertDecoyUnchanged()
        XCTAssertEqual(try String(contentsOfFile: path, encoding: .utf8), "mine\n")
        XCTAssertEqual(try entries(), [".subnet.env.aaaa.tmp", ".subnet.env.bbbb.tmp", "subnet.env"],
                       "the planted names stay as they were; the written temporary is gone")
        var st = stat()
        XCTAssertEqual(lstat(path, &st), 0)
        XCTAssertEqual(st.st_mode & 0o777, 0o640, "the mode is exactly the one asked for")
    }

    func testEveryNameTakenFailsWithEEXIST() throws {
        XCTAssertEqual(symlink(decoy, dir + "/.s.env.same.tmp"), 0)
        XCTAssertThrowsError(try AtomicFile.write("x", to: dir + "/s.env", mode: 0o644, owner: geteuid(),
                                                  suffix: { "same" })) { error in
            XCTAssertEqual((error as? SystemError)?.errno, EEXIST, "\(error)")
        }
        try assertDecoyUnchanged()
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/s.env"))
    }

    /// A symlink at the target itself is replaced (rename does not follow it), not written through.
    func testASymlinkAtTheTargetIsReplacedNotFollowed() throws {
        let path = dir + "/subnet.env"
        XCTAssertEqual(symlink(decoy, path), 0)
        try AtomicFile.write("mine\n", to: path, mode: 0o644)
        try assertDecoyUnchanged()
        var st = stat()
        XCTAssertEqual(lstat(path, &st), 0)
        XCTAssertEqual(st.st_mode & S_IFMT, S_IFREG)
        XCTAssertEqual(try String(contentsOfFile: path, encoding: .utf8), "mine\n")
    }

    func testReadDoesNotFollowSymlinksAndRemoveIfUnchangedKeepsOthersFiles() throws {
        let path = dir + "/subnet.env"
        XCTAssertNil(try AtomicFile.read(path))
        XCTAssertEqual(symlink(decoy, path), 0)
        XCTAssertThrowsError(try AtomicFile.read(path)) { XCTAssertEqual(($0 as? SystemError)?.errno, ELOOP) }
        XCTAssertThrowsError(try AtomicFile.removeIfUnchanged(path, expected: decoyText))
        try assertDecoyUnchanged()
        XCTAssertEqual(unlink(path), 0)

        try AtomicFile.write("ours\n", to: path, mode: 0o644)
        XCTAssertFalse(try AtomicFile.removeIfUnchanged(path, expected: "something else\n"))
        XCTAssertTrue(FileManager.default.fileExists(atPath: path))
        XCTAssertTrue(try AtomicFile.removeIfUnchanged(path, expected: "ours\n"))
        XCTAssertFalse(FileManager.default.fileExists(atPath: path))
    }

    /// A directory that others can write (no sticky bit) is refused before anything is created in it.
    func testAWorldWritableDirectoryIsRefused() throws {
        let open = dir + "/open"
        XCTAssertEqual(mkdir(open, 0o755), 0)
        XCTAssertEqual(chmod(open, 0o777), 0)
        XCTAssertThrowsError(try AtomicFile.write("x", to: open + "/subnet.env", mode: 0o644)) { error in
            XCTAssertTrue("\(error)".contains("\(open) (mode 777: writable by other users)"), "\(error)")
        }
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: open), [])
    }
}
