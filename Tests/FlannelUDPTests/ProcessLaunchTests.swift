import Foundation
import Synchronization
import XCTest
@testable import FlannelUDP

/// `ProcessLaunch` against the race it exists for: one thread starts long-lived children (`sleep 5`) while another
/// starts short ones (`true`), both as fast as they can. Had a long child inherited a short one's exit socket, the
/// short one's exit would be seen only when that long child exits, 5 s later. With the launches not serialized,
/// each of eight runs here had such a short child. Unprivileged: `sleep` and `true` only.
final class ProcessLaunchTests: XCTestCase {
    func testAShortChildsExitIsNotHeldBackByALongOneStartedFromAnotherThread() throws {
        for tool in ["/usr/bin/sleep", "/usr/bin/true"] where !FileManager.default.isExecutableFile(atPath: tool) {
            throw XCTSkip("needs \(tool)")
        }
        // 500 of each: enough to race with, few enough for a small machine (about 65 MB of sleeping children).
        let count = 500
        let long = Mutex<[Process]>([])
        let launcher = Thread {
            for _ in 0..<count {
                let p = Process()
                p.executableURL = URL(fileURLWithPath: "/usr/bin/sleep")
                p.arguments = ["5"]
                guard (try? ProcessLaunch.run(p)) != nil else { break }
                long.withLock { $0.append(p) }
            }
        }
        launcher.start()
        defer {
            while !launcher.isFinished { usleep(10_000) }
            for p in long.withLock({ $0 }) where p.isRunning { kill(p.processIdentifier, SIGKILL) }
            for p in long.withLock({ $0 }) { p.waitUntilExit() }
        }

        // How long after its start each short child's exit was seen (its termination handler's time).
        let seenAfter = Mutex<[TimeInterval]>([])
        var short: [Process] = []
        for _ in 0..<count {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: "/usr/bin/true")
            let start = Date()
            p.terminationHandler = { _ in
                let t = Date().timeIntervalSince(start)
                seenAfter.withLock { $0.append(t) }
            }
            try ProcessLaunch.run(p)
            short.append(p)
        }
        for p in short { p.waitUntilExit() }
        XCTAssertTrue(waitUntilAll(count, in: seenAfter, timeout: 10), "not every short child's exit was seen")
        let longest = seenAfter.withLock { $0.max() ?? 0 }
        let started = long.withLock { $0.count }
        XCTAssertEqual(started, count, "the other thread could not start its children")
        XCTAssertLessThan(longest, 2.5, "a short child's exit was seen only when a long one started meanwhile exited")
        print("[+] \(count) short children beside \(started) long ones: each exit seen within "
              + "\(String(format: "%.3f", longest)) s")
    }

    private func waitUntilAll(_ n: Int, in times: borrowing Mutex<[TimeInterval]>, timeout: TimeInterval) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while times.withLock({ $0.count }) < n {
            if Date() >= deadline { return false }
            usleep(10_000)
        }
        return true
    }
}
