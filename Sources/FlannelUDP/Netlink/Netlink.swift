import CNetlink
#if canImport(Glibc)
import Glibc
#endif

/// A NETLINK_ROUTE socket (libmnl) with the link, address and route requests flannel-udp needs.
///
/// Every request carries NLM_F_ACK and is read to its end (the kernel's ack, error or NLMSG_DONE) before the call
/// returns, replies matched to it by sequence number and port id, so each call leaves the socket ready for the
/// next. Failures are `SystemError`s that name the operation and the object the way `ip` would
/// ("add route 10.244.0.0/16 dev flannel0: File exists"); when the kernel explains an error with an extended ack,
/// the explanation is added to the object: "set mtu 70000 on eth0 (kernel: mtu greater than device maximum):
/// Invalid argument".
///
/// Dumps that the kernel marks inconsistent (NLM_F_DUMP_INTR: the table changed mid-dump) and requests whose
/// replies were lost to a full receive buffer (ENOBUFS) are retried when repeating them is harmless (queries);
/// changes are never repeated.
///
/// Not thread-safe: use one instance from one thread at a time. The socket belongs to the network namespace of
/// the thread that created the instance; should the socket have to be replaced (after ENOBUFS or a reply that
/// does not belong to the request), the replacement is opened in the calling thread's namespace, so call from a
/// thread in the same namespace.
public final class Netlink {
    private var socket: OpaquePointer
    private var portID: UInt32
    private var sequence: UInt32
    private let receiveBuffer: UnsafeMutableRawBufferPointer
    /// How many times a query was sent again after NLM_F_DUMP_INTR or ENOBUFS (for tests and diagnostics).
    private(set) var retriedQueries = 0

    /// Big enough for any single rtnetlink message; the kernel sizes dump datagrams to at most ~32 KiB.
    private static let receiveBufferSize = 64 * 1024
    /// IFNAMSIZ - 1: the longest interface name the kernel accepts.
    private static let maxNameLength = 15
    /// How often a query is repeated after NLM_F_DUMP_INTR or ENOBUFS before giving up.
    private static let maxAttempts = 10

    /// Opens and binds a NETLINK_ROUTE socket in the calling thread's network namespace.
    public init() throws(SystemError) {
        socket = try Netlink.openSocket()
        portID = mnl_socket_get_portid(socket)
        // Start from the clock, as iproute2 does, so replies to an earlier process's requests cannot match.
        sequence = UInt32(truncatingIfNeeded: time(nil))
        receiveBuffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Netlink.receiveBufferSize, alignment: 16)
    }

    deinit {
        mnl_socket_close(socket)
        receiveBuffer.deallocate()
    }

    private static func openSocket() throws(SystemError) -> OpaquePointer {
        let object = "NETLINK_ROUTE"
        // SOCK_CLOEXEC is O_CLOEXEC on Linux; the name itself can come out ambiguous between glibc's enum and the
        // macro in <linux/net.h> that CNetlink pulls in, depending on which module Swift imports first.
        guard let nl = mnl_socket_open2(NETLINK_ROUTE, O_CLOEXEC) else {
            throw SystemError.current("open netlink socket", object)
        }
        // NETLINK_CAP_ACK (Linux 4.3): error messages do not echo our whole request back.
        // NETLINK_EXT_ACK (Linux 4.12): error messages may carry the kernel's reason in words.
        // Kernels without them refuse with ENOPROTOOPT; errors then arrive as plain errnos, which still works.
        for (option, name) in [(NETLINK_CAP_ACK, "NETLINK_CAP_ACK"), (NETLINK_EXT_ACK, "NETLINK_EXT_ACK")] {
            var on: Int32 = 1
            if mnl_socket_setsockopt(nl, option, &on, socklen_t(MemoryLayout<Int32>.size)) < 0 {
                let error = Glibc.errno
                if error == ENOPROTOOPT { continue }
                mnl_socket_close(nl)
                throw SystemError("set \(name) on netlink socket", "", errno: error)
            }
        }
        if mnl_socket_bind(nl, 0, pid_t(MNL_SOCKET_AUTOPID)) < 0 {
            let error = Glibc.errno
            mnl_socket_close(nl)
            throw SystemError("bind netlink socket", object, errno: error)
        }
        return nl
    }

    // MARK: - Links

    /// Every interface in the namespace. The corresponding request is an RTM_GETLINK dump.
    public func links() throws(SystemError) -> [Link] {
        try exchange("list links", "", replyType: UInt16(RTM_NEWLINK), query: true,
                     build: NetlinkMessages.dumpLinks, parse: NetlinkMessages.parseLink)
    }

    /// The interface called `name`, or nil when there is none (ENODEV).
    /// - Throws: EINVAL without asking the kernel when the name cannot be an interface name (empty, longer than
    ///   15 bytes, or containing NUL).
    public func link(named name: String) throws(SystemError) -> Link? {
        let length = name.utf8.count
        guard length > 0, length <= Netlink.maxNameLength, !name.utf8.contains(0) else {
            throw SystemError("get link", "'\(name)' (an interface name has 1-\(Netlink.maxNameLength) bytes)",
                              errno: EINVAL)
        }
        return try single("get link", name) { seq in NetlinkMessages.getLink(name: name, sequence: seq) }
    }

    /// The interface with this index, or nil when there is none (ENODEV; also for indexes below 1).
    public func link(index: Int32) throws(SystemError) -> Link? {
        guard index > 0 else { return nil }
        return try single("get link", "ifindex \(index)") { seq in
            NetlinkMessages.getLink(index: index, sequence: seq)
        }
    }

    private func single(_ operation: String, _ object: String, build: @escaping (UInt32) -> [UInt8])
        throws(SystemError) -> Link? {
        do throws(SystemError) {
            let found = try exchange(operation, object, replyType: UInt16(RTM_NEWLINK), query: true, build: build,
                                     parse: NetlinkMessages.parseLink)
            guard let link = found.first else { throw SystemError(operation, object, errno: EBADMSG) }
            return link
        } catch where error.errno == ENODEV {
            return nil
        }
    }

    /// Sets the MTU of an interface (RTM_NEWLINK with IFLA_MTU, like `ip link set DEV mtu N`).
    /// - Throws: EINVAL without asking the kernel for a negative or oversized value; the kernel's EINVAL (with its
    ///   reason) for one outside the device's range.
    public func setMTU(_ mtu: Int, index: Int32) throws(SystemError) {
        try setLinkValue("mtu", mtu, index: index) { NetlinkMessages.setMTU($0, index: index, sequence: $1) }
    }

    /// Sets the transmit queue length of an interface (IFLA_TXQLEN, like `ip link set DEV txqueuelen N`). For a
    /// tun this is the ring of packets waiting for the reader; the kernel drops (tx_dropped) when it is full.
    public func setTxQueueLength(_ length: Int, index: Int32) throws(SystemError) {
        try setLinkValue("txqueuelen", length, index: index) {
            NetlinkMessages.setTxQueueLength($0, index: index, sequence: $1)
        }
    }

    /// One RTM_NEWLINK that changes a 32-bit attribute, `message(value, sequence)`; errors read "set `what`
    /// `value` on DEV". A negative or oversized `value` fails with EINVAL without asking the kernel.
    private func setLinkValue(_ what: String, _ value: Int, index: Int32,
                              _ message: (UInt32, UInt32) -> [UInt8]) throws(SystemError) {
        let operation = "set \(what) \(value) on"
        guard let v = UInt32(exactly: value) else {
            throw SystemError(operation, interfaceName(index), errno: EINVAL)
        }
        try perform(operation, interfaceName(index), query: false) { seq in message(v, seq) }
    }

    /// Sets or clears IFF_UP on an interface, like `ip link set DEV up|down`.
    public func setUp(_ up: Bool, index: Int32) throws(SystemError) {
        try perform(up ? "bring up" : "bring down", interfaceName(index), query: false) { seq in
            NetlinkMessages.setUp(up, index: index, sequence: seq)
        }
    }

    /// Deletes an interface (RTM_DELLINK), with the routes and addresses on it.
    public func deleteLink(index: Int32) throws(SystemError) {
        try perform("delete link", interfaceName(index), query: false) { seq in
            NetlinkMessages.deleteLink(index: index, sequence: seq)
        }
    }

    // MARK: - Addresses

    /// The IPv4 addresses of one interface, or of all when `index` is nil (an RTM_GETADDR dump, filtered here).
    public func addresses(index: Int32? = nil) throws(SystemError) -> [InterfaceAddress] {
        let all = try exchange("list addresses", index.map { "on \(interfaceName($0))" } ?? "",
                               replyType: UInt16(RTM_NEWADDR), query: true,
                               build: NetlinkMessages.dumpAddresses, parse: NetlinkMessages.parseAddress)
        guard let index else { return all }
        return all.filter { $0.index == index }
    }

    /// Adds an IPv4 address (NLM_F_CREATE | NLM_F_EXCL: one that is already there fails with EEXIST).
    public func addAddress(_ address: InterfaceAddress) throws(SystemError) {
        try checkPrefix(address, "add address")
        try perform("add address", "\(address) dev \(interfaceName(address.index))", query: false) { seq in
            NetlinkMessages.newAddress(address, sequence: seq)
        }
    }

    /// Removes an IPv4 address (EADDRNOTAVAIL when the interface does not have it).
    public func deleteAddress(_ address: InterfaceAddress) throws(SystemError) {
        try checkPrefix(address, "delete address")
        try perform("delete address", "\(address) dev \(interfaceName(address.index))", query: false) { seq in
            NetlinkMessages.deleteAddress(address, sequence: seq)
        }
    }

    private func checkPrefix(_ address: InterfaceAddress, _ operation: String) throws(SystemError) {
        guard (0...32).contains(address.prefixLength) else {
            throw SystemError(operation, "\(address.address)/\(address.prefixLength) (prefix length must be 0-32)",
                              errno: EINVAL)
        }
    }

    // MARK: - Neighbours

    /// The IPv4 neighbour (ARP) entries of every interface (an RTM_GETNEIGH dump; the kernel filters by family).
    public func neighbours() throws(SystemError) -> [Neighbour] {
        try exchange("list neighbours", "", replyType: UInt16(RTM_NEWNEIGH), query: true,
                     build: NetlinkMessages.dumpNeighbours, parse: NetlinkMessages.parseNeighbour)
    }

    /// Removes one IPv4 neighbour entry (ENOENT when there is no such entry).
    public func deleteNeighbour(_ neighbour: Neighbour) throws(SystemError) {
        try perform("delete neighbour", "\(neighbour.address) dev \(interfaceName(neighbour.index))", query: false) { seq in
            NetlinkMessages.deleteNeighbour(neighbour, sequence: seq)
        }
    }

    // MARK: - Routes

    /// The IPv4 unicast routes of one table (an RTM_GETROUTE dump, filtered here by table and type; cached clones
    /// are left out).
    public func routes(table: UInt32 = Route.mainTable) throws(SystemError) -> [Route] {
        let all = try exchange("list routes", table == Route.mainTable ? "" : "in table \(table)",
                               replyType: UInt16(RTM_NEWROUTE), query: true,
                               build: NetlinkMessages.dumpRoutes, parse: NetlinkMessages.parseRoute)
        return all.compactMap { message in
            let r = message.route
            guard r.table == table, r.type == Route.typeUnicast,
                  message.flags & UInt32(RTM_F_CLONED) == 0 else { return nil }
            return r
        }
    }

    /// Adds a route (NLM_F_CREATE | NLM_F_EXCL): an existing route with the same destination, table, TOS and
    /// metric fails with errno EEXIST.
    public func addRoute(_ route: Route) throws(SystemError) {
        try perform("add route", describe(route), query: false) { seq in
            NetlinkMessages.newRoute(route, sequence: seq)
        }
    }

    /// Deletes a route; ESRCH when no route matches. Matching is by destination, table, type, and gateway, device
    /// and metric where given; protocol and scope do not narrow it (as with `ip route del`).
    public func deleteRoute(_ route: Route) throws(SystemError) {
        try perform("delete route", describe(route), query: false) { seq in
            NetlinkMessages.deleteRoute(route, sequence: seq)
        }
    }

    /// The output interface of the main table's default route (0.0.0.0/0) with the lowest metric, or nil when
    /// there is no default route through a device.
    public func defaultRouteInterface() throws(SystemError) -> Int32? {
        let defaults = try routes(table: Route.mainTable).filter {
            $0.destination.prefixLength == 0 && $0.outputInterface != nil
        }
        return defaults.min { ($0.priority ?? 0) < ($1.priority ?? 0) }?.outputInterface
    }

    /// Asks the kernel which interface and source address it would use to reach `destination`
    /// (RTM_GETROUTE, like `ip route get`). Nil when the destination is unreachable (ENETUNREACH, EHOSTUNREACH).
    public func routeGet(_ destination: IPv4Address) throws(SystemError)
        -> (outputInterface: Int32, preferredSource: IPv4Address?)? {
        let operation = "get route to", object = destination.description
        let found: [NetlinkMessages.RouteMessage]
        do throws(SystemError) {
            found = try exchange(operation, object, replyType: UInt16(RTM_NEWROUTE), query: true,
                                 build: { seq in NetlinkMessages.getRoute(to: destination, sequence: seq) },
                                 parse: NetlinkMessages.parseRoute)
        } catch where error.errno == ENETUNREACH || error.errno == EHOSTUNREACH {
            return nil
        }
        guard let reply = found.first, let oif = reply.route.outputInterface else {
            throw SystemError(operation, object, errno: EBADMSG)
        }
        return (oif, reply.preferredSource)
    }

    // MARK: - Names for messages

    /// The route the way `ip route` writes it, with the device's name looked up on this socket:
    /// "10.244.2.0/24 via 192.168.1.12 dev eth0 table 100 metric 5". For messages such as cleanup's
    /// "delete route ..." lines.
    public func describe(_ route: Route) -> String {
        route.description(device: route.outputInterface.map(interfaceName))
    }

    /// The interface's name, looked up on this socket (so in its namespace), or "ifindex N" when there is none.
    private func interfaceName(_ index: Int32) -> String {
        guard let link = try? link(index: index) else { return "ifindex \(index)" }
        return link.name
    }


    // MARK: - One exchange

    /// Sends a request that the kernel answers with an ack alone (a change).
    private func perform(_ operation: String, _ object: @autoclosure () -> String, query: Bool,
                         build: (UInt32) -> [UInt8]) throws(SystemError) {
        let _: [Never] = try exchange(operation, object(), query: query, build: build, parse: { _ in nil })
    }

    /// Sends one request and reads its replies to the end.
    ///
    /// - Parameters:
    ///   - object: evaluated only when the request fails, so names are looked up only for error messages.
    ///   - replyType: the data message to collect; 0 for requests answered only by an ack.
    ///   - query: the request changes nothing, so it may be sent again after NLM_F_DUMP_INTR or ENOBUFS.
    ///   - build: makes the request for a sequence number.
    ///   - parse: turns one reply into a value; nil marks it malformed (the call then fails with EBADMSG).
    private func exchange<T>(_ operation: String, _ object: @autoclosure () -> String, replyType: UInt16 = 0,
                             query: Bool, build: (UInt32) -> [UInt8],
                             parse: @escaping (UnsafeRawBufferPointer) -> T?)
        throws(SystemError) -> [T] {
        var attempt = 0
        while true {
            attempt += 1
            let again = query && attempt < Netlink.maxAttempts
            var items: [T] = []
            let collector = ReplyCollector(sequence: nextSequence(), portID: portID, replyType: replyType) { bytes in
                guard let item = parse(bytes) else { return false }
                items.append(item)
                return true
            }
            do throws(SocketFailure) {
                try run(build(collector.sequence), collector)
            } catch where error.errno == ENOBUFS && again {
                retriedQueries += 1
                continue
            } catch {
                throw SystemError(operation, object(), errno: error.errno)
            }
            if collector.interrupted {
                if again {
                    retriedQueries += 1
                    continue
                }
                throw SystemError(operation, annotate(object(), "dump inconsistent \(attempt) times in a row"),
                                  errno: EINTR)
            }
            if collector.status.errno != 0 {
                let reason = collector.status.message.flatMap { $0.isEmpty ? nil : "kernel: \($0)" }
                throw SystemError(operation, annotate(object(), reason), errno: collector.status.errno)
            }
            if collector.malformed {
                throw SystemError(operation, object(), errno: EBADMSG)
            }
            return items
        }
    }

    private func nextSequence() -> UInt32 {
        sequence &+= 1
        if sequence == 0 { sequence = 1 }  // libmnl treats sequence 0 as "do not check"
        return sequence
    }

    /// Sends `request` and feeds datagrams to `collector` until it has the request's last reply. Throws the errno
    /// of a socket failure; after one that can leave stale replies queued, the socket is replaced.
    private func run(_ request: [UInt8], _ collector: ReplyCollector) throws(SocketFailure) {
        var (sent, error) = (0, Int32(0))
        repeat {
            (sent, error) = request.withUnsafeBytes { bytes in
                let n = mnl_socket_sendto(socket, bytes.baseAddress, bytes.count)
                return (n, Glibc.errno)
            }
        } while sent < 0 && error == EINTR
        if sent < 0 { throw SocketFailure(errno: error) }
        // Netlink datagrams are sent whole or not at all.
        if sent != request.count { throw SocketFailure(errno: EMSGSIZE) }
        while true {
            var received = 0
            repeat {
                received = mnl_socket_recvfrom(socket, receiveBuffer.baseAddress, receiveBuffer.count)
            } while received < 0 && Glibc.errno == EINTR
            if received < 0 {
                // ENOBUFS: the receive queue overflowed and replies were dropped; the kernel may also have parked a
                // dump that nothing will resume. ENOSPC: libmnl saw MSG_TRUNC. Either way the stream is no longer
                // whole, so continue on a fresh socket.
                let error = Glibc.errno
                replaceSocket()
                throw SocketFailure(errno: error)
            }
            switch collector.feed(UnsafeRawBufferPointer(rebasing: receiveBuffer[..<received])) {
            case .more:
                continue
            case .finished:
                return
            case .outOfStep(let error):
                replaceSocket()
                throw SocketFailure(errno: error)
            }
        }
    }

    /// Swaps in a fresh socket; keeps the old one if a new one cannot be opened (the next request then reports
    /// whatever is wrong).
    private func replaceSocket() {
        guard let fresh = try? Netlink.openSocket() else { return }
        mnl_socket_close(socket)
        socket = fresh
        portID = mnl_socket_get_portid(fresh)
    }
}

/// An errno from the socket itself, before it is given the operation's name.
private struct SocketFailure: Error {
    let errno: Int32
}

@available(*, unavailable, message: "a Netlink socket is not thread-safe; use one per thread")
extension Netlink: Sendable {}

/// "object (note)", or "(note)" for an empty object, or the object alone without a note. SystemError prints
/// "operation object: reason", so the note lands between the object and the errno text.
private func annotate(_ object: String, _ note: String?) -> String {
    guard let note else { return object }
    return object.isEmpty ? "(\(note))" : "\(object) (\(note))"
}
