import Foundation
import Synchronization

/// Starts Foundation `Process`es one at a time within this process.
///
/// On Linux, `Process.run` learns that its child exited from a socket pair that it creates without close-on-exec,
/// and it closes the parent's other descriptors in the child from a list it makes before the spawn. A child that
/// another thread spawns in between inherits that socket's child end, and the first child's exit is then seen only
/// when the second child exits. A test's `ss`, a few milliseconds long, waited a minute that way for a Python
/// receiver started from another thread, and the test timed out. The same holds for the pipes `ExternalTool` gives
/// its child: a concurrent child that inherits one holds back the end of its output.
///
/// Under this lock a launch creates what its child inherits and spawns the child, and the parent has closed the
/// child's ends before the next launch begins. It covers every launch that goes through it (`ExternalTool`, the
/// tests' harness); descriptors that other code opens meanwhile may still be inherited, which is why a launch that
/// reads its child's output makes the pipe under the lock (`runReadingOutput`).
package enum ProcessLaunch {
    private static let lock = Mutex(())

    /// Runs `body` (which sets up and starts one or more processes) while no other launch through here runs.
    package static func serialized<T, E: Error>(_ body: () throws(E) -> T) throws(E) -> T {
        try lock.withLock { _ throws(E) -> T in try body() }
    }

    /// Starts `process`: `process.run()` under the lock.
    package static func run(_ process: Process) throws {
        try serialized { try process.run() }
    }

    /// Starts `process` with its standard output, and with `errorsToo` its standard error, into a new pipe, and
    /// returns the pipe to read. Foundation makes a `Pipe`'s descriptors without close-on-exec, so a pipe made
    /// before the lock is taken can be inherited by a child another thread starts meanwhile, which then holds the
    /// write end open and the reader sees the end of the output only when that child exits. Here the pipe is made
    /// under the lock, and `run()` has closed the parent's write end before the lock is let go.
    package static func runReadingOutput(_ process: Process, errorsToo: Bool = false) throws -> Pipe {
        try serialized { () throws -> Pipe in
            let pipe = Pipe()
            process.standardOutput = pipe
            if errorsToo { process.standardError = pipe }
            try process.run()
            return pipe
        }
    }
}
