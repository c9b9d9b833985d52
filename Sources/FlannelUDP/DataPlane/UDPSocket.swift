import CShims
#if canImport(Glibc)
import Glibc
#endif

/// The underlay UDP socket: IPv4, bound to one address and port, non-blocking, close-on-exec, with large kernel
/// buffers (flannel's proxy never sets them, and its receive buffer overflowing is where it loses packets).
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
    /// Buffers: SO_RCVBUFFORCE/SO_SNDBUFFORCE (which pass net.core.rmem_max/wmem_max but need CAP_NET_ADMIN),
    /// falling back to SO_RCVBUF/SO_SNDBUF (capped by those sysctls) when not permitted.
    /// - Throws: `SystemError` naming the step and the address, e.g. "bind 192.168.1.1:8285: Address already in use".
    public init(bind endpoint: Endpoint, bufferSize: Int = UDPSocket.defaultBufferSize) throws(SystemError) {
        let fd = try syscall("create UDP socket", "\(endpoint)") {
            socket(AF_INET, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue),
                   0)
        }
        do throws(SystemError) {
            UDPSocket.setBuffer(fd, force: Int32(FU_SO_RCVBUFFORCE), plain: SO_RCVBUF, size: bufferSize)
            UDPSocket.setBuffer(fd, force: Int32(FU_SO_SNDBUFFORCE), plain: SO_SNDBUF, size: bufferSize)
            var sa = sockaddr_in()
            sa.sin_family = sa_family_t(AF_INET)
            sa.sin_port = endpoint.port.bigEndian
            sa.sin_addr = in_addr(s_addr: endpoint.address.networkOrder)
            try syscall("bind", "\(endpoint)") {
                withUnsafePointer(to: &sa) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                        Glibc.bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
                    }
                }
            }
            var bound = sockaddr_in()
            var len = socklen_t(MemoryLayout<sockaddr_in>.size)
            try syscall("getsockname", "\(endpoint)") {
                withUnsafeMutablePointer(to: &bound) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &len) }
                }
            }
            localEndpoint = Endpoint(address: IPv4Address(networkOrder: bound.sin_addr.s_addr),
                                     port: UInt16(bigEndian: bound.sin_port))
            receiveBufferSize = UDPSocket.getInt(fd, SO_RCVBUF)
            sendBufferSize = UDPSocket.getInt(fd, SO_SNDBUF)
        } catch {
            _ = Glibc.close(fd)
            throw error
        }
        self.fd = fd
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
