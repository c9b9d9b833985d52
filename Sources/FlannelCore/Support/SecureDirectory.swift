#if canImport(Glibc)
import Glibc
#endif

/// Directories that root writes into (the run directory, the subnet file's, the log file's), checked before use.
///
/// A file root creates or replaces in a directory that another user can change is an attack surface: that user can
/// plant a symlink where the file will be opened, or rename the directory away between a check and a use. So
/// before anything is created in `path`:
/// - every component from `/` down must be a directory (or a symlink, which is then followed and its target
///   checked the same way) owned by root or `owner`;
/// - `path` itself must not be writable by group or others;
/// - an ancestor may be writable by others only with the sticky bit (as `/tmp` is), where nobody else can rename
///   or remove our entries.
/// Missing components are created with `mode` (so they belong to `owner`, who runs this).
public enum SecureDirectory {
    /// Checks (and creates where missing) `path` as described above.
    /// - Parameter owner: besides root, the one uid that may own a component: root itself in production, the
    ///   test's own uid in unprivileged unit tests.
    public static func ensure(_ path: String, mode: mode_t = 0o755, owner: uid_t = 0) throws(SystemError) {
        try ensure(path, mode: mode, owner: owner, create: true, depth: 0)
    }

    /// The same checks as `ensure`, for a directory that must already exist (a reader's view: it creates nothing).
    /// A missing component is an error with ENOENT.
    public static func check(_ path: String, owner: uid_t = 0) throws(SystemError) {
        try ensure(path, mode: 0, owner: owner, create: false, depth: 0)
    }

    private static let maxSymlinks = 8

    private static func ensure(_ path: String, mode: mode_t, owner: uid_t, create: Bool, depth: Int) throws(SystemError) {
        guard depth <= maxSymlinks else { throw SystemError("resolve directory", path, errno: ELOOP) }
        let absolute = path.hasPrefix("/") ? path : currentDirectory() + "/" + path
        let parts = absolute.split(separator: "/").map(String.init)
        var current = "/"
        try check(current, isTarget: parts.isEmpty, owner: owner)
        for (i, part) in parts.enumerated() {
            let isTarget = i == parts.count - 1
            if part == "." { continue }
            let next = current == "/" ? "/" + part : current + "/" + part
            var st = stat()
            if lstat(next, &st) != 0 {
                guard errno == ENOENT, create else { throw SystemError.current("inspect directory", next) }
                if mkdir(next, mode) != 0 && errno != EEXIST { throw SystemError.current("create directory", next) }
            } else if st.st_mode & S_IFMT == S_IFLNK {
                // A symlink that belongs to the owner, in a directory that is already known to be safe, is as
                // trustworthy as a directory of the owner: follow it and check where it leads, from the root.
                guard st.st_uid == 0 || st.st_uid == owner else {
                    throw SystemError("use directory", "\(next) (a symlink owned by uid \(st.st_uid), not root)",
                                      errno: EPERM)
                }
                guard let target = realPath(next) else { throw SystemError.current("resolve symlink", next) }
                let rest = parts[(i + 1)...].joined(separator: "/")
                try ensure(rest.isEmpty ? target : target + "/" + rest, mode: mode, owner: owner, create: create,
                           depth: depth + 1)
                return
            }
            if part == ".." {
                // Walking back up: what remains was checked on the way down (or is an ancestor of it).
                current = (current as String).deletingLastComponent
                continue
            }
            current = next
            try check(current, isTarget: isTarget, owner: owner)
        }
    }

    private static func check(_ path: String, isTarget: Bool, owner: uid_t) throws(SystemError) {
        var st = stat()
        guard lstat(path, &st) == 0 else { throw SystemError.current("inspect directory", path) }
        guard st.st_mode & S_IFMT == S_IFDIR else { throw SystemError("use directory", path, errno: ENOTDIR) }
        guard st.st_uid == 0 || st.st_uid == owner else {
            throw SystemError("use directory", "\(path) (owned by uid \(st.st_uid), not root)", errno: EPERM)
        }
        let othersWrite = st.st_mode & (S_IWGRP | S_IWOTH) != 0
        let sticky = st.st_mode & S_ISVTX != 0
        if othersWrite && (isTarget || !sticky) {
            let what = String(st.st_mode & 0o7777, radix: 8)
            throw SystemError("use directory", "\(path) (mode \(what): writable by other users)", errno: EPERM)
        }
    }

    private static func currentDirectory() -> String {
        var buffer = [CChar](repeating: 0, count: Int(PATH_MAX) + 1)
        guard getcwd(&buffer, buffer.count) != nil else { return "/" }
        return String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    private static func realPath(_ path: String) -> String? {
        guard let resolved = realpath(path, nil) else { return nil }
        defer { free(resolved) }
        return String(cString: resolved)
    }
}

private extension String {
    var deletingLastComponent: String {
        guard let slash = lastIndex(of: "/"), slash != startIndex else { return "/" }
        return String(self[..<slash])
    }
}
