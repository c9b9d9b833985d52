import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Where the etcd password comes from, and how it is kept out of every other user's sight.
///
/// Every local user can read any process's argv (`ps`, /proc/PID/cmdline); only root (and the process's owner) can
/// read its environment (/proc/PID/environ, mode 0400, ptrace-checked). So:
/// - the ways to give a password are a file (`--etcd-password-file`, checked like ssh checks a private key), the
///   environment (`FLANNEL_UDP_ETCD_PASSWORD`, or flanneld's `FLANNELD_ETCD_PASSWORD`), and, discouraged,
///   `--etcd-password` (visible in argv until the process scrubs it, and in the shell's history);
/// - `up --detach` hands the daemon the password in its environment, never in its argv (`daemonArguments` strips
///   it), and the daemon erases the variable from its environment, /proc/PID/environ included, once it has read it
///   (`takeFromEnvironment`), so the commands it runs never inherit it.
public enum EtcdPassword {
    /// The variable `up --detach` hands the password over in, and the first one read.
    public static let variable = "FLANNEL_UDP_ETCD_PASSWORD"
    /// flanneld's name for the same thing, read when `variable` is not set.
    public static let flanneldVariable = "FLANNELD_ETCD_PASSWORD"
    public static var variables: [String] { [variable, flanneldVariable] }

    /// Options whose value is a secret or names one; never passed on to the daemon's argv.
    public static let secretOptions = ["--etcd-password", "--etcd-password-file"]

    /// A password file larger than this is not a password file.
    public static let fileLimit = 4096

    /// Reads a password file: a regular file (a symlink is refused: O_NOFOLLOW), owned by root (or `owner`, this
    /// process's uid), with no permission bits for group or others (like ssh's private keys: a password others can
    /// read is no longer a secret, one they can write is not ours). One trailing newline is removed.
    public static func read(file path: String, owner: uid_t = geteuid()) throws(SystemError) -> String {
        let fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK | O_NOCTTY)
        guard fd >= 0 else {
            if errno == ELOOP { throw SystemError("open password file", "\(path) (a symlink; give the file itself)", errno: ELOOP) }
            throw SystemError.current("open password file", path)
        }
        defer { _ = close(fd) }
        var st = stat()
        try syscall("inspect password file", path) { fstat(fd, &st) }
        guard st.st_mode & S_IFMT == S_IFREG else {
            throw SystemError("use password file", "\(path) (not a regular file)", errno: EINVAL)
        }
        guard st.st_uid == 0 || st.st_uid == owner else {
            throw SystemError("use password file", "\(path) (owned by uid \(st.st_uid), not root)", errno: EPERM)
        }
        guard st.st_mode & 0o077 == 0 else {
            let mode = String(st.st_mode & 0o7777, radix: 8)
            throw SystemError("use password file",
                              "\(path) (mode \(mode): group or others have access; chmod 600 it)", errno: EPERM)
        }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 1024)
        while true {
            let n = try syscall("read password file", path) {
                chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress!, $0.count) }
            }
            if n == 0 { break }
            bytes += chunk[0..<n]
            if bytes.count > fileLimit { throw SystemError("read password file", path, errno: EFBIG) }
        }
        if bytes.last == UInt8(ascii: "\n") { bytes.removeLast() }
        if bytes.last == UInt8(ascii: "\r") { bytes.removeLast() }
        guard !bytes.isEmpty else { throw SystemError("use password file", "\(path) (empty)", errno: EINVAL) }
        guard let text = String(validating: bytes, as: UTF8.self) else {
            throw SystemError("use password file", "\(path) (not UTF-8)", errno: EILSEQ)
        }
        return text
    }

    /// The password from the environment (`FLANNEL_UDP_ETCD_PASSWORD`, else `FLANNELD_ETCD_PASSWORD`), and both
    /// variables erased: their values are overwritten where they lie (so /proc/PID/environ, which shows the
    /// process's initial environment block, no longer holds them) and then unset (so no child inherits them).
    /// Returns nil when neither is set (or set but empty). Call before any other thread exists.
    public static func takeFromEnvironment() -> (name: String, value: String)? {
        var found: (name: String, value: String)?
        for name in variables {
            guard let raw = getenv(name) else { continue }
            let value = String(cString: raw)
            if found == nil && !value.isEmpty { found = (name, value) }
            erase(name)
        }
        return found
    }

    /// Overwrites the value of every `name=` entry in `environ` with NULs, then unsets `name`.
    static func erase(_ name: String) {
        let prefix = Array((name + "=").utf8)
        if var entry = environ as UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>? {
            while let p = entry.pointee {
                let matches = prefix.withUnsafeBufferPointer { pre in
                    strncmp(p, UnsafeRawPointer(pre.baseAddress!).assumingMemoryBound(to: CChar.self), pre.count) == 0
                }
                if matches { memset(p + prefix.count, 0, strlen(p + prefix.count)) }
                entry += 1
            }
        }
        unsetenv(name)
    }

    /// The arguments to start the daemon with: `arguments` (this process's argv after the program) without the
    /// secret options and their values, in either form (`--etcd-password X`, `--etcd-password=X`).
    public static func daemonArguments(_ arguments: [String]) -> [String] {
        var result: [String] = []
        var skipNext = false
        for argument in arguments {
            if skipNext { skipNext = false; continue }
            if secretOptions.contains(argument) { skipNext = true; continue }
            if secretOptions.contains(where: { argument.hasPrefix($0 + "=") }) { continue }
            result.append(argument)
        }
        return result
    }

    /// The daemon's environment: `environment` ("NAME=value" entries) without any password variable, plus
    /// `FLANNEL_UDP_ETCD_PASSWORD` when there is a password to hand over.
    public static func daemonEnvironment(_ environment: [String], password: String?) -> [String] {
        var result = environment.filter { entry in !variables.contains { entry.hasPrefix($0 + "=") } }
        if let password { result.append("\(variable)=\(password)") }
        return result
    }

    /// Overwrites, in this process's own argv (what /proc/PID/cmdline shows), the value of `--etcd-password`, so
    /// that it stays visible only until this runs. Call after the command line has been parsed.
    public static func scrubCommandLine() {
        let argc = Int(CommandLine.argc)
        let argv = CommandLine.unsafeArgv
        var i = 1
        while i < argc {
            guard let arg = argv[i] else { break }
            let text = String(cString: arg)
            if text == "--etcd-password", i + 1 < argc, let value = argv[i + 1] {
                memset(value, Int32(UInt8(ascii: "x")), strlen(value))
                i += 1
            } else if text.hasPrefix("--etcd-password=") {
                let start = arg + "--etcd-password=".utf8.count
                memset(start, Int32(UInt8(ascii: "x")), strlen(start))
            }
            i += 1
        }
    }
}

extension EtcdOptions {
    /// A warning when a user name or password would go to an `http://` endpoint, where anyone on the path reads it;
    /// nil when there are no credentials or every endpoint is https.
    public var plainTextCredentialsWarning: String? {
        guard username != nil || password != nil else { return nil }
        let plain = endpoints.filter { $0.lowercased().hasPrefix("http://") }
        guard !plain.isEmpty else { return nil }
        return "etcd credentials will travel unencrypted to \(plain.joined(separator: ", ")): anyone on the path "
            + "can read them; use https:// endpoints"
    }
}
