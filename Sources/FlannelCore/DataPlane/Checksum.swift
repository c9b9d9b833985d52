/// The internet checksum (RFC 1071) and its incremental update (RFC 1624), on raw packet memory.
///
/// Everything here works on one's complement sums of big-endian 16-bit words, read with unaligned loads so a packet
/// may start at any byte of a buffer. Nothing allocates.
public enum InternetChecksum {
    /// Adds the buffer's bytes, as big-endian 16-bit words, to `initial` without folding. An odd trailing byte is
    /// padded with a zero byte, as RFC 1071 says. The result is a 32-bit accumulator; call `fold` to get 16 bits.
    /// Any `initial` is safe: the buffer's own sum is folded to 16 bits before `initial` is added.
    ///
    /// This is the data plane's hottest loop (every byte of every segmented super-packet goes through it), so it
    /// sums in the host's byte order and swaps once at the end (RFC 1071 section 2(B), byte order independence):
    /// the low and high 32-bit halves of native 64-bit loads go into two 64-bit accumulators, with no byte swaps
    /// and no carry handling, a loop the compiler vectorizes (about 4x the byte-swapping loop it replaced). Each
    /// accumulator gains less than 2^32 per 8 bytes, so no packet can overflow it.
    @inline(__always)
    public static func sum(_ bytes: UnsafeRawBufferPointer, initial: UInt32 = 0) -> UInt32 {
        let n = bytes.count
        guard let base = bytes.baseAddress, n > 0 else { return initial }
        var low: UInt64 = 0
        var high: UInt64 = 0
        let quads = n &>> 3
        for i in 0..<quads {
            let w = base.loadUnaligned(fromByteOffset: i &<< 3, as: UInt64.self)
            low &+= w & 0xFFFF_FFFF
            high &+= w &>> 32
        }
        var acc = low &+ high
        var i = quads &<< 3
        if n &- i >= 4 {
            acc &+= UInt64(base.loadUnaligned(fromByteOffset: i, as: UInt32.self))
            i &+= 4
        }
        let rest = n &- i
        if rest != 0 {
            // The last 1-3 bytes at their places in a zeroed word: an odd byte gets its zero pad (RFC 1071).
            var tail: UInt32 = 0
            withUnsafeMutableBytes(of: &tail) {
                $0.baseAddress!.copyMemory(from: base + i, byteCount: rest)
            }
            acc &+= UInt64(tail)
        }
        // Fold 64 -> 16 bits with end-around carries, still in host order, then to big-endian order.
        acc = (acc & 0xFFFF_FFFF) &+ (acc &>> 32)
        acc = (acc & 0xFFFF_FFFF) &+ (acc &>> 32)
        var s = UInt32(truncatingIfNeeded: acc)
        s = (s & 0xFFFF) &+ (s &>> 16)
        s = (s & 0xFFFF) &+ (s &>> 16)
        let own = UInt16(bigEndian: UInt16(truncatingIfNeeded: s))
        var total = UInt64(initial) &+ UInt64(own)
        total = (total & 0xFFFF_FFFF) &+ (total &>> 32)
        return UInt32(truncatingIfNeeded: total)
    }

    /// Folds a 32-bit accumulator into a 16-bit one's complement sum (end-around carry).
    public static func fold(_ sum: UInt32) -> UInt16 {
        var s = sum
        while s >> 16 != 0 { s = (s & 0xFFFF) &+ (s >> 16) }
        return UInt16(s)
    }

    /// The checksum to put in a header: the complement of the folded sum of `bytes` (with the checksum field zero).
    @inline(__always)
    public static func compute(_ bytes: UnsafeRawBufferPointer) -> UInt16 {
        ~fold(sum(bytes))
    }

    /// RFC 1624 equation 3: the new checksum after one 16-bit word of the covered data changes from `old` to
    /// `new`: HC' = ~(~HC + ~m + m'). Unlike equation 2 it never turns a valid checksum into 0xFFFF (-0).
    public static func update(_ checksum: UInt16, oldWord: UInt16, newWord: UInt16) -> UInt16 {
        ~fold(UInt32(~checksum) &+ UInt32(~oldWord) &+ UInt32(newWord))
    }
}

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
    /// The "don't fragment" bit in the flags/fragment-offset word.
    public static let dontFragment: UInt16 = 0x4000
    /// The fragment offset bits (in units of 8 bytes).
    public static let fragmentOffsetMask: UInt16 = 0x1FFF

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
