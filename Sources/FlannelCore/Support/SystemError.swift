#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// A failed system call or kernel request: what was attempted, on what, and the errno the kernel gave.
/// The description reads like iproute2's: "add route 10.244.0.0/16 dev flannel0: File exists".
public struct SystemError: Error, Equatable, CustomStringConvertible, Sendable {
    /// The operation, in words ("add route", "open tun device", "bind").
    public let operation: String
    /// The object it was applied to ("10.244.0.0/16 dev flannel0", "/dev/net/tun", "0.0.0.0:8285").
    public let object: String
    /// The errno value (positive).
    public let errno: Int32

    public init(_ operation: String, _ object: String, errno: Int32) {
        self.operation = operation
        self.object = object
        self.errno = errno
    }

    /// Captures the calling thread's current errno.
    public static func current(_ operation: String, _ object: String) -> SystemError {
        SystemError(operation, object, errno: Glibc.errno)
    }

    /// The C library's message for the errno ("File exists").
    public var reason: String { SystemError.describe(errno) }

    public var description: String {
        object.isEmpty ? "\(operation): \(reason)" : "\(operation) \(object): \(reason)"
    }

    public static func describe(_ code: Int32) -> String {
        guard let cstr = strerror(code) else { return "errno \(code)" }
        return String(cString: cstr)
    }
}

/// The one place a raw syscall result is checked: retries EINTR, throws `SystemError` for anything else negative.
/// `body` returns the syscall's result (-1 with errno set on failure).
@inline(__always)
@discardableResult
public func syscall<T: FixedWidthInteger>(_ operation: @autoclosure () -> String, _ object: @autoclosure () -> String,
                                          _ body: () -> T) throws(SystemError) -> T {
    while true {
        let rc = body()
        if rc >= 0 { return rc }
        let err = Glibc.errno
        if err == EINTR { continue }
        throw SystemError(operation(), object(), errno: err)
    }
}
