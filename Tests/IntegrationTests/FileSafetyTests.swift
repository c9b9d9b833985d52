import Foundation
import XCTest
@testable import FlannelCore
@testable import FlannelUDP

/// The files root writes, against a local user who owns or can write the directories they go in, plants symlinks
/// where they will be opened, or leaves a stale subnet.env behind (issue 12).
///
///     namespace N ("fu-fs-<pid>-<n>"): eth0 (veth, peer eth0peer) 192.168.77.1/24; flannel0 made by `up`
///     files: /tmp/fu-fs-<pid>-<random>/ (root, 0755) holding the test's directories, decoys and run directory
final class FileSafetyTests: XCTestCase {
    var tmp = ""
    var runDir: String { tmp + "/run" }
    let nobody: uid_t = 65534
    let decoyText = "decoy owned by root: must never change\n"

    override func setUpWithError() throws {
        try requireRoot()
        tmp = try makeTestDirectory("fu-fs", for: self)
    }

    func makeNode() throws -> TestNamespace {
        let ns = try TestNamespace(prefix: "fu-fs")
        addTeardownBlock { [runDir] in
            _ = runFlannelUDP(in: ns, ["down"], runDirectory: runDir)
            ns.destroy()
        }
        try addLoneUnderlay(ns)
        return ns
    }

    func fu(_ ns: TestNamespace, _ args: [String]) -> CommandResult { runFlannelUDP(in: ns, args, runDirectory: runDir) }

    func up(_ ns: TestNamespace, subnetFile: String, _ extra: [String] = []) -> CommandResult {
        fu(ns, ["up", "--network", "10.244.0.0/16", "--subnet", "10.244.1.0/24", "--iface", "eth0",
                "--subnet-file", subnetFile, "--detach"] + extra)
    }

    /// Links, addresses and routes of the namespace, to compare before and after a refused `up`.
    func systemView(_ ns: TestNamespace) throws -> String {
        try ns.run(["ip", "-o", "link", "show"]).replacingOccurrences(of: #"\s+link/.*"#, with: "", options: .regularExpression)
            + ns.run(["ip", "-4", "-o", "addr", "show"]) + ns.run(["ip", "-4", "route", "show", "table", "all"])
    }

    func directory(_ name: String, mode: mode_t, owner: uid_t = 0) throws -> String {
        let path = tmp + "/" + name
        XCTAssertEqual(mkdir(path, 0o700), 0)
        XCTAssertEqual(chmod(path, mode), 0)
        XCTAssertEqual(chown(path, owner, owner), 0)
        return path
    }

    func decoy() throws -> String {
        let path = tmp + "/decoy"
        try decoyText.write(toFile: path, atomically: false, encoding: .utf8)
        return path
    }

    func contents(_ path: String) -> String? { try? String(contentsOfFile: path, encoding: .utf8) }

    let ours = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n"
    let stale = "FLANNEL_NETWORK=10.9.0.0/16\nFLANNEL_SUBNET=10.9.4.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"

    // MARK: directories another user controls

    func testSubnetFileDirectoryAnotherUserControlsIsRefusedAndNothingChanges() throws {
        let ns = try makeNode()
        let owned = try directory("nobodys", mode: 0o755, owner: nobody)
        let open = try directory("open", mode: 0o777)
        let parent = try directory("parent", mode: 0o755, owner: nobody)
        XCTAssertEqual(mkdir(parent + "/child", 0o755), 0)  // root's own directory, inside one nobody can rename
        let cases = [
            (owned, "\(owned) (owned by uid 65534, not root)"),
            (open, "\(open) (mode 777: writable by other users)"),
            (parent + "/child", "\(parent) (owned by uid 65534, not root)"),
        ]
        let before = try systemView(ns)
        for (dir, message) in cases {
            let r = up(ns, subnetFile: dir + "/subnet.env")
            XCTAssertEqual(r.status, 1, "\(dir): \(r.description)")
            XCTAssertTrue(r.stderr.contains(message), "\(dir): \(r.stderr)")
            XCTAssertEqual(try systemView(ns), before, "\(dir): the refused up changed the namespace")
            XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir), [], "\(dir): a file was made")
            XCTAssertEqual(fu(ns, ["status"]).status, 3, "\(dir): a daemon is running")
        }
    }

    func testLogFileDirectoryAnotherUserControlsIsRefusedAndNothingChanges() throws {
        let ns = try makeNode()
        let owned = try directory("nobodys", mode: 0o755, owner: nobody)
        let open = try directory("open", mode: 0o777)
        let before = try systemView(ns)
        for (dir, message) in [(owned, "owned by uid 65534, not root"), (open, "mode 777: writable by other users")] {
            let r = up(ns, subnetFile: tmp + "/subnet.env", ["--log-file", dir + "/flannel.log"])
            XCTAssertEqual(r.status, 1, "\(dir): \(r.description)")
            XCTAssertTrue(r.stderr.contains("\(dir) (\(message))"), "\(dir): \(r.stderr)")
            XCTAssertEqual(try systemView(ns), before)
            XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir), [])
            XCTAssertFalse(FileManager.default.fileExists(atPath: tmp + "/subnet.env"))
        }
    }

    // MARK: planted symlinks

    func testSymlinkAtTheLogFileIsNotFollowed() throws {
        let ns = try makeNode()
        let decoy = try decoy()
        let logs = try directory("logs", mode: 0o755)
        XCTAssertEqual(symlink(decoy, logs + "/flannel.log"), 0)
        let before = try systemView(ns)
        let r = up(ns, subnetFile: tmp + "/subnet.env", ["--log-file", logs + "/flannel.log"])
        XCTAssertEqual(r.status, 1, r.description)
        XCTAssertTrue(r.stderr.contains("open log file \(logs)/flannel.log (a symlink)"), r.stderr)
        XCTAssertEqual(contents(decoy), decoyText, "the daemon logged into the symlink's target")
        XCTAssertEqual(try systemView(ns), before)
        XCTAssertFalse(FileManager.default.fileExists(atPath: tmp + "/subnet.env"))
    }

    /// Decided: refused like the log file's (rather than replaced), before anything changes.
    func testSymlinkAtTheSubnetFileIsNotFollowed() throws {
        let ns = try makeNode()
        let decoy = try decoy()
        let dir = try directory("flannel", mode: 0o755)
        let subnetFile = dir + "/subnet.env"
        XCTAssertEqual(symlink(decoy, subnetFile), 0)
        let before = try systemView(ns)
        let r = up(ns, subnetFile: subnetFile)
        XCTAssertEqual(r.status, 1, r.description)
        XCTAssertTrue(r.stderr.contains("use subnet file \(subnetFile) (a symlink)"), r.stderr)
        XCTAssertEqual(contents(decoy), decoyText, "the subnet file was written through the symlink")
        XCTAssertEqual(try FileManager.default.destinationOfSymbolicLink(atPath: subnetFile), decoy)
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: dir), ["subnet.env"], "a temporary file is left")
        XCTAssertEqual(try systemView(ns), before)
    }

    // MARK: subnet.env that this daemon did not write

    /// Decided: at the end of a run, `down` removes the subnet file only if it still holds exactly what the daemon
    /// wrote; whatever was there before `up` (an older run's file) is not brought back.
    func testStaleSubnetFileFromAnOlderRunIsNotRestoredByDown() throws {
        let ns = try makeNode()
        let subnetFile = tmp + "/subnet.env"
        try stale.write(toFile: subnetFile, atomically: false, encoding: .utf8)
        XCTAssertEqual(up(ns, subnetFile: subnetFile).status, 0)
        XCTAssertEqual(contents(subnetFile), ours)
        let down = fu(ns, ["down"])
        XCTAssertEqual(down.status, 0, down.description)
        XCTAssertNil(contents(subnetFile), "down left a subnet.env that this daemon did not write")
    }

    /// Decided: a subnet file that someone rewrote while the daemon ran is theirs; `down` leaves it as it is.
    func testSubnetFileRewrittenWhileRunningIsLeftAlone() throws {
        let ns = try makeNode()
        let subnetFile = tmp + "/subnet.env"
        XCTAssertEqual(up(ns, subnetFile: subnetFile).status, 0)
        let theirs = ours.replacingOccurrences(of: "FLANNEL_MTU=1472", with: "FLANNEL_MTU=1400")
        try theirs.write(toFile: subnetFile, atomically: true, encoding: .utf8)
        XCTAssertEqual(fu(ns, ["down"]).status, 0)
        XCTAssertEqual(contents(subnetFile), theirs)
    }

    /// Decided: a failed `up` changes nothing, so the file that was there before is put back byte for byte.
    func testFailedUpPutsBackTheSubnetFileThatWasThere() throws {
        let ns = try makeNode()
        let subnetFile = tmp + "/subnet.env"
        try stale.write(toFile: subnetFile, atomically: false, encoding: .utf8)
        try ns.run(["ip", "route", "add", "10.244.0.0/16", "via", "192.168.77.9", "dev", "eth0"])
        let r = up(ns, subnetFile: subnetFile)
        XCTAssertNotEqual(r.status, 0, r.description)
        XCTAssertTrue(r.stderr.contains("add route 10.244.0.0/16 dev flannel0"), r.stderr)
        XCTAssertEqual(contents(subnetFile), stale)
    }

    /// A killed daemon cannot tidy up; `down` removes its subnet file only if it holds exactly what that daemon
    /// wrote (recorded in its state), not one that merely names the same subnet.
    func testKilledDaemonsSubnetFileIsRemovedOnlyIfUnchanged() throws {
        let ns = try makeNode()
        let subnetFile = tmp + "/subnet.env"
        let inode = try ns.run(["stat", "-L", "-c", "%i", "/proc/self/ns/net"]).trimmingCharacters(in: .whitespacesAndNewlines)
        let statePath = "\(runDir)/ns-\(inode)/flannel0.json"
        func upAndKill() throws {
            let r = up(ns, subnetFile: subnetFile)
            XCTAssertEqual(r.status, 0, r.description)
            let state = try XCTUnwrap(DaemonState.load(path: statePath))
            XCTAssertEqual(state.subnetFileContents, ours)
            XCTAssertEqual(kill(state.pid, SIGKILL), 0)
            try waitFor("the killed daemon's device disappears") {
                !((try? ns.run(["ip", "-o", "link", "show"])) ?? "flannel0").contains("flannel0")
            }
        }
        try upAndKill()
        let theirs = ours.replacingOccurrences(of: "FLANNEL_MTU=1472", with: "FLANNEL_MTU=1400")
        try theirs.write(toFile: subnetFile, atomically: true, encoding: .utf8)
        XCTAssertEqual(fu(ns, ["down"]).status, 0)
        XCTAssertEqual(contents(subnetFile), theirs, "down removed a subnet file the killed daemon did not write")

        try upAndKill()
        let down = fu(ns, ["down"])
        XCTAssertEqual(down.status, 0, down.description)
        XCTAssertTrue(down.stdout.contains("[#] remove \(subnetFile)"), down.stdout)
        XCTAssertNil(contents(subnetFile))
    }
}
