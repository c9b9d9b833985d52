/// The IPv4 and TCP headers as the data plane reads and writes them: their offsets and constants, stated once, and
/// `IPv4TCPHeaders`, the view every reader of packet headers goes through.

/// Offsets and constants of the IPv4 header (RFC 791) used across the data plane.
public enum IPv4Header {
    public static let minimumLength = 20
    public static let versionIHL = 0
    public static let tos = 1
    public static let totalLength = 2
    public static let identification = 4
    public static let flagsFragment = 6
    public static let ttl = 8
    public static let proto = 9
    public static let checksum = 10
    public static let source = 12
    public static let destination = 16

    public static let protocolICMP: UInt8 = 1
    public static let protocolTCP: UInt8 = 6
    public static let protocolUDP: UInt8 = 17
    /// The first byte of a header without options: version 4, IHL 5 (20 bytes).
    public static let versionIHLWithoutOptions: UInt8 = 0x45
    /// The "don't fragment" bit in the flags/fragment-offset word.
    public static let dontFragment: UInt16 = 0x4000
    /// The fragment offset bits (in units of 8 bytes).
    public static let fragmentOffsetMask: UInt16 = 0x1FFF
    /// The "more fragments" bit and the fragment offset: a packet is a fragment (first, middle or last) when any
    /// of them is set.
    public static let fragmentBits: UInt16 = 0x3FFF

    /// The header length in bytes (IHL * 4, 0...60) from the version/IHL byte.
    @inline(__always)
    public static func headerLength(versionIHL: UInt8) -> Int { Int(versionIHL & 0x0F) &* 4 }

    /// Decrements the TTL of the IPv4 header at the start of `packet` and patches the header checksum with the
    /// RFC 1624 incremental update (the TTL shares a 16-bit word with the protocol byte).
    ///
    /// - Returns: false, leaving the packet untouched, when the TTL is 0 or 1: forwarding would send it with TTL 0,
    ///   which RFC 1812 5.3.1 forbids; the caller drops it (and may send ICMP time exceeded).
    /// - Precondition: `packet` holds at least 20 bytes (checked by `IPv4Packet.parse` first).
    public static func decrementTTL(_ packet: UnsafeMutableRawBufferPointer) -> Bool {
        let ttlValue = packet[ttl]
        if ttlValue <= 1 { return false }
        let oldWord = UInt16(bigEndian: packet.loadUnaligned(fromByteOffset: ttl, as: UInt16.self))
        let newWord = oldWord &- 0x0100
        let oldSum = UInt16(bigEndian: packet.loadUnaligned(fromByteOffset: checksum, as: UInt16.self))
        let newSum = InternetChecksum.update(oldSum, oldWord: oldWord, newWord: newWord)
        packet[ttl] = ttlValue &- 1
        packet.storeBytes(of: newSum.bigEndian, toByteOffset: checksum, as: UInt16.self)
        return true
    }
}

/// Offsets and flags of the TCP header (RFC 9293) that segmentation and coalescing touch.
package enum TCPHeader {
    package static let minimumLength = 20
    package static let sequence = 4
    package static let acknowledgment = 8
    package static let dataOffset = 12
    package static let flags = 13
    package static let window = 14
    package static let checksum = 16
    package static let protocolNumber = IPv4Header.protocolTCP

    package static let fin: UInt8 = 0x01
    package static let syn: UInt8 = 0x02
    package static let rst: UInt8 = 0x04
    package static let psh: UInt8 = 0x08
    /// The flags that open, close or reset a connection (what the express lane takes from a TCP flow).
    package static let synFinRst: UInt8 = syn | fin | rst
    package static let ack: UInt8 = 0x10
    package static let urg: UInt8 = 0x20
    package static let ece: UInt8 = 0x40
    package static let cwr: UInt8 = 0x80

    /// The header length in bytes (data offset * 4, 0...60) from the data offset byte.
    @inline(__always)
    package static func headerLength(dataOffset byte: UInt8) -> Int { Int(byte >> 4) &* 4 }
}

/// The IPv4 header at the start of packet memory and the TCP header after it, read in place: the one way the data
/// plane reads these headers (the forwarding decision's `IPv4Packet.parse`, TSO segmentation, coalescing, ICMP,
/// flow steering). Every read is an unaligned big-endian load at a fixed offset; nothing is checked here (the
/// caller checks the length first) and nothing allocates.
package struct IPv4TCPHeaders {
    package let base: UnsafeRawPointer

    @inline(__always)
    package init(_ base: UnsafeRawPointer) { self.base = base }

    @inline(__always)
    package init(_ bytes: UnsafeRawBufferPointer) { base = bytes.baseAddress! }

    @inline(__always)
    private func u16(_ offset: Int) -> UInt16 {
        UInt16(bigEndian: base.loadUnaligned(fromByteOffset: offset, as: UInt16.self))
    }

    @inline(__always)
    private func u32(_ offset: Int) -> UInt32 {
        UInt32(bigEndian: base.loadUnaligned(fromByteOffset: offset, as: UInt32.self))
    }

    // IPv4.
    package var versionIHL: UInt8 { base.load(fromByteOffset: IPv4Header.versionIHL, as: UInt8.self) }
    package var version: UInt8 { versionIHL >> 4 }
    /// IHL * 4: where the TCP (or other transport) header starts.
    package var headerLength: Int { IPv4Header.headerLength(versionIHL: versionIHL) }
    package var totalLength: Int { Int(u16(IPv4Header.totalLength)) }
    package var identification: UInt16 { u16(IPv4Header.identification) }
    package var flagsFragment: UInt16 { u16(IPv4Header.flagsFragment) }
    /// Any fragment: more fragments set or a non-zero offset.
    package var isFragment: Bool { flagsFragment & IPv4Header.fragmentBits != 0 }
    package var ttl: UInt8 { base.load(fromByteOffset: IPv4Header.ttl, as: UInt8.self) }
    package var proto: UInt8 { base.load(fromByteOffset: IPv4Header.proto, as: UInt8.self) }
    package var source: UInt32 { u32(IPv4Header.source) }
    package var destination: UInt32 { u32(IPv4Header.destination) }

    // TCP, at `offset` (the IPv4 header length).
    package func tcpHeaderLength(at offset: Int) -> Int {
        TCPHeader.headerLength(dataOffset: base.load(fromByteOffset: offset &+ TCPHeader.dataOffset, as: UInt8.self))
    }
    package func tcpSequence(at offset: Int) -> UInt32 { u32(offset &+ TCPHeader.sequence) }
    package func tcpAcknowledgment(at offset: Int) -> UInt32 { u32(offset &+ TCPHeader.acknowledgment) }
    package func tcpWindow(at offset: Int) -> UInt16 { u16(offset &+ TCPHeader.window) }
    package func tcpFlags(at offset: Int) -> UInt8 {
        base.load(fromByteOffset: offset &+ TCPHeader.flags, as: UInt8.self)
    }
    /// The first 32 bits of the transport header (the port pair of TCP and UDP).
    package func portWord(at offset: Int) -> UInt32 { u32(offset) }
}
