import Foundation
import XCTest
@testable import FlannelCore
@testable import FlannelUDP

/// Start-up against an etcd that is not there yet: the process that ran `up --detach` killed before the daemon
/// is ready (Ctrl-C, `timeout`, a service manager giving up), and `down` while the daemon still waits for etcd.
///
///        wire (bridge br0, 192.168.77.250: etcd, started only when the test says so)
///             |
///        node (eth0 192.168.77.1): flannel-udp up --etcd-endpoints http://192.168.77.250:2379 --detach
final class StartupRobustnessTests: EtcdWireTestCase {
    var node: TestNamespace!
    var runDir: String { tmp + "/run" }
    var subnetFile: String { tmp + "/subnet.env" }

    override func setUpWithError() throws {
        try requireRoot()
        try setUpWire("fu-st")
        node = try plugNode(prefix: "fu-stn", index: 1)
    }

    func fu(_ args: [String]) -> CommandResult {
        runFlannelUDP(in: node, args, runDirectory: runDir)
    }

    /// `up --detach` started without waiting for it; `ip netns exec` execs, so the Process is the CLI itself.
    func startUp() throws -> Process {
        try startBackground(["FLANNEL_UDP_RUN_DIR=\(runDir)", "ip", "netns", "exec", node.name, flannelUDPBinary(), "up",
                             "--etcd-endpoints", etcdURL, "--iface", "eth0", "--subnet-file", subnetFile, "--detach"])
    }

    /// etcd with the network config: the registry the waiting daemon finds.
    override func startEtcd() throws {
        try super.startEtcd()
        try putNetworkConfig()
    }

    /// The daemon's status while it waits for etcd: "starting", with its pid.
    func startingDaemon() throws -> pid_t {
        var pid: pid_t = 0
        try waitFor("the daemon answers status as starting", timeout: 10) {
            let r = fu(["status", "--json"])
            guard r.status == 0, let json = try? JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any],
                  let daemon = json["daemon"] as? [String: Any], daemon["phase"] as? String == "starting",
                  let p = daemon["pid"] as? Int else { return false }
            pid = pid_t(p)
            return true
        }
        return pid
    }

    /// Nothing of the node left: no state directory contents, no subnet file, no device, no lease in etcd.
    func assertNothingLeft(leasesChecked: Bool, file: StaticString = #filePath, line: UInt = #line) throws {
        XCTAssertFalse(FileManager.default.fileExists(atPath: subnetFile), "subnet file left", file: file, line: line)
        let left = (FileManager.default.enumerator(atPath: runDir)?.allObjects as? [String]) ?? []
        XCTAssertEqual(left, [], "left in the run directory", file: file, line: line)
        XCTAssertFalse(try node.run(["ip", "-o", "link", "show"]).contains("flannel0"), "device left", file: file, line: line)
        if leasesChecked {
            let leases = try etcdctl(["get", "--prefix", "--keys-only", "/coreos.com/network/subnets"])
            XCTAssertEqual(leases.trimmingCharacters(in: .whitespacesAndNewlines), "", "lease left", file: file, line: line)
        }
    }

    /// The `up` that started the daemon is SIGKILLed while etcd is unreachable; when etcd comes up, the daemon
    /// reports readiness into a pipe nobody reads (EPIPE, not SIGPIPE), comes up, and `down` removes it all.
    func testDaemonOutlivesAKilledParentAndDownRemovesEverything() throws {
        try requireEtcd()
        let upCLI = try startUp()
        let pid = try startingDaemon()
        XCTAssertEqual(kill(upCLI.processIdentifier, SIGKILL), 0)
        upCLI.waitUntilExit()
        try startEtcd()
        try waitFor("the daemon is up with a lease", timeout: 30) {
            let r = fu(["status", "--json"])
            guard r.status == 0, let json = try? JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any],
                  let daemon = json["daemon"] as? [String: Any] else {
                XCTAssertEqual(kill(pid, 0), 0, "the daemon died: \(r.description)")
                return kill(pid, 0) != 0  // stop waiting: the assertion above already failed
            }
            return daemon["phase"] as? String == "running"
        }
        XCTAssertEqual(kill(pid, 0), 0, "the daemon died when its parent was gone")
        XCTAssertTrue(FileManager.default.fileExists(atPath: subnetFile))
        XCTAssertNotEqual(try etcdctl(["get", "--prefix", "--keys-only", "/coreos.com/network/subnets"])
            .trimmingCharacters(in: .whitespacesAndNewlines), "", "no lease taken")
        let log = (try? String(contentsOfFile: "\(runDir)/ns-\(try namespaceInode())/flannel0.log", encoding: .utf8)) ?? ""
        XCTAssertTrue(log.contains("Broken pipe"), "EPIPE on the readiness pipe is logged: \(log)")
        let down = fu(["down"])
        XCTAssertEqual(down.status, 0, down.description)
        try assertNothingLeft(leasesChecked: true)
    }

    /// `down` while the daemon still retries etcd: it stops at once and leaves nothing behind; the `up` that
    /// waited for it says so.
    func testDownStopsADaemonThatIsStillStarting() throws {
        try requireEtcd()
        let upCLI = try startUp()
        let pid = try startingDaemon()
        let routes = fu(["route", "list"])
        XCTAssertNotEqual(routes.status, 0, routes.description)
        XCTAssertTrue(routes.stderr.contains("still starting"), routes.description)
        let start = Date()
        let down = fu(["down"])
        XCTAssertEqual(down.status, 0, down.description)
        XCTAssertLessThan(Date().timeIntervalSince(start), 8, "down waited for the timeout: \(down.description)")
        XCTAssertFalse(down.stderr.contains("killing"), down.description)
        XCTAssertNotEqual(kill(pid, 0) == 0 && !FaultTests.isZombie(pid), true, "the daemon still runs")
        upCLI.waitUntilExit()
        XCTAssertNotEqual(upCLI.terminationStatus, 0, "up reported success for a daemon stopped during start-up")
        try assertNothingLeft(leasesChecked: false)
        XCTAssertEqual(fu(["status"]).status, 3)
    }

    /// The daemon as `up --detach` starts it (`--ready-fd 3`), but the readiness pipe's reader is gone before it
    /// starts: the parent died. Without etcd no library has ignored SIGPIPE for us (NIO does so globally once it
    /// opens a socket, which is why the etcd variant above survives SIGPIPE even on older code), so the READY
    /// write hits a closed pipe: EPIPE logged, the daemon runs on, and `down` stops it cleanly.
    func testReadinessPipeWithoutReaderIsNoReasonToDie() throws {
        let log = tmp + "/daemon.log"
        var pipeFDs: [Int32] = [-1, -1]
        XCTAssertEqual(pipe(&pipeFDs), 0)
        XCTAssertEqual(close(pipeFDs[0]), 0)  // the reader is gone
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        XCTAssertEqual(posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0), 0)
        XCTAssertEqual(posix_spawn_file_actions_addopen(&actions, 1, log, O_WRONLY | O_CREAT | O_APPEND, 0o600), 0)
        XCTAssertEqual(posix_spawn_file_actions_adddup2(&actions, 1, 2), 0)
        XCTAssertEqual(posix_spawn_file_actions_adddup2(&actions, pipeFDs[1], 3), 0)
        let args = ["/usr/bin/env", "FLANNEL_UDP_RUN_DIR=\(runDir)", "ip", "netns", "exec", node.name, flannelUDPBinary(),
                    "up", "--network", "10.244.0.0/16", "--subnet", "10.244.1.0/24", "--iface", "eth0",
                    "--subnet-file", subnetFile, "--ready-fd", "3"]
        let cArgs = args.map { strdup($0) } + [nil]
        defer { cArgs.forEach { free($0) } }
        var pid: pid_t = 0
        XCTAssertEqual(posix_spawn(&pid, "/usr/bin/env", &actions, nil, cArgs, environ), 0)
        XCTAssertEqual(close(pipeFDs[1]), 0)
        var reaped = false
        var status: Int32 = 0
        defer { if !reaped { kill(pid, SIGKILL); waitpid(pid, &status, 0) } }
        func exited() -> Bool {
            if !reaped && waitpid(pid, &status, WNOHANG) == pid { reaped = true }
            return reaped
        }
        try waitFor("the daemon logs that it is up, or dies", timeout: 10) {
            exited() || ((try? String(contentsOfFile: log, encoding: .utf8)) ?? "").contains("up: flannel0")
        }
        try waitFor("the daemon has written READY into the closed pipe, or died", timeout: 5) {
            exited() || ((try? String(contentsOfFile: log, encoding: .utf8)) ?? "").contains("Broken pipe")
        }
        XCTAssertFalse(exited(), "the daemon died (wait status \(status), signal \(status & 0x7f)): \((try? String(contentsOfFile: log, encoding: .utf8)) ?? "")")
        XCTAssertEqual(fu(["status"]).status, 0)
        let down = fu(["down"])
        XCTAssertEqual(down.status, 0, down.description)
        try waitFor("the daemon has exited") { exited() }
        XCTAssertEqual(status, 0, "the daemon's wait status after down")
        try assertNothingLeft(leasesChecked: false)
    }

    func namespaceInode() throws -> String {
        try node.run(["stat", "-L", "-c", "%i", "/proc/self/ns/net"]).trimmingCharacters(in: .whitespacesAndNewlines)
    }
}
