import Foundation
import XCTest
@testable import FlannelCore
@testable import FlannelUDP

/// Self-healing (issue 13), on the topology in HostileTopology.swift: while pod 1 pings pod 2 every 10 ms, the
/// overlay route, the /32 address, the link's up state and the MTU of node 1's flannel0 are taken away by hand,
/// one at a time. Each must be back within a second, traffic must flow again, and `status --json` must count
/// each repair. A deleted device cannot be repaired (the forwarder's queues went with it): the daemon must exit
/// non-zero with the reason, and leave nothing behind.
final class SelfHealingTests: HostileTopologyTestCase {
    /// The repair deadline the issue sets.
    let repairDeadline: TimeInterval = 1

    func repairs(_ node: Node) throws -> [String: Any] {
        try XCTUnwrap(try daemonStatus(node)["repairs"] as? [String: Any], "status --json has no repairs section")
    }

    func count(_ node: Node, _ kind: String) throws -> Int { try repairs(node)[kind] as? Int ?? -1 }

    /// `ip -o ...` inside the node, "" when it fails.
    func ip(_ node: Node, _ args: [String]) -> String {
        runCommand(["ip", "netns", "exec", node.ns.name, "ip", "-o"] + args).stdout
    }

    func overlayRouteInPlace(_ n: Node) -> Bool {
        ip(n, ["route", "show", "10.244.0.0/16"]).contains("dev flannel0")
    }
    func addressInPlace(_ n: Node) -> Bool {
        ip(n, ["-4", "addr", "show", "dev", "flannel0"]).contains("inet 10.244.\(n.index).0/32")
    }
    func linkLine(_ n: Node) -> String { ip(n, ["link", "show", "flannel0"]) }
    func linkUp(_ n: Node) -> Bool { linkLine(n).contains(",UP") || linkLine(n).contains("<UP") }

    /// Breaks something with `breakIt` (an `ip` command in node `n`), then waits up to the deadline until
    /// `restored` holds and `kind` was counted once more; returns how long the repair took.
    @discardableResult
    func breakAndWatch(_ n: Node, _ kind: String, _ breakIt: [String], _ restored: () -> Bool) throws -> TimeInterval {
        let before = try count(n, kind)
        try n.ns.run(breakIt)
        let broken = Date()
        try waitFor("\(kind) is restored after `\(breakIt.joined(separator: " "))`", timeout: repairDeadline) {
            restored()
        }
        let took = Date().timeIntervalSince(broken)
        print("[+] \(kind): restored \(Int(took * 1000)) ms after `\(breakIt.joined(separator: " "))`")
        try waitFor("status counts the \(kind) repair", timeout: 5) { try count(n, kind) == before + 1 }
        return took
    }

    func testRouteAddressLinkAndMTURestoredDuringPing() throws {
        let (a, b) = try makePair()
        XCTAssertEqual(ping(from: a.pod, b.podAddress).status, 0)
        let pid = try daemonPID(a)
        let zero = try repairs(a)
        for kind in ["route", "address", "linkUp", "mtu"] { XCTAssertEqual(zero[kind] as? Int, 0, kind) }

        // Pod 1 pings pod 2 every 10 ms for the whole test; its output is read at the end.
        let log = tmp + "/ping.log"
        let pinger = try startInBackground(
            ["ip", "netns", "exec", a.pod.name, "ping", "-n", "-i", "0.01", "-W", "1", b.podAddress], log: log)
        func replies() -> Int {
            ((try? String(contentsOfFile: log, encoding: .utf8)) ?? "").components(separatedBy: "bytes from").count - 1
        }
        /// Traffic flows: the background ping gets new replies.
        func trafficResumes(_ after: String) throws {
            let seen = replies()
            try waitFor("the 10 ms ping gets replies again after \(after)", timeout: 5) { replies() > seen + 5 }
        }
        try trafficResumes("start")

        // The overlay route.
        try breakAndWatch(a, "route", ["ip", "route", "del", "10.244.0.0/16", "dev", "flannel0"]) { overlayRouteInPlace(a) }
        try trafficResumes("the route was restored")

        // The address (the kernel takes the route with the device's last address: both come back).
        try breakAndWatch(a, "address", ["ip", "addr", "del", "10.244.1.0/32", "dev", "flannel0"]) {
            addressInPlace(a) && overlayRouteInPlace(a)
        }
        try trafficResumes("the address was restored")

        // The link's up state (down flushes the device's routes too).
        try breakAndWatch(a, "linkUp", ["ip", "link", "set", "flannel0", "down"]) {
            linkUp(a) && overlayRouteInPlace(a)
        }
        try trafficResumes("the link was set up again")

        // The MTU.
        try breakAndWatch(a, "mtu", ["ip", "link", "set", "flannel0", "mtu", "1300"]) {
            linkLine(a).contains("mtu 1472")
        }
        try trafficResumes("the MTU was restored")

        // One daemon did all of it, and says so in both outputs.
        XCTAssertEqual(try daemonPID(a), pid)
        let final = try repairs(a)
        for kind in ["address", "linkUp", "mtu"] { XCTAssertEqual(final[kind] as? Int, 1, kind) }
        // The route came back after each of route, address and link down.
        XCTAssertEqual(final["route"] as? Int, 3)
        XCTAssertNil(final["lastError"] as? String)
        let table = fu(a, ["status"])
        XCTAssertTrue(table.stdout.contains("repairs:   route 3, address 1, link up 1, mtu 1"), table.stdout)

        // Our own teardown is not taken for damage: `down` leaves nothing behind.
        pinger.terminate()
        pinger.waitUntilExit()
        XCTAssertEqual(fu(a, ["down"]).status, 0)
        try waitFor("the device is gone after down") { runCommand(["ip", "netns", "exec", a.ns.name, "ip", "link", "show", "flannel0"]).status != 0 }
        XCTAssertFalse(overlayRouteInPlace(a))
    }

    func testSomeoneElsesRouteIsNotFoughtForever() throws {
        // Someone routes the overlay network to another device: the guard cannot put its route back (EEXIST for
        // another route under the same key), says so in status, and backs off instead of retrying on every event.
        let a = try makeNode(1)
        try a.ns.run(["ip", "route", "replace", "10.244.0.0/16", "dev", "cni0"])
        try waitFor("status reports the failed repair", timeout: 3) {
            ((try repairs(a))["lastError"] as? String)?.contains("File exists") == true
        }
        XCTAssertEqual(try count(a, "route"), 0)
        // Once the other route is gone, ours comes back at the next check.
        try a.ns.run(["ip", "route", "del", "10.244.0.0/16", "dev", "cni0"])
        try waitFor("the overlay route is restored", timeout: 3) { overlayRouteInPlace(a) }
        try waitFor("the error is cleared", timeout: 3) { (try repairs(a))["lastError"] as? String == nil }
    }

    func testDeletedDeviceStopsTheDaemonWithAReason() throws {
        let a = try makeNode(1, start: false)
        let log = tmp + "/daemon.log"
        let daemon = try startInBackground(
            ["FLANNEL_UDP_RUN_DIR=\(tmp)/run", "ip", "netns", "exec", a.ns.name, flannelUDPBinary(),
             "up", "--network", "10.244.0.0/16", "--subnet", a.subnet, "--iface", "eth0",
             "--subnet-file", "\(tmp)/subnet-1.env"], log: log)
        // "running", not only answering: status answers during start-up too ("starting"), and a device deleted
        // then fails the start ("start forwarder: set virtio header size on flannel0: File descriptor in bad
        // state", seen once in CI), a different path from the one this test is about.
        try waitFor("the foreground daemon is running", timeout: 10) {
            let r = fu(a, ["status", "--json"])  // not daemonStatus: that asserts, and "starting" may answer first
            let json = try? JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any]
            return r.status == 0 && (json?["daemon"] as? [String: Any])?["phase"] as? String == "running"
        }

        try a.ns.run(["ip", "link", "del", "flannel0"])
        let deleted = Date()
        try waitFor("the daemon exits after its device was deleted", timeout: 5) { !daemon.isRunning }
        print("[+] device deleted: daemon exited \(Int(Date().timeIntervalSince(deleted) * 1000)) ms later, status \(daemon.terminationStatus)")
        let output = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
        for line in output.split(separator: "\n") where line.contains("deleted") || line.contains("forwarding") {
            print("[+] daemon: \(line)")
        }
        XCTAssertNotEqual(daemon.terminationStatus, 0, output)
        XCTAssertTrue(output.contains("device flannel0 (ifindex"), output)
        XCTAssertTrue(output.contains("was deleted by someone else"), output)
        XCTAssertTrue(output.contains("forwarding into nothing"), output)
        // Nothing left: no device, no route, no daemon.
        XCTAssertEqual(fu(a, ["status"]).status, 3)
        XCTAssertFalse(overlayRouteInPlace(a))
    }

    /// Starts `/usr/bin/env arguments` in the background, its output going to a new file `log`; stopped (and the
    /// file closed) when the test ends.
    private func startInBackground(_ arguments: [String], log: String) throws -> Process {
        XCTAssertTrue(FileManager.default.createFile(atPath: log, contents: nil))
        let out = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
        let process = try startBackground(arguments, output: out)
        addTeardownBlock {
            stopBackground(process)
            try? out.close()
        }
        return process
    }
}
