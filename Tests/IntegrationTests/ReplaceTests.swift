import Foundation
import XCTest
@testable import FlannelUDP

/// `up --replace` (Node/Handover.swift) between two nodes of the hostile topology: node 1 is replaced while pod 2
/// pings pod 1 every 10 ms and streams TCP to it.
final class ReplaceTests: HostileTopologyTestCase {
    func ifindex(_ node: Node) throws -> Int {
        let line = try node.ns.run(["ip", "-o", "link", "show", "flannel0"])
        return try XCTUnwrap(Int(line.split(separator: ":")[0]), line)
    }

    func pid(_ node: Node) throws -> Int {
        try XCTUnwrap(daemonStatus(node)["pid"] as? Int)
    }

    func routes(_ node: Node) throws -> [String: String] {
        var out: [String: String] = [:]
        for r in try daemonStatus(node)["routes"] as? [[String: Any]] ?? [] {
            out[r["subnet"] as? String ?? ""] = "\(r["endpoint"] ?? "") \(r["origin"] ?? "")"
        }
        return out
    }

    /// The pid `up --detach` reports ("flannel0 is up (pid N, log ...)").
    func reportedPid(_ r: CommandResult) -> Int? {
        guard let range = r.stdout.range(of: "(pid ") else { return nil }
        return Int(r.stdout[range.upperBound...].prefix { $0.isNumber })
    }

    /// A ping every 10 ms from `from`'s pod to `to`'s pod, until `stop`; returns the sequence numbers answered.
    final class Pinger {
        let process = Process()
        let output: Pipe
        init(from: Node, to: Node) throws {
            process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
            process.arguments = ["ip", "netns", "exec", from.pod.name, "ping", "-n", "-D", "-i", "0.01", "-W", "2",
                                 to.podAddress]
            process.standardError = FileHandle.nullDevice
            output = try ProcessLaunch.runReadingOutput(process)
        }

        /// Stops pinging (SIGINT) and returns (answered sequence numbers, the highest one sent and answered).
        func stop() -> (missing: [Int], answered: Int, output: String) {
            usleep(2_100_000)  // every request sent so far answered or past its -W
            process.interrupt()
            let data = output.fileHandleForReading.readDataToEndOfFile()
            process.waitUntilExit()
            let text = String(decoding: data, as: UTF8.self)
            var seen = Set<Int>()
            for line in text.split(separator: "\n") {
                guard let r = line.range(of: "icmp_seq=") else { continue }
                if let n = Int(line[r.upperBound...].prefix { $0.isNumber }) { seen.insert(n) }
            }
            let last = seen.max() ?? 0
            let missing = (1...max(1, last)).filter { !seen.contains($0) }
            let around = text.split(separator: "\n").filter { line in
                missing.contains { m in (m - 2...m + 2).contains { line.contains("icmp_seq=\($0) ") } }
            }
            return (missing, seen.count, around.joined(separator: "\n") + "\n" + String(text.suffix(200)))
        }
    }

    /// A TCP stream from `from`'s pod to `to`'s pod at ~4 MB/s until `finish`, SHA-256 on both ends.
    final class Transfer {
        let server: Process
        let client: Process
        let serverOut: Pipe
        let clientOut: Pipe
        let stopFile: String

        init(from: Node, to: Node, tmp: String) throws {
            stopFile = "\(tmp)/stop-transfer"
            let receiver = """
                import hashlib, socket
                s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("\(to.podAddress)", 5001)); s.listen(1)
                c, _ = s.accept(); h = hashlib.sha256(); n = 0
                while True:
                    b = c.recv(65536)
                    if not b: break
                    h.update(b); n += len(b)
                print(n, h.hexdigest())
                """
            let sender = """
                import hashlib, os, socket, time
                c = socket.create_connection(("\(to.podAddress)", 5001)); h = hashlib.sha256(); n = 0
                while not os.path.exists("\(stopFile)"):
                    b = os.urandom(40000); c.sendall(b); h.update(b); n += len(b); time.sleep(0.01)
                c.shutdown(socket.SHUT_WR); c.recv(1); print(n, h.hexdigest())
                """
            server = Process()
            server.executableURL = URL(fileURLWithPath: "/usr/bin/env")
            server.arguments = ["ip", "netns", "exec", to.pod.name, "python3", "-c", receiver]
            serverOut = try ProcessLaunch.runReadingOutput(server)
            do {
                try waitFor("the receiver listens") {
                    (try? to.pod.run(["ss", "-ltn"]))?.contains(":5001") == true
                }
            } catch {
                stopBackground(server)  // its accept() would wait for ever
                throw error
            }
            client = Process()
            client.executableURL = URL(fileURLWithPath: "/usr/bin/env")
            client.arguments = ["ip", "netns", "exec", from.pod.name, "python3", "-c", sender]
            clientOut = try ProcessLaunch.runReadingOutput(client)
        }

        /// Ends the stream; returns what each end counted and hashed ("bytes sha256").
        func finish() -> (sent: String, received: String) {
            _ = FileManager.default.createFile(atPath: stopFile, contents: Data())
            let sent = clientOut.fileHandleForReading.readDataToEndOfFile()
            let received = serverOut.fileHandleForReading.readDataToEndOfFile()
            client.waitUntilExit()
            server.waitUntilExit()
            func line(_ d: Data) -> String { String(decoding: d, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines) }
            return (line(sent), line(received))
        }
    }

    func testTenReplacementsLoseNoPacket() throws {
        // Started with --replace while nothing runs: a plain up.
        let a = try makeNode(1, extra: ["--replace", "--workers", "2"])
        let b = try makeNode(2)
        XCTAssertEqual(fu(a, ["route", "add", b.subnet, "via", b.underlay]).status, 0)
        XCTAssertEqual(fu(b, ["route", "add", a.subnet, "via", a.underlay]).status, 0)
        XCTAssertEqual(fu(a, ["route", "add", "10.244.99.0/24", "via", "192.168.77.99"]).status, 0)
        XCTAssertEqual(ping(from: b.pod, a.podAddress).status, 0, "overlay up")
        let index = try ifindex(a)
        let routesBefore = try routes(a)
        var previous = try pid(a)

        let pinger = try Pinger(from: b, to: a)
        let transfer = try Transfer(from: b, to: a, tmp: tmp)
        usleep(300_000)
        var windows: [String] = []
        for i in 0..<10 {
            let start = Date().timeIntervalSince1970
            // The same number of workers, then more (queues attached, sockets joined): nothing may be lost.
            let r = up(a, ["--replace", "--workers", "\(2 + i / 4)"])
            windows.append(String(format: "%.3f-%.3f", start, Date().timeIntervalSince1970))
            XCTAssertEqual(r.status, 0, "replacement \(i + 1): \(r)")
            let now = try pid(a)
            XCTAssertNotEqual(now, previous, "replacement \(i + 1): a new daemon answers")
            XCTAssertEqual(reportedPid(r), now, "replacement \(i + 1): status answers from the new pid")
            try waitFor("replacement \(i + 1): the old daemon exited") { kill(Int32(previous), 0) != 0 }
            XCTAssertEqual(try ifindex(a), index, "replacement \(i + 1): the device is the same")
            XCTAssertEqual(try routes(a), routesBefore, "replacement \(i + 1): the peer table with its origins")
            previous = now
            usleep(200_000)
        }
        let (sent, received) = transfer.finish()
        let pings = pinger.stop()
        let stats = (try? a.ns.run(["cat", "/sys/class/net/flannel0/statistics/tx_dropped"])) ?? "?"
        print("[+] 10 replacements: \(pings.answered) pings answered, missing \(pings.missing); stream \(received); flannel0 tx_dropped \(stats.trimmingCharacters(in: .whitespacesAndNewlines))")
        XCTAssertEqual(pings.missing, [], "pings lost: \(pings.output)\nreplacements: \(windows)")
        XCTAssertGreaterThan(pings.answered, 300)
        XCTAssertFalse(sent.isEmpty)
        XCTAssertEqual(sent, received, "the stream arrives whole")
        XCTAssertEqual(try XCTUnwrap(try daemonStatus(a)["workers"] as? [Any]).count, 5, "4 pairs and the express lane's")

        // down after replacements removes everything, as after a plain up.
        let down = fu(a, ["down"])
        XCTAssertEqual(down.status, 0, down.description)
        XCTAssertFalse(try a.ns.run(["ip", "-o", "link"]).contains("flannel0"))
        XCTAssertFalse(try a.ns.run(["ip", "route"]).contains("10.244.0.0/16"))
        XCTAssertFalse(FileManager.default.fileExists(atPath: "\(tmp)/subnet-1.env"))
        let dir = "\(tmp)/run/ns-\(try nsID(a))"
        for suffix in ["json", "lock", "sock"] {
            XCTAssertFalse(FileManager.default.fileExists(atPath: "\(dir)/flannel0.\(suffix)"), "leftover \(suffix)")
        }
        let leftovers = (try? FileManager.default.contentsOfDirectory(atPath: dir))?.filter { !$0.hasSuffix(".log") } ?? []
        XCTAssertEqual(leftovers, [], "nothing of the daemons is left in \(dir)")
    }

    /// `--metrics-addr` goes over with the node: the new daemon joins the old one's listener on the same address
    /// (one SO_REUSEPORT group during the switch; before, the replacement failed with "Address already in use"),
    /// and once the old daemon is gone every scrape is answered by the new one. Nobody else gets into that group:
    /// not a plain `up` for another device, not a root program binding as usual, not an unprivileged user's
    /// SO_REUSEPORT listener (the kernel admits only the same user).
    func testTheMetricsEndpointGoesOverWithTheNode() throws {
        let address = "127.0.0.1:9464"
        let a = try makeNode(1, extra: ["--metrics-addr", address])
        let b = try makeNode(2)
        XCTAssertEqual(fu(a, ["route", "add", b.subnet, "via", b.underlay]).status, 0)
        XCTAssertEqual(fu(b, ["route", "add", a.subnet, "via", a.underlay]).status, 0)
        /// flannel_udp_start_time_seconds of whichever daemon answers, or what went wrong.
        func startTime() -> String {
            let script = """
                import sys, urllib.request
                try:
                    text = urllib.request.urlopen("http://\(address)/metrics", timeout=3).read().decode()
                except Exception as e:
                    print("no answer:", e); sys.exit(0)
                print(" ".join(l.split()[-1] for l in text.splitlines() if l.startswith("flannel_udp_start_time_seconds")))
                """
            return (try? a.ns.run(["/usr/bin/python3", "-c", script]))?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "?"
        }
        let before = startTime()
        XCTAssertNotNil(Double(before), before)

        // The attackers, while the daemon serves the address.
        let second = fu(a, ["up", "--detach", "--device", "flannel9", "--port", "8299", "--network", "10.245.0.0/16",
                            "--subnet", "10.245.1.0/24", "--iface", "eth0", "--subnet-file", "\(tmp)/second.env",
                            "--metrics-addr", address])
        XCTAssertNotEqual(second.status, 0, second.description)
        XCTAssertTrue(second.stderr.contains("bind metrics endpoint \(address): Address already in use"), second.description)
        XCTAssertFalse(try a.ns.run(["ip", "-o", "link"]).contains("flannel9"), "the refused daemon changed nothing")
        let bind = """
            import socket, sys
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if sys.argv[1] == "reuseport": s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                s.bind(("127.0.0.1", 9464)); s.listen(1); print("bound")
            except OSError as e:
                print("refused:", e.strerror)
            """
        for (who, mode) in [("root", "plain"), ("nobody", "reuseport")] {
            let prefix = who == "root" ? [] : ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
            let r = runCommand(["ip", "netns", "exec", a.ns.name] + prefix + ["/usr/bin/python3", "-c", bind, mode])
            XCTAssertEqual(r.stdout.trimmingCharacters(in: .whitespacesAndNewlines), "refused: Address already in use",
                           "\(who) binding the metrics address (\(mode)): \(r)")
        }

        let old = try pid(a)
        let replaced = up(a, ["--metrics-addr", address, "--replace"])
        XCTAssertEqual(replaced.status, 0, replaced.description)
        try waitFor("the old daemon exited") { kill(Int32(old), 0) != 0 }
        let after = (0..<5).map { _ in startTime() }
        XCTAssertNotEqual(after[0], before, "the new daemon answers: \(after)")
        XCTAssertNotNil(Double(after[0]), "\(after)")
        XCTAssertEqual(Set(after).count, 1, "only the new daemon answers: \(after)")
        XCTAssertEqual(ping(from: b.pod, a.podAddress).status, 0)
    }

    func testAChangedIdentityIsRefusedAndTheOldDaemonForwardsOn() throws {
        let (a, b) = try makePair()
        let old = try pid(a)
        let changed = fu(a, ["up", "--network", "10.244.0.0/16", "--subnet", "10.244.5.0/24", "--iface", "eth0",
                             "--subnet-file", "\(tmp)/subnet-1.env", "--detach", "--replace"])
        XCTAssertNotEqual(changed.status, 0, changed.description)
        XCTAssertTrue(changed.stderr.contains("refusing to replace"), changed.description)
        XCTAssertTrue(changed.stderr.contains("subnet 10.244.1.0/24 would become 10.244.5.0/24"), changed.description)
        XCTAssertEqual(try pid(a), old)
        XCTAssertEqual(ping(from: b.pod, a.podAddress).status, 0, "the old daemon forwards on")
        XCTAssertTrue(try a.ns.run(["cat", "\(tmp)/subnet-1.env"]).contains("FLANNEL_SUBNET=10.244.1.1/24"))
        // Fewer workers than the old daemon: its last queues and sockets are closed after the switch.
        let fewer = up(a, ["--replace", "--workers", "1"])
        XCTAssertEqual(fewer.status, 0, fewer.description)
        XCTAssertNotEqual(try pid(a), old)
        XCTAssertEqual(try XCTUnwrap(try daemonStatus(a)["workers"] as? [Any]).count, 2, "1 pair and the express lane's")
        XCTAssertEqual(ping(from: b.pod, a.podAddress).status, 0)
        XCTAssertEqual(ping(from: a.pod, b.podAddress, ["-c", "20", "-i", "0.01"]).status, 0)

        // The express lane turned off and on again by replacements: the tun's steering program goes and comes
        // back with it, and short pings take the lane again.
        let off = up(a, ["--replace", "--workers", "1", "--express-size", "0"])
        XCTAssertEqual(off.status, 0, off.description)
        XCTAssertEqual(try XCTUnwrap(try daemonStatus(a)["workers"] as? [Any]).count, 1)
        XCTAssertEqual(ping(from: a.pod, b.podAddress, ["-c", "10", "-i", "0.01"]).status, 0)
        let on = up(a, ["--replace", "--workers", "1"])
        XCTAssertEqual(on.status, 0, on.description)
        let lanes = try XCTUnwrap(try daemonStatus(a)["workers"] as? [[String: Any]])
        XCTAssertEqual(lanes.map { $0["express"] as? Bool ?? false }, [false, true])
        XCTAssertEqual(ping(from: a.pod, b.podAddress, ["-c", "10", "-i", "0.01"]).status, 0)
        let express = try XCTUnwrap((try daemonStatus(a)["workers"] as? [[String: Any]])?.last)
        XCTAssertEqual(express["tunToUDPPackets"] as? Int, 10, "echo requests leave on the express lane: \(express)")
        XCTAssertEqual(express["udpToTunPackets"] as? Int, 10, "echo replies arrive on it: \(express)")
    }

    /// A replacement that fails after the old daemon paused (the new one asks for other offloads than the device
    /// has, which it finds out only from the old daemon's answer): the old one resumes, self-healing included.
    func testAFailureAfterTheHandoverBeganLeavesTheOldDaemonForwarding() throws {
        let (a, b) = try makePair()
        let old = try pid(a)
        let r = up(a, ["--replace", "--no-offload"])
        XCTAssertNotEqual(r.status, 0, r.description)
        XCTAssertTrue(r.stderr.contains("offloads on would become off"), r.description)
        XCTAssertEqual(try pid(a), old)
        XCTAssertEqual(ping(from: b.pod, a.podAddress).status, 0, "the old daemon forwards on")
        // Self-healing resumed: a route removed by hand comes back.
        try waitFor("the old daemon has resumed") {
            (try? String(contentsOfFile: "\(tmp)/run/ns-\(try nsID(a))/flannel0.log", encoding: .utf8))?
                .contains("handover abandoned") == true
        }
        try a.ns.run(["ip", "route", "del", "10.244.0.0/16", "dev", "flannel0"])
        try waitFor("the route is restored") { (try? a.ns.run(["ip", "route"]))?.contains("10.244.0.0/16") == true }
        XCTAssertEqual(ping(from: b.pod, a.podAddress).status, 0)
    }

    /// A replacing "daemon" that begins a handover and dies without a word (as one killed by SIGKILL would), played
    /// by a plain root client: the old daemon notices, resumes, and a later replacement works. A commit with a
    /// wrong token, and a malformed request, change nothing.
    func testAReplacementThatDiesMidwayLeavesTheOldDaemonForwarding() throws {
        let (a, b) = try makePair()
        let old = try pid(a)
        let socket = "\(tmp)/run/ns-\(try nsID(a))/flannel0.sock"
        func send(_ lines: [String]) throws -> String {
            let script = """
                import socket, sys
                out = []
                for line in sys.argv[2:]:
                    s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(line.encode() + b"\\n")
                    out.append(s.makefile().readline().strip())
                print("\\n".join(out))
                """
            return try a.ns.run(["python3", "-c", script, socket] + lines)
        }
        let log = "\(tmp)/run/ns-\(try nsID(a))/flannel0.log"
        func abandoned() -> Int {
            ((try? String(contentsOfFile: log, encoding: .utf8)) ?? "").components(separatedBy: "handover abandoned: the replacing daemon").count - 1
        }
        // While a client that began a handover lives, status says the node is being handed over; once it is
        // gone, the old daemon resumes and says "running" again.
        let holder = try startBackground(["ip", "netns", "exec", a.ns.name, "python3", "-c", """
            import socket, sys, time
            s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.sendall(b'{"handoverBegin":{"version":1}}\\n')
            s.makefile().readline(); time.sleep(3)
            """, socket])
        addTeardownBlock { stopBackground(holder) }
        try waitFor("status says the node is being handed over") {
            (try? daemonStatus(a)["phase"] as? String) == "handing over"
        }
        let shown = fu(a, ["status"])
        XCTAssertTrue(shown.stdout.contains("flannel-udp \(Daemon.version), handing over"), shown.description)
        holder.waitUntilExit()
        try waitFor("the old daemon resumes after the first client") { abandoned() == 1 }
        XCTAssertEqual(try daemonStatus(a)["phase"] as? String, "running")

        let answers = try send([#"{"handoverBegin":{"version":1}}"#, #"{"handoverCommit":{"token":"not-the-token"}}"#,
                                #"{"handoverCommit":{"token":7}}"#])
        let lines = answers.split(separator: "\n")
        XCTAssertEqual(lines.count, 3, answers)
        XCTAssertTrue(lines[0].contains("\"handover\""), answers)
        XCTAssertTrue(lines[1].contains("no such handover in progress"), answers)
        XCTAssertTrue(lines[2].contains("malformed request"), answers)
        // The client that began it has exited: the old daemon resumes by itself.
        try waitFor("the old daemon resumes") { abandoned() == 2 }
        XCTAssertEqual(try pid(a), old)
        XCTAssertEqual(ping(from: b.pod, a.podAddress).status, 0, "the old daemon forwards on")
        try a.ns.run(["ip", "link", "set", "flannel0", "mtu", "1300"])
        try waitFor("self-healing puts the MTU back") {
            (try? a.ns.run(["ip", "-o", "link", "show", "flannel0"]))?.contains("mtu 1472") == true
        }
        // A replacing daemon killed before it took over left its temporary endpoint: the next one removes it.
        let finished = Process()
        finished.executableURL = URL(fileURLWithPath: "/bin/true")
        try ProcessLaunch.run(finished)
        finished.waitUntilExit()
        let leftover = "\(tmp)/run/ns-\(try nsID(a))/flannel0.sock.\(finished.processIdentifier)"
        XCTAssertTrue(FileManager.default.createFile(atPath: leftover, contents: Data()))
        let r = up(a, ["--replace"])
        XCTAssertEqual(r.status, 0, r.description)
        XCTAssertFalse(FileManager.default.fileExists(atPath: leftover))
        XCTAssertNotEqual(try pid(a), old)
        XCTAssertEqual(ping(from: b.pod, a.podAddress).status, 0)
    }

    /// A replacing "daemon" that begins, commits, reads the answer and dies before it took over (played by a root
    /// client, as one killed at that moment would): the old daemon, which stopped forwarding at the commit, does
    /// not let go but forwards on, its self-healing resumed; a later replacement works.
    func testAReplacementThatDiesAfterItsCommitLeavesTheOldDaemonForwarding() throws {
        let (a, b) = try makePair()
        let old = try pid(a)
        let socket = "\(tmp)/run/ns-\(try nsID(a))/flannel0.sock"
        let answer = try a.ns.run(["python3", "-c", """
            import json, socket, sys
            def token(v):
                if isinstance(v, dict):
                    if isinstance(v.get("token"), str): return v["token"]
                    for x in v.values():
                        t = token(x)
                        if t: return t
            begun = socket.socket(socket.AF_UNIX); begun.connect(sys.argv[1])
            begun.sendall(b'{"handoverBegin":{"version":1}}\\n')
            t = token(json.loads(begun.makefile().readline()))
            c = socket.socket(socket.AF_UNIX); c.connect(sys.argv[1])
            c.sendall(json.dumps({"handoverCommit": {"token": t}}).encode() + b"\\n")
            print(c.makefile().readline().strip())
            """, socket])
        XCTAssertEqual(answer.trimmingCharacters(in: .whitespacesAndNewlines), #"{"ok":{}}"#)
        let log = "\(tmp)/run/ns-\(try nsID(a))/flannel0.log"
        try waitFor("the old daemon takes the node back") {
            ((try? String(contentsOfFile: log, encoding: .utf8)) ?? "").contains("handover undone: the replacing daemon")
        }
        XCTAssertEqual(try pid(a), old)
        XCTAssertEqual(try daemonStatus(a)["phase"] as? String, "running")
        XCTAssertEqual(ping(from: b.pod, a.podAddress).status, 0, "the old daemon forwards on")
        try a.ns.run(["ip", "link", "set", "flannel0", "mtu", "1300"])
        try waitFor("self-healing puts the MTU back") {
            (try? a.ns.run(["ip", "-o", "link", "show", "flannel0"]))?.contains("mtu 1472") == true
        }
        let r = up(a, ["--replace"])
        XCTAssertEqual(r.status, 0, r.description)
        XCTAssertNotEqual(try pid(a), old)
        XCTAssertEqual(ping(from: b.pod, a.podAddress).status, 0)
    }

    func nsID(_ node: Node) throws -> UInt64 {
        try XCTUnwrap(UInt64(try node.ns.run(["stat", "-L", "-c", "%i", "/proc/self/ns/net"])
            .trimmingCharacters(in: .whitespacesAndNewlines)))
    }
}
