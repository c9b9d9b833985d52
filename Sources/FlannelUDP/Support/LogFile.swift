#if canImport(Glibc)
import Glibc
#endif

/// A detached daemon's log file, opened by `up --detach` before the daemon starts, so that a refusal is an error
/// of `up` that changes nothing.
public enum LogFile {
    /// Opens `path` for appending (creating it 0600): its directory must pass `SecureDirectory.ensure` (created
    /// 0700 where missing), a symlink at `path` is refused (O_NOFOLLOW), and an existing file must be a regular file
    /// owned by root (or `owner`). Returns a close-on-exec descriptor.
    public static func open(_ path: String, owner: uid_t = geteuid()) throws(SystemError) -> Int32 {
        let slash = path.lastIndex(of: "/")
        let dir = slash.map { $0 == path.startIndex ? "/" : String(path[..<$0]) } ?? "."
        try SecureDirectory.ensure(dir, mode: 0o700, owner: owner)
        // O_NONBLOCK so that a FIFO at the path cannot hang us; cleared again below once it is known to be a file.
        let flags = O_WRONLY | O_CREAT | O_APPEND | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY | O_NONBLOCK
        let fd = Glibc.open(path, flags, 0o600)
        guard fd >= 0 else {
            if errno == ELOOP { throw SystemError("open log file", "\(path) (a symlink)", errno: ELOOP) }
            throw SystemError.current("open log file", path)
        }
        var st = stat()
        do throws(SystemError) {
            try syscall("inspect log file", path) { fstat(fd, &st) }
            guard st.st_mode & S_IFMT == S_IFREG else {
                throw SystemError("use log file", "\(path) (not a regular file)", errno: EINVAL)
            }
            guard st.st_uid == 0 || st.st_uid == owner else {
                throw SystemError("use log file", "\(path) (owned by uid \(st.st_uid), not root)", errno: EPERM)
            }
            try syscall("set flags of log file", path) { fcntl(fd, F_SETFL, O_WRONLY | O_APPEND) }
        } catch {
            _ = close(fd)
            throw error
        }
        return fd
    }
}
