#if canImport(Glibc)
import Glibc
#endif

/// What a command-line front end needs from its own process, so that it never calls the C library itself.
public enum Console {
    /// Writes `text` to standard error at once, unbuffered (one write(2); a closed stderr is ignored).
    public static func writeError(_ text: String) {
        let bytes = Array(text.utf8)
        _ = bytes.withUnsafeBytes { write(STDERR_FILENO, $0.baseAddress!, $0.count) }
    }

    /// Whether this process runs with root's effective uid.
    public static var isRoot: Bool { geteuid() == 0 }

    /// Output into a closed pipe (`flannel-udp status | head -1`) or a control socket the daemon closed becomes an
    /// error where it happens (EPIPE), not death by SIGPIPE.
    public static func ignoreBrokenPipes() { signal(SIGPIPE, SIG_IGN) }
}
