import CShims
#if canImport(Glibc)
import Glibc
#endif

/// Helpers for the control endpoint's unix stream socket (a pathname socket in the daemon's state directory).
enum UnixSocket {
    /// Fills a sockaddr_un for the filesystem path `path` and calls `body` with it and its length. Throws
    /// ENAMETOOLONG (naming the path) when the path does not fit in sun_path.
    static func withAddress<R>(_ path: String, _ body: (UnsafePointer<sockaddr>, socklen_t) -> R) throws(SystemError) -> R {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        let capacity = MemoryLayout.size(ofValue: addr.sun_path)
        guard !bytes.isEmpty, bytes.count < capacity, !bytes.contains(0) else {
            throw SystemError("use unix socket path", path, errno: ENAMETOOLONG)
        }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            for (i, b) in bytes.enumerated() { raw[i] = b }
            raw[bytes.count] = 0
        }
        let length = socklen_t(MemoryLayout<sa_family_t>.size + bytes.count + 1)
        return withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, length) }
        }
    }

    /// The peer's pid and uid (SO_PEERCRED): for a client, those of the process that called listen(); for the
    /// server, those of the process that called connect().
    static func peerCredentials(_ fd: Int32, what: String) throws(SystemError) -> (pid: pid_t, uid: uid_t) {
        var pid: pid_t = 0
        var uid: uid_t = 0
        try syscall("read peer credentials of", what) { fu_peer_credentials(fd, &pid, &uid) }
        return (pid, uid)
    }

    static func makeSocket(_ what: String) throws(SystemError) -> Int32 {
        try syscall("create control socket", what) { socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
    }

    /// Sets SO_RCVTIMEO and SO_SNDTIMEO.
    static func setTimeouts(_ fd: Int32, seconds: Int, what: String = "control socket") throws(SystemError) {
        var tv = timeval(tv_sec: seconds, tv_usec: 0)
        try syscall("set SO_RCVTIMEO on", what) { setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size)) }
        try syscall("set SO_SNDTIMEO on", what) { setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size)) }
    }

    /// Writes all of `bytes`, retrying short writes and EINTR; `descriptors` go along with the first byte
    /// (SCM_RIGHTS).
    static func writeAll(_ fd: Int32, _ bytes: [UInt8], what: String, descriptors: [Int32] = []) throws(SystemError) {
        var off = 0
        if !descriptors.isEmpty {
            while true {
                let n = bytes.withUnsafeBytes { fu_send_with_fds(fd, $0.baseAddress!, UInt($0.count), descriptors, Int32(descriptors.count)) }
                if n < 0 {
                    if errno == EINTR { continue }
                    throw SystemError.current("pass descriptors to", what)
                }
                off = n
                break
            }
        }
        while off < bytes.count {
            let n = bytes.withUnsafeBytes { buf in
                send(fd, buf.baseAddress! + off, buf.count - off, Int32(MSG_NOSIGNAL))
            }
            if n < 0 {
                if errno == EINTR { continue }
                throw SystemError.current("write to", what)
            }
            off += n
        }
    }

    enum ReadOutcome {
        case line([UInt8])
        case tooLong
        case eof([UInt8])
    }

    /// Reads until a newline, EOF, or `limit` bytes. Timeouts and errors throw.
    ///
    /// With `timeoutSeconds` the whole line must arrive within that time (ETIMEDOUT otherwise). SO_RCVTIMEO alone
    /// bounds each recv, not the request: a client trickling one byte per second would hold the (single) control
    /// thread for as long as it likes, and every other client with it.
    ///
    /// With `descriptors`, descriptors passed along (SCM_RIGHTS) are received too and handed to it, each once (the
    /// caller owns and must close them); without, the kernel discards any.
    static func readLine(_ fd: Int32, limit: Int, what: String, timeoutSeconds: Int? = nil,
                         descriptors: ((Int32) -> Void)? = nil) throws(SystemError) -> ReadOutcome {
        var data: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        let deadline = timeoutSeconds.map { MonotonicClock.milliseconds() + Int64($0) * 1000 }
        while true {
            if let deadline {
                let remaining = deadline - MonotonicClock.milliseconds()
                guard remaining > 0 else { throw SystemError("read from", what, errno: ETIMEDOUT) }
                var pfd = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                let r = poll(&pfd, 1, Int32(clamping: remaining))
                if r < 0 {
                    if errno == EINTR { continue }
                    throw SystemError.current("poll", what)
                }
                if r == 0 { throw SystemError("read from", what, errno: ETIMEDOUT) }
            }
            var passed = [Int32](repeating: -1, count: Int(FU_MAX_PASSED_FDS))
            var count: Int32 = 0
            let n = chunk.withUnsafeMutableBytes { buffer in
                descriptors == nil ? recv(fd, buffer.baseAddress!, buffer.count, 0)
                    : fu_recv_with_fds(fd, buffer.baseAddress!, UInt(buffer.count), &passed, &count)
            }
            for k in 0..<Int(count) { descriptors?(passed[k]) }
            if n < 0 {
                if errno == EINTR { continue }
                throw SystemError.current("read from", what)
            }
            if n == 0 { return .eof(data) }
            if let nl = chunk[0..<n].firstIndex(of: UInt8(ascii: "\n")) {
                data.append(contentsOf: chunk[0..<nl])
                return data.count > limit ? .tooLong : .line(data)
            }
            data.append(contentsOf: chunk[0..<n])
            if data.count > limit { return .tooLong }
        }
    }
}
