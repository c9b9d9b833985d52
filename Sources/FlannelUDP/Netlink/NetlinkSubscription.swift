import CNetlink
#if canImport(Glibc)
import Glibc
#endif

/// A NETLINK_ROUTE socket that listens to the kernel's announcements of link, IPv4 address and IPv4 route
/// changes (the groups `ip monitor link address route` listens to). It sends nothing.
///
/// Non-blocking: `receive` returns at once; wait for `fd` to become readable with poll(). The socket belongs to
/// the network namespace of the thread that creates it.
///
/// Only the kernel can send to these groups, and what arrives is treated as a hint to look again, never as
/// the state itself (see `NetlinkEvent`).
final class NetlinkSubscription {
    private let socket: OpaquePointer
    private let buffer: UnsafeMutableRawBufferPointer
    /// Enough for a burst of notifications while the watcher is busy: a link going down takes its routes and
    /// neighbours with it in one go.
    private static let receiveBufferBytes: Int32 = 1 << 20

    /// What one `receive` found.
    enum Received {
        /// A datagram of notifications, parsed (nil: not whole netlink messages).
        case events([NetlinkEvent]?)
        /// Nothing queued.
        case empty
        /// The receive queue overflowed (ENOBUFS) and notifications were lost: re-read the state.
        case overrun
    }

    /// Opens the socket and joins `groups` (RTMGRP_* bits), in the calling thread's network namespace.
    init(groups: UInt32 = NetlinkMessages.linkAddressRouteGroups) throws(SystemError) {
        let object = "NETLINK_ROUTE (link, address and route notifications)"
        // O_NONBLOCK and O_CLOEXEC have the values of SOCK_NONBLOCK and SOCK_CLOEXEC on Linux.
        guard let nl = mnl_socket_open2(NETLINK_ROUTE, O_CLOEXEC | O_NONBLOCK) else {
            throw SystemError.current("open netlink socket", object)
        }
        var size = NetlinkSubscription.receiveBufferBytes
        if setsockopt(mnl_socket_get_fd(nl), SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size)) < 0 {
            let error = Glibc.errno
            mnl_socket_close(nl)
            throw SystemError("set SO_RCVBUF \(size) on netlink socket", object, errno: error)
        }
        if mnl_socket_bind(nl, groups, pid_t(MNL_SOCKET_AUTOPID)) < 0 {
            let error = Glibc.errno
            mnl_socket_close(nl)
            throw SystemError("bind netlink socket to groups 0x\(String(groups, radix: 16))", object, errno: error)
        }
        socket = nl
        buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 * 1024, alignment: 16)
    }

    deinit {
        mnl_socket_close(socket)
        buffer.deallocate()
    }

    /// The descriptor to poll for POLLIN.
    var fd: Int32 { mnl_socket_get_fd(socket) }

    /// Reads one queued datagram, if any.
    func receive() throws(SystemError) -> Received {
        while true {
            let n = mnl_socket_recvfrom(socket, buffer.baseAddress, buffer.count)
            if n > 0 {
                return .events(NetlinkMessages.parseNotifications(UnsafeRawBufferPointer(rebasing: buffer[..<n])))
            }
            if n == 0 { return .events([]) }
            let error = Glibc.errno
            switch error {
            case EINTR: continue
            case EAGAIN, EWOULDBLOCK: return .empty
            // ENOBUFS: the kernel dropped notifications for us. ENOSPC: libmnl saw MSG_TRUNC (a datagram bigger
            // than the buffer). Both mean some news is missing.
            case ENOBUFS, ENOSPC: return .overrun
            default: throw SystemError("receive netlink notifications", "", errno: error)
            }
        }
    }
}

@available(*, unavailable, message: "use a NetlinkSubscription from one thread")
extension NetlinkSubscription: Sendable {}
