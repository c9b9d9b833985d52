#if canImport(Glibc)
import Glibc
#endif

/// TCP coalescing for the UDP -> tun direction (what the kernel's GRO does on a NIC): consecutive TCP segments of
/// one flow, as they come out of the underlay, are merged into one super-packet that is written into the tun with
/// a virtio_net_hdr (GSO_TCPV4, gso_size, NEEDS_CSUM), so the kernel handles one packet where there were dozens.
///
/// The merge rules are the kernel's (tcp_gro_receive, inet_gro_receive), a little stricter where that is simpler:
///   - both packets IPv4 with a 20-byte header (no IP options), not fragments, same TOS, TTL, DF bit, source and
///     destination, and the identification incremented by one per segment;
///   - same ports, acknowledgment number, window, header length, reserved bits and TCP options byte for byte (timestamps
///     included, as the kernel compares them);
///   - the same flags except PSH; no SYN, RST, URG, FIN anywhere, and CWR only on the first segment;
///   - sequence numbers contiguous; every segment but the last exactly as long as the first (the gso_size), the
///     last no longer; after a shorter segment or one with PSH nothing more is merged (PSH goes on the result);
///   - at most 64 segments and 65535 bytes.
/// A group of one is written as it came, with an all-zero virtio header.
///
/// Unlike the kernel's GRO, the segments' own TCP checksums are not verified before they are merged (that would be
/// a second pass over every byte); the merged packet goes in with NEEDS_CSUM, so the receiving stack trusts it.
/// What protects the bytes is the outer UDP checksum over the whole inner packet, which the kernel verifies before
/// the datagram reaches us (or the NIC does). A peer that sends a zero UDP checksum (legal in IPv4) and a wrong
/// TCP checksum gets its segment accepted where it would otherwise be dropped; a peer can inject packets anyway
/// (see the threat model), so this changes integrity only against corruption inside the sending host.
///
/// Nothing is copied but headers: the group is a gather list (iovecs) for one writev into the tun: the virtio
/// header, the first packet's IPv4 + TCP headers (copied into the coalescer's own buffer when a second packet
/// joins, then patched), and every packet's payload where it was received. Packets passed in must stay valid
/// until `finish`'s iovecs have been written. No allocation after init.
package final class TCPCoalescer {
    package static let maxSegments = 64
    /// Where the TCP header starts: only packets whose IPv4 header has no options are coalesced.
    private static let ip = IPv4Header.minimumLength
    package static let maxLength = 65535

    /// The super-packet's IPv4 + TCP headers (at most 20 + 60 bytes), once the group has two packets.
    private let headerBuffer: UnsafeMutableRawPointer
    /// iovecs[0]: the virtio header; [1]: the headers (or the whole packet while the group has one); [2...]: the
    /// payloads.
    private let iovecs: UnsafeMutablePointer<iovec>
    /// The first packet, where it was received.
    private var head: UnsafeMutableRawPointer?
    private var length = 0
    private(set) var count = 0
    private var tcpHeaderLength = 0
    private var gsoSize = 0
    private var nextSequence: UInt32 = 0
    private var closed = false
    private var push = false

    package var isOpen: Bool { count > 0 }

    package init() {
        headerBuffer = .allocate(byteCount: 128, alignment: 64)
        iovecs = .allocate(count: TCPCoalescer.maxSegments &+ 2, initializedTo: iovec())
    }

    deinit {
        headerBuffer.deallocate()
        iovecs.deallocate()
    }

    /// The packet's flags when it may start or join a group: TCP/IPv4, 20-byte IP header, not a fragment, some
    /// payload, none of SYN, RST, URG, FIN. `packet.count` must be the packet's total length.
    @inline(__always)
    package static func candidateFlags(_ packet: UnsafeRawBufferPointer) -> UInt8? {
        guard packet.count >= ip &+ TCPHeader.minimumLength else { return nil }
        let h = IPv4TCPHeaders(packet)
        guard h.versionIHL == IPv4Header.versionIHLWithoutOptions, h.proto == TCPHeader.protocolNumber else {
            return nil
        }
        guard !h.isFragment else { return nil }
        let thl = h.tcpHeaderLength(at: ip)
        guard thl >= TCPHeader.minimumLength, ip &+ thl < packet.count else { return nil }
        let flags = h.tcpFlags(at: ip)
        guard flags & (TCPHeader.syn | TCPHeader.rst | TCPHeader.urg | TCPHeader.fin) == 0 else { return nil }
        return flags
    }

    package static func isCandidate(_ packet: UnsafeRawBufferPointer) -> Bool { candidateFlags(packet) != nil }

    /// Opens a group with `packet`. - Precondition: no group is open and `isCandidate(packet)`.
    package func begin(_ packet: UnsafeMutableRawBufferPointer) {
        precondition(count == 0)
        let ip = TCPCoalescer.ip
        let h = IPv4TCPHeaders(UnsafeRawBufferPointer(packet))
        head = packet.baseAddress
        length = packet.count
        count = 1
        tcpHeaderLength = h.tcpHeaderLength(at: ip)
        gsoSize = packet.count &- ip &- tcpHeaderLength
        nextSequence = h.tcpSequence(at: ip) &+ UInt32(truncatingIfNeeded: gsoSize)
        push = h.tcpFlags(at: ip) & TCPHeader.psh != 0
        closed = push
    }

    /// Merges `packet` into the open group if the rules allow; false leaves everything as it was.
    package func append(_ packet: UnsafeRawBufferPointer) -> Bool {
        guard count > 0, !closed, count < TCPCoalescer.maxSegments, let flags = TCPCoalescer.candidateFlags(packet)
        else { return false }
        let ip = TCPCoalescer.ip
        let first = UnsafeRawPointer(head!)
        let p = packet.baseAddress!
        let h = IPv4TCPHeaders(p), h0 = IPv4TCPHeaders(first)
        let thl = tcpHeaderLength
        let payload = packet.count &- ip &- thl
        // The whole byte: the header length and the reserved bits (AccECN's AE among them), which the kernel
        // compares as part of its flag word; they would be lost in the merge.
        let dataOffset = ip &+ TCPHeader.dataOffset
        guard packet[dataOffset] == first.load(fromByteOffset: dataOffset, as: UInt8.self),
              payload <= gsoSize,
              length &+ payload <= TCPCoalescer.maxLength else { return false }
        // IPv4: TOS, TTL, DF, addresses equal; identification = first + count.
        guard packet[IPv4Header.tos] == first.load(fromByteOffset: IPv4Header.tos, as: UInt8.self),
              h.ttl == h0.ttl,
              packet[IPv4Header.flagsFragment] == first.load(fromByteOffset: IPv4Header.flagsFragment, as: UInt8.self),
              h.source == h0.source, h.destination == h0.destination else { return false }
        guard h.identification == h0.identification &+ UInt16(truncatingIfNeeded: count) else { return false }
        // TCP: ports, acknowledgment; flags equal but for PSH (and CWR on the first); window; options.
        let t = p + ip, t0 = first + ip
        let firstFlags = h0.tcpFlags(at: ip)
        guard flags & TCPHeader.cwr == 0,
              (flags ^ firstFlags) & ~(TCPHeader.psh | TCPHeader.cwr) == 0,
              h.portWord(at: ip) == h0.portWord(at: ip),
              h.tcpAcknowledgment(at: ip) == h0.tcpAcknowledgment(at: ip),
              h.tcpWindow(at: ip) == h0.tcpWindow(at: ip),
              sameOptions(t, t0, thl) else { return false }
        guard h.tcpSequence(at: ip) == nextSequence else { return false }

        if count == 1 {
            headerBuffer.copyMemory(from: head!, byteCount: ip &+ thl)
            iovecs[1] = iovec(iov_base: headerBuffer, iov_len: ip &+ thl)
            iovecs[2] = iovec(iov_base: head! + (ip &+ thl), iov_len: gsoSize)
        }
        iovecs[count &+ 2] = iovec(iov_base: UnsafeMutableRawPointer(mutating: p + (ip &+ thl)), iov_len: payload)
        length &+= payload
        count &+= 1
        nextSequence &+= UInt32(truncatingIfNeeded: payload)
        if flags & TCPHeader.psh != 0 { push = true; closed = true }
        if payload < gsoSize { closed = true }
        return true
    }

    /// Whether two TCP headers of `length` bytes (a multiple of 4) have the same options, word by word (integer
    /// loads: a memcmp call costs more than the compare for these few bytes, every packet).
    @inline(__always)
    private func sameOptions(_ t: UnsafeRawPointer, _ t0: UnsafeRawPointer, _ length: Int) -> Bool {
        var o = TCPHeader.minimumLength
        while o < length {
            if t.loadUnaligned(fromByteOffset: o, as: UInt32.self) != t0.loadUnaligned(fromByteOffset: o, as: UInt32.self) {
                return false
            }
            o &+= 4
        }
        return true
    }

    /// Closes the open group: writes its virtio header to `header` (`VirtioNetHeader.length` bytes) and returns
    /// the gather list to write: `header` first, then the packet's pieces (valid until the next `begin`, and only
    /// while the packets passed in stay where they are).
    package func finish(header: UnsafeMutableRawPointer) -> UnsafeBufferPointer<iovec> {
        precondition(count > 0)
        let pieces = count == 1 ? 2 : count &+ 2
        defer {
            count = 0
            head = nil
        }
        iovecs[0] = iovec(iov_base: header, iov_len: VirtioNetHeader.length)
        if count == 1 {
            VirtioNetHeader.none.store(to: header)
            iovecs[1] = iovec(iov_base: head!, iov_len: length)
            return UnsafeBufferPointer(start: iovecs, count: pieces)
        }
        let ip = TCPCoalescer.ip
        let b = headerBuffer
        b.storeBytes(of: UInt16(truncatingIfNeeded: length).bigEndian, toByteOffset: IPv4Header.totalLength,
                     as: UInt16.self)
        b.storeBytes(of: UInt16(0), toByteOffset: IPv4Header.checksum, as: UInt16.self)
        let ipSum = InternetChecksum.compute(UnsafeRawBufferPointer(start: b, count: ip))
        b.storeBytes(of: ipSum.bigEndian, toByteOffset: IPv4Header.checksum, as: UInt16.self)
        if push {
            let f = IPv4TCPHeaders(b).tcpFlags(at: ip)
            b.storeBytes(of: f | TCPHeader.psh, toByteOffset: ip &+ TCPHeader.flags, as: UInt8.self)
        }
        // NEEDS_CSUM: the field holds the pseudo-header sum; the kernel (or whoever delivers it) completes it.
        let pseudo = InternetChecksum.pseudoHeaderSum(b, proto: TCPHeader.protocolNumber, length: length &- ip)
        b.storeBytes(of: pseudo.bigEndian, toByteOffset: ip &+ TCPHeader.checksum, as: UInt16.self)
        VirtioNetHeader(flags: VirtioNetHeader.flagNeedsChecksum, gsoType: VirtioNetHeader.gsoTCPv4,
                        headerLength: UInt16(truncatingIfNeeded: ip &+ tcpHeaderLength),
                        gsoSize: UInt16(truncatingIfNeeded: gsoSize), checksumStart: UInt16(ip),
                        checksumOffset: UInt16(TCPHeader.checksum)).store(to: header)
        return UnsafeBufferPointer(start: iovecs, count: pieces)
    }
}
