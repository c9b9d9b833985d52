import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// `down`: stop the verified daemon of a device and remove whatever is left of it.
///
/// The daemon is asked over the control socket (ControlClient verifies who answers first) and held by a pidfd
/// from the moment it is verified, so the SIGKILL after a timeout can only reach that process. A pid reported in
/// an answer is never used: a process that merely claims to be the daemon gets nothing signalled.
public enum DaemonStop {
    public enum Outcome: Sendable {
        /// No daemon was running; `removed` lists the dead one's files that were removed.
        case notRunning(removed: [String])
        case stopped(removed: [String])
    }

    /// Stops the daemon of `paths.device`; waits up to `timeoutSeconds` for it to exit, then SIGKILLs it through
    /// its pidfd. `progress` receives a line for anything the operator should hear about on the way. No daemon
    /// is an outcome, not an error: every error is a failure to stop one (`.failed` or `.system`).
    public static func stop(paths: RuntimePaths, keepLease: Bool, timeoutSeconds: Int,
                            progress: (String) -> Void) throws(FlannelError) -> Outcome {
        let state = DaemonState.load(path: paths.stateFile)
        let first: ControlClient.Answer
        do { first = try ControlClient.exchange(.request(.status), paths: paths) } catch {
            if case .notRunning = error { return .notRunning(removed: DaemonLeftovers.remove(paths: paths, state: state)) }
            throw error
        }
        guard let identity = first.daemon else { throw ControlClient.permissionDenied("the daemon's state is root's") }
        // From here on the pidfd names this process and no other, whatever happens to the pid.
        let process = try DaemonProcess(identity)
        if process != nil {
            let answer: ControlClient.Answer
            do { answer = try ControlClient.exchange(.request(.shutdown(keepLease: keepLease)), paths: paths) } catch {
                guard case .notRunning = error else { throw error }
                // It may have exited between the two requests: that is what we wanted. If it has not, the daemon
                // we hold no longer answers, and it is still there: a failure to stop it.
                if process?.waitForExit(milliseconds: 1000) == true {
                    return .stopped(removed: finish(paths: paths, state: state))
                }
                throw .failed(error.description)
            }
            guard answer.daemon == identity else {
                throw ControlClient.untrusted("the daemon changed between two requests (pid \(identity.pid), then \(answer.daemon.map { "\($0.pid)" } ?? "?"))")
            }
            if case .error(let m) = answer.response { throw .failed("daemon refused: \(m)") }
        }
        if let process, !process.waitForExit(milliseconds: timeoutSeconds * 1000) {
            progress("daemon (pid \(identity.pid)) did not stop within \(timeoutSeconds) s; killing it")
            try FlannelError.system(try process.send(SIGKILL))
            guard process.waitForExit(milliseconds: 5000) else {
                throw .failed("the daemon for \(paths.device) (pid \(identity.pid)) did not stop")
            }
        }
        return .stopped(removed: finish(paths: paths, state: state))
    }

    /// After the daemon exited: its tun goes with its last descriptor (which can trail the exit a little), then
    /// what a daemon that did not exit cleanly left is removed.
    private static func finish(paths: RuntimePaths, state: DaemonState?) -> [String] {
        let deadline = MonotonicClock.seconds() + 5
        while MonotonicClock.seconds() < deadline {
            guard let nl = try? Netlink(), (try? nl.link(named: paths.device)) != nil else { break }
            usleep(20_000)
        }
        return DaemonLeftovers.remove(paths: paths, state: state)
    }
}

/// What a daemon that did not exit cleanly leaves in its state directory, and its subnet file.
public enum DaemonLeftovers {
    /// Removes the dead daemon's subnet file (only if it still holds exactly what that daemon wrote, as its state
    /// records; anything else there is someone else's), state,
    /// log, socket and lock file, and the state directory if that leaves it empty. Nothing is removed while a
    /// daemon holds the lock. Returns the paths removed that an operator should hear about.
    @discardableResult
    public static func remove(paths: RuntimePaths, state: DaemonState?) -> [String] {
        // A reader's check first: a missing directory means nothing to remove, and nothing is created here.
        guard (try? SecureDirectory.check(paths.stateDirectory)) != nil else { return [] }
        guard let lock = try? DaemonLock.acquire(paths.lockFile) else { return [] }  // a daemon runs
        var removed: [String] = []
        if let state, !state.isAlive, let subnetFile = state.subnetFile, let written = state.subnetFileContents,
           (try? AtomicFile.removeIfUnchanged(subnetFile, expected: written)) == true {
            removed.append(subnetFile)
        }
        if unlink(paths.stateFile) == 0 { removed.append(paths.stateFile) }
        for path in [paths.logFile, paths.controlSocket] { _ = unlink(path) }
        lock.release(removingFile: true)
        _ = rmdir(paths.stateDirectory)  // fails harmlessly while another device's files are in it
        return removed
    }
}
