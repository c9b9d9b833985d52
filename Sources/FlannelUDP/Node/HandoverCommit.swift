import Foundation
import Logging
#if canImport(Glibc)
import Glibc
#endif

// The commit is the one step of a handover (Handover.swift) whose outcome the new daemon can fail to learn: the
// old daemon may have taken it and let go while its answer was lost (the connection broke, the 10 s ran out, the
// old daemon died). Guessing is wrong either way: "not taken" when it was leaves nobody forwarding and nobody
// owning the device and the lease; "taken" when it was not leaves two daemons forwarding. So it is found out.
//
// The old daemon answers before it lets go (its workers stopped, its descriptors still open; the rest runs as the
// reply's `afterward`, and it exits only once we have recorded ourselves), so the normal run cannot lose the answer
// to the old daemon's exit. If it is lost all the same, the new daemon
//   1. asks the old one to abort: taken (.ok) means it never took the commit and forwards on: not committed;
//   2. otherwise watches the old daemon, the process verified at `begin` (pid and start time), until
//        it is gone                      -> committed (had it died rather than let go, nobody would forward
//                                           either, and the queues, sockets and lease are ours already),
//        its status says "handed over"   -> committed (it waits for us to record ourselves, then exits),
//        its status says "running"       -> not committed (it abandoned the handover: a committed one goes back
//                                           to "running" only when its successor, we, died),
//        `boundMilliseconds` pass        -> not committed: it is there, neither leaving nor saying "running".
//                                           A begun daemon says "running" 20 s after the begin at the latest
//                                           (`OutgoingHandover.timeoutMilliseconds`), so this is one whose status
//                                           does not answer. Whatever it is at, it forwards on once we exit: a
//                                           begun handover resumes when its replacing daemon dies, a committed one
//                                           takes the node back when its successor dies before recording itself.

/// Which way a commit went whose answer was lost, and why we believe so.
enum CommitOutcome: Equatable, Sendable {
    case committed(because: String)
    case notCommitted(because: String)
}

enum CommitSettlement {
    /// Longer than the old daemon's own handover timeout, after which one that did not commit says "running".
    static let boundMilliseconds = OutgoingHandover.timeoutMilliseconds + 5_000

    /// Watches `old` until it shows which way the commit went (see above), for at most `milliseconds`.
    /// `phase` is the old daemon's phase as its `status` reports it, nil when it does not answer.
    static func watch(_ old: DaemonIdentity, milliseconds: Int64 = boundMilliseconds,
                      phase: () -> DaemonPhase?) -> CommitOutcome {
        let deadline = MonotonicClock.milliseconds() + milliseconds
        let who = "the old daemon (pid \(old.pid))"
        var said: DaemonPhase?
        while true {
            // Start time, not only the pid: a recycled pid is another process, and a zombie is gone.
            if DaemonState.startTicks(of: old.pid) != old.startTicks {
                return .committed(because: "\(who) has exited")
            }
            switch phase() {
            case .handedOver?: return .committed(because: "\(who) says it has handed over")
            case .running?: return .notCommitted(because: "\(who) says it is running: it abandoned the handover and forwards on")
            case let other?: said = other
            case nil: break
            }
            if MonotonicClock.milliseconds() >= deadline {
                let state = said.map { "last saying '\($0.rawValue)'" } ?? "not answering"
                return .notCommitted(because: "\(who) is still there after \(milliseconds) ms, \(state)")
            }
            usleep(20_000)
        }
    }
}

extension HandoverClient {
    /// Tells the old daemon to let go. Returns when it did (its answer, or found out when the answer was lost);
    /// otherwise it has been told to abort (or resumes by itself once we exit) and keeps forwarding, and this throws.
    static func commit(_ old: HandoverState, daemon: DaemonIdentity, paths: RuntimePaths,
                       logger: Logger) throws(Failure) {
        let answer: ControlResponse
        do { answer = try exchange(.commit(token: old.token), paths: paths) } catch {
            return try settle(old, daemon: daemon, paths: paths, logger: logger, lost: error)
        }
        if answer == .ok { return }
        abort(old, paths: paths, logger: logger)
        switch answer {
        case .error(let message): throw .failed("the running daemon did not let go: \(message); it keeps forwarding")
        default: throw .failed("the running daemon answered the commit with something else; it keeps forwarding")
        }
    }

    /// A commit whose answer was `lost`: aborted, or watched until the old daemon shows which way it went.
    private static func settle(_ old: HandoverState, daemon: DaemonIdentity, paths: RuntimePaths, logger: Logger,
                               lost: FlannelError) throws(Failure) {
        logger.warning("the answer to the commit was lost (\(lost)); finding out whether the old daemon let go")
        let outcome: CommitOutcome
        if (try? exchange(.abort(token: old.token), paths: paths)) == .ok {
            outcome = .notCommitted(because: "the old daemon (pid \(daemon.pid)) took the abort: it had not taken the commit and forwards on")
        } else {
            outcome = CommitSettlement.watch(daemon) { phase(of: daemon, paths: paths) }
        }
        switch outcome {
        case .committed(let why):
            logger.warning("the commit went through: \(why); taking over")
        case .notCommitted(let why):
            logger.error("the commit did not go through: \(why)")
            throw .failed("replace: the answer to the commit was lost (\(lost)), and \(why)")
        }
    }

    /// The phase `daemon` reports in its status, nil when it does not answer (or another process does).
    static func phase(of daemon: DaemonIdentity, paths: RuntimePaths) -> DaemonPhase? {
        guard let answer = try? ControlClient.exchange(.request(.status), paths: paths, timeoutSeconds: 2),
              answer.daemon == daemon, case .status(let status) = answer.response else { return nil }
        return status.phase
    }
}
