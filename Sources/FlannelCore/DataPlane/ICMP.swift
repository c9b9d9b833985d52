#if canImport(Glibc)
import Glibc
#endif

/// ICMP error messages the data plane generates (RFC 792), and the rules for when it may (RFC 1122 3.2.2,
/// RFC 1812 4.3.2.7). Messages are built into a caller's preallocated buffer; nothing allocates.
public enum ICMPError {
    /// Type 3 code 0, destination unreachable / net unreachable: no peer route for the destination.
    case netUnreachable
    /// Type 11 code 0, time exceeded in transit: the TTL would have reached 0.
    case timeExceeded

    public var type: UInt8 { self == .netUnreachable ? 3 : 11 }
    public var code: UInt8 { 0 }

    /// RFC 1812 4.3.2.3: an ICMP error holds the original IP header and data such that the whole message is no
    /// longer than 576 bytes.
    public static let maximumLength = 576
    /// Our IP header (no options) + ICMP header (8).
    public static let headersLength = IPv4Header.minimumLength + ICMPError.icmpHeaderLength
    /// Type, code, checksum and 4 unused bytes.
    static let icmpHeaderLength = 8

    /// ICMP types that are themselves error messages: destination unreachable, source quench, redirect, time
    /// exceeded, parameter problem. No error is ever sent about one of these (RFC 1122 3.2.2); queries such as
    /// echo request do get errors, so a pod's `ping` learns that a network is unreachable (flannel suppresses
    /// errors about every ICMP packet).
    public static func isErrorType(_ type: UInt8) -> Bool {
        switch type {
        case 3, 4, 5, 11, 12: return true
        default: return false
        }
    }

    /// True when the source address does not name a single host, so no error may be sent to it (RFC 1812
    /// 4.3.2.7): "this network" 0/8, loopback 127/8, multicast 224/4, class E 240/4 (which includes the limited
    /// broadcast 255.255.255.255).
    public static func isUnsuitableSource(_ a: IPv4Address) -> Bool {
        let top = a.value >> 24
        return top == 0 || top == 127 || top >= 224
    }

    /// Whether an ICMP error about `packet` (whose bytes are `bytes`) is allowed by the RFCs: not about an ICMP
    /// error message, not about a fragment other than the first, not to a source that is not a single host, and
    /// not about a datagram sent to a multicast or broadcast destination (RFC 1122 3.2.2).
    public static func mayReport(_ packet: IPv4Packet, _ bytes: UnsafeRawBufferPointer) -> Bool {
        if packet.fragmentOffset != 0 { return false }
        if isUnsuitableSource(packet.source) { return false }
        if packet.destination.value >> 28 == 0xE || packet.destination.value == UInt32.max { return false }
        if packet.proto == IPv4Header.protocolICMP {
            // Without its type byte we cannot tell whether it is an error: stay silent.
            guard packet.totalLength > packet.headerLength else { return false }
            if isErrorType(bytes[packet.headerLength]) { return false }
        }
        return true
    }

    /// Writes this ICMP error about `original` (the offending packet: its header and as much of its data as
    /// fits in 576 bytes, up to its total length) into `buffer`, as a complete IPv4 packet from `source` to
    /// the original's source: TTL 64, TOS 0xC0 (precedence "internetwork control", as RFC 1812 4.3.2.5
    /// suggests and Linux does), DF clear, identification `identification`, both checksums filled in.
    ///
    /// - Returns: the message's length, or 0 when `buffer` is too small (it needs at most 576 bytes).
    /// - Precondition: `packet` is `IPv4Packet.parse(original)`'s result.
    public func build(about packet: IPv4Packet, _ original: UnsafeRawBufferPointer, source: IPv4Address,
                      identification: UInt16, into buffer: UnsafeMutableRawBufferPointer) -> Int {
        let quoted = min(packet.totalLength, ICMPError.maximumLength - ICMPError.headersLength)
        let length = ICMPError.headersLength + quoted
        guard buffer.count >= length else { return 0 }
        // IP header.
        let ip = IPv4Header.minimumLength
        buffer[IPv4Header.versionIHL] = IPv4Header.versionIHLWithoutOptions
        buffer[IPv4Header.tos] = 0xC0
        buffer.storeBytes(of: UInt16(length).bigEndian, toByteOffset: IPv4Header.totalLength, as: UInt16.self)
        buffer.storeBytes(of: identification.bigEndian, toByteOffset: IPv4Header.identification, as: UInt16.self)
        buffer.storeBytes(of: UInt16(0), toByteOffset: IPv4Header.flagsFragment, as: UInt16.self)
        buffer[IPv4Header.ttl] = 64
        buffer[IPv4Header.proto] = IPv4Header.protocolICMP
        buffer.storeBytes(of: UInt16(0), toByteOffset: IPv4Header.checksum, as: UInt16.self)
        buffer.storeBytes(of: source.value.bigEndian, toByteOffset: IPv4Header.source, as: UInt32.self)
        buffer.storeBytes(of: packet.source.value.bigEndian, toByteOffset: IPv4Header.destination, as: UInt32.self)
        let ipSum = InternetChecksum.compute(UnsafeRawBufferPointer(rebasing: buffer[0..<ip]))
        buffer.storeBytes(of: ipSum.bigEndian, toByteOffset: IPv4Header.checksum, as: UInt16.self)
        // ICMP header: type, code, checksum, 4 unused bytes (zero for both types we send).
        buffer[ip] = type
        buffer[ip &+ 1] = code
        buffer.storeBytes(of: UInt16(0), toByteOffset: ip &+ 2, as: UInt16.self)
        buffer.storeBytes(of: UInt32(0), toByteOffset: ip &+ 4, as: UInt32.self)
        UnsafeMutableRawBufferPointer(rebasing: buffer[ICMPError.headersLength..<length])
            .copyMemory(from: UnsafeRawBufferPointer(rebasing: original[0..<quoted]))
        let icmpSum = InternetChecksum.compute(UnsafeRawBufferPointer(rebasing: buffer[ip..<length]))
        buffer.storeBytes(of: icmpSum.bigEndian, toByteOffset: ip &+ 2, as: UInt16.self)
        return length
    }
}

/// A token bucket limiting the ICMP errors one worker generates, like Linux's icmp_ratelimit/icmp_msgs_burst:
/// by default 1000 per second with bursts of 50. It belongs to one worker thread (a value type used by that
/// thread only), so it needs no lock or atomic; the clock is read only when an error is about to be built.
public struct ICMPRateLimiter: Sendable {
    public let ratePerSecond: UInt64
    public let burst: UInt64
    private let nanosPerToken: UInt64
    private var tokens: UInt64
    private var lastRefill: UInt64
    private let clock: @Sendable () -> UInt64

    /// - Parameter clock: monotonic nanoseconds; the default reads CLOCK_MONOTONIC_COARSE (vDSO, no syscall).
    public init(ratePerSecond: UInt64 = 1000, burst: UInt64 = 50,
                clock: @escaping @Sendable () -> UInt64 = ICMPRateLimiter.coarseMonotonicNanoseconds) {
        precondition(ratePerSecond > 0 && burst > 0)
        self.ratePerSecond = ratePerSecond
        self.burst = burst
        nanosPerToken = max(1, 1_000_000_000 / ratePerSecond)
        tokens = burst
        self.clock = clock
        lastRefill = clock()
    }

    /// Takes a token if there is one.
    public mutating func allow() -> Bool {
        let now = clock()
        if now > lastRefill {
            let earned = (now - lastRefill) / nanosPerToken
            if earned > 0 {
                if tokens + earned >= burst {
                    tokens = burst
                    lastRefill = now
                } else {
                    tokens += earned
                    lastRefill += earned * nanosPerToken
                }
            }
        }
        guard tokens > 0 else { return false }
        tokens -= 1
        return true
    }

    /// CLOCK_MONOTONIC_COARSE in nanoseconds: the cheapest clock (vDSO, no syscall, no TSC read), but it moves
    /// only once per scheduler tick (4 ms at HZ=250). For rates per second (this limiter, `LogLimiter`), never
    /// for a duration shorter than a tick: `DuplexLoop` times its spin with CLOCK_MONOTONIC, and CoDel uses the
    /// kernel's receive timestamps.
    public static func coarseMonotonicNanoseconds() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC_COARSE, &ts)
        return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
    }
}
