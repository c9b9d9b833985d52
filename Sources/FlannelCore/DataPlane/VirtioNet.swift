import CShims

/// The `virtio_net_hdr` a tun device with IFF_VNET_HDR puts before every packet it hands out, and expects before
/// every packet written to it (10 bytes; the legacy header's fields are in the host's byte order, little-endian on
/// the hosts flannel-udp runs on; the layout is pinned by static assertions in the C shim).
///
/// Read from the tun: `gsoType` TCPV4 marks a TCP super-packet that the kernel left for us to cut into
/// `gsoSize`-byte segments (TSO); `needsChecksum` marks a packet whose transport checksum holds only the
/// pseudo-header sum and is to be completed over the bytes from `checksumStart` and stored at
/// `checksumStart + checksumOffset`. Written to the tun: the same, describing a super-packet we coalesced.
package struct VirtioNetHeader: Equatable {
    package static let length = Int(FU_VIRTIO_NET_HDR_LEN)
    package static let flagNeedsChecksum = UInt8(FU_VIRTIO_NET_HDR_F_NEEDS_CSUM)
    package static let gsoNone = UInt8(FU_VIRTIO_NET_HDR_GSO_NONE)
    package static let gsoTCPv4 = UInt8(FU_VIRTIO_NET_HDR_GSO_TCPV4)
    package static let gsoECN = UInt8(FU_VIRTIO_NET_HDR_GSO_ECN)

    package var flags: UInt8 = 0
    package var gsoType: UInt8 = 0
    /// Length of the headers (IP + TCP) of a GSO packet; a hint only, never trusted for segmenting.
    package var headerLength: UInt16 = 0
    package var gsoSize: UInt16 = 0
    package var checksumStart: UInt16 = 0
    package var checksumOffset: UInt16 = 0

    /// The all-zero header: no offload, checksums complete.
    package static let none = VirtioNetHeader()

    package var needsChecksum: Bool { flags & VirtioNetHeader.flagNeedsChecksum != 0 }

    package init() {}

    package init(flags: UInt8, gsoType: UInt8, headerLength: UInt16, gsoSize: UInt16, checksumStart: UInt16,
         checksumOffset: UInt16) {
        self.flags = flags
        self.gsoType = gsoType
        self.headerLength = headerLength
        self.gsoSize = gsoSize
        self.checksumStart = checksumStart
        self.checksumOffset = checksumOffset
    }

    /// Reads the header at `p` (at least `length` bytes).
    package init(from p: UnsafeRawPointer) {
        flags = p.load(fromByteOffset: 0, as: UInt8.self)
        gsoType = p.load(fromByteOffset: 1, as: UInt8.self)
        headerLength = UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 2, as: UInt16.self))
        gsoSize = UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 4, as: UInt16.self))
        checksumStart = UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 6, as: UInt16.self))
        checksumOffset = UInt16(littleEndian: p.loadUnaligned(fromByteOffset: 8, as: UInt16.self))
    }

    /// Writes the header to `p` (at least `length` bytes).
    package func store(to p: UnsafeMutableRawPointer) {
        p.storeBytes(of: flags, toByteOffset: 0, as: UInt8.self)
        p.storeBytes(of: gsoType, toByteOffset: 1, as: UInt8.self)
        p.storeBytes(of: headerLength.littleEndian, toByteOffset: 2, as: UInt16.self)
        p.storeBytes(of: gsoSize.littleEndian, toByteOffset: 4, as: UInt16.self)
        p.storeBytes(of: checksumStart.littleEndian, toByteOffset: 6, as: UInt16.self)
        p.storeBytes(of: checksumOffset.littleEndian, toByteOffset: 8, as: UInt16.self)
    }
}

extension InternetChecksum {
    /// The pseudo-header sum (RFC 9293 3.1) of an IPv4 packet's transport segment of `length` bytes, folded to 16
    /// bits and not complemented: what a NEEDS_CSUM packet carries in its checksum field. `ipHeader` points at
    /// the IPv4 header (source and destination are read from it).
    package static func pseudoHeaderSum(_ ipHeader: UnsafeRawPointer, proto: UInt8, length: Int) -> UInt16 {
        let addresses = UnsafeRawBufferPointer(start: ipHeader + IPv4Header.source, count: 8)
        return fold(sum(addresses, initial: UInt32(proto) &+ UInt32(length)))
    }

    /// Completes a NEEDS_CSUM checksum in place: one's complement sum of `packet[start...]` (the field holds the
    /// pseudo-header sum), stored complemented at `start + offset`. A result of 0 is sent as 0xFFFF, as the
    /// kernel's skb_checksum_help does (UDP reserves 0 for "no checksum"; TCP accepts either).
    /// - Returns: false, leaving the packet alone, when the offsets do not lie inside it.
    package static func complete(_ packet: UnsafeMutableRawBufferPointer, start: Int, offset: Int) -> Bool {
        guard start >= IPv4Header.minimumLength, start &+ offset &+ 2 <= packet.count else { return false }
        let covered = UnsafeRawBufferPointer(rebasing: UnsafeRawBufferPointer(packet)[start...])
        var c = ~fold(sum(covered))
        if c == 0 { c = 0xFFFF }
        packet.storeBytes(of: c.bigEndian, toByteOffset: start &+ offset, as: UInt16.self)
        return true
    }
}
