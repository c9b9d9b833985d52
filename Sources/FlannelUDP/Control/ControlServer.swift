import CShims
import Foundation
import Synchronization
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// Answers control requests. Calls are serialized (one request at a time), from any of the serving threads.
public protocol ControlHandler: AnyObject, Sendable {
    func handle(_ request: ControlRequest) -> ControlResponse
    /// A handover request, knowing the client's pid (SO_PEERCRED, root's). By default refused.
    func handle(_ request: HandoverRequest, from pid: pid_t) -> HandoverReply
    /// Descriptors to pass along with `response` (SCM_RIGHTS; the handler keeps its own). By default none.
    func descriptors(for response: ControlResponse) -> [Int32]
}

/// The answer to a handover request, and what to do once it has been written (or writing it failed): a daemon
/// that commits a handover lets go only after it has said so, so that its leaving cannot swallow the answer.
public struct HandoverReply: Sendable {
    public let response: ControlResponse
    /// Run by the serving thread once the answer is written and the connection closed, outside the handler's
    /// turn; also when writing failed (the decision was made with the answer, the client finds out otherwise).
    public let afterward: (@Sendable () -> Void)?

    public init(_ response: ControlResponse, afterward: (@Sendable () -> Void)? = nil) {
        self.response = response
        self.afterward = afterward
    }
}

extension ControlHandler {
    public func handle(_ request: HandoverRequest, from pid: pid_t) -> HandoverReply {
        HandoverReply(.error("this daemon does not hand over"))
    }
    public func descriptors(for response: ControlResponse) -> [Int32] { [] }
}

/// The daemon's control endpoint: a pathname unix socket in the root-only state directory (see `RuntimePaths`).
///
///     accept thread ── peer not root? ──> refusal written at once (never read), closed, rate-limited log line
///          │ root
///          v
///     bounded queue ──> `workerCount` serving threads: read one request (whole request within 2 s),
///                       handle it (serialized), answer, close, then run a handover reply's `afterward`
///
/// Only root (uid 0, checked with SO_PEERCRED on every connection) may talk to it. The directory already keeps
/// other users out; the check here is the second wall, for a directory someone loosened. A refused client costs
/// one non-blocking write and never occupies a serving thread, so idle or looping unprivileged clients cannot
/// delay root's requests or fill the log. A root client that sends garbage, too much, or nothing within the
/// timeout gets an error (or is dropped) and holds one serving thread for at most the timeout.
public final class ControlServer: @unchecked Sendable {  // fds immutable after init; queue and threads behind locks
    public static let workerCount = 4
    /// Root connections waiting for a serving thread beyond this are answered "busy" at once.
    public static let maxPending = 64
    static let refusal = "permission denied: only root may control flannel-udp"

    /// Where the socket is bound; changes only with `move(to:)`, before `start`.
    public private(set) var path: String
    private let listenFD: Int32
    private let wake: WakePipe
    private let logger: Logger
    private let queue = NSCondition()
    private var pending: [(fd: Int32, pid: pid_t)] = []
    private var stopping = false
    private var threads: [Thread] = []
    private let finished = DispatchGroup()
    /// Serialises requests: the handler sees one at a time, whichever worker thread serves it.
    private let handlerTurn = Mutex(())
    private var refusalLog = LogLimiter(intervalNanoseconds: 10_000_000_000)  // accept thread only
    private var closed = false

    /// Binds and listens on `path`, mode 0600. The caller holds the daemon lock (`DaemonLock`), so a file already
    /// at `path` is a dead daemon's socket: it is unlinked first.
    public init(path: String, logger: Logger) throws(SystemError) {
        self.path = path
        self.logger = logger
        let fd = try syscall("create control socket", path) {
            socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        }
        do throws(SystemError) {
            if unlink(path) != 0 && errno != ENOENT { throw SystemError.current("remove stale control socket", path) }
            if try UnixSocket.withAddress(path, { bind(fd, $0, $1) }) != 0 {
                throw SystemError.current("bind control socket", path)
            }
            // The directory is 0700 already; the socket itself is root's alone as well.
            try syscall("chmod control socket", path) { chmod(path, 0o600) }
            try syscall("listen on control socket", path) { listen(fd, 64) }
            wake = try WakePipe()
        } catch {
            _ = close(fd)
            throw error
        }
        listenFD = fd
    }

    /// Starts the accept thread and the serving threads.
    public func start(handler: ControlHandler) {
        let accept = Thread { [self] in
            self.acceptLoop()
            self.finished.leave()
        }
        accept.name = "control-accept"
        var all = [accept]
        for i in 0..<Self.workerCount {
            let t = Thread { [self] in
                self.serveLoop(handler: handler)
                self.finished.leave()
            }
            t.name = "control-\(i)"
            all.append(t)
        }
        threads = all
        for t in all {
            finished.enter()
            t.start()
        }
    }

    /// Renames the bound socket to `newPath` (rename(2): atomic, replacing whatever socket is there, in the same
    /// directory): a replacing daemon's endpoint takes the place of the old one's without a moment in which the
    /// name is missing.
    public func move(to newPath: String) throws(SystemError) {
        try syscall("rename control socket \(path) to", newPath) { rename(path, newPath) }
        path = newPath
    }

    /// Stops every thread (if started), closes the socket and removes its name (unless `removingName` is false:
    /// a daemon that handed over leaves the name, which is its successor's now). Safe to call more than once.
    public func stop(removingName: Bool = true) {
        wake.wake()
        queue.lock()
        stopping = true
        queue.broadcast()
        queue.unlock()
        if !threads.isEmpty {
            finished.wait()
            threads = []
        }
        queue.lock()
        for client in pending { _ = close(client.fd) }
        pending = []
        let first = !closed
        closed = true
        queue.unlock()
        guard first else { return }
        if !removingName {
            _ = close(listenFD)
            return
        }
        // Unlink before closing: a client that connects in between gets ECONNREFUSED from the closed socket
        // or ENOENT, both "not running".
        if unlink(path) != 0 && errno != ENOENT {
            logger.warning("\(SystemError.current("remove control socket", path))")
        }
        _ = close(listenFD)
    }

    deinit {
        if !closed { _ = close(listenFD) }
    }

    private func acceptLoop() {
        var fds = [pollfd(fd: listenFD, events: Int16(POLLIN), revents: 0),
                   pollfd(fd: wake.readFD, events: Int16(POLLIN), revents: 0)]
        while true {
            let n = poll(&fds, 2, -1)
            if n < 0 {
                if errno == EINTR { continue }
                logger.error("\(SystemError.current("poll", "control socket \(path)")); control endpoint stopped")
                return
            }
            if fds[1].revents != 0 { return }
            if fds[0].revents & Int16(POLLIN) == 0 { continue }
            let client = fu_accept_cloexec(listenFD)
            if client < 0 {
                if errno != EINTR && errno != EAGAIN && errno != ECONNABORTED {
                    logger.warning("\(SystemError.current("accept on control socket", path))")
                    if errno == EMFILE || errno == ENFILE { usleep(100_000) }  // do not spin while out of fds
                }
                continue
            }
            admit(client)
        }
    }

    /// Refuses a non-root client at once, queues a root one.
    private func admit(_ fd: Int32) {
        let peer: (pid: pid_t, uid: uid_t)
        do { peer = try UnixSocket.peerCredentials(fd, what: "control client") } catch {
            logger.warning("control: \(error)")
            _ = close(fd)
            return
        }
        guard peer.uid == 0 else {
            // Not read: a request from this client is never looked at. The answer fits in the empty socket buffer,
            // so the non-blocking send either goes out whole or the client is gone. The client reads it even if
            // its own write then fails with EPIPE (ControlClient does).
            answerNow(fd, .error(Self.refusal))
            _ = close(fd)
            let (log, suppressed) = refusalLog.allow()
            if log {
                let more = suppressed > 0 ? " (\(suppressed) more refused since the last such line)" : ""
                logger.warning("control: refused a client of uid \(peer.uid) (pid \(peer.pid)): only root may control the daemon\(more)")
            }
            return
        }
        queue.lock()
        if pending.count >= Self.maxPending {
            queue.unlock()
            answerNow(fd, .error("busy: too many control requests at once; try again"))
            _ = close(fd)
            return
        }
        pending.append((fd, peer.pid))
        queue.signal()
        queue.unlock()
    }

    private func answerNow(_ fd: Int32, _ response: ControlResponse) {
        let bytes = ControlProtocol.encodeLine(response)
        _ = bytes.withUnsafeBytes { send(fd, $0.baseAddress!, $0.count, Int32(MSG_NOSIGNAL | MSG_DONTWAIT)) }
    }

    private func serveLoop(handler: ControlHandler) {
        while true {
            queue.lock()
            while pending.isEmpty && !stopping { queue.wait() }
            if stopping {
                queue.unlock()
                return
            }
            let client = pending.removeFirst()
            queue.unlock()
            let afterward = serveClient(client.fd, pid: client.pid, handler: handler)
            _ = close(client.fd)
            afterward?()
        }
    }

    /// Reads, handles and answers one request; returns what is to be done once the connection is closed.
    private func serveClient(_ fd: Int32, pid: pid_t, handler: ControlHandler) -> (@Sendable () -> Void)? {
        let what = "control client"
        let response: ControlResponse
        var afterward: (@Sendable () -> Void)?
        do {
            try UnixSocket.setTimeouts(fd, seconds: ControlProtocol.requestTimeoutSeconds, what: what)
            switch try UnixSocket.readLine(fd, limit: ControlProtocol.maxRequestBytes, what: what,
                                           timeoutSeconds: ControlProtocol.requestTimeoutSeconds) {
            case .tooLong:
                response = .error("request longer than \(ControlProtocol.maxRequestBytes) bytes")
            case .eof(let bytes) where bytes.isEmpty:
                return nil
            case .line(let bytes), .eof(let bytes):
                if let message = try? ControlProtocol.decode(ControlMessage.self, from: bytes) {
                    let reply = handlerTurn.withLock { _ in
                        switch message {
                        case .request(let request): return HandoverReply(handler.handle(request))
                        case .handover(let request): return handler.handle(request, from: pid)
                        }
                    }
                    response = reply.response
                    afterward = reply.afterward
                } else {
                    response = .error("malformed request (expected one JSON object per line)")
                }
            }
        } catch {
            logger.debug("control: \(error)")
            return nil
        }
        do {
            try UnixSocket.writeAll(fd, ControlProtocol.encodeLine(response), what: what,
                                    descriptors: handler.descriptors(for: response))
        } catch {
            logger.debug("control: \(error)")
        }
        return afterward
    }
}
