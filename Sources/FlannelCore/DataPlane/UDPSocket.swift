import CShims
#if canImport(Glibc)
import Glibc
#endif

/// The underlay UDP socket: IPv4, bound to one address and port, non-blocking (until `Forwarder.start` makes it
/// blocking for its receive worker; the data plane's sends all pass MSG_DONTWAIT), close-on-exec, with large
/// kernel buffers (flannel's proxy never sets them, and its receive buffer overflowing is where it loses packets).
///
/// `@unchecked Sendable`: the descriptor is immutable after init and the kernel serialises concurrent use of a
/// socket, so the two forwarding workers may send and receive on it from their own threads. `close()` must only
/// be called once the workers have stopped (the `Forwarder` does not close it).
public final class UDPSocket: @unchecked Sendable {
    public let fd: Int32
    /// The address and port actually bound (the kernel's choice when port 0 was asked for).
    public let localEndpoint: Endpoint
    /// Buffer sizes the kernel reports after setup (it doubles what was asked for, for bookkeeping).
    public let receiveBufferSize: Int
    public let sendBufferSize: Int
    private var closed = false

    /// Default kernel buffer size asked for in each direction: 8 MiB, a few thousand full-size datagrams.
    public static let defaultBufferSize = 8 << 20

    /// Opens a UDP socket bound to `endpoint`.
    ///
    /// `reusePort`: SO_REUSEPORT before the bind, so that other sockets of this user (the other workers' ones, or a
    /// replacing daemon's) may bind the same address and port; the kernel then spreads the datagrams over the
    /// group (see `FlowSteering`). Without it a second bind fails with EADDRINUSE.
    ///
    /// Buffers: SO_RCVBUFFORCE/SO_SNDBUFFORCE (which pass net.core.rmem_max/wmem_max but need CAP_NET_ADMIN),
    /// falling back to SO_RCVBUF/SO_SNDBUF (capped by those sysctls) when not permitted.
    /// - Throws: `SystemError` naming the step and the address, e.g. "bind 192.168.1.1:8285: Address already in use".
    public init(bind endpoint: Endpoint, bufferSize: Int = UDPSocket.defaultBufferSize,
                reusePort: Bool = false) throws(SystemError) {
        let fd = try syscall("create UDP socket", "\(endpoint)") {
            socket(AF_INET, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue),
                   0)
        }
        do throws(SystemError) {
            UDPSocket.setBuffer(fd, force: Int32(FU_SO_RCVBUFFORCE), plain: SO_RCVBUF, size: bufferSize)
            UDPSocket.setBuffer(fd, force: Int32(FU_SO_SNDBUFFORCE), plain: SO_SNDBUF, size: bufferSize)
            if reusePort {
                var one: Int32 = 1
                try syscall("set SO_REUSEPORT on UDP socket for", "\(endpoint)") {
                    setsockopt(fd, SOL_SOCKET, Int32(FU_SO_REUSEPORT), &one, socklen_t(MemoryLayout<Int32>.size))
                }
            }
            try syscall("bind", "\(endpoint)") { endpoint.withSocketAddress { Glibc.bind(fd, $0, $1) } }
            localEndpoint = try UDPSocket.boundEndpoint(fd, what: "\(endpoint)")
            receiveBufferSize = UDPSocket.getInt(fd, SO_RCVBUF)
            sendBufferSize = UDPSocket.getInt(fd, SO_SNDBUF)
        } catch {
            _ = Glibc.close(fd)
            throw error
        }
        self.fd = fd
    }

    /// Opens `count` sockets on `endpoint` with SO_REUSEPORT, one per worker (port 0: the kernel's choice for the
    /// first, the same port for the others), and with more than one attaches `FlowSteering`'s program to the
    /// group so that each inner flow lands on one socket. Socket k is index k of the reuseport group (the kernel
    /// numbers sockets in the order they bind).
    ///
    /// The port must be free: SO_REUSEPORT would let the group join any other socket of this user on it (another
    /// daemon's, for another device), and the two would share its datagrams. So the port is first bound once
    /// without SO_REUSEPORT, which fails with EADDRINUSE as a second daemon always did, then released for the
    /// group. (A daemon that means to join, one replacing another, is what would skip that check.)
    /// `express`: the last socket is the express lane's (see `steer`).
    /// - Throws: `SystemError` for the first socket that cannot be opened or the program the kernel refuses (the
    ///   sockets opened so far are closed).
    public static func group(bind endpoint: Endpoint, count: Int, express: Int? = nil,
                             bufferSize: Int = UDPSocket.defaultBufferSize) throws(SystemError) -> [UDPSocket] {
        precondition(count >= (express == nil ? 1 : 2))
        let probe = try UDPSocket(bind: endpoint, bufferSize: 0)
        let free = probe.localEndpoint
        probe.close()
        return try join(free, count: count, bufferSize: bufferSize, steering: count > 1, express: express)
    }

    /// Opens `count` sockets on `endpoint` with SO_REUSEPORT, joining whatever reuseport group is bound there
    /// (no check that the port is free: `up --replace` with more workers adds sockets to the group it took
    /// over), and with `steering` attaches `FlowSteering`'s program for them (see `steer`).
    public static func join(_ endpoint: Endpoint, count: Int, bufferSize: Int = UDPSocket.defaultBufferSize,
                            steering: Bool, express: Int? = nil) throws(SystemError) -> [UDPSocket] {
        var sockets: [UDPSocket] = []
        do throws(SystemError) {
            sockets.append(try UDPSocket(bind: endpoint, bufferSize: bufferSize, reusePort: true))
            let bound = sockets[0].localEndpoint
            while sockets.count < count {
                sockets.append(try UDPSocket(bind: bound, bufferSize: bufferSize, reusePort: true))
            }
            if steering { try steer(sockets, express: express) }
        } catch {
            for s in sockets { s.close() }
            throw error
        }
        return sockets
    }

    /// Attaches `FlowSteering`'s program for `sockets.count` sockets to the reuseport group of `sockets` (the
    /// program is the group's, whichever member it is attached through, and atomically replaces the one before):
    /// the flows spread over the group's first `sockets.count` indices, which must be these sockets. Sockets
    /// joined later get nothing until the program is attached again for them (`up --replace` with more workers);
    /// an index past the group (sockets closed) falls back to the kernel's hash. `express`: the last of `sockets`
    /// is the express lane's, for inner packets of at most that many bytes.
    public static func steer(_ sockets: [UDPSocket], express: Int? = nil) throws(SystemError) {
        let workers = express == nil ? sockets.count : sockets.count - 1
        precondition(workers >= 1, "an express lane needs a worker beside it")
        let program = FlowSteering.program(workers: workers, express: express)
        try syscall("attach reuseport steering program (SO_ATTACH_REUSEPORT_CBPF) to", "\(sockets[0].localEndpoint)") {
            program.withUnsafeBufferPointer {
                fu_attach_reuseport_cbpf(sockets[0].fd, $0.baseAddress, UInt16($0.count))
            }
        }
    }

    /// Takes over a bound IPv4 UDP socket (a running daemon's, passed to a replacing one): checked to be one,
    /// bound to `endpoint`; this object owns and closes it from now on (also when the check fails).
    public init(adopting fd: Int32, expecting endpoint: Endpoint) throws(SystemError) {
        do throws(SystemError) {
            var type: Int32 = 0
            var len = socklen_t(MemoryLayout<Int32>.size)
            try syscall("inspect passed socket for", "\(endpoint)") { getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) }
            guard type == Int32(SOCK_DGRAM.rawValue) else { throw SystemError("use passed socket for", "\(endpoint) (not UDP)", errno: EINVAL) }
            let bound = try UDPSocket.boundEndpoint(fd, what: "passed socket")
            guard bound == endpoint else {
                throw SystemError("use passed socket for", "\(endpoint) (it is bound to \(bound))", errno: EINVAL)
            }
            localEndpoint = bound
        } catch {
            _ = Glibc.close(fd)
            throw error
        }
        self.fd = fd
        receiveBufferSize = UDPSocket.getInt(fd, SO_RCVBUF)
        sendBufferSize = UDPSocket.getInt(fd, SO_SNDBUF)
    }

    private static func boundEndpoint(_ fd: Int32, what: String) throws(SystemError) -> Endpoint {
        var bound = sockaddr_in()
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        try syscall("getsockname", what) {
            withUnsafeMutablePointer(to: &bound) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) }
            }
        }
        guard bound.sin_family == sa_family_t(AF_INET) else { throw SystemError("use socket", "\(what) (not IPv4)", errno: EAFNOSUPPORT) }
        return Endpoint(bound)
    }

    private static func setBuffer(_ fd: Int32, force: Int32, plain: Int32, size: Int) {
        var v = Int32(clamping: size)
        let len = socklen_t(MemoryLayout<Int32>.size)
        if setsockopt(fd, SOL_SOCKET, force, &v, len) == 0 { return }
        // EPERM without CAP_NET_ADMIN: the plain option still gets up to the sysctl maximum. Its failure is not
        // fatal either; the socket works with the default size.
        _ = setsockopt(fd, SOL_SOCKET, plain, &v, len)
    }

    private static func getInt(_ fd: Int32, _ option: Int32) -> Int {
        var v: Int32 = 0
        var len = socklen_t(MemoryLayout<Int32>.size)
        return getsockopt(fd, SOL_SOCKET, option, &v, &len) == 0 ? Int(v) : 0
    }

    /// Closes the socket. Idempotent. Only after the forwarder using it has stopped.
    public func close() {
        guard !closed else { return }
        closed = true
        _ = Glibc.close(fd)
    }

    deinit { close() }
}
