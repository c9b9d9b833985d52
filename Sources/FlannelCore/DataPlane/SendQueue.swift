import CShims
#if canImport(Glibc)
import Glibc
#endif

/// The tun -> UDP worker's outgoing datagrams for one sendmmsg: a list of segments (each one whole IPv4 packet,
/// one datagram on the wire), grouped into messages.
///
/// A segment is one or two pieces of memory: a packet read from the tun as it is, or a header that segmentation
/// wrote into one of this queue's header slots followed by its payload, left in place in the read buffer (no copy).
///
/// With UDP GSO on, consecutive segments to the same peer with the same size (the last of a run may be shorter)
/// share one message with a UDP_SEGMENT control message giving that size: the kernel cuts the message at exactly
/// those boundaries, so the wire still carries one IPv4 packet per datagram. A run holds one flow key only
/// (`FlowSteering.key`): the receiving node steers a GSO message (or the GRO buffer it becomes) to one of its
/// workers by its first datagram, so a message mixing flows would carry some of them to the wrong worker, out of
/// order with the rest of their flow. A run stops at `maxSegmentsPerSend`
/// segments or `maxBytesPerSend` bytes (the kernel's UDP_MAX_SEGMENTS and the largest UDP payload), and after a
/// shorter segment. Without GSO, every segment is its own message.
///
/// Everything is allocated once; nothing here allocates per packet. Used by one thread.
package final class SendQueue {
    /// Bytes per header slot: the longest IPv4 header (60) plus the longest TCP header (60), rounded up.
    package static let headerStride = 128
    package static let maxSegmentsPerSend = 64
    package static let maxBytesPerSend = 65507

    /// Segments the queue holds before it has to be sent.
    package let capacity: Int
    var gso: Bool

    // Segments.
    private(set) var segmentCount = 0
    package let headers: UnsafeMutableRawPointer
    package let iovs: UnsafeMutablePointer<iovec>
    private var iovCount = 0
    package let segmentIov: UnsafeMutablePointer<Int>
    package let segmentParts: UnsafeMutablePointer<Int>
    package let segmentLength: UnsafeMutablePointer<Int>

    // Messages.
    private(set) var messageCount = 0
    package let msgs: UnsafeMutablePointer<fu_mmsghdr>
    package let names: UnsafeMutablePointer<sockaddr_in>
    package let messagePeer: UnsafeMutablePointer<Int>
    package let messageFlow: UnsafeMutablePointer<UInt32>
    package let messageFirst: UnsafeMutablePointer<Int>
    package let messageSegments: UnsafeMutablePointer<Int>
    package let messageSegmentSize: UnsafeMutablePointer<Int>
    package let messageBytes: UnsafeMutablePointer<Int>
    package let controls: UnsafeMutableRawPointer
    package let controlStride: Int

    package init(capacity: Int, gso: Bool) {
        precondition(capacity >= 1)
        self.capacity = capacity
        self.gso = gso
        headers = .allocate(byteCount: capacity * SendQueue.headerStride, alignment: 64)
        iovs = .allocate(count: capacity * 2, initializedTo: iovec())
        segmentIov = .allocate(count: capacity, initializedTo: 0)
        segmentParts = .allocate(count: capacity, initializedTo: 0)
        segmentLength = .allocate(count: capacity, initializedTo: 0)
        msgs = .allocate(count: capacity, initializedTo: fu_mmsghdr())
        names = .allocate(count: capacity, initializedTo: sockaddr_in())
        messagePeer = .allocate(count: capacity, initializedTo: 0)
        messageFlow = .allocate(count: capacity, initializedTo: 0)
        messageFirst = .allocate(count: capacity, initializedTo: 0)
        messageSegments = .allocate(count: capacity, initializedTo: 0)
        messageSegmentSize = .allocate(count: capacity, initializedTo: 0)
        messageBytes = .allocate(count: capacity, initializedTo: 0)
        controlStride = fu_cmsg_space(MemoryLayout<UInt16>.size)
        controls = .allocate(byteCount: capacity * controlStride, alignment: 16)
        controls.initializeMemory(as: UInt8.self, repeating: 0, count: capacity * controlStride)
    }

    deinit {
        headers.deallocate()
        iovs.deallocate()
        segmentIov.deallocate()
        segmentParts.deallocate()
        segmentLength.deallocate()
        msgs.deallocate()
        names.deallocate()
        messagePeer.deallocate()
        messageFlow.deallocate()
        messageFirst.deallocate()
        messageSegments.deallocate()
        messageSegmentSize.deallocate()
        messageBytes.deallocate()
        controls.deallocate()
    }

    package var free: Int { capacity &- segmentCount }
    package var isEmpty: Bool { segmentCount == 0 }

    /// The header slot for the next segment but `ahead` (segmentation writes headers there before appending).
    @inline(__always)
    package func headerSlot(ahead: Int) -> UnsafeMutableRawPointer {
        headers + (segmentCount &+ ahead) &* SendQueue.headerStride
    }

    package func reset() {
        segmentCount = 0
        iovCount = 0
        messageCount = 0
    }

    /// Appends one segment (one IPv4 packet of `firstLength + secondLength` bytes of flow key `flow`) for `peer`.
    /// - Precondition: `free > 0`.
    package func append(peer: Int, name: sockaddr_in, first: UnsafeMutableRawPointer, firstLength: Int,
                second: UnsafeMutableRawPointer? = nil, secondLength: Int = 0, flow: UInt32 = 0) {
        precondition(segmentCount < capacity)
        let k = segmentCount
        let length = firstLength &+ secondLength
        segmentIov[k] = iovCount
        iovs[iovCount] = iovec(iov_base: first, iov_len: firstLength)
        iovCount &+= 1
        if let second, secondLength > 0 {
            iovs[iovCount] = iovec(iov_base: second, iov_len: secondLength)
            iovCount &+= 1
            segmentParts[k] = 2
        } else {
            segmentParts[k] = 1
        }
        segmentLength[k] = length
        segmentCount &+= 1

        if gso && messageCount > 0 {
            let m = messageCount &- 1
            let size = messageSegmentSize[m]
            let lastLength = segmentLength[k &- 1]
            if messagePeer[m] == peer && messageFlow[m] == flow && lastLength == size && length <= size
                && messageSegments[m] < SendQueue.maxSegmentsPerSend
                && messageBytes[m] &+ length <= SendQueue.maxBytesPerSend {
                messageSegments[m] &+= 1
                messageBytes[m] &+= length
                return
            }
        }
        let m = messageCount
        messageCount &+= 1
        messagePeer[m] = peer
        messageFlow[m] = flow
        names[m] = name
        messageFirst[m] = k
        messageSegments[m] = 1
        messageSegmentSize[m] = length
        messageBytes[m] = length
    }

    /// Fills the mmsghdrs of messages `from...` (after the kernel changed nothing but msg_len, or after
    /// `splitMessages`): iovecs of their segments, and a UDP_SEGMENT control message when a message holds more
    /// than one segment.
    package func prepareMessages(from start: Int = 0) {
        var m = start
        while m < messageCount {
            let first = messageFirst[m]
            let last = first &+ messageSegments[m] &- 1
            let iovStart = segmentIov[first]
            let iovEnd = segmentIov[last] &+ segmentParts[last]
            var control: UnsafeMutableRawPointer? = nil
            var controlLength = 0
            if messageSegments[m] > 1 {
                control = controls + m &* controlStride
                controlLength = controlStride
                let c = control!.assumingMemoryBound(to: cmsghdr.self)
                c.pointee.cmsg_len = fu_cmsg_len(MemoryLayout<UInt16>.size)
                c.pointee.cmsg_level = Int32(FU_SOL_UDP)
                c.pointee.cmsg_type = Int32(FU_UDP_SEGMENT)
                fu_cmsg_data(c).withMemoryRebound(to: UInt16.self, capacity: 1) {
                    $0.pointee = UInt16(truncatingIfNeeded: messageSegmentSize[m])
                }
            }
            msgs[m] = fu_mmsghdr(
                msg_hdr: msghdr(msg_name: UnsafeMutableRawPointer(names + m),
                                msg_namelen: socklen_t(MemoryLayout<sockaddr_in>.size),
                                msg_iov: iovs + iovStart, msg_iovlen: iovEnd &- iovStart,
                                msg_control: control, msg_controllen: controlLength, msg_flags: 0),
                msg_len: 0)
            m &+= 1
        }
    }

    /// Turns GSO off and rewrites messages `from...` as one message per segment (the kernel refused a GSO send).
    /// - Returns: the number of messages from `from` on after the split.
    @discardableResult
    package func splitMessages(from start: Int) -> Int {
        gso = false
        guard start < messageCount else { return 0 }
        let firstSegment = messageFirst[start]
        // Segments are in message order, so the messages from `start` on cover firstSegment..<segmentCount.
        // Peers and names of the old messages are spread over their segments first, from the back, so that
        // writing message k (k >= its old index) never overwrites an old message not yet read.
        var m = messageCount &- 1
        var k = segmentCount &- 1
        var newIndex = start &+ (segmentCount &- firstSegment) &- 1
        while m >= start {
            let peer = messagePeer[m]
            let flow = messageFlow[m]
            let name = names[m]
            var s = messageSegments[m]
            while s > 0 {
                messagePeer[newIndex] = peer
                messageFlow[newIndex] = flow
                names[newIndex] = name
                messageFirst[newIndex] = k
                messageSegments[newIndex] = 1
                messageSegmentSize[newIndex] = segmentLength[k]
                messageBytes[newIndex] = segmentLength[k]
                newIndex &-= 1
                k &-= 1
                s &-= 1
            }
            m &-= 1
        }
        messageCount = start &+ (segmentCount &- firstSegment)
        return messageCount &- start
    }
}
