import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Runs async work (the etcd client) from the daemon's main thread and waits for it, while still answering
/// SIGINT/SIGTERM: those are blocked in every thread of the daemon and collected with sigwait, so a plain
/// semaphore wait would leave an operator's Ctrl-C unanswered for as long as etcd is unreachable.
enum Blocking {
    struct Interrupted: Error, CustomStringConvertible {
        var signal: Int32
        var description: String { "interrupted by \(signal == SIGINT ? "SIGINT" : "SIGTERM") during start-up" }
    }

    private final class Box<T>: @unchecked Sendable {  // written once by the task, read after the semaphore
        var result: Result<T, Error>?
    }

    static func run<T>(_ body: @escaping @Sendable () async throws -> T) throws -> T {
        let box = Box<T>()
        let done = DispatchSemaphore(value: 0)
        let task = Task.detached {
            do { box.result = .success(try await body()) } catch { box.result = .failure(error) }
            done.signal()
        }
        var set = sigset_t()
        sigemptyset(&set)
        sigaddset(&set, SIGINT)
        sigaddset(&set, SIGTERM)
        while done.wait(timeout: .now() + .milliseconds(100)) == .timedOut {
            var zero = timespec(tv_sec: 0, tv_nsec: 0)
            let sig = sigtimedwait(&set, nil, &zero)
            if sig == SIGINT || sig == SIGTERM {
                task.cancel()
                done.wait()
                throw Interrupted(signal: sig)
            }
        }
        return try box.result!.get()
    }
}
