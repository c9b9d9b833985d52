import Foundation
import XCTest
import Atomics
import CAllocCounter
import Logging
import Synchronization
import TestSupport
@testable import FlannelCore
@testable import FlannelUDP
#if canImport(Glibc)
import Glibc
#endif

/// The express lane's pair on one thread (`DuplexLoop`), unprivileged: two "tun queues" (SOCK_SEQPACKET
/// socketpairs, one packet per read/write like a tun) and two UDP sockets on loopback, the second pair being the
/// lane's. The flow pair keeps a thread per direction.
final class ExpressLaneThreadTests: LoopbackForwarderTestCase {
    private var lanePair: [Int32] = [-1, -1]
    private var laneSocket: UDPSocket!

    override func setUpWithError() throws {
        try super.setUpWithError()
        XCTAssertEqual(socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &lanePair), 0)
        laneSocket = try UDPSocket(bind: Endpoint(address: ip("127.0.0.1"), port: 0))
    }

    override func tearDown() {
        for fd in lanePair where fd >= 0 { close(fd) }
        laneSocket?.close()
        super.tearDown()
    }

    private func makeForwarder(laneTun: Int32? = nil, spin: Int = 0, heartbeat: Int32 = 1000,
                               onFailure: (@Sendable (SystemError) -> Void)? = nil) throws -> Forwarder {
        try Forwarder(tunFDs: [pair[0], laneTun ?? lanePair[0]], tunName: "test-tun", tunDevice: nil, vnetHeader: false,
                      sockets: [socket, laneSocket], table: table, config: config, counters: counters, logger: logger,
                      options: ForwarderOptions(offloads: false, heartbeatMilliseconds: heartbeat, express: 128,
                                                expressSpinMicroseconds: spin),
                      onFailure: onFailure)
    }

    /// This process's threads by name, with their thread ids.
    private func threads() -> [(tid: Int32, name: String)] {
        let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task")) ?? []
        return tasks.compactMap { tid in
            guard let comm = try? String(contentsOfFile: "/proc/self/task/\(tid)/comm", encoding: .utf8) else { return nil }
            return (Int32(tid)!, comm.trimmingCharacters(in: .whitespacesAndNewlines))
        }
    }

    /// utime + stime of one thread, in clock ticks (/proc/self/task/TID/stat fields 14 and 15).
    private func cpuTicks(_ tid: Int32) throws -> Int {
        let stat = try String(contentsOfFile: "/proc/self/task/\(tid)/stat", encoding: .utf8)
        // The name (field 2) is in parentheses and may hold spaces: count fields after the last ')'.
        let rest = stat[stat.index(after: try XCTUnwrap(stat.lastIndex(of: ")")))...].split(separator: " ")
        return try XCTUnwrap(Int(rest[11])) + XCTUnwrap(Int(rest[12]))
    }

    private func waitForPacket(_ fd: Int32, timeout: Int32 = 5000) -> [UInt8]? {
        var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        guard poll(&pfd, 1, timeout) == 1 else { return nil }
        var buf = [UInt8](repeating: 0, count: 65536)
        let n = buf.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
        return n >= 0 ? Array(buf[0..<n]) : nil
    }

    private func write(_ fd: Int32, _ bytes: [UInt8]) {
        XCTAssertEqual(bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }, bytes.count)
    }

    /// One thread carries both directions of the lane's pair, and it forwards both ways: what its tun queue
    /// gives goes to the peer, what its socket gets goes into its tun queue. The watchdog still sees both of the
    /// lane's workers, and their heartbeats move while the thread sleeps in its poll.
    func testTheLanePairRunsOnOneThreadThatForwardsBothWays() throws {
        let f = try makeForwarder(heartbeat: 10)
        try f.start()
        defer { f.stop() }
        // Each thread names itself when it starts: wait until all three have.
        var names = threads().map(\.name)
        let named = Date().addingTimeInterval(5)
        while names.filter({ $0.hasPrefix("fu-") }).count < 3 && Date() < named {
            usleep(5000)  // polling a condition with a deadline
            names = threads().map(\.name)
        }
        XCTAssertEqual(names.filter { $0 == "fu-express" }.count, 1, "\(names)")
        XCTAssertFalse(names.contains { $0.hasPrefix("fu-x-") }, "no thread per direction for the lane: \(names)")
        XCTAssertEqual(names.filter { $0 == "fu-tun-to-udp" || $0 == "fu-udp-to-tun" }.count, 2, "\(names)")

        for i in 0..<20 {
            write(lanePair[1], makeIPv4(source: ip("10.244.1.2"), destination: ip("10.244.2.5"), identification: UInt16(i)))
            let out = try XCTUnwrap(waitForPacket(peer.fd), "request \(i)")
            XCTAssertEqual(word(out, 4), UInt16(i))
            let answer = makeIPv4(source: ip("10.244.2.5"), destination: ip("10.244.1.2"), identification: UInt16(i))
            XCTAssertEqual(sendDatagram(answer, from: peer.fd, to: laneSocket.localEndpoint), answer.count)
            let back = try XCTUnwrap(waitForPacket(lanePair[1]), "answer \(i)")
            XCTAssertEqual(word(back, 4), UInt16(i))
        }
        // The pair counts a batch after handing it over: wait for the last one's count.
        let counted = Date().addingTimeInterval(5)
        while f.workerCounts[1].udpToTunPackets < 20 && Date() < counted { usleep(2000) }
        let counts = f.workerCounts
        XCTAssertEqual(counts.map(\.express), [nil, true])
        XCTAssertEqual(counts[1].tunToUDPPackets, 20)
        XCTAssertEqual(counts[1].udpToTunPackets, 20)
        XCTAssertEqual(counts[0].tunToUDPPackets + counts[0].udpToTunPackets, 0)

        let first = f.heartbeats
        XCTAssertEqual(first.map(\.worker), ["fu-tun-to-udp", "fu-udp-to-tun", "fu-x-tun-to-udp", "fu-x-udp-to-tun"])
        XCTAssertTrue(heartbeatsMove(f, from: first), "heartbeats did not move while idle: \(f.heartbeats)")
    }

    /// The spin ends: with the longest one allowed, after traffic the lane's thread goes back to sleep, so an
    /// idle second costs it (nearly) no CPU. A loop that kept looking would use the whole second. A bound with a
    /// tenfold margin, not a measurement.
    func testAfterTheLongestSpinTheLaneThreadSleeps() throws {
        let f = try makeForwarder(spin: ForwarderOptions.maximumExpressSpinMicroseconds)
        try f.start()
        defer { f.stop() }
        for i in 0..<50 {
            write(lanePair[1], makeIPv4(source: ip("10.244.1.2"), destination: ip("10.244.2.5"), identification: UInt16(i)))
            XCTAssertNotNil(waitForPacket(peer.fd), "request \(i)")
        }
        let tid = try XCTUnwrap(threads().first { $0.name == "fu-express" }?.tid, "\(threads())")
        usleep(100_000)  // the last spin (1 ms) is long over
        let before = try cpuTicks(tid)
        usleep(1_000_000)
        let used = try cpuTicks(tid) - before
        let ticksPerSecond = sysconf(Int32(_SC_CLK_TCK))
        XCTAssertLessThan(used, ticksPerSecond / 10, "the lane's thread used \(used) of \(ticksPerSecond) ticks idle")
        XCTAssertEqual(f.workerCounts[1].tunToUDPPackets, 50)
    }

    /// Under a flood the lane's thread never sleeps, so it must show it is alive and look at the stop flag
    /// while it forwards: its heartbeats move during the flood, and stop() returns while the flood goes on. (A
    /// loop that did both only between sleeps would freeze the watchdog's evidence and never stop.)
    func testUnderAFloodTheLaneStaysAliveAndStops() throws {
        let f = try makeForwarder(spin: ForwarderOptions.maximumExpressSpinMicroseconds, heartbeat: 3_600_000)
        try f.start()
        let flooding = ManagedAtomic<Bool>(true)
        let writer = lanePair[1]
        let flood = Thread {
            let packet = makeIPv4(source: ip("10.244.1.2"), destination: ip("10.244.2.5"))
            let end = Date().addingTimeInterval(20)  // a bound in case stop() hangs
            while flooding.load(ordering: .relaxed) && Date() < end {
                _ = packet.withUnsafeBytes { send(writer, $0.baseAddress, $0.count, Int32(MSG_DONTWAIT)) }
            }
            flooding.store(false, ordering: .relaxed)
        }
        flood.start()
        defer { flooding.store(false, ordering: .relaxed) }
        let deadline = Date().addingTimeInterval(5)
        while f.workerCounts[1].tunToUDPPackets < 100 && Date() < deadline { usleep(5000) }
        let first = f.heartbeats.map(\.count)
        usleep(300_000)
        let later = f.heartbeats.map(\.count)
        XCTAssertGreaterThan(later[2], first[2], "the lane's heartbeats move during the flood: \(first) \(later)")
        XCTAssertGreaterThan(later[3], first[3])
        f.stop()
        XCTAssertTrue(flooding.load(ordering: .relaxed), "stop() returned while the flood went on")
        XCTAssertGreaterThan(f.workerCounts[1].tunToUDPPackets, 100)
    }

    /// The zero-allocation proof for the lane's loop: one pass (both workers drained until both are empty) with
    /// traffic both ways, hundreds of times after a warm-up, on this thread, leaves its malloc count unchanged.
    func testTheLanePassDoesNotAllocate() throws {
        let f = try makeForwarder()  // not started: this thread runs the lane's pass itself
        let lane = try XCTUnwrap(f.threads.last as? DuplexLoop)
        let out = makeIPv4(source: ip("10.244.1.2"), destination: ip("10.244.2.5"), payload: filled(1, 40))
        let back = makeIPv4(source: ip("10.244.2.5"), destination: ip("10.244.1.2"), payload: filled(2, 40))
        let sink = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 8)
        defer { sink.deallocate() }
        var measured: UInt64 = 0
        var r = 0
        while r < 300 {
            var k = 0
            while k < 4 {
                write(lanePair[1], out)
                XCTAssertEqual(sendDatagram(back, from: peer.fd, to: laneSocket.localEndpoint), back.count)
                k += 1
            }
            let n = try allocations { _ = try lane.forwardWhileBusy() }
            if r > 0 { measured += n }  // the first pass warms up
            while recv(peer.fd, sink.baseAddress, sink.count, Int32(MSG_DONTWAIT)) > 0 {}
            while recv(lanePair[1], sink.baseAddress, sink.count, Int32(MSG_DONTWAIT)) > 0 {}
            r += 1
        }
        XCTAssertEqual(measured, 0, "the lane's pass allocated \(measured) times")
        XCTAssertEqual(f.workerCounts[1].tunToUDPPackets, 1200)
        XCTAssertEqual(f.workerCounts[1].udpToTunPackets, 1200)
    }

    /// The lane's thread sleeps in poll() with its heartbeat timer an hour away: only the wake signal that
    /// stop() sends ends that wait. Without it stop() would hang (the 60 s is a liveness bound).
    func testStopWakesTheLaneThreadInItsPoll() throws {
        let f = try makeForwarder(heartbeat: 3_600_000)
        XCTAssertEqual(try heartbeatsBeforeAStopThatWakes(f), [1, 1, 1, 1], "each loop went round once and then slept, idle")
        XCTAssertNil(f.failure)
    }

    /// A fatal error on the lane (its "tun queue" is a directory: poll() says readable, and the lane's read,
    /// always RWF_NOWAIT, is refused with EOPNOTSUPP) stops the whole forwarder and is reported once, naming the
    /// call and the object.
    func testAFatalErrorOnTheLaneStopsTheForwarder() throws {
        let dir = open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        XCTAssertGreaterThanOrEqual(dir, 0)
        defer { close(dir) }
        let reported = Mutex<[String]>([])
        let f = try makeForwarder(laneTun: dir, onFailure: { error in reported.withLock { $0.append(error.description) } })
        try f.start()
        let failure = f.wait()
        XCTAssertEqual(failure?.description, "read from test-tun: Operation not supported")
        XCTAssertEqual(reported.withLock { $0 }, ["read from test-tun: Operation not supported"])
    }
}
