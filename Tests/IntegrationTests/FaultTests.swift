import Foundation
import Synchronization
import XCTest
@testable import FlannelCore
@testable import FlannelUDP

/// Faults a node must survive (topology in HostileTopology.swift): the underlay link going down and up, the
/// daemon killed with SIGKILL, abuse of the control endpoint (garbage, a huge request, a stalled or trickling
/// client, 20 clients at once, a non-root client), and `up` twice on one device.
final class FaultTests: HostileTopologyTestCase {
    func testUnderlayLinkDownAndUpTrafficResumes() throws {
        let (a, b) = try makePair()
        XCTAssertEqual(ping(from: a.pod, b.podAddress).status, 0)
        let pid = try daemonPID(a)
        try a.ns.run(["ip", "link", "set", "eth0", "down"])
        XCTAssertNotEqual(ping(from: a.pod, b.podAddress, ["-W", "1"]).status, 0, "ping through a downed underlay")
        XCTAssertEqual(kill(pid, 0), 0, "the daemon died when its underlay went down")
        try a.ns.run(["ip", "link", "set", "eth0", "up"])
        try waitFor("pod A reaches pod B again", timeout: 15) {
            ping(from: a.pod, b.podAddress, ["-W", "1"]).status == 0
        }
        // Send errors while the link was down were per-packet (counted as sendFailed, if any), never fatal.
        XCTAssertEqual(try daemonPID(a), pid)
    }

    func testKilledDaemonThenUpAgainAndCleanup() throws {
        let a = try makeNode(1)
        let first = try daemonPID(a)
        XCTAssertEqual(kill(first, SIGKILL), 0)
        try waitFor("the killed daemon is gone") { kill(first, 0) != 0 || Self.isZombie(first) }
        // The kernel releases the control socket as the process's descriptors close, which can trail the exit a
        // little on a loaded machine: poll for the verdict rather than read it once.
        try waitFor("status of a killed daemon says: not running (3)", timeout: 5) { fu(a, ["status"]).status == 3 }
        // Nothing it left behind blocks a new one.
        let again = up(a)
        XCTAssertEqual(again.status, 0, again.description)
        let second = try daemonPID(a)
        XCTAssertNotEqual(second, first)
        XCTAssertEqual(fu(a, ["route", "add", "10.244.2.0/24", "via", "192.168.77.2"]).status, 0)

        // Killed again: cleanup removes the dead daemon's state; then nothing is left to find.
        XCTAssertEqual(kill(second, SIGKILL), 0)
        try waitFor("the second daemon is gone") { kill(second, 0) != 0 || Self.isZombie(second) }
        let cleanup = fu(a, ["cleanup", "--network", "10.244.0.0/16"])
        XCTAssertEqual(cleanup.status, 0, cleanup.description)
        let stateFiles = (FileManager.default.enumerator(atPath: tmp + "/run")?.allObjects as? [String] ?? [])
            .filter { $0.hasSuffix(".json") }
        XCTAssertEqual(stateFiles, [], "state of a dead daemon left after cleanup")
        let link = runCommand(["ip", "netns", "exec", a.ns.name, "ip", "link", "show", "flannel0"])
        let route = try a.ns.run(["ip", "route", "show", "10.244.0.0/16"])
        XCTAssertTrue(link.status != 0 || route.isEmpty || !route.contains("flannel0"),
                      "leftover: \(link.stdout) \(route)")
        XCTAssertEqual(fu(a, ["down"]).status, 0, "down with nothing left")
        XCTAssertEqual(up(a).status, 0, "up after cleanup")
    }

    func testUpTwiceOnOneDeviceRefusesClearly() throws {
        let a = try makeNode(1)
        let pid = try daemonPID(a)
        let second = up(a)
        XCTAssertNotEqual(second.status, 0, second.description)
        XCTAssertTrue(second.stderr.contains("already running"), second.stderr)
        XCTAssertEqual(try daemonPID(a), pid, "the first daemon must keep running")
        XCTAssertEqual(fu(a, ["status"]).status, 0)
    }

    func testControlEndpointSurvivesGarbageHugeStalledAndConcurrentClients() throws {
        let a = try makeNode(1)
        let pid = try daemonPID(a)
        let name = try controlSocket(a)

        // Garbage, a binary blob, JSON of the wrong shape, and an empty connection.
        for junk in ["hello\n", "\u{0}\u{1}\u{2}\u{ff}\n", "{\"routeAdd\":{\"subnet\":12}}\n", "[]\n", "{}\n", ""] {
            let reply = try rawControl(a.ns, name, Array(junk.utf8))
            XCTAssertTrue(junk.isEmpty ? reply.isEmpty : reply.contains("\"error\""), "\(junk.debugDescription): \(reply)")
        }
        // More than 64 KiB without a newline, and a 1 MiB line.
        let huge = try rawControl(a.ns, name, Array(repeating: UInt8(ascii: "x"), count: 65 * 1024))
        XCTAssertTrue(huge.contains("longer than"), huge)
        let hugeLine = try rawControl(a.ns, name, Array(repeating: UInt8(ascii: " "), count: 1 << 20) + [10])
        XCTAssertTrue(hugeLine.contains("longer than"), hugeLine)

        // A client that sends half a request and stalls, and one that trickles a byte every 500 ms: others are
        // answered within the request timeout (2 s) plus a margin.
        let staller = try openControl(a.ns, name)
        defer { close(staller) }
        _ = "{\"sta".withCString { send(staller, $0, 5, Int32(MSG_NOSIGNAL)) }
        let trickler = try openControl(a.ns, name)
        let tricklerDone = DispatchSemaphore(value: 0)
        Thread {
            for _ in 0..<16 {
                var b = UInt8(ascii: " ")
                if send(trickler, &b, 1, Int32(MSG_NOSIGNAL)) < 0 { break }
                usleep(500_000)
            }
            close(trickler)
            tricklerDone.signal()
        }.start()
        for _ in 0..<2 {
            let start = Date()
            let status = fu(a, ["status"])
            let elapsed = Date().timeIntervalSince(start)
            XCTAssertEqual(status.status, 0, status.description)
            XCTAssertLessThan(elapsed, 4.5, "status waited \(elapsed) s behind a stalled control client")
        }
        tricklerDone.wait()

        // 20 clients at once: status, and route add (+ del for every other one).
        let results = Mutex<[Int: CommandResult]>([:])
        let base = ["ip", "netns", "exec", a.ns.name, flannelUDPBinary()]
        let env = environment
        DispatchQueue.concurrentPerform(iterations: 20) { i in
            var r: CommandResult
            if i % 4 == 0 {
                r = runCommand(base + ["status", "--json"], environment: env)
            } else {
                r = runCommand(base + ["route", "add", "10.244.\(100 + i).0/24", "via", "192.168.77.\(100 + i)"],
                               environment: env)
                if r.status == 0 && i % 2 == 1 {
                    r = runCommand(base + ["route", "del", "10.244.\(100 + i).0/24"], environment: env)
                }
            }
            results.withLock { $0[i] = r }
        }
        for (i, r) in results.withLock({ $0 }).sorted(by: { $0.key < $1.key }) {
            XCTAssertEqual(r.status, 0, "client \(i): \(r.description)")
        }
        let expected = Set((0..<20).filter { $0 % 4 != 0 && $0 % 2 == 0 }.map { "10.244.\(100 + $0).0/24" })
        let routes = Set(((try daemonStatus(a))["routes"] as? [[String: Any]] ?? []).compactMap { $0["subnet"] as? String })
        XCTAssertEqual(routes, expected, "peer table after concurrent changes")
        XCTAssertEqual(try daemonPID(a), pid)
    }

    func testNonRootClientIsRefused() throws {
        let a = try makeNode(1)
        let asNobody = ["ip", "netns", "exec", a.ns.name] + Self.asNobody
        let cli = runCommand(asNobody + [flannelUDPBinary(), "status"], environment: environment)
        XCTAssertNotEqual(cli.status, 0, cli.description)
        XCTAssertNotEqual(cli.status, 3, "a refused client must not read as 'not running': \(cli.description)")
        XCTAssertTrue((cli.stderr + cli.stdout).lowercased().contains("permission denied"), cli.description)
        // Past the directory's wall (loosened here, as a misconfiguration would): the daemon itself refuses the
        // client (SO_PEERCRED) without reading its request, and the CLI still shows the refusal.
        let socketPath = try controlSocket(a)
        try loosenControlDirectory(a)
        let past = runCommand(asNobody + [flannelUDPBinary(), "status"], environment: environment)
        XCTAssertNotEqual(past.status, 0, past.description)
        XCTAssertNotEqual(past.status, 3, past.description)
        XCTAssertTrue(past.stdout.contains("permission denied: only root may control flannel-udp"), past.description)
        if FileManager.default.isExecutableFile(atPath: "/usr/bin/python3") {
            let script = """
                import socket
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect("\(socketPath)")
                try:
                    s.sendall(b'{"routeDel":{"subnet":"10.244.2.0/24"}}\\n')
                except BrokenPipeError:
                    pass
                print(s.recv(4096).decode())
                """
            let raw = runCommand(asNobody + ["/usr/bin/python3", "-c", script])
            XCTAssertTrue(raw.stdout.contains("permission denied"), raw.description)
        }
        XCTAssertEqual(fu(a, ["status"]).status, 0, "root is still served")
    }

    // MARK: - helpers

    static func isZombie(_ pid: pid_t) -> Bool {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8) else { return true }
        return stat.split(separator: ")").last?.split(separator: " ").first == "Z"
    }

    /// Connects to the control socket at `path` from inside `ns`.
    func openControl(_ ns: TestNamespace, _ path: String) throws -> Int32 {
        try ns.withEntered {
            let fd = try UnixSocket.makeSocket(path)
            try UnixSocket.setTimeouts(fd, seconds: 5)
            let rc = try UnixSocket.withAddress(path) { connect(fd, $0, $1) }
            guard rc == 0 else {
                let e = SystemError.current("connect", path)
                close(fd)
                throw e
            }
            return fd
        }
    }

    /// Sends `bytes` (then shuts down writing) and returns whatever the daemon answers before it closes.
    func rawControl(_ ns: TestNamespace, _ name: String, _ bytes: [UInt8]) throws -> String {
        let fd = try openControl(ns, name)
        defer { close(fd) }
        var off = 0
        while off < bytes.count {
            let n = bytes.withUnsafeBytes { send(fd, $0.baseAddress! + off, $0.count - off, Int32(MSG_NOSIGNAL)) }
            if n <= 0 { break }  // the daemon may close once it has seen enough
            off += n
        }
        shutdown(fd, Int32(SHUT_WR))
        var reply: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = buf.withUnsafeMutableBytes { recv(fd, $0.baseAddress!, $0.count, 0) }
            if n <= 0 { break }
            reply += buf[0..<n]
        }
        return String(decoding: reply, as: UTF8.self)
    }
}
