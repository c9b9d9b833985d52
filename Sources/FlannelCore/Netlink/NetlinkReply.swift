import CNetlink
#if canImport(Glibc)
import Glibc
#endif

/// Follows the replies to one request, fed one received datagram at a time, until the kernel's last word for it:
/// NLMSG_ERROR (an ack or an error) or NLMSG_DONE (the end of a dump).
///
/// The datagrams go through libmnl's `mnl_cb_run2`, which checks that every message carries this request's
/// sequence number and the kernel's reply to this socket's port id, splits multi-part dumps, and stops on a dump
/// the kernel marked NLM_F_DUMP_INTR. Data messages of `replyType` go to `handle`; a message it cannot parse is
/// remembered, not acted on at once, so the exchange still runs to its end and the socket stays in step with the
/// kernel for the next request.
///
/// No socket here: the unit tests feed hand-built datagrams.
package final class ReplyCollector {
    /// What a fed datagram meant.
    package enum Progress: Equatable {
        /// The exchange is not over: receive again.
        case more
        /// The kernel's last message for this request has arrived (see `status`, `malformed`, `interrupted`).
        case finished
        /// The datagram did not belong to this request (errno ESRCH: another port id; EPROTO: another sequence
        /// number) or was not netlink at all (EBADMSG). The socket is out of step and must not be reused.
        case outOfStep(Int32)
    }

    package let sequence: UInt32
    package let portID: UInt32
    private let replyType: UInt16
    private let handle: (UnsafeRawBufferPointer) -> Bool

    /// The errno and extended-ack text of the terminating NLMSG_ERROR / NLMSG_DONE (errno 0: success).
    package private(set) var status = NetlinkMessages.Status(errno: 0, message: nil)
    /// Whether some message of `replyType` could not be parsed.
    package private(set) var malformed = false
    /// Whether the kernel flagged the dump NLM_F_DUMP_INTR (the table changed while it was being dumped): what was
    /// collected is not a consistent snapshot and the dump should be run again.
    package private(set) var interrupted = false

    /// - Parameters:
    ///   - replyType: the data message expected (RTM_NEWLINK, ...); other data messages are ignored.
    ///   - handle: parses one message; returns false when it is malformed.
    package init(sequence: UInt32, portID: UInt32, replyType: UInt16,
                 handle: @escaping (UnsafeRawBufferPointer) -> Bool) {
        self.sequence = sequence
        self.portID = portID
        self.replyType = replyType
        self.handle = handle
    }

    /// Processes one received datagram (which may hold several messages).
    package func feed(_ datagram: UnsafeRawBufferPointer) -> Progress {
        guard let base = datagram.baseAddress, datagram.count > 0 else { return .outOfStep(EBADMSG) }
        if ReplyCollector.hasOversizedMessage(datagram) { return .outOfStep(EBADMSG) }
        // Once a dump is known to be inconsistent, only its end matters; mnl_cb_run2 would stop at every
        // flagged message, so look for the end directly.
        if interrupted { return scanForEnd(datagram) }

        let context = Unmanaged.passUnretained(self).toOpaque()
        // mnl_cb_run2 takes the array as non-const, so hand it a copy.
        var controlCallbacks = replyControlCallbacks
        // errno is read right after the call, before anything else can overwrite it.
        let (rc, error) = withExtendedLifetime(self) {
            controlCallbacks.withUnsafeMutableBufferPointer { controls in
                let rc = mnl_cb_run2(base, datagram.count, sequence, portID, replyDataCallback, context,
                                     controls.baseAddress, UInt32(controls.count))
                return (rc, Glibc.errno)
            }
        }
        switch rc {
        case MNL_CB_OK:
            return .more
        case MNL_CB_STOP:
            return .finished
        default:
            // mnl_cb_run2 fails only for framing problems; our callbacks never return MNL_CB_ERROR.
            if error == EINTR {
                // NLM_F_DUMP_INTR: libmnl stopped at the flagged message. The dump itself goes on; the rest of it
                // must still be read (and dropped) before the socket can carry another request.
                interrupted = true
                return scanForEnd(datagram)
            }
            return .outOfStep(error == 0 ? EBADMSG : error)
        }
    }

    /// Whether a message in the datagram claims a length of 2 GiB or more. libmnl's mnl_nlmsg_ok compares
    /// `(int)nlmsg_len <= len`: such a length turns negative and passes, and mnl_cb_run2 (or `scanForEnd`) then
    /// reads the message and jumps gigabytes past the datagram. No kernel sends one; a datagram with it is refused
    /// before libmnl sees it. (Found by the `netlink` fuzz target.)
    package static func hasOversizedMessage(_ datagram: UnsafeRawBufferPointer) -> Bool {
        let header = MemoryLayout<nlmsghdr>.size
        var offset = 0
        while datagram.count &- offset >= header {
            let length = Int(datagram.loadUnaligned(fromByteOffset: offset, as: UInt32.self))
            if length > Int(Int32.max) { return true }
            // Where libmnl stops walking, so can we: the rest is never read.
            guard length >= header, length <= datagram.count &- offset else { return false }
            offset &+= (length &+ 3) & ~3
        }
        return false
    }

    /// Looks through a datagram for this request's NLMSG_DONE or NLMSG_ERROR, ignoring everything else.
    private func scanForEnd(_ datagram: UnsafeRawBufferPointer) -> Progress {
        guard let base = datagram.baseAddress else { return .more }
        var remaining = Int32(clamping: datagram.count)
        var message: UnsafePointer<nlmsghdr>? = base.assumingMemoryBound(to: nlmsghdr.self)
        while let m = message, mnl_nlmsg_ok(m, remaining) {
            let type = Int32(m.pointee.nlmsg_type)
            if m.pointee.nlmsg_seq == sequence && (type == NLMSG_DONE || type == NLMSG_ERROR) {
                let bytes = UnsafeRawBufferPointer(start: m, count: Int(m.pointee.nlmsg_len))
                if let status = NetlinkMessages.parseStatus(bytes) { self.status = status }
                return .finished
            }
            message = UnsafePointer(mnl_nlmsg_next(m, &remaining))
        }
        return .more
    }

    fileprivate func data(_ message: UnsafePointer<nlmsghdr>) -> Int32 {
        // libmnl 1.0.3+ already stops on NLM_F_DUMP_INTR before calling us; checked again so an older libmnl
        // cannot hand us half of an inconsistent dump as if it were whole.
        if message.pointee.nlmsg_flags & UInt16(NLM_F_DUMP_INTR) != 0 {
            interrupted = true
        }
        if message.pointee.nlmsg_type == replyType && !interrupted {
            let bytes = UnsafeRawBufferPointer(start: message, count: Int(message.pointee.nlmsg_len))
            if !handle(bytes) { malformed = true }
        }
        return MNL_CB_OK
    }

    fileprivate func end(_ message: UnsafePointer<nlmsghdr>) -> Int32 {
        let bytes = UnsafeRawBufferPointer(start: message, count: Int(message.pointee.nlmsg_len))
        // Too short to hold an error code: the exchange is over, but whether it worked is unknown.
        status = NetlinkMessages.parseStatus(bytes) ?? NetlinkMessages.Status(errno: EBADMSG, message: nil)
        return MNL_CB_STOP
    }
}

// The C callbacks for mnl_cb_run2; `data` is the ReplyCollector, passed unretained for the call's duration.

private let replyDataCallback: mnl_cb_t = { message, data in
    guard let message, let data else { return MNL_CB_ERROR }
    return Unmanaged<ReplyCollector>.fromOpaque(data).takeUnretainedValue().data(message)
}

private let replyEndCallback: mnl_cb_t = { message, data in
    guard let message, let data else { return MNL_CB_ERROR }
    return Unmanaged<ReplyCollector>.fromOpaque(data).takeUnretainedValue().end(message)
}

/// Control-message handlers indexed by type (below NLMSG_MIN_TYPE): NLMSG_ERROR and NLMSG_DONE end the exchange;
/// NLMSG_NOOP and NLMSG_OVERRUN (nil entries) are skipped.
private let replyControlCallbacks: [mnl_cb_t?] = (0..<Int(NLMSG_MIN_TYPE)).map { type in
    type == Int(NLMSG_ERROR) || type == Int(NLMSG_DONE) ? replyEndCallback : nil
}
