import CShims
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// The socket's sending side, as wireguard-go keeps it inside its bind: packets queue up (TSO super-packets cut
/// into whole IPv4 packets on the way in), and `flush` sends the queue in one sendmmsg, with UDP GSO grouping runs
/// of equal-size datagrams to one peer into one message. GSO's fallback lives here too: a refused GSO send is sent
/// again one datagram per packet (for good after EIO). Counts what it sends per peer and in total.
final class UDPSender {
    let queue: SendQueue
    private let waitMilliseconds: Int32
    private let io: StageIO
    private var logLimiter = LogLimiter()

    /// `queueCapacity`: datagrams queued before a flush (default: `sendQueueCapacity`, at least a batch); 1 for
    /// a sender that only ever uses `sendNow`.
    init(_ io: StageIO, options: ForwarderOptions, queueCapacity: Int? = nil) {
        self.io = io
        waitMilliseconds = options.sendWaitMilliseconds
        queue = SendQueue(capacity: queueCapacity ?? max(options.sendQueueCapacity, options.batchSize),
                          gso: io.offloads.udpGSO.load(ordering: .relaxed))
    }

    /// Queues `packet` for `peer`, sending what is queued first when it would not fit.
    func append(_ packet: TunPacket, peer: Int, snapshot: RouteSnapshot) throws(SystemError) {
        if packet.datagrams > queue.free { try flush(snapshot) }
        switch packet.cut(into: queue, peer: peer, name: snapshot.peers[peer].sockaddr) {
        case .segmented:
            if packet.gsoSize > 0 { io.offloads.superPacketsSegmented.wrappingIncrement(ordering: .relaxed) }
        case .invalid: io.counters.countDrop(.malformed)
        case .tooManySegments: io.counters.countDrop(.oversize)
        }
    }

    /// One sendmmsg for the queue; a partial send continues where the kernel stopped. sendmmsg reports an error
    /// only for the first message it could not send: that one is counted as `sendFailed` (all its segments) and
    /// skipped. On EAGAIN (socket buffer full) wait for POLLOUT up to `sendWaitMilliseconds` once per call, then
    /// drop the rest. A GSO message refused with EIO (the route's device cannot checksum UDP, the one refusal
    /// that only GSO gets): GSO goes off for good, with one log line. With EINVAL (also what a segment larger
    /// than the route's MTU gets, so not proof that GSO is unusable): this queue only. Either way the rest of the
    /// queue is sent again one datagram per packet.
    func flush(_ snapshot: RouteSnapshot) throws(SystemError) {
        guard !queue.isEmpty else { return }
        defer {
            queue.reset()
            queue.gso = io.offloads.udpGSO.load(ordering: .relaxed)
        }
        queue.prepareMessages()
        var sent = 0
        var waited = false
        var packets: UInt64 = 0
        var bytes: UInt64 = 0
        while sent < queue.messageCount {
            let msgs = queue.msgs + sent
            let count = UInt32(queue.messageCount - sent)
            let result = try PacketIO.call("sendmmsg on", io.name) {
                Int(fu_sendmmsg(io.fd, msgs, count, Int32(MSG_DONTWAIT)))
            }
            switch result {
            case .done(let r):
                var j = sent
                while j < sent + r {
                    let n = queue.messageSegments[j]
                    let len = queue.messageBytes[j]
                    snapshot.peers[queue.messagePeer[j]].counters.countTx(packets: n, bytes: len)
                    packets &+= UInt64(n)
                    bytes &+= UInt64(len)
                    j += 1
                }
                sent += r
            case .wouldBlock:
                if !waited {
                    waited = true
                    var pfd = pollfd(fd: io.fd, events: Int16(POLLOUT), revents: 0)
                    // Whatever poll says (room, the time up, EINTR), the next sendmmsg is the test: what it cannot
                    // send then is dropped and counted below.
                    _ = poll(&pfd, 1, waitMilliseconds)
                    continue
                }
                var dropped = 0
                var j = sent
                while j < queue.messageCount { dropped += queue.messageSegments[j]; j += 1 }
                io.counters.countDrop(.sendFailed, UInt64(dropped))
                logLimiter.warn(io.logger, "sendmmsg on \(io.name) (socket buffer full, \(dropped) dropped)", EAGAIN)
                sent = queue.messageCount
            case .failed(let e):
                if queue.gso && queue.messageSegments[sent] > 1 && (e == EIO || e == EINVAL) {
                    gsoRefused(e, message: sent)
                    continue
                }
                io.counters.countDrop(.sendFailed, UInt64(queue.messageSegments[sent]))
                logLimiter.warn(io.logger, "sendmmsg on \(io.name) to \(Endpoint(queue.names[sent]))", e)
                sent += 1
            }
        }
        countSent(packets: packets, bytes: bytes)
    }

    /// Adds what was sent to the direction's counters and the pair's (each peer's are counted where it is known).
    @inline(__always)
    private func countSent(packets: UInt64, bytes: UInt64) {
        io.counters.tunToUDPPackets.wrappingIncrement(by: packets, ordering: .relaxed)
        io.counters.tunToUDPBytes.wrappingIncrement(by: bytes, ordering: .relaxed)
        io.worker.tunToUDPPackets.wrappingIncrement(by: packets, ordering: .relaxed)
    }

    /// GSO's fallback: the messages from `message` on are rewritten one datagram per packet.
    private func gsoRefused(_ e: Int32, message: Int) {
        let to = Endpoint(queue.names[message])
        if e == EIO {
            io.offloads.udpGSO.store(false, ordering: .relaxed)
            io.logger.warning("""
                offload gso off: the kernel refused a UDP GSO send on \(io.name) to \(to) \
                (\(SystemError.describe(e))); sending one datagram per packet
                """)
        } else {
            logLimiter.warn(io.logger, "UDP GSO send on \(io.name) to \(to) refused, resent one datagram each", e)
        }
        queue.splitMessages(from: message)
        queue.prepareMessages(from: message)
    }

    /// One whole packet (no TSO) to `peer` at once, with sendto and no queue: the express lane's send for a
    /// packet that came alone. Counted as `flush` counts it. A full socket buffer (EAGAIN) queues it and flushes,
    /// which waits for room as a batch would; any other failure drops it as `sendFailed`.
    func sendOne(_ packet: TunPacket, peer: Int, snapshot: RouteSnapshot) throws(SystemError) {
        let entry = snapshot.peers[peer]
        let bytes = packet.bytes
        let result = try PacketIO.call("sendto on", io.name) {
            entry.sockaddr.withSockaddr { sendto(io.fd, bytes.baseAddress, bytes.count, Int32(MSG_DONTWAIT), $0, $1) }
        }
        switch result {
        case .done:
            entry.counters.countTx(bytes: bytes.count)
            countSent(packets: 1, bytes: UInt64(bytes.count))
        case .wouldBlock:
            try append(packet, peer: peer, snapshot: snapshot)
            try flush(snapshot)
        case .failed:
            PacketIO.dropped(result, .sendFailed, "sendto on \(io.name) to \(entry.route.endpoint)", &logLimiter, io)
        }
    }

    /// One datagram to `peer` at once (an ICMP error the receiving side built), with sendto; counted as
    /// `icmpSent`, or dropped as `sendFailed`.
    func sendNow(_ packet: UnsafeRawBufferPointer, to peer: PeerEntry) throws(SystemError) {
        let result = try PacketIO.call("sendto on", io.name) {
            peer.sockaddr.withSockaddr { sendto(io.fd, packet.baseAddress, packet.count, Int32(MSG_DONTWAIT), $0, $1) }
        }
        if case .done = result {
            io.counters.icmpSent.wrappingIncrement(ordering: .relaxed)
            return
        }
        PacketIO.dropped(result, .sendFailed, "send ICMP error to \(peer.route.endpoint)", &logLimiter, io)
    }
}
