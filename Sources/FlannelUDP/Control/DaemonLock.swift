#if canImport(Glibc)
import Glibc
#endif

/// The lock that keeps a second daemon off a device in a network namespace: an exclusive flock on
/// `<state dir>/<device>.lock`, held for the daemon's whole life.
///
/// The kernel drops an flock when the last descriptor of the open file closes, so a daemon that dies in any way
/// (SIGKILL included) leaves nothing that blocks the next one. Whoever holds the lock may remove the daemon's
/// files (socket, state, the lock file itself): the daemon on its way out, `down`/`cleanup` for a dead one.
///
/// Removing a lock file races with someone who opened it just before: they could then lock the removed inode
/// while a third process creates and locks a new file at the path. So after every successful flock the
/// descriptor's inode is compared with the path's, and on a mismatch the lock is retried on the new file.
public final class DaemonLock {
    public let path: String
    private var fd: Int32

    private init(path: String, fd: Int32) {
        self.path = path
        self.fd = fd
    }

    /// Takes the lock without waiting; nil when another process holds it. The directory must have been checked
    /// (SecureDirectory) by the caller. O_NOFOLLOW: a symlink at `path` is an error, never followed.
    public static func acquire(_ path: String) throws(SystemError) -> DaemonLock? {
        for _ in 0..<8 {
            let fd = try syscall("open lock file", path) { open(path, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0o600) }
            let rc = flock(fd, LOCK_EX | LOCK_NB)
            if rc != 0 {
                let err = errno
                _ = close(fd)
                if err == EWOULDBLOCK { return nil }
                if err == EINTR { continue }
                throw SystemError("lock", path, errno: err)
            }
            var held = stat()
            var named = stat()
            guard fstat(fd, &held) == 0 else {
                let e = SystemError.current("inspect lock file", path)
                _ = close(fd)
                throw e
            }
            if lstat(path, &named) == 0 && named.st_dev == held.st_dev && named.st_ino == held.st_ino {
                return DaemonLock(path: path, fd: fd)
            }
            // The file we locked was removed (or replaced) after we opened it: lock whatever is there now.
            _ = close(fd)
        }
        throw SystemError("lock", path, errno: EAGAIN)
    }

    /// Releases the lock; with `removingFile` the lock file is unlinked first, while still held. Returns the
    /// error of that unlink, if any (the lock is released regardless).
    @discardableResult
    public func release(removingFile: Bool) -> SystemError? {
        guard fd >= 0 else { return nil }
        var failure: SystemError?
        if removingFile && unlink(path) != 0 && errno != ENOENT { failure = SystemError.current("remove lock file", path) }
        _ = close(fd)
        fd = -1
        return failure
    }

    deinit { release(removingFile: false) }
}
