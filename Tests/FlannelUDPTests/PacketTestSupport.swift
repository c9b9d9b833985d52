#if canImport(Glibc)
import Glibc
#endif
@testable import FlannelCore
@testable import FlannelUDP
import TestSupport

/// Helpers shared by the data plane's unit tests: packet construction, hex (the seeded generator is TestSupport's).

func hexBytes(_ hex: String) -> [UInt8] {
    let chars = Array(hex.utf8)
    precondition(chars.count % 2 == 0)
    func nibble(_ c: UInt8) -> UInt8 {
        switch c {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): return c - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): return c - UInt8(ascii: "a") + 10
        default: preconditionFailure("bad hex")
        }
    }
    return stride(from: 0, to: chars.count, by: 2).map { nibble(chars[$0]) << 4 | nibble(chars[$0 + 1]) }
}

func hexString(_ bytes: some Sequence<UInt8>) -> String {
    bytes.map { b in
        let s = String(b, radix: 16)
        return s.count == 1 ? "0" + s : s
    }.joined()
}

/// Reference checksum: the plain RFC 1071 loop over 16-bit words, no tricks.
func referenceChecksum(_ bytes: [UInt8]) -> UInt16 {
    var sum: UInt32 = 0
    var i = 0
    while i < bytes.count {
        let hi = UInt32(bytes[i])
        let lo = i + 1 < bytes.count ? UInt32(bytes[i + 1]) : 0
        sum += hi << 8 | lo
        i += 2
    }
    while sum >> 16 != 0 { sum = (sum & 0xFFFF) + (sum >> 16) }
    return ~UInt16(sum)
}

func ip(_ text: String) -> IPv4Address { IPv4Address(text)! }
func net(_ text: String) -> IPv4Network { try! IPv4Network(parsing: text) }

/// Builds an IPv4 packet (20-byte header, valid checksum) around `payload`.
func makeIPv4(source: IPv4Address, destination: IPv4Address, proto: UInt8 = 17, ttl: UInt8 = 64,
              identification: UInt16 = 0x1234, flagsFragment: UInt16 = 0, payload: [UInt8] = [1, 2, 3, 4]) -> [UInt8] {
    var p = [UInt8](repeating: 0, count: 20)
    p[0] = 0x45
    let total = 20 + payload.count
    p[2] = UInt8(total >> 8); p[3] = UInt8(total & 0xFF)
    p[4] = UInt8(identification >> 8); p[5] = UInt8(identification & 0xFF)
    p[6] = UInt8(flagsFragment >> 8); p[7] = UInt8(flagsFragment & 0xFF)
    p[8] = ttl
    p[9] = proto
    for (i, v) in [source.value, destination.value].enumerated() {
        for j in 0..<4 { p[12 + 4 * i + j] = UInt8(truncatingIfNeeded: v >> (24 - 8 * j)) }
    }
    let c = referenceChecksum(p)
    p[10] = UInt8(c >> 8); p[11] = UInt8(c & 0xFF)
    return p + payload
}

/// An ICMP message (type, code, 4 bytes rest, data) with its checksum.
func makeICMP(type: UInt8, code: UInt8 = 0, rest: [UInt8] = [0, 0, 0, 0], data: [UInt8] = []) -> [UInt8] {
    var m = [type, code, 0, 0] + rest + data
    let c = referenceChecksum(m)
    m[2] = UInt8(c >> 8); m[3] = UInt8(c & 0xFF)
    return m
}

/// Runs `body` with the bytes copied into fresh memory starting `offset` bytes into an allocation, so that the
/// code under test sees a misaligned packet when `offset` is odd; returns the bytes as modified.
@discardableResult
func withMutablePacket<R>(_ bytes: [UInt8], offset: Int = 0,
                          _ body: (UnsafeMutableRawBufferPointer) throws -> R) rethrows -> (R, [UInt8]) {
    let raw = UnsafeMutableRawBufferPointer.allocate(byteCount: bytes.count + offset + 1, alignment: 16)
    defer { raw.deallocate() }
    let slice = UnsafeMutableRawBufferPointer(rebasing: raw[offset..<(offset + bytes.count)])
    slice.copyBytes(from: bytes)
    let r = try body(slice)
    return (r, Array(slice))
}

func word(_ p: [UInt8], _ offset: Int) -> UInt16 { UInt16(p[offset]) << 8 | UInt16(p[offset + 1]) }

/// `count` bytes of `value`.
func filled(_ value: UInt8, _ count: Int) -> [UInt8] { [UInt8](repeating: value, count: count) }

/// The packet a coalescer's gather list writes after its virtio header (pieces 1...), gathered into one array.
func packetBytes(of pieces: UnsafeBufferPointer<iovec>) -> [UInt8] {
    var bytes: [UInt8] = []
    for piece in pieces.dropFirst() {
        bytes += UnsafeRawBufferPointer(start: piece.iov_base, count: piece.iov_len)
    }
    return bytes
}

/// The length of that packet, without copying (for the allocation test).
func packetLength(of pieces: UnsafeBufferPointer<iovec>) -> Int {
    var n = 0
    var i = 1
    while i < pieces.count {
        n &+= pieces[i].iov_len
        i &+= 1
    }
    return n
}
