#if canImport(Glibc)
import Glibc
#endif

/// `Endpoint` as the socket calls take and give it: a `sockaddr_in` in network byte order. The one place that
/// fills one in (bind, sendto, the peer table's destinations) and reads one back (getsockname, recvmmsg).
extension Endpoint {
    public var socketAddress: sockaddr_in {
        var sa = sockaddr_in()
        sa.sin_family = sa_family_t(AF_INET)
        sa.sin_port = port.bigEndian
        sa.sin_addr = in_addr(s_addr: address.networkOrder)
        return sa
    }

    /// The address and port of `sa`; the caller has checked that it is AF_INET.
    public init(_ sa: sockaddr_in) {
        self.init(address: IPv4Address(networkOrder: sa.sin_addr.s_addr), port: UInt16(bigEndian: sa.sin_port))
    }

    /// Calls `body` with the endpoint as the `sockaddr` pointer and length that bind and sendto take.
    public func withSocketAddress<R>(_ body: (UnsafePointer<sockaddr>, socklen_t) throws -> R) rethrows -> R {
        try socketAddress.withSockaddr(body)
    }
}

extension sockaddr_in {
    /// Calls `body` with this address as the `sockaddr` pointer and length that bind and sendto take.
    public func withSockaddr<R>(_ body: (UnsafePointer<sockaddr>, socklen_t) throws -> R) rethrows -> R {
        try withUnsafePointer(to: self) {
            try $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                try body($0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
    }
}
