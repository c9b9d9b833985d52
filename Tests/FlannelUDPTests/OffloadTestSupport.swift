import CShims
@testable import FlannelCore
@testable import FlannelUDP
#if canImport(Glibc)
import Glibc
#endif

/// Reference TCP/IPv4 packets for the offload tests, built field by field with the plain RFC 1071 loop
/// (`referenceChecksum`), independently of the code under test.
struct TCPPacketSpec {
    var source = ip("10.244.1.2")
    var destination = ip("10.244.2.5")
    var sourcePort: UInt16 = 40000
    var destinationPort: UInt16 = 5201
    var identification: UInt16 = 0x1000
    var ttl: UInt8 = 63
    var tos: UInt8 = 0
    var flagsFragment: UInt16 = 0x4000  // DF
    var ipOptions: [UInt8] = []
    var sequence: UInt32 = 0xFFFF_F000  // wraps inside the larger tests
    var acknowledgment: UInt32 = 0x0102_0304
    var flags: UInt8 = TCPHeader.ack
    var window: UInt16 = 502
    var tcpOptions: [UInt8] = timestampOption(tsval: 0x11223344, tsecr: 0x55667788)
    var payload: [UInt8] = []

    /// The whole packet with correct checksums (or, with `partialChecksum`, the TCP checksum field holding only
    /// the pseudo-header sum, as a NEEDS_CSUM packet does).
    func bytes(partialChecksum: Bool = false) -> [UInt8] {
        precondition(ipOptions.count % 4 == 0 && tcpOptions.count % 4 == 0)
        let ihl = 20 + ipOptions.count
        let thl = 20 + tcpOptions.count
        let total = ihl + thl + payload.count
        var ipHeader = [UInt8](repeating: 0, count: 20)
        ipHeader[0] = 0x40 | UInt8(ihl / 4)
        ipHeader[1] = tos
        put16(&ipHeader, 2, UInt16(total))
        put16(&ipHeader, 4, identification)
        put16(&ipHeader, 6, flagsFragment)
        ipHeader[8] = ttl
        ipHeader[9] = 6
        put32(&ipHeader, 12, source.value)
        put32(&ipHeader, 16, destination.value)
        ipHeader += ipOptions
        put16(&ipHeader, 10, referenceChecksum(ipHeader))

        var tcp = [UInt8](repeating: 0, count: 20)
        put16(&tcp, 0, sourcePort)
        put16(&tcp, 2, destinationPort)
        put32(&tcp, 4, sequence)
        put32(&tcp, 8, acknowledgment)
        tcp[12] = UInt8(thl / 4) << 4
        tcp[13] = flags
        put16(&tcp, 14, window)
        tcp += tcpOptions + payload
        let pseudo = pseudoHeader(length: tcp.count)
        if partialChecksum {
            put16(&tcp, 16, ~referenceChecksum(pseudo))
        } else {
            put16(&tcp, 16, referenceChecksum(pseudo + tcp))
        }
        return ipHeader + tcp
    }

    func pseudoHeader(length: Int) -> [UInt8] {
        var p = [UInt8](repeating: 0, count: 12)
        put32(&p, 0, source.value)
        put32(&p, 4, destination.value)
        p[9] = 6
        put16(&p, 10, UInt16(length))
        return p
    }
}

func timestampOption(tsval: UInt32, tsecr: UInt32) -> [UInt8] {
    var o: [UInt8] = [1, 1, 8, 10, 0, 0, 0, 0, 0, 0, 0, 0]
    put32(&o, 4, tsval)
    put32(&o, 8, tsecr)
    return o
}

func put16(_ b: inout [UInt8], _ at: Int, _ v: UInt16) {
    b[at] = UInt8(v >> 8)
    b[at + 1] = UInt8(v & 0xFF)
}

func put32(_ b: inout [UInt8], _ at: Int, _ v: UInt32) {
    for j in 0..<4 { b[at + j] = UInt8(truncatingIfNeeded: v >> (24 - 8 * j)) }
}

/// True when the IPv4 header checksum and the TCP or UDP checksum (with its pseudo-header) of `packet` verify
/// by full recomputation.
func checksumsVerify(_ packet: [UInt8]) -> Bool {
    let ihl = Int(packet[0] & 0x0F) * 4
    guard referenceChecksum(Array(packet[0..<ihl])) == 0 else { return false }
    let total = Int(word(packet, 2))
    var pseudo = Array(packet[12..<20]) + [0, packet[9], 0, 0]
    put16(&pseudo, 10, UInt16(total - ihl))
    return referenceChecksum(pseudo + Array(packet[ihl..<total])) == 0
}

/// The bytes of segment `k` of a send queue, its pieces joined.
func queuedSegment(_ q: SendQueue, _ k: Int) -> [UInt8] {
    var out: [UInt8] = []
    for j in 0..<q.segmentParts[k] {
        let v = q.iovs[q.segmentIov[k] + j]
        out += Array(UnsafeRawBufferPointer(start: v.iov_base, count: v.iov_len))
    }
    return out
}

/// Payload bytes that make every position distinct (so a misplaced byte shows).
func patternPayload(_ count: Int, seed: UInt8 = 0) -> [UInt8] {
    (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ $0 >> 8 &+ Int(seed)) }
}
