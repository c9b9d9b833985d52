import Foundation
import XCTest
@testable import FlannelCore
@testable import FlannelUDP

/// Regressions for bugs found by scripts/fuzz.sh and the fault/hostile integration tests.
final class FuzzAndFaultRegressionTests: XCTestCase {
    /// A control client that trickles its request one byte at a time, each within SO_RCVTIMEO, must not hold the
    /// control thread past the request timeout (the server is single-threaded: everyone else would wait).
    func testTricklingControlClientIsCutOffAtTheRequestTimeout() throws {
        var fds: [Int32] = [0, 0]
        XCTAssertEqual(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds), 0)
        defer { close(fds[0]); close(fds[1]) }
        try UnixSocket.setTimeouts(fds[0], seconds: 1)
        let writer = fds[1]
        let stop = DispatchSemaphore(value: 0)
        let finished = DispatchSemaphore(value: 0)
        Thread {
            // '{' then one more byte every 200 ms, never a newline, for up to 6 s.
            for _ in 0..<30 {
                var b = UInt8(ascii: " ")
                _ = send(writer, &b, 1, Int32(MSG_NOSIGNAL))
                if stop.wait(timeout: .now() + .milliseconds(200)) == .success { break }
            }
            finished.signal()
        }.start()
        let start = Date()
        XCTAssertThrowsError(try UnixSocket.readLine(fds[0], limit: 64 * 1024, what: "test", timeoutSeconds: 1)) {
            XCTAssertEqual(($0 as? SystemError)?.errno, ETIMEDOUT, "\($0)")
        }
        let elapsed = Date().timeIntervalSince(start)
        stop.signal()
        finished.wait()
        XCTAssertLessThan(elapsed, 3, "the trickling client held the reader for \(elapsed) s")
    }

    /// A complete line that arrives in pieces inside the timeout is still read.
    func testLineInPiecesWithinTheTimeoutIsRead() throws {
        var fds: [Int32] = [0, 0]
        XCTAssertEqual(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &fds), 0)
        defer { close(fds[0]); close(fds[1]) }
        for part in ["{\"sta", "tus\":{}}\n"] {
            _ = part.utf8CString.withUnsafeBufferPointer { send(fds[1], $0.baseAddress, part.utf8.count, 0) }
        }
        guard case .line(let bytes) = try UnixSocket.readLine(fds[0], limit: 1024, what: "test", timeoutSeconds: 2)
        else { return XCTFail("no line") }
        XCTAssertEqual(try ControlProtocol.decode(ControlRequest.self, from: bytes), .status)
    }
}
