#if canImport(Glibc)
import Glibc
#endif

/// TCP segmentation in userspace: the tun hands us a TCP "super-packet" (TSO, up to 64 KiB, one IPv4 header)
/// and we cut it into whole IPv4 packets that each fit the tun MTU, exactly as the kernel's tcp_gso_segment would
/// on a device without TSO: per segment a copy of the headers with
///   - IPv4 total length for that segment, identification + k, header checksum recomputed;
///   - TCP sequence number advanced by k * gso_size; FIN and PSH only on the last segment, CWR only on the first;
///   - the full TCP checksum (pseudo-header, header, payload), whatever the super-packet's field held (with
///     NEEDS_CSUM it is only the pseudo-header sum).
/// The payload stays where the tun read put it; only headers are written (into the send queue's header slots).
/// The caller has already routed the super-packet and decremented its TTL, once for all segments.
package enum TCPSegmenter {
    package enum Outcome: Equatable {
        /// `n` segments were appended to the queue.
        case segmented(Int)
        /// Not a TCP/IPv4 packet that can be segmented (fragment, short headers, gso size 0, ...).
        case invalid
        /// More segments than the queue can ever hold (a tiny gso size): dropped.
        case tooManySegments
    }

    /// Segments needed for `packet` at `gsoSize` bytes of payload each (0 when it cannot be segmented).
    package static func segmentCount(_ packet: UnsafeRawBufferPointer, gsoSize: Int) -> Int {
        guard let (headerLength, total) = headers(packet), gsoSize > 0 else { return 0 }
        let payload = total &- headerLength
        return payload == 0 ? 1 : (payload &+ gsoSize &- 1) / gsoSize
    }

    /// The length of the IPv4 + TCP headers and the packet's total length, when `packet` is an unfragmented
    /// TCP/IPv4 packet whose headers fit.
    @inline(__always)
    package static func headers(_ packet: UnsafeRawBufferPointer) -> (Int, Int)? {
        guard packet.count >= IPv4Header.minimumLength &+ TCPHeader.minimumLength else { return nil }
        let h = IPv4TCPHeaders(packet)
        let ihl = h.headerLength
        guard h.version == 4, ihl >= IPv4Header.minimumLength, h.proto == TCPHeader.protocolNumber else { return nil }
        let total = h.totalLength
        guard total <= packet.count, !h.isFragment, ihl &+ TCPHeader.minimumLength <= total else { return nil }
        let thl = h.tcpHeaderLength(at: ihl)
        guard thl >= TCPHeader.minimumLength, ihl &+ thl <= total else { return nil }
        return (ihl &+ thl, total)
    }

    /// Cuts `packet` into segments of at most `gsoSize` payload bytes and appends them to `queue` for `peer`
    /// (all of one flow key, `flow`).
    /// - Precondition: the queue has room for `segmentCount(packet, gsoSize:)` segments, or is empty.
    package static func segment(_ packet: UnsafeMutableRawBufferPointer, gsoSize: Int, peer: Int, name: sockaddr_in,
                                into queue: SendQueue, flow: UInt32 = 0) -> Outcome {
        let bytes = UnsafeRawBufferPointer(packet)
        guard gsoSize > 0, let (headerLength, total) = headers(bytes) else { return .invalid }
        let h = IPv4TCPHeaders(bytes)
        let ihl = h.headerLength
        let thl = headerLength &- ihl
        let payloadLength = total &- headerLength
        let count = payloadLength == 0 ? 1 : (payloadLength &+ gsoSize &- 1) / gsoSize
        if count > queue.capacity { return .tooManySegments }
        precondition(count <= queue.free)

        let base = packet.baseAddress!
        let id0 = h.identification
        let seq0 = h.tcpSequence(at: ihl)
        let flags = h.tcpFlags(at: ihl)
        // The pseudo-header without its length (source, destination, protocol), once; each segment adds its own.
        let pseudo = InternetChecksum.pseudoHeaderSum(base, proto: TCPHeader.protocolNumber, length: 0)
        var k = 0
        var offset = headerLength
        while k < count {
            let segmentPayload = min(gsoSize, total &- offset)
            let h = queue.headerSlot(ahead: 0)
            h.copyMemory(from: base, byteCount: headerLength)
            // IPv4 header.
            h.storeBytes(of: UInt16(truncatingIfNeeded: headerLength &+ segmentPayload).bigEndian,
                         toByteOffset: IPv4Header.totalLength, as: UInt16.self)
            h.storeBytes(of: (id0 &+ UInt16(truncatingIfNeeded: k)).bigEndian,
                         toByteOffset: IPv4Header.identification, as: UInt16.self)
            h.storeBytes(of: UInt16(0), toByteOffset: IPv4Header.checksum, as: UInt16.self)
            let ipSum = InternetChecksum.compute(UnsafeRawBufferPointer(start: h, count: ihl))
            h.storeBytes(of: ipSum.bigEndian, toByteOffset: IPv4Header.checksum, as: UInt16.self)
            // TCP header.
            let tcp = h + ihl
            tcp.storeBytes(of: (seq0 &+ UInt32(truncatingIfNeeded: k &* gsoSize)).bigEndian,
                           toByteOffset: TCPHeader.sequence, as: UInt32.self)
            var f = flags
            if k != count &- 1 { f &= ~(TCPHeader.fin | TCPHeader.psh) }
            if k != 0 { f &= ~TCPHeader.cwr }
            tcp.storeBytes(of: f, toByteOffset: TCPHeader.flags, as: UInt8.self)
            tcp.storeBytes(of: UInt16(0), toByteOffset: TCPHeader.checksum, as: UInt16.self)
            let segmentLength = thl &+ segmentPayload
            var acc = UInt32(InternetChecksum.fold(UInt32(pseudo) &+ UInt32(segmentLength)))
            acc &+= UInt32(InternetChecksum.fold(InternetChecksum.sum(UnsafeRawBufferPointer(start: tcp, count: thl))))
            acc &+= UInt32(InternetChecksum.fold(InternetChecksum.sum(
                UnsafeRawBufferPointer(start: base + offset, count: segmentPayload))))
            let tcpSum = ~InternetChecksum.fold(acc)
            tcp.storeBytes(of: tcpSum.bigEndian, toByteOffset: TCPHeader.checksum, as: UInt16.self)

            queue.append(peer: peer, name: name, first: h, firstLength: headerLength,
                         second: base + offset, secondLength: segmentPayload, flow: flow)
            offset &+= segmentPayload
            k &+= 1
        }
        return .segmented(count)
    }
}
