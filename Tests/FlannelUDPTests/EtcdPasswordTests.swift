import Foundation
import XCTest
@testable import FlannelCore
@testable import FlannelUDP
#if canImport(Glibc)
import Glibc
#endif

/// The etcd password's ways in (file, environment) and the daemon's argv without it. Unprivileged: the test's uid
/// stands in for root as the file's owner.
final class EtcdPasswordTests: TemporaryDirectoryTestCase {
    override class var directoryPrefix: String { "fu-secret" }

    private func file(_ name: String, _ text: String, mode: mode_t = 0o600) throws -> String {
        let path = dir + "/" + name
        try text.write(toFile: path, atomically: false, encoding: .utf8)
        XCTAssertEqual(chmod(path, mode), 0)
        return path
    }

    private func assertRefused(_ path: String, _ errno: Int32, _ fragment: String,
                               file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertThrowsError(try EtcdPassword.read(file: path), file: file, line: line) { error in
            XCTAssertEqual((error as? SystemError)?.errno, errno, "\(error)", file: file, line: line)
            XCTAssertTrue("\(error)".contains(fragment), "\(error)", file: file, line: line)
        }
    }

    func testFileIsReadWithOneTrailingNewlineRemoved() throws {
        XCTAssertEqual(try EtcdPassword.read(file: try file("a", "s3cret\n")), "s3cret")
        XCTAssertEqual(try EtcdPassword.read(file: try file("b", "s3cret")), "s3cret")
        XCTAssertEqual(try EtcdPassword.read(file: try file("c", "two words \n\n")), "two words \n")
        XCTAssertEqual(try EtcdPassword.read(file: try file("d", "crlf\r\n", mode: 0o400)), "crlf")
    }

    func testFilesOthersCanReadOrThatAreNotPlainFilesAreRefused() throws {
        assertRefused(try file("group", "pw\n", mode: 0o640), EPERM, "mode 640: group or others have access")
        assertRefused(try file("world", "pw\n", mode: 0o604), EPERM, "mode 604")
        let target = try file("target", "pw\n")
        XCTAssertEqual(symlink(target, dir + "/link"), 0)
        assertRefused(dir + "/link", ELOOP, "\(dir)/link (a symlink")
        assertRefused(dir, EINVAL, "not a regular file")
        XCTAssertEqual(mkfifo(dir + "/fifo", 0o600), 0)
        assertRefused(dir + "/fifo", EINVAL, "not a regular file")  // and did not hang opening it
        assertRefused(try file("empty", "\n"), EINVAL, "(empty)")
        assertRefused(try file("huge", String(repeating: "x", count: 5000)), EFBIG, "huge")
        assertRefused(dir + "/missing", ENOENT, "missing")
    }

    func testDaemonArgumentsHoldNoSecret() {
        let args = ["up", "--etcd-endpoints", "http://e:2379", "--etcd-password", "s3cret", "--etcd-username", "u",
                    "--etcd-password=s3cret2", "--etcd-password-file", "/root/pw", "--etcd-password-file=/root/pw2",
                    "--detach"]
        XCTAssertEqual(EtcdPassword.daemonArguments(args),
                       ["up", "--etcd-endpoints", "http://e:2379", "--etcd-username", "u", "--detach"])
    }

    func testDaemonEnvironmentCarriesOnlyTheHandedOverPassword() {
        let env = ["PATH=/bin", "FLANNELD_ETCD_PASSWORD=old", "FLANNEL_UDP_ETCD_PASSWORD=older", "HOME=/root"]
        XCTAssertEqual(EtcdPassword.daemonEnvironment(env, password: "s3cret"),
                       ["PATH=/bin", "HOME=/root", "FLANNEL_UDP_ETCD_PASSWORD=s3cret"])
        XCTAssertEqual(EtcdPassword.daemonEnvironment(env, password: nil), ["PATH=/bin", "HOME=/root"])
    }

    func testEnvironmentIsTakenAndErased() {
        setenv("FLANNELD_ETCD_PASSWORD", "flanneld-pw", 1)
        XCTAssertEqual(EtcdPassword.takeFromEnvironment()?.value, "flanneld-pw")
        XCTAssertNil(getenv("FLANNELD_ETCD_PASSWORD"))
        setenv("FLANNELD_ETCD_PASSWORD", "flanneld-pw", 1)
        setenv("FLANNEL_UDP_ETCD_PASSWORD", "ours", 1)
        let taken = EtcdPassword.takeFromEnvironment()
        XCTAssertEqual(taken?.name, "FLANNEL_UDP_ETCD_PASSWORD")
        XCTAssertEqual(taken?.value, "ours")
        XCTAssertNil(getenv("FLANNEL_UDP_ETCD_PASSWORD"))
        XCTAssertNil(getenv("FLANNELD_ETCD_PASSWORD"), "both are erased, so no child inherits either")
        XCTAssertNil(EtcdPassword.takeFromEnvironment())
    }

    func testPlainHTTPCredentialsAreWarnedAbout() {
        var options = EtcdOptions(endpoints: ["https://a:2379", "http://b:2379"])
        XCTAssertNil(options.plainTextCredentialsWarning, "no credentials, nothing to warn about")
        options.password = "pw"
        XCTAssertEqual(options.plainTextCredentialsWarning?.contains("unencrypted to http://b:2379"), true)
        options.password = nil
        options.username = "flannel"
        XCTAssertNotNil(options.plainTextCredentialsWarning)
        options.endpoints = ["https://a:2379"]
        XCTAssertNil(options.plainTextCredentialsWarning)
    }
}
