import Foundation
import XCTest
#if canImport(Glibc)
import Glibc
#endif

/// A test case with a fresh directory of its own under the temporary directory (`dir`), created before each test
/// with `directoryMode` and removed after it, whatever the test left in it.
class TemporaryDirectoryTestCase: XCTestCase {
    /// The directory's name starts with this (then the pid and a random number).
    class var directoryPrefix: String { "fu-test" }
    class var directoryMode: mode_t { 0o700 }
    var dir = ""

    override func setUpWithError() throws {
        try super.setUpWithError()
        dir = NSTemporaryDirectory() + "\(Self.directoryPrefix)-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        XCTAssertEqual(mkdir(dir, Self.directoryMode), 0)
    }

    override func tearDown() {
        _ = try? FileManager.default.removeItem(atPath: dir)
        super.tearDown()
    }
}
