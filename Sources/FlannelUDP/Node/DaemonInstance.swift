import Foundation
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// What makes a process *the* daemon of a device in a network namespace, from the first moment of start-up to the
/// last of teardown: the checked state directory, the lock, the state file and the control endpoint.
///
/// Order matters both ways. Claiming: directory checked, lock taken (else "already running"), state written
/// (pid and start time, so clients can verify who answers), socket bound. Releasing: socket closed and unlinked
/// first (no client can reach a daemon without state), state removed, lock file removed while still held, lock
/// dropped, directory removed if empty.
final class DaemonInstance {
    let paths: RuntimePaths
    let control: ControlServer
    /// Nil while a replacing daemon waits for the one it replaces (`init(replacing:)`, `takeOver`).
    private var lock: DaemonLock?
    private let logger: Logger
    private var released = false

    /// Claims the device; nil when another daemon holds its lock (already running: nothing was changed).
    init?(paths: RuntimePaths, initialState: DaemonState, logger: Logger) throws(SystemError) {
        self.paths = paths
        self.logger = logger
        try SecureDirectory.ensure(paths.stateDirectory, mode: 0o700)
        guard let taken = try DaemonLock.acquire(paths.lockFile) else { return nil }
        lock = taken
        do {
            try initialState.write(to: paths.stateFile)
            control = try ControlServer(path: paths.controlSocket, logger: logger)
        } catch {
            _ = unlink(paths.stateFile)
            taken.release(removingFile: true)
            throw error
        }
    }

    /// A replacing daemon's instance (`up --replace`): the old daemon holds the lock, the state file and the
    /// control socket's name, so this binds its endpoint under a temporary name in the same directory and takes
    /// everything over in `takeOver` once the old one has let go.
    init(replacing paths: RuntimePaths, logger: Logger) throws(SystemError) {
        self.paths = paths
        self.logger = logger
        try SecureDirectory.ensure(paths.stateDirectory, mode: 0o700)
        DaemonInstance.removeDeadReplacementSockets(paths)
        control = try ControlServer(path: paths.controlSocket + ".\(getpid())", logger: logger)
        lock = nil
    }

    /// Temporary endpoints (`<device>.sock.<pid>`) of replacing daemons that were killed before they took over.
    static func removeDeadReplacementSockets(_ paths: RuntimePaths) {
        let prefix = "\(paths.device).sock."
        for name in (try? FileManager.default.contentsOfDirectory(atPath: paths.stateDirectory)) ?? []
        where name.hasPrefix(prefix) {
            guard let pid = Int32(name.dropFirst(prefix.count)), pid > 0, kill(pid, 0) != 0, errno == ESRCH else { continue }
            _ = unlink("\(paths.stateDirectory)/\(name)")
        }
    }

    /// After the old daemon committed the handover: records our state, renames our endpoint over the old one's
    /// (clients verify the pid against the state file, so the state comes first), then takes the lock once the
    /// old daemon has exited (it releases it last), waiting up to `timeoutMilliseconds`.
    func takeOver(_ state: DaemonState, timeoutMilliseconds: Int64 = 30_000) throws(SystemError) {
        try state.write(to: paths.stateFile)
        try control.move(to: paths.controlSocket)
        let deadline = MonotonicClock.milliseconds() + timeoutMilliseconds
        while true {
            if let taken = try DaemonLock.acquire(paths.lockFile) {
                lock = taken
                return
            }
            guard MonotonicClock.milliseconds() < deadline else {
                throw SystemError("take over the lock (the old daemon did not exit)", paths.lockFile, errno: ETIMEDOUT)
            }
            usleep(10_000)
        }
    }

    /// Rewrites the state file (the daemon knows its network, subnet and listening address once it is up).
    func record(_ state: DaemonState) {
        do { try state.write(to: paths.stateFile) } catch { logger.warning("cannot write state file: \(error)") }
    }

    /// With `handingOver`, only the lock is dropped: the socket's name, the state file and the lock file are the
    /// successor's now. Without the lock (a replacement that failed before `takeOver`) only the endpoint goes.
    func release(handingOver: Bool = false) {
        guard !released else { return }
        released = true
        guard let lock, !handingOver else {
            control.stop(removingName: !handingOver)
            lock?.release(removingFile: false)
            return
        }
        control.stop()
        if unlink(paths.stateFile) != 0 && errno != ENOENT {
            logger.warning("\(SystemError.current("remove state file", paths.stateFile))")
        }
        if let e = lock.release(removingFile: true) { logger.warning("\(e)") }
        DaemonInstance.removeDeadReplacementSockets(paths)
        _ = rmdir(paths.stateDirectory)  // fails harmlessly while another device's files (or a log) are in it
    }

    deinit { release() }
}
