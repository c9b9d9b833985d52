import CShims
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Talks to a running daemon, after checking that it is one.
///
/// Before a request is sent, the client checks, in order: the state directory (SecureDirectory: root's, not
/// writable by others), that the socket's listener is root (SO_PEERCRED), and that its pid is the one in the
/// state file with the start time recorded there (so a recycled pid or a process that merely reports a pid is not
/// believed). Anything else is refused as untrusted and nothing is sent. A caller that is not root cannot read the
/// state file; it checks only that root answers, and can only ever be refused by the daemon. Failures are
/// `FlannelError`s: no daemon is `.notRunning`, the OS's refusal `.system`, everything else `.failed`.
public enum ControlClient {
    /// Nothing listens on the device's control socket in this network namespace (exit 3).
    static func notRunning(_ device: String) -> FlannelError {
        .notRunning("no flannel-udp daemon is running for \(device) in this network namespace")
    }

    /// The caller may not reach the control socket (not root).
    static func permissionDenied(_ why: String) -> FlannelError {
        .failed("permission denied: only root may control flannel-udp (\(why))")
    }

    /// Something answers that is not the verified daemon; it was told nothing and is not believed.
    static func untrusted(_ why: String) -> FlannelError {
        .failed("not trusting the control socket: \(why)")
    }

    static func badResponse(_ why: String) -> FlannelError {
        .failed("bad response from daemon: \(why)")
    }

    /// One answer and who gave it (nil for a caller that is not root, which cannot check the state file).
    public struct Answer: Sendable {
        public let response: ControlResponse
        public let daemon: DaemonIdentity?
        /// Descriptors the daemon passed along (`acceptingDescriptors` only): the caller's to close.
        public var descriptors: [Int32] = []
    }

    /// Sends one request to the daemon of `paths.device` and returns its response.
    public static func send(_ request: ControlRequest, paths: RuntimePaths, timeoutSeconds: Int = 5)
        throws(FlannelError) -> ControlResponse {
        try exchange(.request(request), paths: paths, timeoutSeconds: timeoutSeconds).response
    }

    /// Sends one request to the verified daemon of `paths.device`; the answer says who answered.
    ///
    /// `acceptingDescriptors`: keep descriptors the daemon passes along (a handover's); otherwise any are closed.
    public static func exchange(_ request: ControlMessage, paths: RuntimePaths, timeoutSeconds: Int = 5,
                                acceptingDescriptors: Bool = false) throws(FlannelError) -> Answer {
        let asRoot = geteuid() == 0
        do { try SecureDirectory.check(paths.stateDirectory) } catch {
            switch error.errno {
            case ENOENT: throw notRunning(paths.device)
            case EACCES: throw permissionDenied(error.description)
            default: throw untrusted(error.description)
            }
        }
        let path = paths.controlSocket
        let fd = try FlannelError.system(try syscall("create control socket", path) {
            socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        })
        defer { _ = close(fd) }
        try FlannelError.system(try UnixSocket.setTimeouts(fd, seconds: timeoutSeconds, what: path))
        let rc = try FlannelError.system(try UnixSocket.withAddress(path) { connect(fd, $0, $1) })
        if rc != 0 {
            let e = SystemError.current("connect to control socket", path)
            if e.errno == ECONNREFUSED || e.errno == ENOENT { throw notRunning(paths.device) }
            if e.errno == EACCES || e.errno == EPERM { throw permissionDenied(e.description) }
            throw .system(e)
        }
        let daemon = try verifyPeer(fd, paths: paths, asRoot: asRoot)

        do { try UnixSocket.writeAll(fd, ControlProtocol.encodeLine(request), what: path) } catch {
            // The daemon refuses a client it will not serve without reading its request and closes: the write
            // can then fail with EPIPE (or ECONNRESET) while the refusal is waiting to be read.
            guard error.errno == EPIPE || error.errno == ECONNRESET else { throw .system(error) }
        }
        var passed: [Int32] = []
        var kept = false
        defer { if !kept { passed.forEach { _ = close($0) } } }
        let outcome = try FlannelError.system(try UnixSocket.readLine(fd, limit: 16 * 1024 * 1024, what: path,
                                                                      descriptors: { passed.append($0) }))
        switch outcome {
        case .tooLong: throw badResponse("too long")
        case .line(let bytes), .eof(let bytes):
            if bytes.isEmpty { throw badResponse("daemon closed the connection without answering") }
            let response: ControlResponse
            do { response = try ControlProtocol.decode(ControlResponse.self, from: bytes) } catch {
                throw badResponse("\(error)")
            }
            kept = acceptingDescriptors
            return Answer(response: response, daemon: daemon, descriptors: kept ? passed : [])
        }
    }

    /// The listener must be root; for a root caller, also the process the state file names, started at the
    /// recorded time.
    private static func verifyPeer(_ fd: Int32, paths: RuntimePaths, asRoot: Bool) throws(FlannelError)
        -> DaemonIdentity? {
        let peer = try FlannelError.system(try UnixSocket.peerCredentials(fd, what: paths.controlSocket))
        guard peer.uid == 0 else {
            throw untrusted("\(paths.controlSocket) is held by uid \(peer.uid) (pid \(peer.pid)), not root")
        }
        guard asRoot else { return nil }
        guard let state = DaemonState.load(path: paths.stateFile) else {
            throw untrusted("pid \(peer.pid) answers on \(paths.controlSocket), but there is no readable state file \(paths.stateFile)")
        }
        guard state.pid == peer.pid else {
            throw untrusted("pid \(peer.pid) answers on \(paths.controlSocket), but \(paths.stateFile) names pid \(state.pid)")
        }
        guard peer.pid > 1, let ticks = DaemonState.startTicks(of: peer.pid), ticks == state.startTicks else {
            throw untrusted("pid \(peer.pid) answers on \(paths.controlSocket), but it is not the process that started at the time \(paths.stateFile) records")
        }
        return DaemonIdentity(pid: peer.pid, startTicks: ticks)
    }
}
