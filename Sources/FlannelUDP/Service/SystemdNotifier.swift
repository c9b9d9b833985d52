import CShims
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// The sd_notify protocol, written against its description (sd_notify(3), "NOTIFY_SOCKET"): the service manager
/// puts the path of an AF_UNIX datagram socket in `NOTIFY_SOCKET` (a file system path, or an abstract name
/// written with a leading '@'), and the service sends it newline-separated `KEY=VALUE` assignments, one
/// datagram per message: `READY=1`, `RELOADING=1` (with `MONOTONIC_USEC=`), `STOPPING=1`, `STATUS=...`,
/// `WATCHDOG=1`. No libsystemd at run time.
///
/// A failed send is returned to the caller, which logs it: the manager may have gone away, and a service is not
/// stopped for that.
public final class SystemdNotifier: @unchecked Sendable {  // immutable after init; sendto is thread-safe
    /// As given in `NOTIFY_SOCKET`.
    public let socketPath: String
    private let fd: Int32
    private var address = sockaddr_un()
    private let addressLength: socklen_t

    /// A `NOTIFY_SOCKET` value that names no AF_UNIX address: bad input, `.usage`.
    static func badSocket(_ value: String, _ problem: String) -> FlannelError {
        .usage("NOTIFY_SOCKET=\(value): \(problem)")
    }

    /// nil when `NOTIFY_SOCKET` is unset or empty (not started by a service manager that wants notifications).
    /// - Throws: `.usage` for a value that is no AF_UNIX address; `.system` if no socket can be created.
    public static func fromEnvironment(_ environment: [String: String] = ProcessInfo.processInfo.environment)
        throws(FlannelError) -> SystemdNotifier? {
        guard let path = environment["NOTIFY_SOCKET"], !path.isEmpty else { return nil }
        return try SystemdNotifier(socketPath: path)
    }

    public init(socketPath: String) throws(FlannelError) {
        self.socketPath = socketPath
        var bytes = Array(socketPath.utf8)
        let capacity = MemoryLayout.size(ofValue: address.sun_path)
        if bytes.first == UInt8(ascii: "@") {
            bytes[0] = 0  // abstract: a leading NUL, the name not NUL-terminated, the length says where it ends
            guard bytes.count > 1, bytes.count <= capacity else {
                throw Self.badSocket(socketPath, "an abstract socket name must have 1 to \(capacity - 1) characters")
            }
            addressLength = socklen_t(MemoryLayout<sa_family_t>.size + bytes.count)
        } else if bytes.first == UInt8(ascii: "/") {
            guard bytes.count < capacity else {
                throw Self.badSocket(socketPath, "longer than a unix socket path can be (\(capacity - 1) bytes)")
            }
            addressLength = socklen_t(MemoryLayout<sa_family_t>.size + bytes.count + 1)
        } else {
            throw Self.badSocket(socketPath, "not an absolute path or an @abstract name (only AF_UNIX is supported)")
        }
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            for (i, b) in bytes.enumerated() { raw[i] = b }
        }
        fd = try FlannelError.system(try syscall("create sd_notify socket for", socketPath) {
            socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        })
    }

    deinit { _ = close(fd) }

    /// Sends one message of `KEY=VALUE` lines. A value must not contain a newline (a STATUS line is flattened).
    public func send(_ assignments: [String]) throws(SystemError) {
        let message = Array(assignments.joined(separator: "\n").utf8)
        let object = socketPath
        _ = try withUnsafePointer(to: &address) { (p: UnsafePointer<sockaddr_un>) throws(SystemError) -> Int in
            try p.withMemoryRebound(to: sockaddr.self, capacity: 1) { (sa: UnsafePointer<sockaddr>) throws(SystemError) -> Int in
                try syscall("send sd_notify message to", object) {
                    message.withUnsafeBytes { sendto(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL), sa, addressLength) }
                }
            }
        }
    }

    /// `STATUS=<line>`: newlines become spaces.
    public static func status(_ text: String) -> String {
        "STATUS=" + text.replacingOccurrences(of: "\n", with: " ")
    }

    /// `MONOTONIC_USEC=<now>`, which systemd wants with `RELOADING=1` (CLOCK_MONOTONIC in microseconds).
    public static func monotonicNow() -> String {
        "MONOTONIC_USEC=\(MonotonicClock.nanoseconds() / 1000)"
    }
}

/// `WATCHDOG_USEC` (and `WATCHDOG_PID`) as the service manager sets them: how often it wants `WATCHDOG=1`.
public struct WatchdogSettings: Equatable, Sendable {
    /// The manager's timeout in microseconds; pings go out at half of it, as sd_watchdog_enabled(3) advises.
    public var timeoutMicroseconds: UInt64
    public var pingIntervalSeconds: Double { Double(timeoutMicroseconds) / 2_000_000 }

    public struct Invalid: Error, CustomStringConvertible, Sendable {
        public var variable: String
        public var value: String
        public var description: String { "\(variable)=\(value): not a positive integer" }
    }

    /// nil when no watchdog is asked for, or when `WATCHDOG_PID` names another process (the variables were
    /// meant for a parent and leaked into our environment).
    public static func fromEnvironment(_ environment: [String: String] = ProcessInfo.processInfo.environment,
                                       pid: pid_t = getpid()) throws(Invalid) -> WatchdogSettings? {
        guard let text = environment["WATCHDOG_USEC"], !text.isEmpty else { return nil }
        guard let usec = UInt64(text), usec > 0 else { throw Invalid(variable: "WATCHDOG_USEC", value: text) }
        if let pidText = environment["WATCHDOG_PID"], !pidText.isEmpty {
            guard let owner = pid_t(pidText), owner > 0 else { throw Invalid(variable: "WATCHDOG_PID", value: pidText) }
            if owner != pid { return nil }
        }
        return WatchdogSettings(timeoutMicroseconds: usec)
    }

    /// How long a forwarding worker may sleep in its blocking receive so that its heartbeat moves at least twice per ping
    /// interval: a quarter of the interval, at most one second, at least 10 ms.
    public var heartbeatMilliseconds: Int32 {
        Int32(min(1000, max(10, Double(timeoutMicroseconds) / 8000)))
    }
}
