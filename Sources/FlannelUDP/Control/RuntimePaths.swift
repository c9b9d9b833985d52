import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// Where a daemon keeps its control endpoint and state, keyed by device name and network namespace.
///
/// Everything lives in the per-namespace state directory `<run dir>/ns-<netns inode>/` (run dir `/run/flannel-udp`,
/// or `$FLANNEL_UDP_RUN_DIR`), which is checked with `SecureDirectory` (root-owned all the way down, not writable
/// by group or others) before anything is created or believed in it:
/// - `<device>.lock`: flock()ed by the daemon for its whole life: the "already running" lock. The kernel drops it
///   when the daemon dies, however it dies, so a killed daemon never blocks the next `up`.
/// - `<device>.sock`: the control endpoint, a pathname unix socket (mode 0600). Only root can create a name in the
///   directory, so no other user can squat it or answer on it; a stale one is unlinked and re-bound under the lock.
///   (It used to be an abstract name, which any local user could bind first.)
/// - `<device>.json`: the daemon's state (pid and start time first, so the CLI can check who answers), written at
///   start and removed on a clean exit; `down` and `cleanup` remove a dead daemon's leftovers.
public struct RuntimePaths: Sendable {
    public let device: String
    public let runDirectory: String
    public let namespaceID: UInt64

    public init(device: String, environment: [String: String] = ProcessInfo.processInfo.environment) {
        self.device = device
        runDirectory = environment["FLANNEL_UDP_RUN_DIR"] ?? "/run/flannel-udp"
        namespaceID = RuntimePaths.currentNamespaceID()
    }

    /// The inode of /proc/self/ns/net: unique per network namespace while it exists.
    public static func currentNamespaceID() -> UInt64 {
        var st = stat()
        guard stat("/proc/self/ns/net", &st) == 0 else { return 0 }
        return UInt64(st.st_ino)
    }

    public var stateDirectory: String { "\(runDirectory)/ns-\(namespaceID)" }
    public var stateFile: String { "\(stateDirectory)/\(device).json" }
    public var logFile: String { "\(stateDirectory)/\(device).log" }
    public var controlSocket: String { "\(stateDirectory)/\(device).sock" }
    public var lockFile: String { "\(stateDirectory)/\(device).lock" }
}

/// What a running daemon records about itself, for `status`, `down` and `cleanup`.
public struct DaemonState: Codable, Equatable, Sendable {
    public var pid: Int32
    /// The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), so that a recycled pid is
    /// not mistaken for the daemon.
    public var startTicks: UInt64
    public var device: String
    public var network: String
    public var subnet: String
    public var subnetFile: String?
    public var listen: String
    public var startedAt: Date
    /// Exactly what the daemon wrote to `subnetFile`: `down` removes a killed daemon's subnet file only if it still
    /// holds this (nil, as from an older version, means: leave it).
    public var subnetFileContents: String?

    /// True while the recorded process still exists and is the same process (same start time).
    public var isAlive: Bool {
        guard let ticks = DaemonState.startTicks(of: pid) else { return false }
        return ticks == startTicks
    }

    /// Field 22 (starttime) of /proc/PID/stat, or nil when there is no such process or it has already exited
    /// (a zombie waiting to be reaped is dead for our purposes: its descriptors, device and socket are gone).
    public static func startTicks(of pid: Int32) -> UInt64? {
        guard let data = FileManager.default.contents(atPath: "/proc/\(pid)/stat"),
              let text = String(data: data, encoding: .utf8),
              let close = text.lastIndex(of: ")") else { return nil }
        // After "pid (comm)" come fields 3...; starttime is field 22, i.e. index 19 of the remainder.
        let fields = text[text.index(after: close)...].split(separator: " ")
        guard fields.count > 19, fields[0] != "Z", fields[0] != "X" else { return nil }
        return UInt64(fields[19])
    }

    public static func load(path: String) -> DaemonState? {
        guard let data = FileManager.default.contents(atPath: path) else { return nil }
        return try? JSONFormat.decoder().decode(DaemonState.self, from: data)
    }

    public func write(to path: String) throws(SystemError) {
        let data = (try? JSONFormat.encoder(pretty: true).encode(self)) ?? Data()
        try AtomicFile.write(String(decoding: data, as: UTF8.self) + "\n", to: path, mode: 0o600)
    }
}
