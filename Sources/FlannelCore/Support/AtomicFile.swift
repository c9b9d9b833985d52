import CShims
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Whole files that root writes (the subnet file, the state file) and reads back, safe against a local user who
/// wants root to write somewhere else:
///
/// - the directory passes `SecureDirectory.ensure` first (root-owned all the way, not writable by others), so nobody
///   else can plant a symlink or a file in it, or rename it away;
/// - the new contents are written to an unnamed file (O_TMPFILE) and fsynced, and only then linked to a temporary
///   name, so a process killed while writing leaves nothing behind; where the filesystem has no O_TMPFILE, or
///   /proc is not mounted (the link goes through /proc/self/fd), the temporary file is created under its name
///   from the start;
/// - the temporary name is unpredictable (`.<name>.<64 random bits>.tmp`) and never reused: the link fails on any
///   file or symlink already there (EEXIST), as the fallback's O_CREAT|O_EXCL|O_NOFOLLOW does, and another name is
///   tried instead;
/// - the finished file replaces the target with rename(2), which replaces a symlink at the target instead of
///   following it;
/// - reads open with O_NOFOLLOW and accept only a regular file.
public enum AtomicFile {
    /// How many temporary names are tried before giving up (each collision means someone is squatting on names).
    package static let attempts = 16
    /// Reads stop here: the files this tool reads back are a few hundred bytes.
    public static let readLimit = 64 * 1024

    /// Atomic whole-file replacement: write a temporary file in the same directory, fsync, rename over `path`, so a
    /// reader (the CNI plugin) never sees a half-written file. The directory is checked and created (0755) with
    /// `SecureDirectory.ensure`; `owner` is the one uid besides root that may own it (this process's, which is
    /// root whenever `up` runs).
    public static func write(_ text: String, to path: String, mode: mode_t,
                             owner: uid_t = geteuid()) throws(SystemError) {
        try write(text, to: path, mode: mode, owner: owner, suffix: randomSuffix)
    }

    /// `write` with the temporary name's suffix supplied by the caller: tests use it to put a file at the exact
    /// name that will be tried. `unnamed: false` skips O_TMPFILE (the fallback, for tests); `descriptors` is where
    /// this process's descriptors show as links (a test names a directory that does not exist, as without /proc);
    /// `beforeNaming` runs once the contents are written and synced, before any name is given (tests look at the
    /// directory there).
    package static func write(_ text: String, to path: String, mode: mode_t, owner: uid_t,
                              suffix: () -> String, unnamed: Bool = true, descriptors: String = "/proc/self/fd",
                              beforeNaming: () -> Void = {}) throws(SystemError) {
        let (dir, name) = split(path)
        try SecureDirectory.ensure(dir, mode: 0o755, owner: owner)
        var fd: Int32 = -1
        // An unnamed file can only be named through `descriptors`: without it (no /proc in a minimal container or
        // chroot), the named fallback from the start.
        if unnamed && access(descriptors, X_OK) == 0 {
            fd = fu_open_tmpfile(dir, mode)
            if fd < 0 && errno != EOPNOTSUPP && errno != EISDIR {
                throw SystemError.current("create unnamed file in", dir)
            }
        }
        // The temporary name: given only after the contents are synced when the file started unnamed.
        var tmp: String? = nil
        if fd < 0 { (fd, tmp) = try createTemporary(directory: dir, name: name, mode: mode, suffix: suffix) }
        var ok = false
        defer {
            if !ok, let tmp { unlink(tmp) }
        }
        let label = tmp ?? "unnamed file in \(dir)"
        do {
            // open() applied the umask; the file gets exactly `mode`.
            try syscall("set mode of", label) { fchmod(fd, mode) }
            try writeAll(fd, Array(text.utf8), name: label)
            try syscall("fsync", label) { fsync(fd) }
            beforeNaming()
            if tmp == nil { tmp = try giveName(fd, via: descriptors, directory: dir, name: name, suffix: suffix) }
        } catch {
            _ = close(fd)
            throw error
        }
        let named = tmp!
        // Not retried on EINTR: on Linux the descriptor is released even when close reports EINTR, and a retry
        // could close a descriptor another thread has opened since. fsync above already reported write errors.
        if close(fd) != 0 && errno != EINTR { throw SystemError.current("close", named) }
        try syscall("rename \(named) to", path) { rename(named, path) }
        ok = true
    }

    /// Links the unnamed file `fd` to a fresh random temporary name through `descriptors` (/proc/self/fd; linkat
    /// with AT_EMPTY_PATH would need CAP_DAC_READ_SEARCH, which the systemd unit does not grant). linkat never
    /// follows or replaces what is at the new name: a name that exists is skipped.
    private static func giveName(_ fd: Int32, via descriptors: String, directory: String, name: String,
                                 suffix: () -> String) throws(SystemError) -> String {
        let source = "\(descriptors)/\(fd)"
        return try claimName(directory: directory, name: name, suffix: suffix, purpose: "name temporary file for",
                             operation: "link \(source) to") { tmp in
            linkat(AT_FDCWD, source, AT_FDCWD, tmp, AT_SYMLINK_FOLLOW) == 0 ? () : nil
        }.name
    }

    /// The temporary file, created exclusively under a fresh random name; a name that exists (a planted file or
    /// symlink, or a leftover) is skipped, never opened.
    private static func createTemporary(directory: String, name: String, mode: mode_t,
                                        suffix: () -> String) throws(SystemError) -> (Int32, String) {
        try claimName(directory: directory, name: name, suffix: suffix, purpose: "create temporary file for",
                      operation: "create") { tmp in
            let fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode)
            return fd >= 0 ? fd : nil
        }
    }

    /// Tries fresh random temporary names (`.<name>.<suffix>.tmp` in `directory`) until `claim` takes one, at most
    /// `attempts` of them. `claim` returns nil with errno set when it fails: EEXIST (the name exists) and EINTR try
    /// another name; any other error is thrown at once, as `operation` on that name. All names taken: EEXIST.
    private static func claimName<T>(directory: String, name: String, suffix: () -> String, purpose: String,
                                     operation: String,
                                     _ claim: (String) -> T?) throws(SystemError) -> (result: T, name: String) {
        var last = SystemError(purpose, "\(directory)/\(name)", errno: EEXIST)
        for _ in 0..<attempts {
            let tmp = "\(directory)/.\(name).\(suffix()).tmp"
            if let result = claim(tmp) { return (result, tmp) }
            let err = errno
            if err == EINTR { continue }
            last = SystemError(operation, tmp, errno: err)
            if err != EEXIST { throw last }
        }
        throw last
    }

    private static func writeAll(_ fd: Int32, _ bytes: [UInt8], name: String) throws(SystemError) {
        let failure: SystemError? = bytes.withUnsafeBytes { buf in
            var off = 0
            while off < buf.count {
                let n = Glibc.write(fd, buf.baseAddress! + off, buf.count - off)
                if n < 0 {
                    if errno == EINTR { continue }
                    return SystemError.current("write", name)
                }
                off += n
            }
            return nil
        }
        if let failure { throw failure }
    }

    /// 64 random bits in hex, from the system's CSPRNG (getrandom).
    package static func randomSuffix() -> String {
        let hex = String(UInt64.random(in: .min ... .max), radix: 16)
        return String(repeating: "0", count: 16 - hex.count) + hex
    }

    package static func split(_ path: String) -> (directory: String, name: String) {
        guard let slash = path.lastIndex(of: "/") else { return (".", path) }
        let dir = String(path[..<slash])
        return (dir.isEmpty ? "/" : dir, String(path[path.index(after: slash)...]))
    }

    /// The contents of the regular file at `path`, or nil when there is none. A symlink is not followed (ELOOP), and
    /// anything but a regular file (a FIFO would block, a device would never end) is refused.
    public static func read(_ path: String) throws(SystemError) -> Data? {
        let fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK | O_NOCTTY)
        if fd < 0 {
            if errno == ENOENT { return nil }
            throw SystemError.current("open", path)
        }
        defer { _ = close(fd) }
        var st = stat()
        try syscall("inspect", path) { fstat(fd, &st) }
        guard st.st_mode & S_IFMT == S_IFREG else { throw SystemError("read", "\(path) (not a regular file)", errno: EINVAL) }
        var data = Data()
        var chunk = [UInt8](repeating: 0, count: 4096)
        while data.count <= readLimit {
            let n = try syscall("read", path) { chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress!, $0.count) } }
            if n == 0 { return data }
            data.append(contentsOf: chunk[0..<n])
        }
        throw SystemError("read", path, errno: EFBIG)
    }

    /// Removes `path` only if it holds exactly `expected`: a file that someone rewrote since (another tool, an
    /// operator, a newer run) is left alone. Returns whether it was removed.
    /// Between the comparison and the unlink only a writer to the (root-only) directory could swap the file.
    @discardableResult
    public static func removeIfUnchanged(_ path: String, expected: String) throws(SystemError) -> Bool {
        guard let current = try read(path), current == Data(expected.utf8) else { return false }
        try syscall("remove", path) { unlink(path) }
        return true
    }
}
