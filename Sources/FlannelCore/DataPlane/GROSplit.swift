/// The datagrams in one UDP receive buffer. With UDP_GRO the kernel hands over `total` bytes holding datagrams
/// of `segmentSize` bytes back to back, the last possibly shorter (the control message's segment size; 0 or
/// missing: one datagram). Each range is one datagram, so one IPv4 packet on flannel's wire. Both numbers come
/// from outside (the kernel, from what the peers sent): any values give ranges that tile `0..<total` exactly and
/// are never empty. Pure, no allocation.
package struct GROSplit: IteratorProtocol {
    package let total: Int
    /// Bytes per datagram: the segment size, or the whole buffer when that is 0, negative or larger.
    package let step: Int
    private var offset = 0

    package init(total: Int, segmentSize: Int) {
        self.total = Swift.max(total, 0)
        step = segmentSize > 0 && segmentSize < total ? segmentSize : Swift.max(total, 1)
    }

    /// More than one datagram in the buffer (GRO at work).
    package var isCoalesced: Bool { step < total }

    package mutating func next() -> Range<Int>? {
        guard offset < total else { return nil }
        let end = offset &+ Swift.min(step, total &- offset)
        defer { offset = end }
        return offset..<end
    }
}
