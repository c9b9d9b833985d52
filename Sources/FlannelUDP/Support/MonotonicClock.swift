#if canImport(Glibc)
import Glibc
#endif

/// CLOCK_MONOTONIC, the one clock for deadlines, timeouts and back-off outside the data plane: it never jumps
/// when someone sets the wall clock. (The data plane's rate limiter reads CLOCK_MONOTONIC_COARSE itself.)
public enum MonotonicClock {
    /// Nanoseconds since an arbitrary fixed point (boot).
    public static func nanoseconds() -> UInt64 {
        var ts = timespec()
        _ = clock_gettime(CLOCK_MONOTONIC, &ts)  // cannot fail for CLOCK_MONOTONIC with a valid pointer
        return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
    }

    public static func seconds() -> Double { Double(nanoseconds()) / 1e9 }

    public static func milliseconds() -> Int64 { Int64(nanoseconds() / 1_000_000) }
}
