import Foundation
import XCTest
@testable import FlannelCore
@testable import FlannelUDP
import Logging

/// A local unprivileged user (nobody, via setpriv) against the control endpoint (topology in HostileTopology.swift):
/// squatting its name before the daemon starts, answering in the daemon's place, and flooding it with idle or
/// looping connections. Each test plays the attacker; a sacrificial root-owned `sleep` stands for any process
/// that a fooled `down` could kill.
final class ControlTrustTests: HostileTopologyTestCase {
    override func setUpWithError() throws {
        try super.setUpWithError()
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/setpriv"),
              FileManager.default.isExecutableFile(atPath: "/usr/bin/python3") else {
            throw XCTSkip("control trust tests need setpriv (util-linux) and /usr/bin/python3")
        }
    }

    /// Before any daemon runs, nobody tries both the old abstract name and the new socket path; then root's `up`,
    /// `status` and `down` work as if nobody had tried.
    func testUnprivilegedUserCannotSquatTheControlEndpoint() throws {
        let a = try makeNode(1, start: false)
        // A first up/down leaves the run directory in place (as on a node that ran flannel-udp before).
        XCTAssertEqual(up(a).status, 0)
        XCTAssertEqual(fu(a, ["down"]).status, 0)
        let dir = try stateDirectory(a)
        let script = """
            import os, socket, sys, time
            held = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            held.bind("\\0flannel-udp/flannel0")
            held.listen(8)
            for attempt in ("mkdir", "bind"):
                try:
                    if attempt == "mkdir":
                        os.makedirs("\(dir)", exist_ok=True)
                    else:
                        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                        s.bind("\(dir)/flannel0.sock")
                        s.listen(8)
                    print(attempt, "OK", flush=True)
                except OSError as e:
                    print(attempt, "DENIED", e.errno, flush=True)
            print("READY", flush=True)
            time.sleep(120)
            """
        let squatter = try NobodyProcess(ns: a.ns, script: script)
        defer { squatter.stop() }
        let said = try squatter.waitForLine("READY")
        XCTAssertTrue(said.contains("mkdir DENIED") && said.contains("bind DENIED"), said)
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/flannel0.sock"))

        let upAgain = up(a)
        XCTAssertEqual(upAgain.status, 0, "a squatter blocked up: \(upAgain.description)")
        let status = fu(a, ["status", "--json"])
        XCTAssertEqual(try daemonJSON(status)["subnet"] as? String, "10.244.1.0/24")
        XCTAssertEqual(fu(a, ["down"]).status, 0)
    }

    /// The strongest impersonation left: a process running as root that answers on the socket path, reporting a
    /// sacrificial process's pid, with a state file that names that process and its true start time. The CLI
    /// checks the listener's own pid (SO_PEERCRED) against the state file, so status and route refuse to believe
    /// it and `down` signals nothing.
    func testFakeDaemonIsNotBelievedAndDownKillsNothing() throws {
        let a = try makeNode(1, start: false)
        let victim = try startBackground(["sleep", "600"])
        defer { victim.terminate(); victim.waitUntilExit() }
        let victimPID = victim.processIdentifier
        let victimTicks = try XCTUnwrap(DaemonState.startTicks(of: victimPID))
        let dir = try stateDirectory(a)
        try SecureDirectory.ensure(dir, mode: 0o700)
        let paths = RuntimePaths(device: "flannel0", environment: environment)
        let stateFile = dir + "/flannel0.json"
        try DaemonState(pid: victimPID, startTicks: victimTicks, device: "flannel0", network: "10.244.0.0/16",
                        subnet: "10.244.99.0/24", subnetFile: nil, listen: "0.0.0.0:8285", startedAt: Date())
            .write(to: stateFile)
        let fake = FakeDaemon(pid: victimPID)
        let server = try ControlServer(path: dir + "/flannel0.sock", logger: Logger(label: "fake"))
        server.start(handler: fake)
        defer { server.stop() }
        XCTAssertEqual(paths.controlSocket.hasSuffix("/flannel0.sock"), true)

        try assertNotBelieved(a, victim: victimPID, fake: fake, because: "names pid \(victimPID)")

        // The same with a state file that names the fake itself, at a wrong start time (a recycled pid).
        try DaemonState(pid: getpid(), startTicks: 1, device: "flannel0", network: "10.244.0.0/16",
                        subnet: "10.244.99.0/24", subnetFile: nil, listen: "0.0.0.0:8285", startedAt: Date())
            .write(to: stateFile)
        try assertNotBelieved(a, victim: victimPID, fake: fake, because: "not the process that started")
        XCTAssertEqual(fake.requests.withLock { $0 }, 0, "the fake was sent a request")
    }

    /// A non-root answerer: nobody binds the socket while the directory is loosened, which is then tightened again
    /// (so only the listener's uid gives it away). Not believed; the victim survives.
    func testSocketHeldByAnotherUserIsNotBelieved() throws {
        let a = try makeNode(1, start: false)
        let victim = try startBackground(["sleep", "600"])
        defer { victim.terminate(); victim.waitUntilExit() }
        let dir = try stateDirectory(a)
        try SecureDirectory.ensure(dir, mode: 0o700)
        // The state file first, while the directory is still root's alone (it is only written into a checked
        // directory); then the directory is loosened for nobody to bind the socket.
        try DaemonState(pid: victim.processIdentifier, startTicks: try XCTUnwrap(DaemonState.startTicks(of: victim.processIdentifier)),
                        device: "flannel0", network: "10.244.0.0/16", subnet: "10.244.99.0/24", subnetFile: nil,
                        listen: "0.0.0.0:8285", startedAt: Date()).write(to: dir + "/flannel0.json")
        XCTAssertEqual(chmod(tmp + "/run", 0o711), 0)
        XCTAssertEqual(chmod(dir, 0o777), 0)
        let answer = ControlProtocol.encodeLine(ControlResponse.status(FakeDaemon.status(pid: victim.processIdentifier)))
        let answerFile = tmp + "/forged.json"
        try Data(answer).write(to: URL(fileURLWithPath: answerFile))
        XCTAssertEqual(chmod(answerFile, 0o644), 0)
        let script = """
            import socket
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind("\(dir)/flannel0.sock")
            s.listen(16)
            answer = open("\(answerFile)", "rb").read()
            print("READY", flush=True)
            while True:
                c, _ = s.accept()
                try:
                    c.sendall(answer)  # the CLI hangs up unanswered once it has seen who holds the socket
                except OSError:
                    pass
                c.close()
            """
        let squatter = try NobodyProcess(ns: a.ns, script: script)
        defer { squatter.stop() }
        _ = try squatter.waitForLine("READY")
        XCTAssertEqual(chmod(dir, 0o700), 0)
        try assertNotBelieved(a, victim: victim.processIdentifier, fake: nil, because: "uid 65534")
    }

    /// 50 idle connections of nobody (the directory loosened so that it can connect at all): root's `status` is
    /// answered within a second each time; then a loop of 300 refused connections adds at most a couple of log
    /// lines, and every one of them got the refusal without its request being read.
    func testIdleAndLoopingUnprivilegedClientsNeitherStallRootNorFillTheLog() throws {
        let a = try makeNode(1)
        try loosenControlDirectory(a)
        let path = try controlSocket(a)
        let idle = """
            import socket, time
            conns = []
            for i in range(50):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect("\(path)")
                conns.append(s)
            print("READY", flush=True)
            time.sleep(120)
            """
        let idler = try NobodyProcess(ns: a.ns, script: idle)
        defer { idler.stop() }
        _ = try idler.waitForLine("READY")
        for _ in 0..<3 {
            let start = Date()
            let status = fu(a, ["status", "--json"])
            let elapsed = Date().timeIntervalSince(start)
            XCTAssertEqual(status.status, 0, status.description)
            XCTAssertLessThan(elapsed, 1.0, "root's status waited \(elapsed) s behind 50 idle unprivileged clients")
        }

        let loop = """
            import socket
            refused = 0
            for i in range(300):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect("\(path)")
                if b"permission denied" in s.recv(4096):
                    refused += 1
                s.close()
            print("REFUSED", refused, flush=True)
            """
        let looped = runCommand(["ip", "netns", "exec", a.ns.name] + Self.asNobody + ["/usr/bin/python3", "-c", loop])
        XCTAssertTrue(looped.stdout.contains("REFUSED 300"), looped.description)
        let log = try String(contentsOfFile: try stateDirectory(a) + "/flannel0.log", encoding: .utf8)
        let lines = log.split(separator: "\n").filter { $0.contains("refused a client") }
        XCTAssertGreaterThanOrEqual(lines.count, 1, log)
        XCTAssertLessThanOrEqual(lines.count, 3, "350 refusals logged as \(lines.count) lines:\n\(lines.joined(separator: "\n"))")
        XCTAssertEqual(fu(a, ["status"]).status, 0)
    }

    // MARK: - helpers

    /// status, route list and down against an impostor: all fail naming the distrust, nothing invented is shown,
    /// and the victim is alive afterwards.
    func assertNotBelieved(_ node: Node, victim: pid_t, fake: FakeDaemon?, because: String,
                           file: StaticString = #filePath, line: UInt = #line) throws {
        let status = fu(node, ["status", "--json"])
        XCTAssertEqual(status.status, 1, status.description, file: file, line: line)
        XCTAssertFalse(status.stdout.contains("10.244.99.0/24"), "an impostor's status was shown: \(status.stdout)", file: file, line: line)
        XCTAssertTrue(status.stdout.contains("not trusting the control socket"), status.description, file: file, line: line)
        XCTAssertTrue(status.stdout.contains(because), status.description, file: file, line: line)
        let routes = fu(node, ["route", "list"])
        XCTAssertNotEqual(routes.status, 0, routes.description, file: file, line: line)
        XCTAssertFalse(routes.stdout.contains("10.244.98.0/24"), routes.description, file: file, line: line)
        let down = fu(node, ["down", "--timeout", "1"])
        XCTAssertNotEqual(down.status, 0, down.description, file: file, line: line)
        XCTAssertTrue(down.stderr.contains("not trusting the control socket"), down.description, file: file, line: line)
        XCTAssertEqual(kill(victim, 0), 0, "down killed the victim (pid \(victim))", file: file, line: line)
        XCTAssertFalse(FaultTests.isZombie(victim), "down killed the victim (pid \(victim))", file: file, line: line)
    }
}

/// Answers like a daemon would, with a pid of its choosing and an invented peer table.
final class FakeDaemon: ControlHandler, @unchecked Sendable {
    let pid: pid_t
    let requests = NSMutexBox(0)
    init(pid: pid_t) { self.pid = pid }

    static func status(pid: pid_t) -> DaemonStatus {
        DaemonStatus(pid: pid, version: "0.1.0", startedAt: Date(), uptimeSeconds: 1, device: "flannel0",
                     network: "10.244.0.0/16", subnet: "10.244.99.0/24", mtu: 1472, listen: "0.0.0.0:8285",
                     publicIP: "192.168.77.1", underlay: "eth0", subnetFile: nil, peersFile: nil, peerCheck: "strict",
                     routes: [RouteInfo(subnet: "10.244.98.0/24", endpoint: "192.168.77.98:8285", origin: "manual")],
                     counters: DataPlaneCounters().snapshot(), offloads: [], lease: nil)
    }

    func handle(_ request: ControlRequest) -> ControlResponse {
        requests.withLock { $0 += 1 }
        switch request {
        case .status: return .status(Self.status(pid: pid))
        case .routeList: return .routes(Self.status(pid: pid).routes)
        default: return .ok
        }
    }
}

/// A tiny lock around a value (the test target's Synchronization.Mutex is not Sendable-friendly in a class field).
final class NSMutexBox<T>: @unchecked Sendable {
    private let lock = NSLock()
    private var value: T
    init(_ value: T) { self.value = value }
    func withLock<R>(_ body: (inout T) -> R) -> R { lock.withLock { body(&value) } }
}

/// A python script run as nobody inside a namespace, whose output is read line by line.
final class NobodyProcess {
    let process = Process()
    private let output: Pipe
    private var seen = ""

    init(ns: TestNamespace, script: String) throws {
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["ip", "netns", "exec", ns.name] + HostileTopologyTestCase.asNobody + ["/usr/bin/python3", "-c", script]
        process.standardInput = FileHandle.nullDevice
        output = try ProcessLaunch.runReadingOutput(process, errorsToo: true)
    }

    /// Everything printed up to and including the first line that contains `marker` (within 10 s).
    func waitForLine(_ marker: String) throws -> String {
        let fd = output.fileHandleForReading.fileDescriptor
        let deadline = Date().addingTimeInterval(10)
        while !seen.contains(marker) {
            var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let left = Int32(max(0, deadline.timeIntervalSinceNow) * 1000)
            guard left > 0, poll(&pfd, 1, left) > 0 else { throw TimedOut(what: "\(marker) from a nobody process; it said: \(seen)", seconds: 10) }
            var buf = [UInt8](repeating: 0, count: 4096)
            let n = read(fd, &buf, buf.count)
            guard n > 0 else { throw TimedOut(what: "\(marker) from a nobody process (it exited); it said: \(seen)", seconds: 10) }
            seen += String(decoding: buf[0..<n], as: UTF8.self)
        }
        return seen
    }

    func stop() {
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
    }
}
