import Foundation
import XCTest
@testable import FlannelCore
@testable import FlannelUDP

/// The etcd password against a local unprivileged user who reads every process's argv (issue 12): whichever way
/// the password is given, the detached daemon's /proc/PID/cmdline never holds it (read as uid 65534 through
/// setpriv, and as root), its /proc/PID/environ no longer does once it runs, and it still authenticates to an etcd
/// with auth enabled. Credentials over http:// are warned about.
///
///                   wire (bridge br0, etcd with auth on 192.168.77.250:2379)
///                       |
///     node (eth0 192.168.77.1): flannel-udp up --etcd-endpoints http://192.168.77.250:2379 --etcd-username flannel
final class EtcdSecretTests: EtcdWireTestCase {
    /// Unique to the run, so that finding it anywhere cannot be a coincidence.
    let secret = "pw-\(UInt64.random(in: 1 ... .max))"

    override func setUpWithError() throws {
        try requireRoot()
        try requireEtcd()
        try requireTools(["setpriv"], packages: "util-linux")
        try setUpWire("fu-sec")
        try startEtcd()
        try putNetworkConfig()
        try etcdctl(["user", "add", "root:rootpw"])
        try etcdctl(["user", "add", "flannel:\(secret)"])
        try etcdctl(["role", "add", "flannel"])
        try etcdctl(["role", "grant-permission", "flannel", "--prefix=true", "readwrite", "/coreos.com/network/"])
        try etcdctl(["user", "grant-role", "flannel", "flannel"])
        try etcdctl(["auth", "enable"])
    }

    /// A node on the wire whose `down` runs in teardown.
    func makeNode() throws -> TestNamespace {
        try plugNode(prefix: "fu-secn", index: 1)
    }

    /// `up --detach` as user flannel with `extra` (the password given some way) and `environment`; then checks that
    /// it authenticated (its lease is in etcd), warned about http, and that nothing of the daemon shows the secret.
    func assertUpAuthenticatesWithoutShowingTheSecret(_ extra: [String], environment: [String: String] = [:],
                                                      file: StaticString = #filePath, line: UInt = #line) throws -> CommandResult {
        let ns = try makeNode()
        let run = tmp + "/run"
        let up = runCommand(["ip", "netns", "exec", ns.name, flannelUDPBinary(), "up", "--etcd-endpoints", etcdURL,
                             "--etcd-username", "flannel", "--iface", "eth0", "--subnet-file", tmp + "/subnet.env",
                             "--detach"] + extra,
                            environment: environment.merging(["FLANNEL_UDP_RUN_DIR": run]) { a, _ in a })
        XCTAssertEqual(up.status, 0, up.description, file: file, line: line)
        XCTAssertTrue(up.stderr.contains("etcd credentials will travel unencrypted to \(etcdURL)"), up.stderr,
                      file: file, line: line)

        // Authenticated: it holds a lease in the registry (read back as etcd's root user).
        let keys = try etcdctl(["--user", "root:rootpw", "get", "--prefix", "--keys-only", "/coreos.com/network/subnets/"])
        XCTAssertTrue(keys.contains("/coreos.com/network/subnets/10.244."), keys, file: file, line: line)

        let stateDir = "\(run)/ns-\(try ns.run(["stat", "-L", "-c", "%i", "/proc/self/ns/net"]).trimmingCharacters(in: .whitespacesAndNewlines))"
        let state = try XCTUnwrap(DaemonState.load(path: stateDir + "/flannel0.json"), file: file, line: line)
        XCTAssertTrue(state.isAlive, file: file, line: line)

        // What any local user sees: the daemon's command line, read as nobody.
        let seen = runCommand(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat", "/proc/\(state.pid)/cmdline"])
        XCTAssertEqual(seen.status, 0, "nobody can read any process's cmdline: \(seen.description)", file: file, line: line)
        let cmdline = seen.stdout.replacingOccurrences(of: "\u{0}", with: " ")
        XCTAssertTrue(cmdline.contains("--etcd-endpoints"), cmdline, file: file, line: line)
        XCTAssertFalse(cmdline.contains(secret), "the daemon's argv shows the password: \(cmdline)", file: file, line: line)
        XCTAssertFalse(cmdline.contains("--etcd-password"), cmdline, file: file, line: line)
        // Root's view of its memory-backed argv and environment.
        let rootCmdline = try String(decoding: Data(contentsOf: URL(fileURLWithPath: "/proc/\(state.pid)/cmdline")), as: UTF8.self)
        XCTAssertFalse(rootCmdline.contains(secret), file: file, line: line)
        let environ = try String(decoding: Data(contentsOf: URL(fileURLWithPath: "/proc/\(state.pid)/environ")), as: UTF8.self)
        XCTAssertFalse(environ.contains(secret), "the daemon's environment still holds the password", file: file, line: line)
        let log = (try? String(contentsOfFile: stateDir + "/flannel0.log", encoding: .utf8)) ?? ""
        XCTAssertFalse(log.contains(secret), log, file: file, line: line)

        let down = runFlannelUDP(in: ns, ["down"], runDirectory: run)
        XCTAssertEqual(down.status, 0, down.description, file: file, line: line)
        return up
    }

    func testPasswordFileStaysOutOfTheDaemonsArgvAndEnvironment() throws {
        let path = tmp + "/etcd-password"
        try "\(secret)\n".write(toFile: path, atomically: false, encoding: .utf8)
        XCTAssertEqual(chmod(path, 0o600), 0)
        _ = try assertUpAuthenticatesWithoutShowingTheSecret(["--etcd-password-file", path])
    }

    func testPasswordFileOthersCanReadIsRefused() throws {
        let path = tmp + "/etcd-password"
        try "\(secret)\n".write(toFile: path, atomically: false, encoding: .utf8)
        XCTAssertEqual(chmod(path, 0o644), 0)
        let ns = try makeNode()
        let up = runCommand(["ip", "netns", "exec", ns.name, flannelUDPBinary(), "up", "--etcd-endpoints", etcdURL,
                             "--etcd-username", "flannel", "--etcd-password-file", path, "--iface", "eth0",
                             "--subnet-file", tmp + "/subnet.env", "--detach"],
                            environment: ["FLANNEL_UDP_RUN_DIR": tmp + "/run"])
        XCTAssertEqual(up.status, 64, up.description)
        XCTAssertTrue(up.stderr.contains("\(path) (mode 644: group or others have access; chmod 600 it)"), up.stderr)
        XCTAssertFalse(try ns.run(["ip", "-o", "link", "show"]).contains("flannel0"))
        XCTAssertFalse(FileManager.default.fileExists(atPath: tmp + "/subnet.env"))
    }

    func testPasswordOnTheCommandLineIsKeptFromTheDaemonAndWarnedAbout() throws {
        let up = try assertUpAuthenticatesWithoutShowingTheSecret(["--etcd-password", secret])
        XCTAssertTrue(up.stderr.contains("--etcd-password on the command line can be read by every local user"), up.stderr)
        XCTAssertFalse(up.stdout.contains(secret) || up.stderr.contains(secret), up.description)
    }

    func testPasswordOnTheCommandLineInEqualsFormIsKeptFromTheDaemon() throws {
        _ = try assertUpAuthenticatesWithoutShowingTheSecret(["--etcd-password=\(secret)"])
    }

    /// Without --detach the `up` process is the daemon: it overwrites the value in its own argv once parsed.
    func testForegroundUpOverwritesThePasswordInItsArgv() throws {
        let ns = try makeNode()
        let run = tmp + "/run"
        let daemon = try startBackground(["FLANNEL_UDP_RUN_DIR=\(run)", "ip", "netns", "exec", ns.name, flannelUDPBinary(),
                                          "up", "--etcd-endpoints", etcdURL, "--etcd-username", "flannel",
                                          "--etcd-password", secret, "--iface", "eth0", "--subnet-file", tmp + "/subnet.env"])
        defer {
            if daemon.isRunning { kill(daemon.processIdentifier, SIGTERM) }
            daemon.waitUntilExit()
        }
        try waitFor("the foreground daemon is up", timeout: 20) {
            runCommand(["ip", "netns", "exec", ns.name, flannelUDPBinary(), "status"],
                       environment: ["FLANNEL_UDP_RUN_DIR": run]).status == 0
        }
        // `env` execs `ip`, which execs flannel-udp: the process started is the daemon.
        let seen = runCommand(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat",
                               "/proc/\(daemon.processIdentifier)/cmdline"])
        XCTAssertEqual(seen.status, 0, seen.description)
        let cmdline = seen.stdout.replacingOccurrences(of: "\u{0}", with: " ")
        XCTAssertTrue(cmdline.contains("--etcd-password"), "not the daemon's command line: \(cmdline)")
        XCTAssertFalse(cmdline.contains(secret), cmdline)
    }

    func testPasswordFromTheEnvironmentIsErasedFromTheDaemon() throws {
        _ = try assertUpAuthenticatesWithoutShowingTheSecret([], environment: ["FLANNEL_UDP_ETCD_PASSWORD": secret])
    }

    func testFlanneldsPasswordVariableIsAcceptedAndErased() throws {
        _ = try assertUpAuthenticatesWithoutShowingTheSecret([], environment: ["FLANNELD_ETCD_PASSWORD": secret])
    }
}
