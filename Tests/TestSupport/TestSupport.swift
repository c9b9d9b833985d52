#if canImport(Glibc)
import Glibc
#endif
import FlannelCore

// What the unit tests and the integration tests (two modules) both need.

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
