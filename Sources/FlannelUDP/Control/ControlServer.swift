import CShims
import Foundation
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// Answers control requests. Called on the control thread, one request at a time.
public protocol ControlHandler: AnyObject, Sendable {
    func handle(_ request: ControlRequest) -> ControlResponse
}

/// The daemon's control endpoint: an abstract unix socket served by one thread.
///
/// Only root (uid 0, checked with SO_PEERCRED on every connection) may talk to it. Each connection carries one
/// request; a client that sends garbage, too much, or nothing within the timeout gets an error (or is dropped) and
/// never blocks the next client for longer than the timeout.
public final class ControlServer: @unchecked Sendable {  // fd fields are immutable after init; thread owns the loop
    public let name: String
    private let listenFD: Int32
    private let wake: WakePipe
    private var thread: Thread?
    private let logger: Logger
    private let done = DispatchSemaphore(value: 0)

    public enum BindError: Error, CustomStringConvertible {
        case alreadyRunning(String)
        case system(SystemError)
        public var description: String {
            switch self {
            case .alreadyRunning(let name): return "another flannel-udp daemon already holds control socket @\(name) in this network namespace"
            case .system(let e): return e.description
            }
        }
    }

    /// Binds and listens on `@name`. Fails with `.alreadyRunning` when another process holds the name.
    public init(name: String, logger: Logger) throws(BindError) {
        self.name = name
        self.logger = logger
        let fd: Int32
        do { fd = try AbstractSocket.makeSocket("@\(name)") } catch { throw .system(error) }
        let rc = AbstractSocket.withAddress(name) { bind(fd, $0, $1) }
        if rc != 0 {
            let err = errno
            _ = close(fd)
            if err == EADDRINUSE { throw .alreadyRunning(name) }
            throw .system(SystemError("bind control socket", "@\(name)", errno: err))
        }
        if listen(fd, 16) != 0 {
            let e = SystemError.current("listen on control socket", "@\(name)")
            _ = close(fd)
            throw .system(e)
        }
        do { wake = try WakePipe() } catch {
            _ = close(fd)
            throw .system(error)
        }
        listenFD = fd
    }

    /// Starts serving on a background thread.
    public func start(handler: ControlHandler) {
        let t = Thread { [self] in
            self.serve(handler: handler)
            self.done.signal()
        }
        t.name = "control"
        thread = t
        t.start()
    }

    /// Stops the thread (if started) and closes the socket. Safe to call more than once.
    public func stop() {
        wake.wake()
        if thread != nil {
            done.wait()
            thread = nil
        }
    }

    deinit {
        _ = close(listenFD)
    }

    private func serve(handler: ControlHandler) {
        var fds = [pollfd(fd: listenFD, events: Int16(POLLIN), revents: 0),
                   pollfd(fd: wake.readFD, events: Int16(POLLIN), revents: 0)]
        while true {
            let n = poll(&fds, 2, -1)
            if n < 0 {
                if errno == EINTR { continue }
                logger.error("poll on control socket failed: \(SystemError.describe(errno))")
                return
            }
            if fds[1].revents != 0 { return }
            if fds[0].revents & Int16(POLLIN) == 0 { continue }
            let client = accept(listenFD, nil, nil)
            if client < 0 {
                if errno != EINTR && errno != EAGAIN && errno != ECONNABORTED {
                    logger.warning("accept on control socket failed: \(SystemError.describe(errno))")
                }
                continue
            }
            _ = fcntl(client, F_SETFD, FD_CLOEXEC)
            serveClient(client, handler: handler)
            _ = close(client)
        }
    }

    private func serveClient(_ fd: Int32, handler: ControlHandler) {
        AbstractSocket.setTimeouts(fd, seconds: ControlProtocol.requestTimeoutSeconds)
        var pid: pid_t = 0
        var uid: uid_t = 0
        guard fu_peer_credentials(fd, &pid, &uid) == 0 else {
            logger.warning("control: cannot read peer credentials: \(SystemError.describe(errno))")
            return
        }
        let what = "control client (pid \(pid))"
        guard uid == 0 else {
            logger.warning("control: refused a request from uid \(uid) (pid \(pid)): only root may control the daemon")
            // Take the request off the socket first (never decoded): closing with it unread makes the client's
            // write fail with EPIPE, and the client would report a broken pipe instead of this refusal.
            _ = try? AbstractSocket.readLine(fd, limit: ControlProtocol.maxRequestBytes, what: what,
                                             timeoutSeconds: ControlProtocol.requestTimeoutSeconds)
            try? AbstractSocket.writeAll(fd, ControlProtocol.encodeLine(ControlResponse.error("permission denied: only root may control flannel-udp")), what: what)
            return
        }
        let response: ControlResponse
        do {
            switch try AbstractSocket.readLine(fd, limit: ControlProtocol.maxRequestBytes, what: what,
                                              timeoutSeconds: ControlProtocol.requestTimeoutSeconds) {
            case .tooLong:
                response = .error("request longer than \(ControlProtocol.maxRequestBytes) bytes")
            case .eof(let bytes) where bytes.isEmpty:
                return
            case .line(let bytes), .eof(let bytes):
                if let request = try? ControlProtocol.decode(ControlRequest.self, from: bytes) {
                    response = handler.handle(request)
                } else {
                    response = .error("malformed request (expected one JSON object per line)")
                }
            }
        } catch {
            logger.debug("control: \(error)")
            return
        }
        do {
            try AbstractSocket.writeAll(fd, ControlProtocol.encodeLine(response), what: what)
        } catch {
            logger.debug("control: \(error)")
        }
    }
}

/// Talks to a running daemon.
public enum ControlClient {
    public enum Failure: Error, CustomStringConvertible {
        /// No daemon holds the socket name (ECONNREFUSED on an abstract name means nobody is bound).
        case notRunning(String)
        case system(SystemError)
        case badResponse(String)

        public var description: String {
            switch self {
            case .notRunning(let name): return "no flannel-udp daemon is running for \(name) in this network namespace"
            case .system(let e): return e.description
            case .badResponse(let why): return "bad response from daemon: \(why)"
            }
        }
    }

    /// Sends one request to the daemon of `paths.device` and returns its response.
    public static func send(_ request: ControlRequest, paths: RuntimePaths, timeoutSeconds: Int = 5) throws(Failure) -> ControlResponse {
        let name = paths.controlSocketName
        let fd: Int32
        do { fd = try AbstractSocket.makeSocket("@\(name)") } catch { throw .system(error) }
        defer { _ = close(fd) }
        AbstractSocket.setTimeouts(fd, seconds: timeoutSeconds)
        let rc = AbstractSocket.withAddress(name) { connect(fd, $0, $1) }
        if rc != 0 {
            if errno == ECONNREFUSED || errno == ENOENT { throw .notRunning(paths.device) }
            throw .system(SystemError.current("connect to control socket", "@\(name)"))
        }
        do {
            try AbstractSocket.writeAll(fd, ControlProtocol.encodeLine(request), what: "@\(name)")
            switch try AbstractSocket.readLine(fd, limit: 16 * 1024 * 1024, what: "@\(name)") {
            case .tooLong: throw Failure.badResponse("too long")
            case .line(let bytes), .eof(let bytes):
                if bytes.isEmpty { throw Failure.badResponse("daemon closed the connection without answering") }
                do { return try ControlProtocol.decode(ControlResponse.self, from: bytes) } catch {
                    throw Failure.badResponse("\(error)")
                }
            }
        } catch let e as SystemError {
            throw .system(e)
        } catch let e as Failure {
            throw e
        } catch {
            throw .badResponse("\(error)")
        }
    }
}
