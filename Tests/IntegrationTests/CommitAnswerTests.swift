import Foundation
import Logging
import XCTest
@testable import FlannelUDP

/// The commit of `up --replace` when its answer goes missing (Node/HandoverCommit.swift, Control/ControlServer.swift).
/// No network namespace is needed: a control socket in a test directory, the replacing side's real
/// `HandoverClient.commit`, and an old daemon played by a root python process that answers as a daemon would,
/// with the pid and start time the state file records, so the client believes it.
final class CommitAnswerTests: XCTestCase {
    var tmp = ""
    var paths: RuntimePaths!
    let old = HandoverState(
        token: "the-token", daemonVersion: "0.1.0", device: "flannel0", deviceIndex: 7, network: "10.244.0.0/16",
        subnet: "10.244.1.0/24", publicIP: "192.168.77.1", port: 8285, mtu: 1472, vnetHeader: true, sockets: 1,
        subnetFile: nil, subnetFileContents: nil, routes: [], masquerade: nil, lease: nil)

    override func setUpWithError() throws {
        try requireRoot()
        tmp = try makeTestDirectory("fu-commit", for: self)
        paths = RuntimePaths(device: "flannel0", environment: ["FLANNEL_UDP_RUN_DIR": tmp + "/run"])
        try SecureDirectory.ensure(paths.stateDirectory, mode: 0o700)
    }

    func recordState(_ identity: DaemonIdentity) throws {
        try DaemonState(pid: identity.pid, startTicks: identity.startTicks, device: "flannel0",
                        network: "10.244.0.0/16", subnet: "10.244.1.0/24", subnetFile: nil, listen: "0.0.0.0:8285",
                        startedAt: Date()).write(to: paths.stateFile)
    }

    /// The old daemon answers the commit before it lets go: its `afterward` runs only once the answer has been
    /// written (here it waits until the client has read it). Run before the write, as the daemon used to let go
    /// before answering, the client would wait in vain and time out.
    func testTheCommitIsAnsweredBeforeTheDaemonLetsGo() throws {
        try recordState(DaemonIdentity(pid: getpid(), startTicks: try XCTUnwrap(DaemonState.startTicks(of: getpid()))))
        let daemon = LettingGoDaemon()
        let server = try ControlServer(path: paths.controlSocket, logger: Logger(label: "old"))
        server.start(handler: daemon)
        defer { server.stop() }
        let answer = try ControlClient.exchange(.handover(.commit(token: "t")), paths: paths, timeoutSeconds: 5)
        XCTAssertEqual(answer.response, .ok)
        daemon.answerRead.signal()
        XCTAssertEqual(daemon.letGo.wait(timeout: .now() + 15), .success, "the daemon never let go")
        XCTAssertEqual(daemon.answeredFirst.withLock { $0 }, true, "the daemon let go before its answer was read")
    }

    /// An old daemon that answers each request as `behaviour` says; returns it and who it is.
    ///
    /// On a commit it always hangs up without an answer (the answer is lost). Then, by behaviour:
    /// - `exits`: exits at once (as the old daemon did when it let go before answering, or as one that dies);
    /// - `neverSawIt`: takes the abort (it had not taken the commit), says "running";
    /// - `abandoned`: refuses the abort, says "running" (it had given the handover up by itself);
    /// - `handedOver`: refuses the abort ("too late"), says "handed over";
    /// - `leavesLater`: refuses the abort, says "handing over" three times, then exits.
    func startOldDaemon(_ behaviour: String) throws -> (Process, DaemonIdentity) {
        func line(_ response: ControlResponse) -> String {
            String(decoding: ControlProtocol.encodeLine(response), as: UTF8.self).trimmingCharacters(in: .newlines)
        }
        func status(_ phase: DaemonPhase) -> String {
            var s = FakeDaemon.status(pid: 0)
            s.phase = phase
            return line(.status(s))
        }
        let script = """
            import json, os, socket, sys
            path, behaviour, ok, refused = sys.argv[1:5]
            phases = {"running": sys.argv[5], "handing over": sys.argv[6], "handed over": sys.argv[7]}
            s = socket.socket(socket.AF_UNIX); s.bind(path); os.chmod(path, 0o600); s.listen(16)
            print("listening", flush=True)
            statuses = 0
            while True:
                c, _ = s.accept()
                request = json.loads(c.makefile().readline())
                if "handoverCommit" in request:
                    c.close()
                    if behaviour == "exits": os._exit(0)
                    continue
                if "handoverAbort" in request:
                    c.sendall(((ok if behaviour == "neverSawIt" else refused) + "\\n").encode()); c.close(); continue
                statuses += 1
                phase = {"neverSawIt": "running", "abandoned": "running", "handedOver": "handed over"}.get(behaviour, "handing over")
                c.sendall((phases[phase] + "\\n").encode()); c.close()
                if behaviour == "leavesLater" and statuses == 3: os._exit(0)
            """
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = ["python3", "-c", script, paths.controlSocket, behaviour, line(.ok),
                       line(.error("too late to abort: the handover was committed and this daemon lets go")),
                       status(.running), status(.handingOver), status(.handedOver)]
        let output = try ProcessLaunch.runReadingOutput(p)
        addTeardownBlock { [paths] in
            stopBackground(p)
            _ = unlink(paths!.controlSocket)
        }
        var ready = Data()
        while !ready.contains(UInt8(ascii: "\n")) {
            let more = output.fileHandleForReading.availableData
            if more.isEmpty { break }  // it exited
            ready += more
        }
        XCTAssertEqual(String(decoding: ready, as: UTF8.self), "listening\n")
        let identity = DaemonIdentity(pid: p.processIdentifier,
                                      startTicks: try XCTUnwrap(DaemonState.startTicks(of: p.processIdentifier)))
        try recordState(identity)
        return (p, identity)
    }

    /// Commits to an old daemon behaving as `behaviour`; returns the error, if it throws, and what was logged.
    func commit(_ behaviour: String) throws -> (error: FlannelError?, log: String) {
        let (p, identity) = try startOldDaemon(behaviour)
        let log = LogCapture()
        var failure: FlannelError?
        do {
            try HandoverClient.commit(old, daemon: identity, paths: paths, logger: Logger(label: "new") { _ in log })
        } catch { failure = error }
        stopBackground(p)
        _ = unlink(paths.controlSocket)
        return (failure, log.text)
    }

    /// Committed although the answer was lost: the replacing daemon takes over (it used to give up and exit, and
    /// nobody forwarded).
    func testALostAnswerFromAnOldDaemonThatLetGoIsACommit() throws {
        for (behaviour, why) in [("exits", "has exited"), ("handedOver", "says it has handed over"),
                                 ("leavesLater", "has exited")] {
            let (error, log) = try commit(behaviour)
            XCTAssertNil(error, "\(behaviour): \(error.map { "\($0)" } ?? "")\n\(log)")
            XCTAssertTrue(log.contains("the answer to the commit was lost"), "\(behaviour): \(log)")
            XCTAssertTrue(log.contains("the commit went through: the old daemon (pid"), "\(behaviour): \(log)")
            XCTAssertTrue(log.contains(why), "\(behaviour): \(log)")
        }
    }

    /// Not committed although nobody said so: the old daemon forwards on, the replacing one gives up with the
    /// reason (two daemons never forward).
    func testALostAnswerFromAnOldDaemonThatForwardsOnIsNoCommit() throws {
        for (behaviour, why) in [("neverSawIt", "took the abort: it had not taken the commit and forwards on"),
                                 ("abandoned", "says it is running: it abandoned the handover and forwards on")] {
            let (error, log) = try commit(behaviour)
            let message = try XCTUnwrap(error, "\(behaviour): \(log)").description
            XCTAssertTrue(message.contains("the answer to the commit was lost"), "\(behaviour): \(message)")
            XCTAssertTrue(message.contains(why), "\(behaviour): \(message)")
            XCTAssertTrue(log.contains("the commit did not go through"), "\(behaviour): \(log)")
        }
    }
}

/// Answers a commit with `.ok` and, afterwards, records whether its answer had been read by then.
final class LettingGoDaemon: ControlHandler, @unchecked Sendable {
    let answerRead = DispatchSemaphore(value: 0)
    let letGo = DispatchSemaphore(value: 0)
    let answeredFirst = NSMutexBox<Bool?>(nil)

    func handle(_ request: ControlRequest) -> ControlResponse { .error("not this test's business") }

    func handle(_ request: HandoverRequest, from pid: pid_t) -> HandoverReply {
        HandoverReply(.ok, afterward: { [self] in
            let read = answerRead.wait(timeout: .now() + 10) == .success
            answeredFirst.withLock { $0 = read }
            letGo.signal()
        })
    }
}

/// Collects log lines (a swift-log handler).
final class LogCapture: LogHandler, @unchecked Sendable {
    private let lines = NSMutexBox<[String]>([])
    var text: String { lines.withLock { $0.joined(separator: "\n") } }
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .trace
    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }
    func log(event: LogEvent) {
        lines.withLock { $0.append("\(event.level): \(event.message)") }
    }
}
