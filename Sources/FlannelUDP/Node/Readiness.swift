#if canImport(Glibc)
import Glibc
#endif

/// Tells the process that started a detached daemon whether start-up worked: one line on an inherited pipe,
/// `READY` or `ERROR <message>`, then the pipe is closed.
public struct Readiness: Sendable {
    public let fd: Int32?
    public init(fd: Int32?) { self.fd = fd }

    /// Each returns the write's error, if any: a reader that is gone (EPIPE: the `up --detach` that started us was
    /// killed or timed out) is no reason for the daemon to stop, so callers log it and carry on.
    @discardableResult public func ready() -> SystemError? { send("READY") }
    @discardableResult public func failed(_ message: String) -> SystemError? { send("ERROR \(message)") }

    private func send(_ line: String) -> SystemError? {
        guard let fd else { return nil }
        defer { _ = close(fd) }
        let bytes = Array((line.replacingOccurrences(of: "\n", with: " ") + "\n").utf8)
        do {
            // One short line into an empty pipe: written whole or not at all. SIGPIPE is ignored (Daemon.run).
            try syscall("report readiness on", "fd \(fd)") { bytes.withUnsafeBytes { write(fd, $0.baseAddress!, $0.count) } }
        } catch { return error }
        return nil
    }
}
