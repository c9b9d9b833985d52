import XCTest
import Foundation
import CShims
@testable import FlannelCore
@testable import FlannelUDP
#if canImport(Glibc)
import Glibc
#endif

/// The tun's steering program in the kernel: a namespace of its own, a tun with two flow queues and the express
/// lane's, the program attached (`TunDevice.steer`), and hand-made IPv4 packets sent through a raw socket to
/// addresses routed into the tun. Each packet must come out of the queue `FlowSteering.queue` names for the bytes
/// read: the proof that the verifier takes the program and that the kernel runs it with the packet at the inner
/// IPv4 header. Without the program the kernel's own flow hash picks the queues, and the express lane's checks fail.
final class TunSteeringTests: XCTestCase {
    static let workers = 2
    static let express = ForwarderOptions.defaultExpressLength

    func testEveryPacketLeavesThroughTheQueueTheProgramNames() throws {
        guard getuid() == 0 else { throw XCTSkip("needs root: creates a network namespace (fu-dp-<pid>-N)") }
        guard DPNamespace.tool("ip") != nil, access("/dev/net/tun", R_OK | W_OK) == 0 else {
            throw XCTSkip("needs ip (iproute2) and /dev/net/tun")
        }
        let ns = try DPNamespace.create(41)
        addTeardownBlock { ns.delete() }
        let tun = try ns.inside { try TunDevice(name: "steer0", queues: Self.workers + 1) }
        addTeardownBlock { tun.close() }
        ns.ip("link", "set", "lo", "up")
        ns.ip("addr", "add", "10.98.0.1/32", "dev", "steer0")
        ns.ip("link", "set", "steer0", "up", "mtu", "1500")
        ns.ip("route", "add", "10.99.0.0/16", "dev", "steer0")
        try tun.steer(workers: Self.workers, express: Self.express)
        try tun.setNonBlocking(true)

        let sent = packets()
        let landed = try send(sent, in: ns, through: tun)
        XCTAssertEqual(landed.count, sent.count, "every packet sent came out of the tun once")
        var perQueue = [Int](repeating: 0, count: Self.workers + 1)
        for (queue, bytes) in landed {
            perQueue[queue] += 1
            XCTAssertEqual(queue, Self.expected(bytes), "packet of \(bytes.count) bytes, protocol \(bytes[9])")
        }
        XCTAssertTrue(perQueue.allSatisfy { $0 > 0 }, "both flow queues and the express lane are used: \(perQueue)")

        // Detached, the kernel's flow hash picks again, and many packets leave elsewhere than the program says:
        // the checks above hold because of the program.
        try tun.steer(workers: nil, express: nil)
        let hashed = try send(sent, in: ns, through: tun)
        XCTAssertEqual(hashed.count, sent.count)
        XCTAssertGreaterThan(hashed.filter { $0.0 != Self.expected($0.1) }.count, 0)
    }

    static func expected(_ bytes: [UInt8]) -> Int {
        bytes.withUnsafeBytes { FlowSteering.queue($0, workers: workers, express: express) }
    }

    /// Sends each packet through a raw socket in `ns` (IP_HDRINCL: the kernel fills in the length, identification
    /// and header checksum, nothing else) and reads it back from the tun: the queue it left through, and its bytes.
    func send(_ packets: [[UInt8]], in ns: DPNamespace, through tun: TunDevice) throws -> [(Int, [UInt8])] {
        try ns.inside {
            let raw = socket(AF_INET, Int32(SOCK_RAW.rawValue) | Int32(SOCK_CLOEXEC.rawValue), Int32(IPPROTO_RAW))
            guard raw >= 0 else { throw SystemError.current("create raw socket", "steer0") }
            defer { close(raw) }
            var out: [(Int, [UInt8])] = []
            for p in packets {
                let dest = Endpoint(address: IPv4Address(UInt32(p[16]) << 24 | UInt32(p[17]) << 16
                                                         | UInt32(p[18]) << 8 | UInt32(p[19])), port: 0)
                let n = p.withUnsafeBytes { b in dest.withSocketAddress { sendto(raw, b.baseAddress, b.count, 0, $0, $1) } }
                guard n == p.count else { throw SystemError.current("send raw packet to", "\(dest.address)") }
                out.append(contentsOf: try Self.drain(tun, expecting: 1))
            }
            return out
        }
    }

    /// Bulk and express traffic of many flows: full-size TCP segments, bare acknowledgements (with options), SYNs,
    /// FINs, short requests, pings, UDP of both sizes, fragments.
    func packets() -> [[UInt8]] {
        var out: [[UInt8]] = []
        for k in 0..<24 {
            var spec = TCPPacketSpec()
            spec.source = IPv4Address("10.98.0.1")!
            spec.destination = IPv4Address(0x0A63_0100 | UInt32(k % 5 + 2))
            spec.sourcePort = UInt16(40000 + 2 * k)
            spec.payload = [UInt8](repeating: UInt8(k), count: [1400, 0, 0, 30, 600, 88][k % 6])
            spec.flags = k % 6 == 2 ? TCPHeader.syn : TCPHeader.ack
            if k % 4 == 3 { spec.tcpOptions += [1, 1, 1, 1] }
            out.append(spec.bytes())
        }
        for k in 0..<12 {
            let payload = [UInt8](repeating: 0xAB, count: k % 2 == 0 ? 56 : 1200)
            out.append(makeIPv4(source: ip("10.98.0.1"), destination: IPv4Address(0x0A63_0200 | UInt32(k + 2)),
                                proto: k % 3 == 0 ? 1 : 17, payload: payload))
        }
        var fragment = makeIPv4(source: ip("10.98.0.1"), destination: ip("10.99.3.3"), proto: 6,
                                payload: [UInt8](repeating: 1, count: 60))
        fragment[6] = 0x20  // more fragments
        out.append(fragment)
        return out
    }

    /// Reads the tun's queues until `count` packets came out or 2 s passed: which queue each came from.
    static func drain(_ tun: TunDevice, expecting count: Int) throws -> [(Int, [UInt8])] {
        var got: [(Int, [UInt8])] = []
        var buffer = [UInt8](repeating: 0, count: 65536)
        let deadline = Date().addingTimeInterval(2)
        while got.count < count && Date() < deadline {
            var fds = tun.queueFDs.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
            _ = poll(&fds, nfds_t(fds.count), 100)
            for (q, fd) in tun.queueFDs.enumerated() {
                while true {
                    let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
                    if n < 0 {
                        if errno == EAGAIN { break }
                        throw SystemError.current("read queue \(q) of", tun.name)
                    }
                    // Only what the test sent: not the IPv6 the kernel may send on a device coming up.
                    if n >= IPv4Header.minimumLength && buffer[0] >> 4 == 4 && buffer[16] == 10 && buffer[17] == 99 {
                        got.append((q, Array(buffer[0..<n])))
                    }
                }
            }
        }
        return got
    }
}
