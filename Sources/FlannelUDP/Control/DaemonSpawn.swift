import CShims
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// `up --detach`: start this same program again, without --detach, as the daemon, and wait for it to say whether
/// it came up. A threaded Swift process must not fork(), so this is posix_spawn of /proc/self/exe with a pipe
/// for the verdict (`READY` or `ERROR <why>`, written by `Readiness`), stdin from /dev/null, stdout/stderr to the
/// log file, in a new session so the daemon outlives the shell. The etcd password goes to the daemon in its
/// environment, never in its argv (every local user can read argv; see `EtcdPassword`).
public enum DaemonSpawn {
    /// The daemon's verdict `ERROR <message>` with its exit code, as the domain error it came from: the daemon is
    /// this program, whose `fail` mapped that error to the code (64 `.usage`, 3 `.notRunning`, else 1), so `up
    /// --detach` exits as the daemon did.
    static func daemonFailed(_ message: String, exitStatus: Int32) -> FlannelError {
        switch exitStatus {
        case 64: return .usage(message)
        case 3: return .notRunning(message)
        default: return .failed(message)
        }
    }

    /// Starts the daemon for `device` with `arguments` (this process's argv, first the program) minus `--detach`
    /// and the etcd password, and waits until it is ready. Returns its pid and the log file it writes.
    public static func start(device: String, logFile: String?, etcdPassword: String?,
                             arguments: [String] = CommandLine.arguments) throws(FlannelError)
        -> (pid: pid_t, log: String) {
        let paths = RuntimePaths(device: device)
        let log = logFile ?? paths.logFile
        // Opened here, checked (directory, no symlink, a regular file of root's), so a bad log path fails `up`
        // before the daemon has changed anything.
        let logFD = try FlannelError.system(try LogFile.open(log))
        defer { _ = close(logFD) }

        var pipeFDs: [Int32] = [-1, -1]
        guard pipe(&pipeFDs) == 0 else { throw .system(SystemError.current("create", "readiness pipe")) }
        let (readEnd, writeEnd) = (pipeFDs[0], pipeFDs[1])

        var args = [arguments[0]]
            + EtcdPassword.daemonArguments(Array(arguments.dropFirst())).filter { $0 != "--detach" }
        // In the daemon the readiness pipe is always fd 3; everything above it is closed.
        args += ["--ready-fd", "3"]
        var environment: [String] = []
        if var entry = environ as UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>? {
            while let p = entry.pointee { environment.append(String(cString: p)); entry += 1 }
        }
        let pid: pid_t
        do throws(SystemError) {
            // The child keeps only the write end.
            try syscall("set close-on-exec on", "readiness pipe") { fcntl(readEnd, F_SETFD, FD_CLOEXEC) }
            pid = try spawn(args: args,
                            environment: EtcdPassword.daemonEnvironment(environment, password: etcdPassword),
                            stdout: logFD, ready: writeEnd)
        } catch {
            _ = close(readEnd)
            _ = close(writeEnd)
            throw .system(error)
        }
        _ = close(writeEnd)

        // Wait for the verdict; EOF without one means the daemon died before it could say anything.
        var buffer = [UInt8]()
        var chunk = [UInt8](repeating: 0, count: 512)
        while true {
            let n = chunk.withUnsafeMutableBytes { read(readEnd, $0.baseAddress!, $0.count) }
            if n < 0 && errno == EINTR { continue }
            if n < 0 {
                let error = SystemError.current("read", "readiness pipe of daemon pid \(pid)")
                _ = close(readEnd)
                throw .system(error)
            }
            if n == 0 { break }
            buffer += chunk[0..<n]
        }
        _ = close(readEnd)
        let line = String(decoding: buffer, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
        if line == "READY" { return (pid, log) }
        var status: Int32 = 0
        let exited = waitpid(pid, &status, 0) == pid
        let code = exited && (status & 0x7f) == 0 ? (status >> 8) & 0xff : 1
        if line.hasPrefix("ERROR ") { throw daemonFailed(String(line.dropFirst(6)), exitStatus: code) }
        throw .failed("the daemon exited before it was ready (status \(status)); see \(log)")
    }

    /// posix_spawn of /proc/self/exe: stdin /dev/null, stdout and stderr `stdout`, `ready` as fd 3, every other
    /// descriptor closed, in a new session. Each step of the set-up is checked: a descriptor of this process that
    /// leaked into the daemon would outlive `up`.
    private static func spawn(args: [String], environment: [String], stdout: Int32, ready: Int32)
        throws(SystemError) -> pid_t {
        func check(_ step: String, _ rc: Int32) throws(SystemError) {
            guard rc == 0 else { throw SystemError(step, "daemon (/proc/self/exe)", errno: rc) }
        }
        var actions = posix_spawn_file_actions_t()
        try check("posix_spawn_file_actions_init for", posix_spawn_file_actions_init(&actions))
        defer { posix_spawn_file_actions_destroy(&actions) }
        try check("open /dev/null as stdin of", posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0))
        try check("set the log as stdout of", posix_spawn_file_actions_adddup2(&actions, stdout, 1))
        try check("set the log as stderr of", posix_spawn_file_actions_adddup2(&actions, 1, 2))
        try check("pass the readiness pipe to", posix_spawn_file_actions_adddup2(&actions, ready, 3))
        try check("close the other descriptors of", fu_spawn_file_actions_addclosefrom(&actions, 4))

        var attr = posix_spawnattr_t()
        try check("posix_spawnattr_init for", posix_spawnattr_init(&attr))
        defer { posix_spawnattr_destroy(&attr) }
        try check("start a new session for", posix_spawnattr_setflags(&attr, Int16(FU_POSIX_SPAWN_SETSID)))

        let cArgs = args.map { strdup($0) } + [nil]
        defer { cArgs.forEach { free($0) } }
        let cEnv = environment.map { strdup($0) } + [nil]
        defer { cEnv.forEach { free($0) } }
        // strdup fails only without memory; a nil inside either list would end it early, and the daemon would
        // start with arguments or environment cut short.
        guard !cArgs.dropLast().contains(nil), !cEnv.dropLast().contains(nil) else {
            throw SystemError("copy the arguments and environment of", "daemon (/proc/self/exe)", errno: ENOMEM)
        }
        var pid: pid_t = 0
        try check("start", posix_spawn(&pid, "/proc/self/exe", &actions, &attr, cArgs, cEnv))
        return pid
    }
}
