import XCTest
@testable import FlannelUDP
#if canImport(Glibc)
import Glibc
#endif

/// The self-pipe that wakes pollers: its end is close-on-exec and non-blocking (a spawned tool must not inherit it,
/// and `drain` must not block), and a wake stays visible to every poller until drained.
final class WakePipeTests: XCTestCase {
    func testTheReadEndIsCloseOnExecAndNonBlockingAndAWakeStaysUntilDrained() throws {
        let pipe = try WakePipe()
        XCTAssertNotEqual(fcntl(pipe.readFD, F_GETFD) & FD_CLOEXEC, 0, "close-on-exec")
        XCTAssertNotEqual(fcntl(pipe.readFD, F_GETFL) & O_NONBLOCK, 0, "non-blocking")

        func readable() -> Bool {
            var pfd = pollfd(fd: pipe.readFD, events: Int16(POLLIN), revents: 0)
            return poll(&pfd, 1, 0) == 1
        }
        XCTAssertFalse(readable())
        pipe.drain()  // nothing to read: returns at once
        pipe.wake()
        pipe.wake()
        XCTAssertTrue(readable())
        XCTAssertTrue(readable(), "a wake is not consumed by looking at it")
        pipe.drain()
        XCTAssertFalse(readable())
    }
}
