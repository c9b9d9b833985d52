import XCTest
import Atomics
import Logging
import CShims
@testable import FlannelCore
@testable import FlannelUDP
import TestSupport
#if canImport(Glibc)
import Glibc
#endif

/// The express lane's first look at a quiet input (`TunToUDPWorker.forwardOne`, `UDPToTunWorker.deliverOne`):
/// one packet, sent past the batch machinery, and every case a batch handles handled the same way, counted the
/// same way. On the loopback fixture, unprivileged (but for the full send buffer's test, which needs a qdisc); the
/// workers run on the test thread.
final class ExpressOnePacketTests: LoopbackForwarderTestCase {
    private var workerCounters = WorkerCounters()

    override func setUpWithError() throws {
        try super.setUpWithError()
        for fd in pair { _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) }
    }

    /// A tun -> UDP worker over the fixture, built by hand so that its "tun" may carry virtio headers (a
    /// `Forwarder` would ask a socketpair for TUNSETVNETHDRSZ).
    private func tunToUDP(vnet: Bool, gso: Bool = false, sendWaitMilliseconds: Int32 = 10) -> TunToUDPWorker {
        let offloads = OffloadState(vnetHeader: vnet, tso: vnet, udpGSO: gso, udpGRO: false, coalesce: false)
        let options = ForwarderOptions(batchSize: 8, sendWaitMilliseconds: sendWaitMilliseconds)
        func io(_ fd: Int32, _ name: String) -> StageIO {
            StageIO(fd: fd, name: name, counters: counters, worker: workerCounters, offloads: offloads, logger: logger)
        }
        let setup = WorkerSetup(threadName: "fu-x-tun-to-udp", stopRequested: ManagedAtomic(false), table: table,
                                config: config, counters: counters, options: options, express: true)
        return TunToUDPWorker(reader: TunReader(io(pair[0], "test-tun"), vnet: vnet, options: options),
                              sender: UDPSender(io(socket.fd, "test-udp"), options: options),
                              icmpWriter: TunWriter(io(pair[0], "test-tun"), vnet: vnet, coalesce: false), setup)
    }

    private func write(_ bytes: [UInt8]) {
        XCTAssertEqual(bytes.withUnsafeBytes { Glibc.write(pair[1], $0.baseAddress, $0.count) }, bytes.count)
    }

    /// What the data plane has counted for the tun -> UDP direction: in total, for the peer, for the pair.
    private func sentCounts() -> [UInt64] {
        let peer = table.snapshot().peers[0].counters.snapshot
        let total = counters.snapshot().tunToUDP
        return [total.packets, total.bytes, peer.txPackets, peer.txBytes, workerCounters.tunToUDPPackets.load(ordering: .relaxed)]
    }

    /// A lone packet leaves at once, as the batch would send it, and is counted everywhere the batch counts it;
    /// the next look at the empty tun takes nothing.
    func testALonePacketLeavesAtOnceAndIsCountedAsABatchCountsIt() throws {
        let out = makeIPv4(source: ip("10.244.1.2"), destination: ip("10.244.2.5"), payload: filled(1, 40))
        let w = tunToUDP(vnet: false)
        write(out)
        XCTAssertEqual(try w.forwardOne(), 1)
        XCTAssertEqual(drainFD(peer.fd), [forwarded(out)])
        let alone = sentCounts()
        XCTAssertEqual(alone, [1, UInt64(out.count), 1, UInt64(out.count), 1])
        XCTAssertEqual(try w.forwardOne(), 0)

        write(out)
        XCTAssertEqual(try w.drain(), 1)
        XCTAssertEqual(drainFD(peer.fd), [forwarded(out)])
        XCTAssertEqual(sentCounts(), alone.map { $0 * 2 }, "the batch path counts the same")
        XCTAssertEqual(counters.snapshot().drops.values.reduce(0, +), 0, "\(counters.snapshot().drops)")
    }

    /// A TSO super-packet can reach the lane's tun queue (a queue is the kernel's choice), and the first look
    /// must not send it whole: it is cut into flannel's MTU-sized datagrams with complete checksums, as a batch
    /// cuts it. Sent whole, it would be one 5 KB datagram that no flannel node could take.
    func testASuperPacketOnTheFirstLookIsCutAsABatchCutsIt() throws {
        for gso in [false, true] {
            counters = DataPlaneCounters()
            workerCounters = WorkerCounters()
            table = RouteTable([PeerRoute(subnet: net("10.244.2.0/24"), endpoint: peer.localEndpoint)])
            var spec = TCPPacketSpec()
            spec.payload = patternPayload(3 * 1420 + 700)
            let header = VirtioNetHeader(flags: VirtioNetHeader.flagNeedsChecksum, gsoType: VirtioNetHeader.gsoTCPv4,
                                         headerLength: 52, gsoSize: 1420, checksumStart: 20, checksumOffset: 16)
            var bytes = [UInt8](repeating: 0, count: VirtioNetHeader.length)
            bytes.withUnsafeMutableBytes { header.store(to: $0.baseAddress!) }
            let w = tunToUDP(vnet: true, gso: gso)
            write(bytes + spec.bytes(partialChecksum: true))
            XCTAssertEqual(try w.forwardOne(), 1)
            let received = drainFD(peer.fd)
            XCTAssertEqual(received.map(\.count), [1472, 1472, 1472, 752], "gso \(gso)")
            XCTAssertTrue(received.allSatisfy(checksumsVerify), "gso \(gso)")
            XCTAssertEqual(sentCounts(), [4, 3 * 1472 + 752, 4, 3 * 1472 + 752, 4], "gso \(gso)")
            XCTAssertEqual(w.sender.queue.isEmpty, true, "nothing left queued for a later flush")
        }
    }

    /// A packet the lane cannot send (here the kernel refuses a broadcast destination without SO_BROADCAST) is
    /// counted as `sendFailed`, and the lane goes on: nothing is thrown, nothing is left queued, the next one is
    /// tried on its own.
    func testALoneSendThatFailsIsCountedAndTheLaneGoesOn() throws {
        table = RouteTable([PeerRoute(subnet: net("10.244.2.0/24"),
                                      endpoint: Endpoint(address: ip("255.255.255.255"), port: 8285))])
        let w = tunToUDP(vnet: false)
        for k in 1...2 {
            write(makeIPv4(source: ip("10.244.1.2"), destination: ip("10.244.2.5"), identification: UInt16(k)))
            XCTAssertEqual(try w.forwardOne(), 1)
            XCTAssertEqual(counters.drops(.sendFailed), UInt64(k))
        }
        XCTAssertEqual(sentCounts(), [0, 0, 0, 0, 0])
        XCTAssertTrue(w.sender.queue.isEmpty)
    }

    /// A lone packet that finds the socket's send buffer full (EAGAIN) is not lost: it is queued and flushed, and
    /// the flush waits for room as a batch's does. On loopback a send buffer never fills (the kernel orphans each
    /// packet at once), so this runs as root on a veth between two namespaces of its own, with a token bucket
    /// (tbf) holding packets in the qdisc, where they still count against a 4 KB send buffer. Filler datagrams fill
    /// the buffer until the kernel says EAGAIN, at 1 kbit/s, so that no room comes by itself; the lane's packet
    /// then waits in the flush (up to 5 s here) until another thread opens the bucket 200 ms later.
    func testALonePacketThatFindsTheSendBufferFullWaitsForRoomAndIsSent() throws {
        guard getuid() == 0 else { throw XCTSkip("needs root: creates network namespaces (fu-dp-<pid>-N)") }
        guard let tc = DPNamespace.tool("tc"), DPNamespace.tool("ip") != nil else {
            throw XCTSkip("needs ip and tc (iproute2)")
        }
        var namespaces: [DPNamespace] = []
        addTeardownBlock { for ns in namespaces { ns.delete() } }
        for n in 61...62 { namespaces.append(try DPNamespace.create(n)) }
        let (a, b) = (namespaces[0], namespaces[1])
        a.ip("link", "add", "v0", "type", "veth", "peer", "name", "v0", "netns", b.name)
        a.ip("addr", "add", "10.9.0.1/24", "dev", "v0")
        b.ip("addr", "add", "10.9.0.2/24", "dev", "v0")
        a.ip("link", "set", "v0", "up")
        b.ip("link", "set", "v0", "up")
        let qdisc = a.exec([tc, "qdisc", "add", "dev", "v0", "root", "tbf", "rate", "1kbit", "burst", "1600",
                            "limit", "1000000"])
        try XCTSkipIf(qdisc.status != 0, "this kernel has no tbf qdisc: \(qdisc.output)")

        let sender = try a.inside { try UDPSocket(bind: Endpoint(address: ip("10.9.0.1"), port: 0), bufferSize: 4096) }
        let receiver = try b.inside { try UDPSocket(bind: Endpoint(address: ip("10.9.0.2"), port: 8285)) }
        socket = sender
        table = RouteTable([PeerRoute(subnet: net("10.244.2.0/24"), endpoint: receiver.localEndpoint)])
        // A first datagram across, so the neighbour entry is resolved before the buffer is filled.
        XCTAssertEqual(sendDatagram([0], from: sender.fd, to: receiver.localEndpoint), 1)
        XCTAssertTrue(waitForDatagrams(receiver.fd, 1).count == 1, "the veth carries nothing")

        var fillers = 0
        while sendDatagram([UInt8](repeating: 0xee, count: 1000), from: sender.fd, to: receiver.localEndpoint) > 0 {
            fillers += 1
            XCTAssertLessThan(fillers, 1000, "the send buffer never filled")
            if fillers >= 1000 { return }
        }
        XCTAssertEqual(errno, EAGAIN, "the filler stopped for another reason")

        let out = makeIPv4(source: ip("10.244.1.2"), destination: ip("10.244.2.5"), payload: filled(7, 200))
        let w = tunToUDP(vnet: false, sendWaitMilliseconds: 5000)
        write(out)
        let opener = Thread {
            usleep(200_000)
            _ = a.exec([tc, "qdisc", "change", "dev", "v0", "root", "tbf", "rate", "100mbit", "burst", "1600",
                        "limit", "1000000"])
        }
        opener.start()
        let start = Date()
        XCTAssertEqual(try w.forwardOne(), 1)
        let waited = Date().timeIntervalSince(start)
        while !opener.isFinished { usleep(1000) }
        XCTAssertEqual(counters.drops(.sendFailed), 0, "the packet was dropped instead of waiting for room")
        XCTAssertGreaterThan(waited, 0.1, "the send did not wait for room (did the buffer empty by itself?)")
        XCTAssertEqual(sentCounts(), [1, UInt64(out.count), 1, UInt64(out.count), 1])
        XCTAssertTrue(w.sender.queue.isEmpty, "nothing left queued")
        let arrived = waitForDatagrams(receiver.fd, fillers + 1)
        XCTAssertEqual(arrived.count, fillers + 1)
        XCTAssertEqual(arrived.last, forwarded(out), "the lane's packet arrived, behind the fillers")
        print("[+] \(fillers) fillers filled the 4 KB send buffer; forwardOne waited "
              + "\(String(format: "%.3f", waited)) s for room")
    }

    /// Reads datagrams from `fd` until `count` have come or 5 s have passed.
    private func waitForDatagrams(_ fd: Int32, _ count: Int) -> [[UInt8]] {
        var got: [[UInt8]] = []
        _ = waitUntil(interval: 0.002) {
            got += drainFD(fd)
            return got.count >= count
        }
        return got
    }

    /// A lone packet with no route gets the ICMP error a batch would write back to the tun.
    func testALonePacketWithoutARouteIsAnsweredOnTheTun() throws {
        let w = tunToUDP(vnet: false)
        write(makeIPv4(source: ip("10.244.1.2"), destination: ip("10.244.9.9")))
        XCTAssertEqual(try w.forwardOne(), 1)
        let back = drainFD(pair[1])
        XCTAssertEqual(back.count, 1)
        XCTAssertEqual(back.first?[9], 1, "ICMP")
        XCTAssertEqual(back.first?[20], 3, "destination unreachable")
        XCTAssertEqual(counters.drops(.noRoute), 1)
        XCTAssertTrue(drainFD(peer.fd).isEmpty)
    }

    /// The socket side's first look takes one message, and a GRO buffer is still one message: it is split into
    /// its packets, each decided and written on its own, as a batch does it.
    func testAGROBufferOnTheFirstLookIsSplitIntoItsPackets() throws {
        let f = try Forwarder(tunFD: pair[0], tunName: "test-tun", socket: socket, table: table, config: config,
                              counters: counters, logger: logger, options: ForwarderOptions(batchSize: 8))
        XCTAssertEqual(f.activeOffloads, ["batching", "gso", "gro"])
        let packets = (0..<3).map {
            makeIPv4(source: ip("10.244.2.5"), destination: ip("10.244.1.2"), identification: UInt16($0),
                     payload: patternPayload(1452, seed: UInt8($0)))
        }
        XCTAssertEqual(setInt(peer.fd, Int32(FU_UDP_SEGMENT), 1472), 0)
        let datagram = packets.reduce([], +)
        XCTAssertEqual(sendDatagram(datagram, from: peer.fd, to: socket.localEndpoint), datagram.count)
        XCTAssertEqual(sendDatagram(datagram, from: peer.fd, to: socket.localEndpoint), datagram.count)
        XCTAssertEqual(try f.udpToTun.deliverOne(), 1, "one message per first look")
        XCTAssertEqual(drainFD(pair[1]), packets.map(forwarded))
        XCTAssertEqual(f.offloadStatistics.groBuffers, 1)
        XCTAssertEqual(counters.snapshot().udpToTun.packets, 3)
        XCTAssertEqual(table.snapshot().peers[0].counters.snapshot.rxPackets, 3)
        XCTAssertEqual(try f.udpToTun.deliverOne(), 1, "the second message waited for the next look")
        XCTAssertEqual(drainFD(pair[1]).count, 3)
        XCTAssertEqual(try f.udpToTun.deliverOne(), 0)
    }
}
