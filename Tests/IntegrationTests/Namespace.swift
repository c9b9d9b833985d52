// Shared helpers for integration tests: running commands, and throwaway network namespaces to run them in.
//
// The rule these helpers exist for: an integration test never changes the root network namespace (no device,
// address, route or sysctl there) and sends traffic only inside namespaces it created. So:
//   - `TestNamespace(prefix:)` creates a namespace with a name unique to this process and test
//     ("fu-nl-4711-3"); `destroy()` (also run by deinit) kills whatever still runs inside and deletes it;
//   - `run(_:)` runs a command inside it with `ip netns exec`, never in the caller's namespace;
//   - `withEntered(_:)` moves the *calling thread* into it with setns(2) for the duration of a closure, so library
//     code (a Netlink socket, a tun device, a UDP socket) can be exercised there; it verifies the switch before
//     running the closure and always switches back.
//
// Typical use:
//
//     let ns = try TestNamespace(prefix: "fu-nl")      // skips the test when not root
//     defer { ns.destroy() }
//     try ns.run(["ip", "link", "add", "veth0", "type", "veth", "peer", "name", "veth1"])
//     try ns.withEntered {
//         let nl = try Netlink()                       // opened inside: the socket belongs to `ns`
//         ...
//     }

import Foundation
import Synchronization
import TestSupport
import XCTest
#if canImport(Glibc)
import Glibc
#endif

// MARK: - Running commands

/// What a finished command left behind.
struct CommandResult: Sendable {
    /// The exit status, or 128 + signal number when a signal ended it.
    var status: Int32
    var stdout: String
    var stderr: String

    var succeeded: Bool { status == 0 }
}

/// A command that exited non-zero, with everything needed to see why in a test log.
struct CommandFailure: Error, CustomStringConvertible {
    var arguments: [String]
    var result: CommandResult

    var description: String {
        let err = result.stderr.trimmingCharacters(in: .whitespacesAndNewlines)
        return "`\(arguments.joined(separator: " "))` exited \(result.status)" + (err.isEmpty ? "" : ": \(err)")
    }
}

enum Command {
    /// Runs a command (the first argument is looked up in PATH) and waits for it, capturing stdout and stderr.
    /// Output goes to temporary files rather than pipes, so a command that writes a lot to both cannot deadlock.
    ///
    /// The child starts in the calling thread's network namespace: inside `TestNamespace.withEntered` that is the
    /// test namespace. Prefer `TestNamespace.run`, which says where the command runs.
    static func run(_ arguments: [String]) throws -> CommandResult {
        precondition(!arguments.isEmpty, "no command given")
        let directory = FileManager.default.temporaryDirectory
        let outURL = directory.appendingPathComponent("fu-cmd-\(getpid())-\(UUID().uuidString).out")
        let errURL = directory.appendingPathComponent("fu-cmd-\(getpid())-\(UUID().uuidString).err")
        guard FileManager.default.createFile(atPath: outURL.path, contents: nil),
              FileManager.default.createFile(atPath: errURL.path, contents: nil)
        else { throw CocoaError(.fileWriteUnknown) }
        defer {
            try? FileManager.default.removeItem(at: outURL)
            try? FileManager.default.removeItem(at: errURL)
        }
        let out = try FileHandle(forWritingTo: outURL)
        let err = try FileHandle(forWritingTo: errURL)
        defer {
            try? out.close()
            try? err.close()
        }

        let process = try startBackground(arguments, output: out, errors: err)
        process.waitUntilExit()

        let status = process.terminationReason == .uncaughtSignal
            ? 128 + process.terminationStatus : process.terminationStatus
        return CommandResult(status: status,
                             stdout: (try? String(contentsOf: outURL, encoding: .utf8)) ?? "",
                             stderr: (try? String(contentsOf: errURL, encoding: .utf8)) ?? "")
    }

    /// Runs a command and returns its stdout; throws `CommandFailure` when it exits non-zero.
    @discardableResult
    static func check(_ arguments: [String]) throws -> String {
        let result = try run(arguments)
        guard result.succeeded else { throw CommandFailure(arguments: arguments, result: result) }
        return result.stdout
    }
}

// MARK: - Network namespaces

/// A network namespace created for one test and deleted after it.
///
/// Needs root: `init` throws `XCTSkip` otherwise, so a test that starts with `try TestNamespace(prefix:)` is
/// skipped with a message rather than failed when run unprivileged. Call `destroy()` in the test's teardown or a
/// `defer` (deinit does it too, as a backstop).
final class TestNamespace {
    /// The namespace's name under /run/netns: "<prefix>-<pid>-<counter>".
    let name: String
    private var destroyed = false

    private static let counter = Mutex(0)

    /// Throws `XCTSkip` unless the process runs as root.
    static func requireRoot() throws {
        guard geteuid() == 0 else {
            throw XCTSkip("integration tests need root (they create network namespaces); skipping")
        }
    }

    /// Creates the namespace ("ip netns add") and brings its loopback up.
    /// - Parameter prefix: identifies the test suite, e.g. "fu-nl" for the netlink tests.
    init(prefix: String) throws {
        try TestNamespace.requireRoot()
        let n = TestNamespace.counter.withLock { value in
            value += 1
            return value
        }
        name = "\(prefix)-\(getpid())-\(n)"
        // A namespace of this name can only be left over from an earlier process with the same pid.
        if FileManager.default.fileExists(atPath: "/run/netns/\(name)") {
            _ = try? Command.run(["ip", "netns", "del", name])
        }
        try Command.check(["ip", "netns", "add", name])
        do {
            try run(["ip", "link", "set", "lo", "up"])
        } catch {
            destroy()
            throw error
        }
    }

    deinit { destroy() }

    /// Runs a command inside the namespace (`ip netns exec NAME ...`) and returns its stdout.
    /// - Throws: `CommandFailure` when it exits non-zero.
    @discardableResult
    func run(_ arguments: [String]) throws -> String {
        precondition(!destroyed, "namespace \(name) already destroyed")
        return try Command.check(["ip", "netns", "exec", name] + arguments)
    }

    /// Runs `body` with the calling thread inside the namespace, then moves the thread back.
    ///
    /// setns(2) changes only the calling thread: do all the work that must happen inside on this thread, and do
    /// not hop threads (no `await`) inside `body`. Sockets opened inside stay in the namespace after the switch
    /// back. Before `body` runs, the thread's namespace is compared with the target's (same nsfs inode), so a
    /// failed switch can never let the body run in the root namespace.
    func withEntered<T>(_ body: () throws -> T) throws -> T {
        precondition(!destroyed, "namespace \(name) already destroyed")
        let original = open("/proc/thread-self/ns/net", O_RDONLY | O_CLOEXEC)
        guard original >= 0 else { throw NamespaceError("open /proc/thread-self/ns/net", errno) }
        defer { close(original) }
        let path = "/run/netns/\(name)"
        let target = open(path, O_RDONLY | O_CLOEXEC)
        guard target >= 0 else { throw NamespaceError("open \(path)", errno) }
        defer { close(target) }

        guard TestNamespace.setns(target, TestNamespace.cloneNewNet) == 0 else {
            throw NamespaceError("setns \(path)", errno)
        }
        defer {
            // Staying in the test namespace would run later tests on this thread in a deleted namespace.
            if TestNamespace.setns(original, TestNamespace.cloneNewNet) != 0 {
                let reason = String(cString: strerror(errno))
                fatalError("cannot move the test thread back to its network namespace: \(reason)")
            }
        }
        guard let now = TestNamespace.inode(of: "/proc/thread-self/ns/net"), now == TestNamespace.inode(of: path)
        else { throw NamespaceError("setns \(path) did not take effect", EINVAL) }
        return try body()
    }

    /// The PIDs of processes whose network namespace is this one (`ip netns pids`).
    func pids() -> [pid_t] {
        guard let out = try? Command.check(["ip", "netns", "pids", name]) else { return [] }
        return out.split(whereSeparator: \.isWhitespace).compactMap { pid_t($0) }
    }

    /// Kills every process still inside (SIGKILL), waits for them to go, and deletes the namespace. Idempotent;
    /// never throws, so it is safe in teardown after a failure.
    func destroy() {
        guard !destroyed else { return }
        destroyed = true
        for pid in pids() where pid != getpid() {
            kill(pid, SIGKILL)
        }
        _ = waitUntil(timeout: 5) { pids().filter { $0 != getpid() }.isEmpty }
        let result = try? Command.run(["ip", "netns", "del", name])
        if let result, !result.succeeded {
            print("warning: could not delete network namespace \(name): \(result.stderr)")
        }
    }

    // setns(2) and CLONE_NEWNET are behind _GNU_SOURCE, which Swift's Glibc module does not define; the tests have
    // no C target of their own, so look the function up at run time.
    private static let cloneNewNet: Int32 = 0x4000_0000
    private typealias SetnsFunction = @convention(c) (Int32, Int32) -> Int32
    private static let setns: SetnsFunction = {
        guard let symbol = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "setns") else {
            fatalError("the C library has no setns()")
        }
        return unsafeBitCast(symbol, to: SetnsFunction.self)
    }()

    private static func inode(of path: String) -> ino_t? {
        var st = stat()
        guard stat(path, &st) == 0 else { return nil }
        return st.st_ino
    }
}

/// A failed step of entering a namespace.
struct NamespaceError: Error, CustomStringConvertible {
    var step: String
    var errno: Int32
    init(_ step: String, _ errno: Int32) {
        self.step = step
        self.errno = errno
    }
    var description: String { "\(step): \(String(cString: strerror(errno)))" }
}
