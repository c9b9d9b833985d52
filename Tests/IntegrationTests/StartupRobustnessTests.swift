import Foundation
import XCTest
@testable import FlannelUDP

/// Start-up against an etcd that is not there yet: the process that ran `up --detach` killed before the daemon
/// is ready (Ctrl-C, `timeout`, a service manager giving up), and `down` while the daemon still waits for etcd.
///
///        wire (bridge br0, 192.168.77.250: etcd, started only when the test says so)
///             |
///        node (eth0 192.168.77.1): flannel-udp up --etcd-endpoints http://192.168.77.250:2379 --detach
final class StartupRobustnessTests: XCTestCase {
    var tmp = ""
    var underlay: TestWire!
    var node: TestNamespace!
    var etcd: Process?
    let etcdURL = "http://192.168.77.250:2379"
    var runDir: String { tmp + "/run" }
    var subnetFile: String { tmp + "/subnet.env" }

    override func setUpWithError() throws {
        try requireRoot()
        tmp = NSTemporaryDirectory() + "fu-st-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: tmp, withIntermediateDirectories: true)
        addTeardownBlock { [tmp] in try? FileManager.default.removeItem(atPath: tmp) }
        underlay = try TestWire(prefix: "fu-stw", address: "192.168.77.250/24")
        node = try TestNamespace(prefix: "fu-stn")
        addTeardownBlock { [weak self] in
            guard let self else { return }
            _ = self.fu(["down"])
            self.stopEtcd()
            self.node.destroy()
            self.underlay.destroy()
        }
        try underlay.plug(node, address: "192.168.77.1/24")
    }

    func requireEtcd() throws {
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/etcd"),
              FileManager.default.isExecutableFile(atPath: "/usr/bin/etcdctl") else {
            throw XCTSkip("this start-up test needs etcd: apt-get install -y etcd-server etcd-client (scripts/test.sh does)")
        }
    }

    func fu(_ args: [String]) -> CommandResult {
        runCommand(["ip", "netns", "exec", node.name, flannelUDPBinary()] + args, environment: ["FLANNEL_UDP_RUN_DIR": runDir])
    }

    /// `up --detach` started without waiting for it; `ip netns exec` execs, so the Process is the CLI itself.
    func startUp() throws -> Process {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = ["FLANNEL_UDP_RUN_DIR=\(runDir)", "ip", "netns", "exec", node.name, flannelUDPBinary(), "up",
                       "--etcd-endpoints", etcdURL, "--iface", "eth0", "--subnet-file", subnetFile, "--detach"]
        p.standardInput = FileHandle.nullDevice
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        try p.run()
        return p
    }

    func startEtcd() throws {
        let peer = "http://192.168.77.250:2380"
        etcd = try startBackground(["ip", "netns", "exec", underlay.ns.name, "etcd", "--name", "fu",
                                    "--data-dir", tmp + "/etcd", "--listen-client-urls", etcdURL,
                                    "--advertise-client-urls", etcdURL, "--listen-peer-urls", peer,
                                    "--initial-advertise-peer-urls", peer, "--initial-cluster", "fu=\(peer)"])
        try waitFor("etcd is healthy", timeout: 20) {
            (try? underlay.ns.run(["etcdctl", "--endpoints", etcdURL, "--command-timeout=1s", "endpoint", "health"])) != nil
        }
        try etcdctl(["put", "/coreos.com/network/config", #"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#])
    }

    func stopEtcd() {
        guard let etcd else { return }
        kill(etcd.processIdentifier, SIGKILL)
        etcd.waitUntilExit()
        self.etcd = nil
    }

    @discardableResult
    func etcdctl(_ args: [String]) throws -> String {
        try underlay.ns.run(["etcdctl", "--endpoints", etcdURL] + args)
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

    func namespaceInode() throws -> String {
        try node.run(["stat", "-L", "-c", "%i", "/proc/self/ns/net"]).trimmingCharacters(in: .whitespacesAndNewlines)
    }
}
