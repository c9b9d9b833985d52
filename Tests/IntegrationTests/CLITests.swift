import Foundation
import XCTest
@testable import FlannelCore
@testable import FlannelUDP

/// The command line end to end, as an operator uses it: every subcommand in fresh network namespaces.
///
///     namespace N (one per test, "fu-cli-<pid>-<n>")
///       eth0: veth underlay (peer eth0peer), 192.168.77.1/24, mtu 1500
///       flannel0: made by `flannel-udp up`
final class CLITests: XCTestCase {
    var runDir = ""
    var tmp = ""

    override func setUpWithError() throws {
        try requireRoot()
        tmp = try makeTestDirectory("fu-cli", for: self)
        runDir = tmp + "/run"
    }

    /// A namespace with a 1500-MTU underlay `eth0` at 192.168.77.1/24, removed when the test ends.
    func makeNode() throws -> TestNamespace {
        let ns = try TestNamespace(prefix: "fu-cli")
        addTeardownBlock { ns.destroy() }
        try ns.run(["ip", "link", "set", "lo", "up"])
        try addLoneUnderlay(ns)
        return ns
    }

    func fu(_ ns: TestNamespace, _ args: [String]) -> CommandResult { runFlannelUDP(in: ns, args, runDirectory: runDir) }

    func upArgs(subnetFile: String, extra: [String] = []) -> [String] {
        ["up", "--network", "10.244.0.0/16", "--subnet", "10.244.1.0/24", "--iface", "eth0",
         "--subnet-file", subnetFile, "--detach"] + extra
    }

    /// Everything `ip` can tell about the namespace's IPv4 side (IPv6 link-local addresses change by themselves as
    /// duplicate address detection finishes), to compare before and after a command that must change nothing.
    func systemView(_ ns: TestNamespace) throws -> String {
        try ns.run(["ip", "-o", "link", "show"]).replacingOccurrences(of: #"\s+link/.*"#, with: "", options: .regularExpression)
            + ns.run(["ip", "-4", "-o", "addr", "show"]) + ns.run(["ip", "-4", "route", "show", "table", "all"])
    }

    func testUpStatusDownDown() throws {
        let ns = try makeNode()
        let subnetFile = tmp + "/subnet.env"
        let up = fu(ns, upArgs(subnetFile: subnetFile))
        XCTAssertEqual(up.status, 0, up.description)

        let link = try ns.run(["ip", "-o", "link", "show", "flannel0"])
        XCTAssertTrue(link.contains("mtu 1472"), link)
        XCTAssertTrue(link.contains("qlen 1000"), "a longer tx queue than the tun default of 500: \(link)")
        XCTAssertTrue(link.contains(",UP"), link)
        XCTAssertTrue(try ns.run(["ip", "-o", "addr", "show", "dev", "flannel0"]).contains("inet 10.244.1.0/32"))
        XCTAssertTrue(try ns.run(["ip", "route", "show"]).contains("10.244.0.0/16 dev flannel0"))
        XCTAssertEqual(try String(contentsOfFile: subnetFile, encoding: .utf8),
                       "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1472\nFLANNEL_IPMASQ=false\n")

        let status = fu(ns, ["status", "--json"])
        XCTAssertEqual(status.status, 0, status.description)
        XCTAssertTrue(status.stdout.contains("10.244.1.0/24"), status.stdout)
        XCTAssertFalse(status.stdout.contains("\\/"), "--json writes '/' as it is, never '\\/': \(status.stdout)")
        let json = try JSONSerialization.jsonObject(with: Data(status.stdout.utf8)) as? [String: Any]
        XCTAssertEqual(json?["running"] as? Bool, true)
        let device = json?["device"] as? [String: Any]
        XCTAssertEqual(device?["mtu"] as? Int, 1472)
        XCTAssertEqual(device?["up"] as? Bool, true)
        XCTAssertEqual(device?["addresses"] as? [String], ["10.244.1.0/32"])
        XCTAssertEqual(device?["routes"] as? [String], ["10.244.0.0/16 dev flannel0"])
        let daemon = json?["daemon"] as? [String: Any]
        XCTAssertEqual(daemon?["subnet"] as? String, "10.244.1.0/24")
        XCTAssertEqual(daemon?["listen"] as? String, "192.168.77.1:8285")
        let table = fu(ns, ["status"])
        XCTAssertTrue(table.stdout.contains("flannel0 (tun, UP, mtu 1472)"), table.stdout)

        let down = fu(ns, ["down"])
        XCTAssertEqual(down.status, 0, down.description)
        XCTAssertFalse(try ns.run(["ip", "-o", "link", "show"]).contains("flannel0"))
        XCTAssertFalse(try ns.run(["ip", "route", "show"]).contains("10.244.0.0/16"))
        XCTAssertFalse(FileManager.default.fileExists(atPath: subnetFile), "down must remove the subnet file")
        XCTAssertEqual(try FileManager.default.contentsOfDirectory(atPath: runDir), [], "down must remove the state")
        let again = fu(ns, ["down"])
        XCTAssertEqual(again.status, 0, again.description)
        let stopped = fu(ns, ["status", "--json"])
        XCTAssertEqual(stopped.status, 3, stopped.description)
    }

    func testTwoNamespacesEachRunTheDefaultDevice() throws {
        let a = try makeNode()
        let b = try makeNode()
        let upA = fu(a, upArgs(subnetFile: tmp + "/a.env"))
        let upB = fu(b, ["up", "--network", "10.244.0.0/16", "--subnet", "10.244.2.0/24", "--iface", "eth0",
                         "--subnet-file", tmp + "/b.env", "--detach"])
        XCTAssertEqual(upA.status, 0, upA.description)
        XCTAssertEqual(upB.status, 0, upB.description)
        XCTAssertEqual(fu(a, ["status"]).status, 0)
        XCTAssertEqual(fu(b, ["status"]).status, 0)
        XCTAssertTrue(try b.run(["ip", "-o", "addr", "show", "dev", "flannel0"]).contains("10.244.2.0/32"))
        XCTAssertEqual(fu(a, ["down"]).status, 0)
        XCTAssertEqual(fu(b, ["status"]).status, 0, "taking A down must not touch B")
        XCTAssertEqual(fu(b, ["down"]).status, 0)
    }

    func testSecondUpOnTheSameDeviceRefusesAndChangesNothing() throws {
        let ns = try makeNode()
        XCTAssertEqual(fu(ns, upArgs(subnetFile: tmp + "/a.env")).status, 0)
        let before = try systemView(ns)
        let second = fu(ns, upArgs(subnetFile: tmp + "/b.env"))
        XCTAssertNotEqual(second.status, 0)
        XCTAssertTrue(second.stderr.contains("already running for flannel0"), second.stderr)
        XCTAssertEqual(try systemView(ns), before)
        XCTAssertFalse(FileManager.default.fileExists(atPath: tmp + "/b.env"))
        // Same port, other device and network: the UDP bind fails before any device is made.
        let third = fu(ns, ["up", "--network", "10.245.0.0/16", "--subnet", "10.245.1.0/24", "--iface", "eth0",
                            "--subnet-file", tmp + "/c.env", "--device", "flannel1", "--detach"])
        XCTAssertNotEqual(third.status, 0)
        XCTAssertTrue(third.stderr.contains("192.168.77.1:8285"), third.stderr)
        XCTAssertEqual(try systemView(ns), before)
        XCTAssertEqual(fu(ns, ["down"]).status, 0)
    }

    func testFailedUpRollsBackEverything() throws {
        let ns = try makeNode()
        // A different route to the overlay network already exists: `up` gets as far as adding its route, fails
        // there with EEXIST, and must undo the device it made; the existing route must survive.
        try ns.run(["ip", "route", "add", "10.244.0.0/16", "via", "192.168.77.9", "dev", "eth0"])
        let before = try systemView(ns)
        let up = fu(ns, upArgs(subnetFile: tmp + "/subnet.env"))
        XCTAssertNotEqual(up.status, 0)
        XCTAssertTrue(up.stderr.contains("add route 10.244.0.0/16 dev flannel0"), up.stderr)
        XCTAssertTrue(up.stderr.contains("File exists"), up.stderr)
        XCTAssertEqual(try systemView(ns), before)
        XCTAssertFalse(FileManager.default.fileExists(atPath: tmp + "/subnet.env"))
        XCTAssertEqual(fu(ns, ["status"]).status, 3)
    }

    func testBadInputIsRefusedWithTheValueNamedAndNothingChanges() throws {
        let ns = try makeNode()
        let peers = tmp + "/peers"
        try "10.244.2.0/24 192.168.77.2\n10.244.3.0/24 192.168.77.300\n".write(toFile: peers, atomically: true, encoding: .utf8)
        let subnetFile = tmp + "/subnet.env"
        let base = ["--subnet-file", subnetFile, "--detach"]
        let cases: [([String], String, Int32)] = [
            (["up", "--network", "10.244.0.0/33", "--subnet", "10.244.1.0/24"], "10.244.0.0/33", 64),
            (["up", "--network", "banana", "--subnet", "10.244.1.0/24"], "banana", 64),
            (["up", "--network", "10.244.1.0/16", "--subnet", "10.244.1.0/24"], "host bits", 64),
            (["up", "--network", "10.244.0.0/16", "--subnet", "10.245.1.0/24"], "10.245.1.0/24", 64),
            (["up", "--network", "10.244.0.0/16", "--subnet", "10.244.1.0/24", "--port", "70000"], "70000", 64),
            (["up", "--network", "10.244.0.0/16", "--subnet", "10.244.1.0/24", "--port", "0"], "port 0", 64),
            (["up", "--network", "10.244.0.0/16", "--subnet", "10.244.1.0/24", "--mtu", "20"], "mtu 20", 64),
            (["up", "--network", "10.244.0.0/16", "--subnet", "10.244.1.0/24", "--codel-target", "2000"], "--codel-target 2000", 64),
            (["up", "--network", "10.244.0.0/16", "--subnet", "10.244.1.0/24", "--express-size", "19"], "--express-size 19", 64),
            (["up", "--network", "10.244.0.0/16", "--subnet", "10.244.1.0/24", "--express-size", "65536"], "--express-size 65536", 64),
            (["up", "--network", "10.244.0.0/16", "--subnet", "10.244.1.0/24", "--express-spin", "1001"], "--express-spin 1001", 64),
            (["up", "--network", "10.244.0.0/16", "--subnet", "10.244.1.0/24", "--express-priority", "100"], "--express-priority 100", 64),
            (["up", "--network", "10.244.0.0/16", "--subnet", "10.244.1.0/24", "--masq-resync", "0"], "--masq-resync 0.0 is outside", 64),
            (["up", "--network", "10.244.0.0/16", "--subnet", "10.244.1.0/24", "--iface", "nosuch0"], "nosuch0", 64),
            (["up", "--network", "10.244.0.0/16", "--subnet", "10.244.1.0/24", "--device", "averyveryverylongname"], "averyveryverylongname", 64),
            (["up", "--network", "10.244.0.0/16", "--subnet", "10.244.1.0/24", "--iface", "eth0", "--peers", peers], "\(peers):2", 64),
            (["route", "add", "10.244.2.0/24", "via", "1.2.3"], "1.2.3", 64),
            (["cleanup", "--network", "10.244.0.1/16"], "10.244.0.1/16", 64),
        ]
        let before = try systemView(ns)
        for (args, fragment, code) in cases {
            let r = fu(ns, args + (args[0] == "up" ? base : []))
            XCTAssertEqual(r.status, code, "\(args): \(r.description)")
            XCTAssertTrue(r.stderr.contains(fragment), "\(args): stderr lacks '\(fragment)': \(r.stderr)")
            let after = try systemView(ns)
            XCTAssertEqual(after, before, "\(args) changed the namespace")
            if after != before { print(before, "----- after", after, separator: "\n") }
            XCTAssertFalse(FileManager.default.fileExists(atPath: subnetFile), "\(args) wrote the subnet file")
        }
        // Not root: refused before anything else.
        let nobody = runCommand(["ip", "netns", "exec", ns.name, "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                 flannelUDPBinary()] + upArgs(subnetFile: subnetFile))
        XCTAssertEqual(nobody.status, 77, nobody.description)
        XCTAssertTrue(nobody.stderr.contains("must be run as root"), nobody.stderr)
        XCTAssertEqual(try systemView(ns), before)
    }

    func testCleanupRemovesHostGWAndVXLANLeftoversOnly() throws {
        let ns = try makeNode()
        try ns.run(["ip", "route", "add", "10.244.2.0/24", "via", "192.168.77.2", "dev", "eth0"])
        try ns.run(["ip", "route", "add", "10.244.3.0/24", "via", "192.168.77.3", "dev", "eth0"])
        try ns.run(["ip", "route", "add", "172.16.5.0/24", "via", "192.168.77.2", "dev", "eth0"])
        try ns.run(["ip", "link", "add", "flannel.1", "type", "vxlan", "id", "1", "dev", "eth0", "dstport", "8472"])
        try ns.run(["ip", "addr", "add", "10.244.1.0/32", "dev", "flannel.1"])
        try ns.run(["ip", "link", "set", "flannel.1", "up"])
        try ns.run(["ip", "route", "add", "10.244.4.0/24", "via", "10.244.4.0", "dev", "flannel.1", "onlink"])
        // A dead daemon's state file.
        let stateDir = "\(runDir)/ns-\(try namespaceInode(ns))"
        try FileManager.default.createDirectory(atPath: stateDir, withIntermediateDirectories: true)
        let dead = DaemonState(pid: 999_999_999, startTicks: 1, device: "flannel9", network: "10.244.0.0/16",
                               subnet: "10.244.9.0/24", subnetFile: nil, listen: "192.168.77.1:8285", startedAt: Date())
        try dead.write(to: stateDir + "/flannel9.json")

        let before = try systemView(ns)
        let dry = fu(ns, ["cleanup", "--network", "10.244.0.0/16", "--dry-run"])
        XCTAssertEqual(dry.status, 0, dry.description)
        let expected = [
            "delete route 10.244.2.0/24 via 192.168.77.2 dev eth0",
            "delete route 10.244.3.0/24 via 192.168.77.3 dev eth0",
            "delete route 10.244.4.0/24 via 10.244.4.0 dev flannel.1",
            "delete vxlan device flannel.1",
            "remove \(stateDir)/flannel9.json",
        ]
        XCTAssertEqual(dry.stdout.split(separator: "\n").map(String.init), expected.map { "[dry-run] \($0)" })
        XCTAssertEqual(try systemView(ns), before, "--dry-run changed the namespace")
        XCTAssertTrue(FileManager.default.fileExists(atPath: stateDir + "/flannel9.json"))

        let real = fu(ns, ["cleanup", "--network", "10.244.0.0/16"])
        XCTAssertEqual(real.status, 0, real.description)
        XCTAssertEqual(real.stdout.split(separator: "\n").map(String.init), expected.map { "[#] \($0)" })
        let routes = try ns.run(["ip", "route", "show"])
        XCTAssertTrue(routes.contains("172.16.5.0/24 via 192.168.77.2 dev eth0"), "a route outside the network must survive: \(routes)")
        XCTAssertTrue(routes.contains("192.168.77.0/24 dev eth0"), routes)
        XCTAssertFalse(routes.contains("10.244."), routes)
        XCTAssertFalse(try ns.run(["ip", "-o", "link", "show"]).contains("flannel.1"))
        XCTAssertFalse(FileManager.default.fileExists(atPath: stateDir + "/flannel9.json"))
        let nothing = fu(ns, ["cleanup", "--network", "10.244.0.0/16"])
        XCTAssertEqual(nothing.stdout, "nothing to clean up in 10.244.0.0/16\n")
    }

    func testKilledDaemonLeavesNothingThatDownCannotRemove() throws {
        let ns = try makeNode()
        let subnetFile = tmp + "/subnet.env"
        XCTAssertEqual(fu(ns, upArgs(subnetFile: subnetFile)).status, 0)
        let state = try XCTUnwrap(DaemonState.load(path: "\(runDir)/ns-\(try namespaceInode(ns))/flannel0.json"))
        XCTAssertEqual(kill(state.pid, SIGKILL), 0)
        try waitFor("the killed daemon's device disappears") {
            !((try? ns.run(["ip", "-o", "link", "show"])) ?? "flannel0").contains("flannel0")
        }
        let down = fu(ns, ["down"])
        XCTAssertEqual(down.status, 0, down.description)
        XCTAssertFalse(FileManager.default.fileExists(atPath: subnetFile))
        XCTAssertEqual((try? FileManager.default.contentsOfDirectory(atPath: runDir)) ?? [], [])
        // And it can come up again straight away.
        XCTAssertEqual(fu(ns, upArgs(subnetFile: subnetFile)).status, 0)
        XCTAssertEqual(fu(ns, ["down"]).status, 0)
    }

    func routeList(_ ns: TestNamespace) throws -> [String] {
        let r = fu(ns, ["route", "list", "--json"])
        XCTAssertEqual(r.status, 0, r.description)
        XCTAssertFalse(r.stdout.contains("\\/"), "--json writes '/' as it is, never '\\/': \(r.stdout)")
        let json = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any]
        return ((json?["peers"] as? [[String: Any]]) ?? []).map { "\($0["subnet"] ?? "") \($0["endpoint"] ?? "") \($0["origin"] ?? "")" }
    }

    func testPeersFileLoadsAtStartAndReloadsOnSIGHUPAllOrNothing() throws {
        let ns = try makeNode()
        let peers = tmp + "/peers"
        try "# two peers\n10.244.2.0/24 192.168.77.2\n10.244.3.0/24 192.168.77.3:9000 # odd port\n".write(toFile: peers, atomically: true, encoding: .utf8)
        XCTAssertEqual(fu(ns, upArgs(subnetFile: tmp + "/s.env", extra: ["--peers", peers])).status, 0)
        XCTAssertEqual(try routeList(ns), ["10.244.2.0/24 192.168.77.2:8285 file", "10.244.3.0/24 192.168.77.3:9000 file"])
        let pid = try XCTUnwrap(DaemonState.load(path: "\(runDir)/ns-\(try namespaceInode(ns))/flannel0.json")?.pid)

        // A manual route beside the file's survives reloads; the file's set is replaced whole.
        XCTAssertEqual(fu(ns, ["route", "add", "10.244.9.0/24", "via", "192.168.77.9"]).status, 0)
        try "10.244.4.0/24 192.168.77.4\n".write(toFile: peers, atomically: true, encoding: .utf8)
        XCTAssertEqual(kill(pid, SIGHUP), 0)
        try waitFor("the reloaded file is in the table") {
            try routeList(ns) == ["10.244.4.0/24 192.168.77.4:8285 file", "10.244.9.0/24 192.168.77.9:8285 manual"]
        }

        // A bad line: the whole reload is refused and the table stays as it was.
        try "10.244.5.0/24 192.168.77.5\n10.244.6.0/24 nonsense\n".write(toFile: peers, atomically: true, encoding: .utf8)
        XCTAssertEqual(kill(pid, SIGHUP), 0)
        let log = "\(runDir)/ns-\(try namespaceInode(ns))/flannel0.log"
        try waitFor("the daemon logs the bad line") {
            ((try? String(contentsOfFile: log, encoding: .utf8)) ?? "").contains("\(peers):2:")
        }
        XCTAssertEqual(try routeList(ns), ["10.244.4.0/24 192.168.77.4:8285 file", "10.244.9.0/24 192.168.77.9:8285 manual"])
        // Bad requests over the control socket change nothing either.
        let outside = fu(ns, ["route", "add", "10.250.0.0/24", "via", "192.168.77.9"])
        XCTAssertEqual(outside.status, 64, outside.description)
        XCTAssertTrue(outside.stderr.contains("not inside the overlay network 10.244.0.0/16"), outside.stderr)
        let missing = fu(ns, ["route", "del", "10.244.77.0/24"])
        XCTAssertEqual(missing.status, 64, missing.description)
        XCTAssertTrue(missing.stderr.contains("no route for 10.244.77.0/24"), missing.stderr)
        XCTAssertEqual(try routeList(ns).count, 2)
        XCTAssertEqual(fu(ns, ["down"]).status, 0)
    }

    /// The inode of the namespace's /proc/<pid>/ns/net as seen from inside it: the key of its state directory.
    func namespaceInode(_ ns: TestNamespace) throws -> String {
        try ns.run(["stat", "-L", "-c", "%i", "/proc/self/ns/net"]).trimmingCharacters(in: .whitespacesAndNewlines)
    }
}
