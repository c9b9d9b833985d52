import Foundation
import Synchronization
import XCTest
@testable import FlannelCore
@testable import FlannelUDP
import TestSupport

/// A TCP transfer pod A -> pod B across a lossy, reordering underlay, checked end to end by SHA-256, while the
/// daemons' RSS and open descriptors are sampled. This kernel has no netem (CONFIG_NET_SCH_NETEM is not set) and
/// the image no nft/iptables, so the impairment is a UDP relay in its own namespace (192.168.77.50) that both
/// nodes route through: it drops 1 % of the datagrams and swaps 5 % with the next one. The strict peer check holds
/// (each node's peer endpoint is the relay's address).
///
/// Default: one 20 MB transfer (a few seconds). FLANNEL_UDP_SOAK_SECONDS=N repeats transfers for N seconds and
/// then compares the first and last thirds of the samples.
final class FaultSoakTests: HostileTopologyTestCase {
    func testTransferThroughLossAndReorderKeepsDataAndResourcesFlat() throws {
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/python3") else {
            throw XCTSkip("needs /usr/bin/python3 for the TCP sender/receiver")
        }
        let a = try makeNode(1)
        let b = try makeNode(2)
        let relayNS = try TestNamespace(prefix: "fu-hr")
        addTeardownBlock { relayNS.destroy() }
        try plug(relayNS, index: 50)
        XCTAssertEqual(fu(a, ["route", "add", b.subnet, "via", "192.168.77.50"]).status, 0)
        XCTAssertEqual(fu(b, ["route", "add", a.subnet, "via", "192.168.77.50"]).status, 0)
        let relay = try LossyRelay(in: relayNS, a: Endpoint(address: IPv4Address(192, 168, 77, 1), port: 8285),
                                   b: Endpoint(address: IPv4Address(192, 168, 77, 2), port: 8285))
        relay.start()
        addTeardownBlock { relay.stop() }
        XCTAssertEqual(ping(from: a.pod, b.podAddress, ["-c", "3", "-i", "0.2"]).status == 0
                       || ping(from: a.pod, b.podAddress).status == 0, true, "overlay through the relay")

        let pids = [try daemonPID(a), try daemonPID(b)]
        let samples = Mutex<[[(rss: Int, fds: Int)]]>([[], []])
        let sampling = Atomic<Bool>(true)
        let sampler = Thread {
            while sampling.load(ordering: .relaxed) {
                for (i, pid) in pids.enumerated() {
                    let s = Self.resources(of: pid)
                    samples.withLock { $0[i].append(s) }
                }
                usleep(200_000)
            }
        }
        sampler.start()

        let soak = Double(ProcessInfo.processInfo.environment["FLANNEL_UDP_SOAK_SECONDS"] ?? "") ?? 0
        let start = Date()
        var transfers = 0
        repeat {
            try transfer(from: a, to: b, megabytes: 20, seed: transfers)
            transfers += 1
        } while Date().timeIntervalSince(start) < soak
        sampling.store(false, ordering: .relaxed)
        while !sampler.isFinished { usleep(10_000) }

        XCTAssertGreaterThan(relay.dropped.load(ordering: .relaxed), 0, "the relay dropped nothing")
        XCTAssertGreaterThan(relay.reordered.load(ordering: .relaxed), 0, "the relay reordered nothing")
        for (i, series) in samples.withLock({ $0 }).enumerated() {
            XCTAssertEqual(kill(pids[i], 0), 0, "daemon \(i + 1) died")
            guard series.count >= 3 else { continue }
            let third = max(1, series.count / 3)
            let early = series.prefix(third).map(\.rss).max() ?? 0
            let late = series.suffix(third).map(\.rss).max() ?? 0
            XCTAssertLessThan(late - early, 8 * 1024, "daemon \(i + 1) RSS grew from \(early) to \(late) KiB")
            XCTAssertEqual(series.first?.fds, series.last?.fds, "daemon \(i + 1) open descriptors changed")
            print("soak: daemon \(i + 1): \(series.count) samples, RSS \(series.first!.rss) -> \(series.last!.rss) KiB, "
                  + "fds \(series.first!.fds) -> \(series.last!.fds)")
        }
        print("soak: \(transfers) x 20 MB in \(String(format: "%.1f", Date().timeIntervalSince(start))) s; relay dropped "
              + "\(relay.dropped.load(ordering: .relaxed)), reordered \(relay.reordered.load(ordering: .relaxed)) of "
              + "\(relay.relayed.load(ordering: .relaxed))")
    }

    /// Sends `megabytes` of seeded random data over TCP from pod `a` to pod `b` and compares SHA-256 digests.
    func transfer(from a: Node, to b: Node, megabytes: Int, seed: Int) throws {
        let port = 5000 + seed % 1000
        let receiver = """
            import hashlib, socket
            s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("\(b.podAddress)", \(port))); s.listen(1); s.settimeout(60)
            c, _ = s.accept(); c.settimeout(60); h = hashlib.sha256(); n = 0
            while True:
                d = c.recv(1 << 16)
                if not d: break
                h.update(d); n += len(d)
            print(n, h.hexdigest())
            """
        let sender = """
            import hashlib, random, socket
            data = random.Random(\(seed)).randbytes(\(megabytes) << 20)
            c = socket.create_connection(("\(b.podAddress)", \(port)), timeout=60); c.sendall(data); c.close()
            print(len(data), hashlib.sha256(data).hexdigest())
            """
        let received = Mutex(CommandResult(status: -1, stdout: "", stderr: ""))
        let done = DispatchSemaphore(value: 0)
        let receiveCommand = ["ip", "netns", "exec", b.pod.name, "/usr/bin/python3", "-c", receiver]
        DispatchQueue.global().async {
            let r = runCommand(receiveCommand)
            received.withLock { $0 = r }
            done.signal()
        }
        try waitFor("the receiver listens") {
            // A receiver that exited (a bind that failed) will never listen: say what it printed.
            if done.wait(timeout: .now()) == .success {
                let r = received.withLock { $0 }
                throw CommandFailure(arguments: ["python3 receiver in", b.pod.name], result: r)
            }
            return (try? b.pod.run(["ss", "-ltn"]))?.contains(":\(port)") == true
        }
        let sent = runCommand(["ip", "netns", "exec", a.pod.name, "/usr/bin/python3", "-c", sender])
        XCTAssertEqual(sent.status, 0, sent.description)
        XCTAssertEqual(done.wait(timeout: .now() + 90), .success, "receiver did not finish")
        let got = received.withLock { $0 }
        XCTAssertEqual(got.status, 0, got.description)
        let sentDigest = sent.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        XCTAssertEqual(got.stdout.trimmingCharacters(in: .whitespacesAndNewlines), sentDigest,
                       "bytes and SHA-256 received vs sent")
        XCTAssertTrue(sentDigest.hasPrefix("\(megabytes << 20) "), sentDigest)
    }

    /// VmRSS in KiB and the number of open descriptors of `pid`.
    static func resources(of pid: pid_t) -> (rss: Int, fds: Int) {
        let status = (try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)) ?? ""
        let rss = status.split(separator: "\n").first { $0.hasPrefix("VmRSS:") }
            .flatMap { Int($0.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first ?? "") } ?? 0
        let fds = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd").count) ?? -1
        return (rss, fds)
    }
}

/// A UDP relay between two endpoints that loses and reorders: one socket bound in its namespace on port 8285,
/// served by one thread.
final class LossyRelay: @unchecked Sendable {
    let fd: Int32
    let a: Endpoint
    let b: Endpoint
    let running = Atomic<Bool>(true)
    let dropped = Atomic<Int>(0)
    let reordered = Atomic<Int>(0)
    let relayed = Atomic<Int>(0)
    private var thread: Thread?
    private let finished = DispatchSemaphore(value: 0)

    init(in ns: TestNamespace, a: Endpoint, b: Endpoint) throws {
        self.a = a
        self.b = b
        fd = try ns.withEntered {
            let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
            guard fd >= 0 else { throw SystemError.current("socket", "relay") }
            var big: Int32 = 4 << 20
            setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &big, socklen_t(MemoryLayout<Int32>.size))
            setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &big, socklen_t(MemoryLayout<Int32>.size))
            var tv = timeval(tv_sec: 0, tv_usec: 100_000)
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
            var sa = sockaddr_in()
            sa.sin_family = sa_family_t(AF_INET)
            sa.sin_port = UInt16(8285).bigEndian
            let rc = withUnsafePointer(to: &sa) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
                }
            }
            guard rc == 0 else { close(fd); throw SystemError.current("bind", "relay :8285") }
            return fd
        }
    }

    func start() {
        let t = Thread { [self] in
            run()
            finished.signal()
        }
        thread = t
        t.start()
    }

    func stop() {
        guard thread != nil else { return }
        running.store(false, ordering: .relaxed)
        finished.wait()
        thread = nil
        close(fd)
    }

    private func run() {
        var rng = SeededRandom(seed: 42)
        var buffer = [UInt8](repeating: 0, count: 65536)
        var held: (bytes: [UInt8], to: Endpoint)?
        while running.load(ordering: .relaxed) {
            var from = sockaddr_in()
            var len = socklen_t(MemoryLayout<sockaddr_in>.size)
            let n = buffer.withUnsafeMutableBytes { buf in
                withUnsafeMutablePointer(to: &from) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { recvfrom(fd, buf.baseAddress, buf.count, 0, $0, &len) }
                }
            }
            if n < 0 {
                if let h = held { send(h.bytes, to: h.to); held = nil }  // idle: release what was held back
                continue
            }
            let source = IPv4Address(networkOrder: from.sin_addr.s_addr)
            let to: Endpoint
            if source == a.address { to = b } else if source == b.address { to = a } else { continue }
            relayed.add(1, ordering: .relaxed)
            let roll = Int.random(in: 0..<100, using: &rng)
            if roll < 1 {
                dropped.add(1, ordering: .relaxed)
                continue
            }
            let bytes = Array(buffer[0..<n])
            if held == nil && roll < 6 {
                held = (bytes, to)  // goes out after the next datagram
                reordered.add(1, ordering: .relaxed)
                continue
            }
            send(bytes, to: to)
            if let h = held { send(h.bytes, to: h.to); held = nil }
        }
    }

    private func send(_ bytes: [UInt8], to endpoint: Endpoint) {
        _ = sendDatagram(bytes, from: fd, to: endpoint)
    }
}
