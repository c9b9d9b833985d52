import Foundation
import XCTest
@testable import FlannelCore
@testable import FlannelUDP
import CShims
#if canImport(Glibc)
import Glibc
#endif

/// `up` under a service manager: the sd_notify conversation of a foreground node, and a node configured from the
/// environment only. Two nodes with a pod each on the overlay tests' underlay:
///
///                          wire (bridge br0)
///          +------------------+------------------+
///     eth0 192.168.77.1   eth0 .2
///       node 1 (foreground, NOTIFY_SOCKET=@... owned by the test inside node 1's namespace)
///       pod 10.244.1.2      node 2 (--detach), pod 10.244.2.2
final class ServiceTests: WireTestCase {
    override class var prefix: String { "fu-sv" }

    // MARK: - sd_notify

    func testNotifyReadyReloadWatchdogStopping() throws {
        let a = try makeNode(1, start: false)
        let b = try makeNode(2, start: false)
        let upB = fu(b, ["up", "--network", "10.244.0.0/16", "--subnet", b.subnet, "--iface", "eth0",
                         "--subnet-file", "\(tmp)/b.env", "--detach"])
        XCTAssertEqual(upB.status, 0, upB.description)
        XCTAssertEqual(fu(b, ["route", "add", "10.244.1.0/24", "via", "192.168.77.1"]).status, 0)
        let peers = "\(tmp)/peers-a"
        try "10.244.2.0/24 192.168.77.2\n".write(toFile: peers, atomically: true, encoding: .utf8)

        // The manager's socket: abstract, so it lives in node 1's namespace, where the daemon will look for it.
        let name = "@fu-notify-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let listener = try a.ns.withEntered { try NotifyListener(name: name) }

        let (daemon, logText) = try startSupervised(a, notifySocket: name, watchdogMicroseconds: 1_000_000,
                                                    ["up", "--network", "10.244.0.0/16", "--subnet", a.subnet,
                                                     "--iface", "eth0", "--peers", peers, "--subnet-file", "\(tmp)/a.env"])

        // READY=1 comes first, and when it comes a pod-to-pod ping passes at once.
        let ready = try listener.next(timeout: 20, log: logText)
        XCTAssertTrue(ready.contains("READY=1"), ready)
        XCTAssertTrue(ready.contains("STATUS=forwarding flannel0 10.244.1.0/24 in 10.244.0.0/16"), ready)
        let first = ping(from: a.pod, b.podAddress)
        XCTAssertEqual(first.status, 0, "READY=1 was sent before traffic could pass: \(first.description)")

        // Regular watchdog pings: WATCHDOG_USEC=1 s asks for one every 0.5 s.
        let start = Date()
        var pings = 0
        while pings < 4 {
            let m = try listener.next(timeout: 3, log: logText)
            if m == "WATCHDOG=1" { pings += 1 } else { XCTFail("unexpected message while idle: \(m)") }
        }
        let elapsed = Date().timeIntervalSince(start)
        XCTAssertLessThan(elapsed, 4, "4 watchdog pings took \(elapsed) s")

        // SIGHUP: RELOADING=1 (with MONOTONIC_USEC), then READY=1 with the new peer count.
        try "10.244.2.0/24 192.168.77.2\n10.244.3.0/24 192.168.77.3\n".write(toFile: peers, atomically: true, encoding: .utf8)
        XCTAssertEqual(kill(daemon.processIdentifier, SIGHUP), 0)  // `ip netns exec` and env exec: this is the daemon
        let reloading = try listener.next(timeout: 5, log: logText) { $0 != "WATCHDOG=1" }
        XCTAssertTrue(reloading.hasPrefix("RELOADING=1\nMONOTONIC_USEC="), reloading)
        let reloaded = try listener.next(timeout: 5, log: logText) { $0 != "WATCHDOG=1" }
        XCTAssertTrue(reloaded.hasPrefix("READY=1\n") && reloaded.contains("with 2 peer(s)"), reloaded)

        // SIGTERM: STOPPING=1, and a clean exit.
        XCTAssertEqual(kill(daemon.processIdentifier, SIGTERM), 0)
        let stopping = try listener.next(timeout: 5, log: logText) { $0 != "WATCHDOG=1" }
        XCTAssertTrue(stopping.hasPrefix("STOPPING=1"), stopping)
        try waitFor("the daemon exits", timeout: 10) { !daemon.isRunning }
        XCTAssertEqual(daemon.terminationStatus, 0, logText())
        XCTAssertFalse(try a.ns.run(["ip", "-o", "link", "show"]).contains("flannel0"))
    }

    /// `up --replace` run from a shell (no NOTIFY_SOCKET of its own) against a daemon that a service manager
    /// supervises: the old daemon names the new one as the manager's main process instead of saying STOPPING=1
    /// (which would stop the unit), and the new one pings the manager's watchdog from then on, without a second
    /// READY=1. The listener learns each sender's pid as systemd does (SCM_CREDENTIALS). Before ServiceManagerLink
    /// the old daemon said STOPPING=1 and exited, and the manager heard nothing from the new one.
    func testAReplacementFromAShellReportsToTheOldDaemonsServiceManager() throws {
        let a = try makeNode(1, start: false)
        let name = "@fu-notify-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let listener = try a.ns.withEntered { try NotifyListener(name: name) }
        let upArgs = ["up", "--network", "10.244.0.0/16", "--subnet", a.subnet, "--iface", "eth0",
                      "--subnet-file", "\(tmp)/a.env"]
        let (daemon, logText) = try startSupervised(a, notifySocket: name, watchdogMicroseconds: 2_000_000, upArgs)
        addTeardownBlock { [self] in fu(a, ["down"]) }  // the successor, should the test stop before its 'down'
        let old = daemon.processIdentifier  // `ip netns exec` and env exec: this is the daemon
        let ready = try listener.nextFrom(timeout: 20, log: logText) { $0.message.hasPrefix("READY=1") }
        XCTAssertEqual(ready.pid, old)

        let replace = fu(a, upArgs + ["--replace", "--detach"])
        XCTAssertEqual(replace.status, 0, replace.description + logText())
        let successor = try XCTUnwrap(try daemonJSON(fu(a, ["status", "--json"]))["pid"] as? Int)
        XCTAssertNotEqual(Int32(successor), old)

        // The old daemon's last word: MAINPID= the successor, with a watchdog ping; then it exits 0.
        var seen: [(pid: pid_t, message: String)] = []
        let handed = try listener.nextFrom(timeout: 10, log: logText) { m in
            seen.append(m)
            return m.message.contains("MAINPID=")
        }
        XCTAssertEqual(handed.pid, old)
        XCTAssertTrue(handed.message.hasPrefix("MAINPID=\(successor)\nWATCHDOG=1\nSTATUS=handed over to pid \(successor)"),
                      handed.message)
        try waitFor("the old daemon exits", timeout: 10) { !daemon.isRunning }
        XCTAssertEqual(daemon.terminationStatus, 0, logText())

        // From then on the successor pings (every second for WATCHDOG_USEC=2 s), and nobody says STOPPING=1 or
        // READY=1 again: the unit just goes on.
        var pings = 0
        while pings < 2 {
            let m = try listener.nextFrom(timeout: 3, log: logText) { m in seen.append(m); return true }
            if m.pid == Int32(successor) && m.message == "WATCHDOG=1" { pings += 1 }
        }
        let after = seen.drop { $0.message != handed.message }.dropFirst()
        XCTAssertFalse(after.contains { $0.pid == old }, "the old daemon spoke after it handed over: \(after)")
        XCTAssertFalse(seen.contains { $0.message.contains("STOPPING=1") || ($0.pid != old && $0.message.contains("READY=1")) },
                       "\(seen)")

        // And it is the successor that says STOPPING=1 when the node goes down.
        XCTAssertEqual(fu(a, ["down"]).status, 0)
        let stopping = try listener.nextFrom(timeout: 10, log: logText) { $0.message != "WATCHDOG=1" }
        XCTAssertEqual(stopping.pid, Int32(successor))
        XCTAssertTrue(stopping.message.hasPrefix("STOPPING=1"), stopping.message)
    }

    /// Starts flannel-udp with `args` in `node`'s namespace as a service manager would: in the foreground, with
    /// NOTIFY_SOCKET and WATCHDOG_USEC, its output in tmp/a.log. Killed in teardown if it still runs. Returns the
    /// process (its pid is the daemon's: `ip netns exec` and env exec it) and a reader of its log.
    func startSupervised(_ node: OverlayNode, notifySocket: String, watchdogMicroseconds: Int,
                         _ args: [String]) throws -> (Process, () -> String) {
        let daemon = Process()
        daemon.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        daemon.arguments = ["ip", "netns", "exec", node.ns.name, "env", "NOTIFY_SOCKET=\(notifySocket)",
                            "WATCHDOG_USEC=\(watchdogMicroseconds)", "FLANNEL_UDP_RUN_DIR=\(tmp)/run",
                            flannelUDPBinary()] + args
        let log = "\(tmp)/a.log"
        XCTAssertTrue(FileManager.default.createFile(atPath: log, contents: nil))
        daemon.standardOutput = try FileHandle(forWritingTo: URL(fileURLWithPath: log))
        daemon.standardError = daemon.standardOutput
        try ProcessLaunch.run(daemon)
        addTeardownBlock {
            if daemon.isRunning { kill(daemon.processIdentifier, SIGKILL) }
            daemon.waitUntilExit()
        }
        return (daemon, { (try? String(contentsOfFile: log, encoding: .utf8)) ?? "" })
    }

    func testBadNotifySocketIsAUsageError() throws {
        let a = try makeNode(1, start: false)
        for (env, variable) in [(["NOTIFY_SOCKET": "relative"], "NOTIFY_SOCKET=relative"),
                                (["NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "soon"], "WATCHDOG_USEC=soon")] {
            let r = fu(a, ["up", "--network", "10.244.0.0/16", "--subnet", a.subnet, "--iface", "eth0",
                           "--subnet-file", "\(tmp)/a.env"], environment: env)
            XCTAssertEqual(r.status, 64, r.description)
            XCTAssertTrue(r.stderr.hasPrefix("flannel-udp up: \(variable): "), r.stderr)
            XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
            XCTAssertFalse(try a.ns.run(["ip", "-o", "link", "show"]).contains("flannel0"))
        }
    }

    // MARK: - configuration from the environment

    /// The node's observable shape: what `status --json` says about device and addresses, and subnet.env.
    func shape(_ node: OverlayNode, device: String = "flannel0", subnetFile: String) throws -> [String] {
        let d = try daemonJSON(fu(node, ["status", "--json", "--device", device]))
        var shape = ["device", "network", "subnet", "mtu", "listen", "publicIP", "underlay", "peerCheck"].map {
            "\($0)=\(d[$0] ?? "nil")"
        }
        shape.append(try String(contentsOfFile: subnetFile, encoding: .utf8))
        shape.append(try node.ns.run(["ip", "-4", "-o", "addr", "show", "dev", device])
            .split(separator: " ").filter { $0.contains("/") }.joined())
        return shape
    }

    func testEnvironmentOnlyGivesTheSameNodeAsFlags() throws {
        let flags = try makeNode(1, start: false)
        let env = try makeNode(2, start: false)
        // Node 1 by flags, node 2 by variables only, FLANNEL_UDP_* and flanneld's FLANNELD_* mixed; the same
        // settings apart from the node's own addresses.
        func flagArgs(_ n: OverlayNode) -> [String] {
            ["up", "--network", "10.244.0.0/16", "--subnet", n.subnet, "--iface", "eth0", "--public-ip", n.underlay,
             "--port", "8300", "--mtu", "1400", "--ip-masq", "--peer-check", "relaxed",
             "--subnet-file", "\(tmp)/\(n.index).env", "--detach"]
        }
        let up1 = fu(flags, flagArgs(flags))
        XCTAssertEqual(up1.status, 0, up1.description)
        let variables = ["FLANNEL_UDP_NETWORK": "10.244.0.0/16", "FLANNEL_UDP_SUBNET": env.subnet,
                         "FLANNELD_IFACE": "eth0", "FLANNELD_PUBLIC_IP": env.underlay, "FLANNEL_UDP_PORT": "8300",
                         "FLANNEL_UDP_MTU": "1400", "FLANNELD_IP_MASQ": "true", "FLANNEL_UDP_PEER_CHECK": "relaxed",
                         "FLANNELD_SUBNET_FILE": "\(tmp)/\(env.index).env"]
        let up2 = fu(env, ["up", "--detach"], environment: variables)
        XCTAssertEqual(up2.status, 0, up2.description)

        func normalized(_ n: OverlayNode) throws -> [String] {
            try shape(n, subnetFile: "\(tmp)/\(n.index).env").map {
                $0.replacingOccurrences(of: "192.168.77.\(n.index)", with: "UNDERLAY")
                    .replacingOccurrences(of: "10.244.\(n.index).", with: "SUBNET.")
            }
        }
        let a = try normalized(flags), b = try normalized(env)
        XCTAssertEqual(a, b)
        XCTAssertTrue(a.contains("mtu=1400") && a.contains("listen=UNDERLAY:8300"), "\(a)")
        XCTAssertTrue(b.contains { $0.contains("FLANNEL_IPMASQ=true") }, "\(b)")

        // The values stay in the environment: the re-spawned daemon's argv has none of them.
        let pid = try XCTUnwrap(try daemonJSON(fu(env, ["status", "--json"]))["pid"] as? Int)
        let argv = try String(contentsOfFile: "/proc/\(pid)/cmdline", encoding: .utf8)
        XCTAssertFalse(argv.contains("10.244") || argv.contains("8300"), argv)
        XCTAssertTrue(try String(contentsOfFile: "/proc/\(pid)/environ", encoding: .utf8).contains("FLANNEL_UDP_SUBNET="))

        // Pods reach each other across the two (same port, relaxed peer check on both).
        XCTAssertEqual(fu(flags, ["route", "add", env.subnet, "via", "\(env.underlay):8300"]).status, 0)
        XCTAssertEqual(fu(env, ["route", "add", flags.subnet, "via", "\(flags.underlay):8300"]).status, 0)
        XCTAssertEqual(ping(from: flags.pod, env.podAddress).status, 0)
    }

    func testCommandLineWinsAndBadValuesNameTheVariable() throws {
        let n = try makeNode(1, start: false)
        let base = ["FLANNEL_UDP_NETWORK": "10.244.0.0/16", "FLANNEL_UDP_SUBNET": n.subnet, "FLANNELD_IFACE": "eth0",
                    "FLANNEL_UDP_SUBNET_FILE": "\(tmp)/n.env"]
        for (name, value) in [("FLANNEL_UDP_PORT", "99999"), ("FLANNELD_IP_MASQ", "maybe"),
                              ("FLANNEL_UDP_METRICS_ADDR", "nowhere"), ("FLANNEL_UDP_SUBNET", "10.245.1.0/24"),
                              // flanneld's name for --masq-resync
                              ("FLANNELD_IPTABLES_RESYNC", "4000")] {
            let r = fu(n, ["up", "--detach"], environment: base.merging([name: value]) { $1 })
            XCTAssertEqual(r.status, 64, "\(name)=\(value): \(r.description)")
            XCTAssertTrue(r.stderr.hasPrefix("flannel-udp up: ") && r.stderr.contains("\(name)=\(value)"), r.stderr)
            XCTAssertEqual(r.stderr.split(separator: "\n").count, 1, r.stderr)
            XCTAssertFalse(try n.ns.run(["ip", "-o", "link", "show"]).contains("flannel0"), "\(name) changed something")
        }
        // The command line beats both spellings.
        let up = fu(n, ["up", "--mtu", "1300", "--detach"],
                    environment: base.merging(["FLANNEL_UDP_MTU": "1400", "FLANNELD_MTU": "1200"]) { $1 })
        XCTAssertEqual(up.status, 0, up.description)
        XCTAssertEqual(try daemonJSON(fu(n, ["status", "--json"]))["mtu"] as? Int, 1300)
    }
}

/// The service manager's end of sd_notify: an AF_UNIX datagram socket bound to an abstract name in the calling
/// thread's network namespace (create it inside `TestNamespace.withEntered`).
final class NotifyListener {
    let fd: Int32

    init(name: String) throws {
        precondition(name.hasPrefix("@"))
        fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw NamespaceError("socket AF_UNIX", errno) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(name.utf8.dropFirst())
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in for (i, b) in bytes.enumerated() { raw[i + 1] = b } }
        let length = socklen_t(MemoryLayout<sa_family_t>.size + 1 + bytes.count)
        let rc = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) } }
        guard rc == 0 else {
            let e = errno
            close(fd)
            throw NamespaceError("bind \(name)", e)
        }
        // Each message comes with its sender's credentials, as systemd asks for them.
        var on: Int32 = 1
        guard setsockopt(fd, SOL_SOCKET, SO_PASSCRED, &on, socklen_t(MemoryLayout<Int32>.size)) == 0 else {
            let e = errno
            close(fd)
            throw NamespaceError("setsockopt SO_PASSCRED", e)
        }
    }

    deinit { close(fd) }

    /// The next message that satisfies `accept` (others are skipped), waiting up to `timeout` seconds in all.
    func next(timeout: TimeInterval, log: () -> String = { "" }, _ accept: (String) -> Bool = { _ in true }) throws -> String {
        try nextFrom(timeout: timeout, log: log) { accept($0.message) }.message
    }

    /// The next message that satisfies `accept`, with the pid that sent it (SCM_CREDENTIALS; 0 if none came).
    func nextFrom(timeout: TimeInterval, log: () -> String = { "" },
                  _ accept: ((pid: pid_t, message: String)) -> Bool) throws -> (pid: pid_t, message: String) {
        let deadline = Date().addingTimeInterval(timeout)
        var buffer = [UInt8](repeating: 0, count: 4096)
        while true {
            let left = Int32(max(0, deadline.timeIntervalSinceNow * 1000))
            var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            let n = poll(&pfd, 1, left)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { throw TimedOut(what: "an sd_notify message arrives; daemon log:\n\(log())", seconds: timeout) }
            // struct ucred (pid, uid, gid: three 32-bit fields) needs _GNU_SOURCE, as does SCM_CREDENTIALS (2).
            let credentials = 3 * MemoryLayout<Int32>.size
            var control = [UInt64](repeating: 0, count: (fu_cmsg_space(credentials) + 7) / 8)  // aligned
            let (got, pid) = buffer.withUnsafeMutableBytes { data in
                control.withUnsafeMutableBytes { space -> (Int, pid_t) in
                    var iov = iovec(iov_base: data.baseAddress, iov_len: data.count)
                    return withUnsafeMutablePointer(to: &iov) { iovp in
                        var msg = msghdr(msg_name: nil, msg_namelen: 0, msg_iov: iovp, msg_iovlen: 1,
                                         msg_control: space.baseAddress, msg_controllen: space.count, msg_flags: 0)
                        let n = recvmsg(fd, &msg, 0)
                        guard n >= 0, let cmsg = fu_cmsg_firsthdr(&msg), cmsg.pointee.cmsg_level == SOL_SOCKET,
                              cmsg.pointee.cmsg_type == 2, cmsg.pointee.cmsg_len >= fu_cmsg_len(credentials),
                              let payload = fu_cmsg_data(cmsg) else { return (n, 0) }
                        return (n, UnsafeRawPointer(payload).loadUnaligned(as: pid_t.self))
                    }
                }
            }
            guard got >= 0 else { throw NamespaceError("recv", errno) }
            let message = (pid: pid, message: String(decoding: buffer[0..<got], as: UTF8.self))
            if accept(message) { return message }
        }
    }
}
