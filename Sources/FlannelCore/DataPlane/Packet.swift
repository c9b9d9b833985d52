/// A validated view of the IPv4 header at the start of a raw buffer: the fields the forwarding decision needs,
/// read once with unaligned big-endian loads. It holds no reference to the buffer and never allocates.
public struct IPv4Packet: Equatable, Sendable {
    /// Header length in bytes (IHL * 4), 20...60.
    public var headerLength: Int
    /// The header's total length field: the packet's real length, which may be less than the bytes read.
    public var totalLength: Int
    public var ttl: UInt8
    public var proto: UInt8
    /// The flags/fragment-offset word as it stands (DF, MF, offset).
    public var flagsFragment: UInt16
    public var source: IPv4Address
    public var destination: IPv4Address

    /// The fragment offset in 8-byte units; non-zero for every fragment but the first.
    public var fragmentOffset: UInt16 { flagsFragment & IPv4Header.fragmentOffsetMask }

    /// What `parse` found.
    public enum Parse: Equatable, Sendable {
        case valid(IPv4Packet)
        case invalid(DropReason)
    }

    /// Validates the IPv4 packet at the start of `bytes` (the bytes read from the tun or received in a datagram):
    /// version 4 (anything else, such as the IPv6 router solicitations the kernel sends on every new device, is
    /// `notIPv4`), IHL >= 5, the header fits in what was read, and IHL * 4 <= total length <= bytes read.
    /// Bytes after the total length (padding) are allowed and ignored; the caller forwards `totalLength` bytes.
    /// The header checksum is not verified: the receiving kernel does that, and the incremental TTL update keeps a
    /// bad checksum bad (RFC 1624 section 2).
    public static func parse(_ bytes: UnsafeRawBufferPointer) -> Parse {
        guard bytes.count >= 1 else { return .invalid(.malformed) }
        let h = IPv4TCPHeaders(bytes)
        guard h.version == 4 else { return .invalid(.notIPv4) }
        let headerLength = h.headerLength
        guard headerLength >= IPv4Header.minimumLength, bytes.count >= headerLength else {
            return .invalid(.malformed)
        }
        let total = h.totalLength
        guard total >= headerLength, total <= bytes.count else { return .invalid(.malformed) }
        return .valid(IPv4Packet(
            headerLength: headerLength,
            totalLength: total,
            ttl: h.ttl,
            proto: h.proto,
            flagsFragment: h.flagsFragment,
            source: IPv4Address(h.source),
            destination: IPv4Address(h.destination)))
    }
}
