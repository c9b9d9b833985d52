import Foundation
import XCTest
@testable import FlannelCore
@testable import FlannelUDP

/// Issue 12, "unchecked routes", through the peers file (at start and on SIGHUP) and `route add`: each kind of bad
/// route is refused with the reason, and nothing changes. Node 10.244.1.0/24 of 10.244.0.0/16 at 192.168.77.1
/// (CLITests' node).
extension CLITests {
    /// Each bad route and a fragment of the reason it must be refused with.
    static let badRoutes: [(subnet: String, endpoint: String, why: String)] = [
        ("10.245.2.0/24", "192.168.77.2", "not inside the overlay network 10.244.0.0/16"),
        ("10.244.1.5/32", "192.168.77.2", "overlaps this node's own subnet 10.244.1.0/24"),
        ("10.244.1.0/24", "192.168.77.2", "overlaps this node's own subnet 10.244.1.0/24"),
        ("10.244.0.0/16", "192.168.77.2", "overlaps this node's own subnet 10.244.1.0/24"),
        ("10.244.2.0/24", "127.0.0.1", "loopback range"),
        ("10.244.2.0/24", "224.0.0.1", "multicast range"),
        ("10.244.2.0/24", "0.0.0.0", "unspecified range"),
        ("10.244.2.0/24", "255.255.255.255", "broadcast"),
        ("10.244.2.0/24", "240.0.0.1", "reserved range"),
        ("10.244.2.0/24", "10.244.3.1", "inside the overlay network 10.244.0.0/16"),
        ("10.244.2.0/24", "192.168.77.1:9000", "this node's own public IP"),
    ]

    func testRouteAddRefusesEachBadKindWithTheReason() throws {
        let ns = try makeNode()
        XCTAssertEqual(fu(ns, upArgs(subnetFile: tmp + "/s.env")).status, 0)
        XCTAssertEqual(fu(ns, ["route", "add", "10.244.9.0/24", "via", "192.168.77.9"]).status, 0)
        let before = try routeList(ns)
        let system = try systemView(ns)
        for bad in Self.badRoutes {
            let r = fu(ns, ["route", "add", bad.subnet, "via", bad.endpoint])
            XCTAssertEqual(r.status, 64, "route add \(bad.subnet) via \(bad.endpoint): \(r.description)")
            XCTAssertTrue(r.stderr.contains(bad.why), "\(bad): stderr lacks '\(bad.why)': \(r.stderr)")
            XCTAssertEqual(try routeList(ns), before, "\(bad) changed the peer table")
        }
        XCTAssertEqual(try systemView(ns), system)
        XCTAssertEqual(fu(ns, ["down"]).status, 0)
    }

    func testPeersFileWithABadRouteIsRefusedAtStartAndOnReload() throws {
        let ns = try makeNode()
        let peers = tmp + "/peers"
        let subnetFile = tmp + "/s.env"
        let before = try systemView(ns)
        for bad in Self.badRoutes {
            try "10.244.4.0/24 192.168.77.4\n\(bad.subnet) \(bad.endpoint)\n".write(toFile: peers, atomically: true, encoding: .utf8)
            let r = fu(ns, upArgs(subnetFile: subnetFile, extra: ["--peers", peers]))
            XCTAssertEqual(r.status, 64, "\(bad): \(r.description)")
            XCTAssertTrue(r.stderr.contains(peers) && r.stderr.contains(bad.why), "\(bad): stderr lacks '\(bad.why)': \(r.stderr)")
            XCTAssertEqual(try systemView(ns), before, "\(bad) changed the namespace")
            XCTAssertFalse(FileManager.default.fileExists(atPath: subnetFile))
        }

        // Running with a good file; each bad reload is refused whole (the good line beside it is not taken).
        try "10.244.4.0/24 192.168.77.4\n".write(toFile: peers, atomically: true, encoding: .utf8)
        XCTAssertEqual(fu(ns, upArgs(subnetFile: subnetFile, extra: ["--peers", peers])).status, 0)
        let table = try routeList(ns)
        XCTAssertEqual(table, ["10.244.4.0/24 192.168.77.4:8285 file"])
        let pid = try XCTUnwrap(DaemonState.load(path: "\(runDir)/ns-\(try namespaceInode(ns))/flannel0.json")?.pid)
        let log = "\(runDir)/ns-\(try namespaceInode(ns))/flannel0.log"
        for bad in Self.badRoutes {
            try "10.244.5.0/24 192.168.77.5\n\(bad.subnet) \(bad.endpoint)\n".write(toFile: peers, atomically: true, encoding: .utf8)
            XCTAssertEqual(kill(pid, SIGHUP), 0)
            let line = "route \(bad.subnet) via \(try Endpoint(parsing: bad.endpoint, defaultPort: 8285)) refused"
            try waitFor("the daemon logs the refusal of \(bad)") {
                ((try? String(contentsOfFile: log, encoding: .utf8)) ?? "").split(separator: "\n").contains {
                    $0.contains(peers) && $0.contains(line) && $0.contains(bad.why)
                }
            }
            XCTAssertEqual(try routeList(ns), table, "\(bad) changed the peer table")
        }
        XCTAssertEqual(fu(ns, ["down"]).status, 0)
    }

    func testUpRefusesANetworkThatIsEverythingOrCoversTheUnderlay() throws {
        let ns = try makeNode()
        let subnetFile = tmp + "/s.env"
        let before = try systemView(ns)
        let cases: [(String, String, String)] = [
            ("0.0.0.0/0", "10.244.1.0/24", "network 0.0.0.0/0 is the whole IPv4 address space"),
            ("10.0.0.0/7", "10.244.1.0/24", "network 10.0.0.0/7 is larger than a /8"),
            ("127.0.0.0/8", "127.1.0.0/24", "overlaps the loopback range 127.0.0.0/8"),
            ("192.168.0.0/16", "192.168.1.0/24", "network 192.168.0.0/16 covers the underlay address 192.168.77.1"),
            ("10.244.0.0/16", "10.244.1.0/24", "network 10.244.0.0/16 covers the public IP 10.244.9.9"),
        ]
        for (network, subnet, why) in cases {
            var args = ["up", "--network", network, "--subnet", subnet, "--iface", "eth0", "--subnet-file", subnetFile,
                        "--detach"]
            if why.contains("public IP") { args += ["--public-ip", "10.244.9.9"] }
            let r = fu(ns, args)
            XCTAssertEqual(r.status, 64, "\(network): \(r.description)")
            XCTAssertTrue(r.stderr.contains(why), "\(network): stderr lacks '\(why)': \(r.stderr)")
            XCTAssertEqual(try systemView(ns), before, "\(network) changed the namespace")
            XCTAssertFalse(FileManager.default.fileExists(atPath: subnetFile))
        }
    }
}
