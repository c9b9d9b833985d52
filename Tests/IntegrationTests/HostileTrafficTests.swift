import Foundation
import XCTest
@testable import FlannelCore
@testable import FlannelUDP
import TestSupport

/// Node A under attack while pods A and B talk (topology in HostileTopology.swift): a stranger on the underlay
/// floods A's port 8285 with random bytes, truncated and oversized datagrams, bad versions/IHL/lengths, forged
/// inner sources, TTL 0/1, fragments and ICMP errors about ICMP errors; peer B's address sends spoofed sources.
/// Every datagram's drop reason is predicted and the counters must match exactly; nothing but B's legitimate
/// packets may reach A's tun; the daemon keeps running and the legitimate flows complete.
/// FLANNEL_UDP_HOSTILE_ROUNDS (default 4) sets how many rounds of ~300 hostile datagrams are sent.
class HostileTrafficTests: HostileTopologyTestCase {
    func testFloodIsCountedAndNeverReachesTheTun() throws {
        let (a, b) = try makePair()
        XCTAssertEqual(ping(from: b.pod, a.podAddress).status, 0, "overlay up")
        let stranger = try TestNamespace(prefix: "fu-hs")
        addTeardownBlock { stranger.destroy() }
        try plug(stranger, index: 99)
        let pid = try daemonPID(a)
        let target = a.underlay + ":8285"

        // Legitimate traffic during the whole flood: pings B -> A and a TCP transfer A -> B.
        let iperfServer = try startIperf3Server(in: b.pod, address: b.podAddress)
        addTeardownBlock { stopBackground(iperfServer) }
        // Read while the overlay is idle: per-peer rx is counted per packet, udpToTun once per batch.
        let before = try counters(a)
        let legit = DispatchGroup()
        nonisolated(unsafe) var pingResult = CommandResult(status: -1, stdout: "", stderr: "")
        nonisolated(unsafe) var iperfResult = CommandResult(status: -1, stdout: "", stderr: "")
        let pingCommand = ["ip", "netns", "exec", b.pod.name, "ping", "-n", "-q", "-c", "300", "-i", "0.01", "-W", "2",
                           a.podAddress]
        let iperfCommand = ["ip", "netns", "exec", a.pod.name, "iperf3", "-c", b.podAddress, "-n", "20M"]
        DispatchQueue.global().async(group: legit) { pingResult = runCommand(pingCommand) }
        DispatchQueue.global().async(group: legit) { iperfResult = runCommand(iperfCommand) }

        var rng = SeededRandom(seed: 0x666c_616e_6e65_6c)
        let rounds = Int(ProcessInfo.processInfo.environment["FLANNEL_UDP_HOSTILE_ROUNDS"] ?? "") ?? 4
        var expected: [String: Int] = [:]
        var sentByStranger = 0
        for _ in 0..<rounds {
            let batch = Self.hostileBatch(&rng)
            for d in batch { expected[Forge.strangerDropReason(d), default: 0] += 1 }
            sentByStranger += try sendUDP(from: stranger, to: target, batch)
            // Paced per round so the socket buffer never overflows and every datagram is counted.
            try waitFor("A counts round of the stranger's flood", timeout: 10) {
                let now = try counters(a)
                return expected.allSatisfy { now.drop($0.key) - before.drop($0.key) >= $0.value }
            }
        }

        // Peer B's address (a socket in B's namespace) sending what B may not send, and packets B may send but
        // whose TTL runs out in A: expired ones are dropped; the echoes with TTL 0 and 1 earn a time exceeded each,
        // the ICMP error and the non-first fragment none.
        let aPod = IPv4Address(10, 244, 1, 2)
        let fromB: [([UInt8], String)] = [
            (Forge.echo(source: IPv4Address(10, 244, 7, 7), destination: aPod), "spoofedSource"),
            (Forge.echo(source: IPv4Address(10, 244, 1, 9), destination: aPod), "spoofedSource"),
            (Forge.echo(source: IPv4Address(192, 168, 77, 2), destination: aPod), "spoofedSource"),
            (Forge.echo(source: IPv4Address(10, 244, 2, 2), destination: aPod, ttl: 0), "ttlExpired"),
            (Forge.echo(source: IPv4Address(10, 244, 2, 2), destination: aPod, ttl: 1), "ttlExpired"),
            (Forge.ipv4(source: IPv4Address(10, 244, 2, 2), destination: aPod, proto: 1,
                        payload: Self.icmpErrorAboutICMPError(), ttl: 1), "ttlExpired"),
            (Forge.ipv4(source: IPv4Address(10, 244, 2, 2), destination: aPod, proto: 17,
                        payload: Array(repeating: 7, count: 16), ttl: 1, flagsFragment: 0x0020), "ttlExpired"),
            ([0x45, 0, 0, 20], "malformed"),
            ([0x60] + Array(repeating: 0, count: 39), "notIPv4"),
        ]
        var fromBExpected: [String: Int] = [:]
        for (_, reason) in fromB { fromBExpected[reason, default: 0] += 1 }
        try sendUDP(from: b.ns, to: target, fromB.map(\.0))
        for (reason, n) in fromBExpected { expected[reason, default: 0] += n }
        try waitFor("A counts B's spoofed packets", timeout: 10) {
            let now = try counters(a)
            return expected.allSatisfy { now.drop($0.key) - before.drop($0.key) >= $0.value }
        }

        legit.wait()
        var after = try counters(a)
        try waitFor("A's counters settle") {
            let again = try counters(a)
            defer { after = again }
            return again.udpToTun == after.udpToTun && again.rx(b.subnet) == after.rx(b.subnet)
        }
        // Exact counts per reason, and nothing else dropped on the way in.
        for reason in ["malformed", "notIPv4", "unknownPeer", "spoofedSource", "ttlExpired", "oversize", "outsideNetwork"] {
            XCTAssertEqual(after.drop(reason) - before.drop(reason), expected[reason] ?? 0, "drops[\(reason)]")
        }
        XCTAssertEqual(after.drop("tunWriteFailed"), before.drop("tunWriteFailed"))
        // Two time exceeded, for B's echoes with TTL 0 and 1 (not for the ICMP error, not for the fragment, never
        // for the stranger).
        XCTAssertEqual(after.icmpSent - before.icmpSent, 2, "ICMP errors sent")
        // Everything written into A's tun came from peer B: the flood added nothing.
        XCTAssertEqual(after.udpToTun - before.udpToTun, after.rx(b.subnet) - before.rx(b.subnet),
                       "a datagram from someone other than peer B reached the tun")
        // Legitimate traffic kept flowing.
        XCTAssertEqual(pingResult.status, 0, pingResult.description)
        // (A ping may be lost to the TCP transfer filling a queue; not to the flood, which is paced.)
        let received = pingResult.stdout.firstMatch(of: /(\d+) received/).flatMap { Int($0.1) } ?? 0
        XCTAssertGreaterThanOrEqual(received, 290, pingResult.stdout)
        XCTAssertEqual(iperfResult.status, 0, iperfResult.description)
        XCTAssertEqual(kill(pid, 0), 0, "daemon died")
        XCTAssertEqual(try daemonPID(a), pid)
        XCTAssertEqual(ping(from: a.pod, b.podAddress).status, 0)
        print("hostile: stranger sent \(sentByStranger) datagrams, B sent \(fromB.count) spoofed; drops by reason: "
              + expected.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " "))
    }

    /// ~300 hostile datagrams from a non-peer.
    static func hostileBatch(_ rng: inout SeededRandom) -> [[UInt8]] {
        let aPod = IPv4Address(10, 244, 1, 2)
        let bPod = IPv4Address(10, 244, 2, 2)
        var out: [[UInt8]] = []
        // Random bytes of random length, including empty datagrams.
        for _ in 0..<150 {
            let n = Int.random(in: 0...1600, using: &rng)
            out.append((0..<n).map { _ in UInt8.random(in: 0...255, using: &rng) })
        }
        out.append([])
        // Random bytes behind a plausible IPv4 first byte (IHL 0...15).
        for ihl in 0...15 {
            var d = (0..<Int.random(in: 1...80, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
            d[0] = 0x40 | UInt8(ihl)
            out.append(d)
        }
        let echo = Forge.echo(source: bPod, destination: aPod)
        // Truncated: every prefix of a valid packet shorter than its total length.
        for n in 1..<echo.count { out.append(Array(echo[0..<n])) }
        // Wrong versions.
        for v: UInt8 in [0, 1, 5, 6, 15] { out.append([v << 4 | 5] + echo[1...]) }
        // Total length below the header, above the datagram, zero.
        for total in [0, 19, 48, 49, 65535] {
            var d = echo
            d[2] = UInt8(total >> 8); d[3] = UInt8(total & 0xff)
            out.append(d)
        }
        // Oversized: larger than any tun MTU, valid and not.
        for size in [1473, 9000, 65000] {
            let payload = (0..<(size - 20)).map { _ in UInt8.random(in: 0...255, using: &rng) }
            out.append(Forge.ipv4(source: bPod, destination: aPod, proto: 17, payload: payload))
            out.append((0..<size).map { _ in UInt8.random(in: 0...255, using: &rng) })
        }
        // Well formed, but the sender is no peer: forged sources (B's pod, A's own pod, outside), TTL 0/1,
        // fragments, ICMP errors about ICMP errors, options.
        for source in [bPod, aPod, IPv4Address(10, 244, 1, 0), IPv4Address(8, 8, 8, 8), IPv4Address(0, 0, 0, 0),
                       IPv4Address(255, 255, 255, 255), IPv4Address(224, 0, 0, 1)] {
            out.append(Forge.echo(source: source, destination: aPod))
        }
        for ttl: UInt8 in [0, 1, 2] { out.append(Forge.echo(source: bPod, destination: aPod, ttl: ttl)) }
        for frag: UInt16 in [0x2000, 0x2001, 0x0001, 0x1fff, 0x4000] {
            out.append(Forge.ipv4(source: bPod, destination: aPod, proto: 17, payload: Array(repeating: 1, count: 24),
                                  flagsFragment: frag))
        }
        out.append(Forge.ipv4(source: bPod, destination: aPod, proto: 1, payload: icmpErrorAboutICMPError()))
        out.append(Forge.ipv4(source: bPod, destination: aPod, proto: 1, payload: icmpErrorAboutICMPError(), ttl: 1))
        var withOptions = Forge.echo(source: bPod, destination: aPod)
        withOptions[0] = 0x46
        withOptions.insert(contentsOf: [1, 1, 1, 0], at: 20)
        withOptions[3] += 4
        out.append(withOptions)
        return out
    }

    /// An ICMP destination unreachable quoting an ICMP time exceeded.
    static func icmpErrorAboutICMPError() -> [UInt8] {
        let inner = Forge.ipv4(source: IPv4Address(10, 244, 1, 2), destination: IPv4Address(10, 244, 2, 2), proto: 1,
                               payload: Forge.icmp(type: 11, code: 0, data: Array(repeating: 0, count: 28)))
        return Forge.icmp(type: 3, code: 1, data: Array(inner.prefix(48)))
    }
}
