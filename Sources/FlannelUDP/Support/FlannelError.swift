/// The one domain error: why a command or the daemon could not do what was asked, in one line, and which kind of
/// failure it is. The CLI maps each kind to one of its documented exit codes in one place (`fail`); the OS's own
/// failures stay `SystemError` underneath (`.system`).
public enum FlannelError: Error, CustomStringConvertible, Sendable, Equatable {
    /// The request does not fit this system or its input is bad (a missing interface, a bad peers file, a registry
    /// config that cannot work): nothing was changed. Exit 64.
    case usage(String)
    /// A system call or kernel request failed. Exit 1.
    case system(SystemError)
    /// Anything else that stopped the work (another daemon holds the device, a start-up step failed). Exit 1.
    case failed(String)
    /// No daemon runs for the device, so there is nothing to ask. Exit 3.
    case notRunning(String)
    /// A signal or `down` stopped the work before it was done (while waiting for the registry at start-up, say);
    /// what was taken has been given back. The daemon ends normally on it; anywhere else exit 1.
    case stopped(String)

    public var description: String {
        switch self {
        case .usage(let m), .failed(let m), .notRunning(let m), .stopped(let m): return m
        case .system(let e): return e.description
        }
    }

    /// Runs `body`, a request to the OS, and turns its `SystemError` into `.system`: the one conversion, instead
    /// of a catch-and-cast at each call.
    public static func system<T>(_ body: @autoclosure () throws(SystemError) -> T) throws(FlannelError) -> T {
        do { return try body() } catch { throw .system(error) }
    }
}
