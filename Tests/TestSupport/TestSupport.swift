#if canImport(Glibc)
import Glibc
#endif
import FlannelCore
import Foundation

// What the unit tests and the integration tests (two modules) both need.

/// Polls `condition` every `interval` until it holds or `timeout` passes; returns whether it held (a last look
/// is taken at the deadline). For waiting on the system (a process to appear, a counter to move, datagrams to
/// arrive) without fixed sleeps.
public func waitUntil(timeout: TimeInterval = 5, interval: TimeInterval = 0.01,
                      _ condition: () throws -> Bool) rethrows -> Bool {
    let deadline = Date().addingTimeInterval(timeout)
    while true {
        if try condition() { return true }
        if Date() >= deadline { return false }
        Thread.sleep(forTimeInterval: interval)
    }
}

/// SplitMix64: small, fast and seeded, so a failing property test or flood can be replayed exactly.
public struct SeededRandom: RandomNumberGenerator {
    public var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// Sends `bytes` as one datagram from the UDP socket `fd` to `endpoint`: sendto's result (-1 with errno set).
public func sendDatagram(_ bytes: [UInt8], from fd: Int32, to endpoint: Endpoint) -> Int {
    bytes.withUnsafeBytes { b in endpoint.withSocketAddress { sendto(fd, b.baseAddress, b.count, 0, $0, $1) } }
}

/// What `cleanup` prints, in order, to remove flanneld's masquerade rules for network 10.244.0.0/16 as its
/// iptables and nftables modes leave them (one jump each; the ip6tables nat chain of its IPv6 side; the nftables
/// table for IPv4): the plan's unit test and the CLI's test in a namespace expect the same lines.
public let flanneldMasqueradeCleanup = [
    "delete iptables rule -t nat -A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG",
    "delete iptables chain -t nat FLANNEL-POSTRTG (1 rule)",
    "delete iptables rule -t filter -A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD",
    "delete iptables chain -t filter FLANNEL-FWD (1 rule)",
    "delete ip6tables rule -t nat -A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG",
    "delete ip6tables chain -t nat FLANNEL-POSTRTG (1 rule)",
    "delete nftables table ip flannel-ipv4",
]
