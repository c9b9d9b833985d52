import Foundation
import Synchronization
import XCTest
@testable import FlannelUDP
import TestSupport

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
        let long = LongChildren(count)
        defer { long.end() }

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
        XCTAssertTrue(waitUntil(timeout: 10) { seenAfter.withLock { $0.count } >= count },
                      "not every short child's exit was seen")
        let longest = seenAfter.withLock { $0.max() ?? 0 }
        let started = long.started
        XCTAssertEqual(started, count, "the other thread could not start its children")
        XCTAssertLessThan(longest, 2.5, "a short child's exit was seen only when a long one started meanwhile exited")
        print("[+] \(count) short children beside \(started) long ones: each exit seen within "
              + "\(String(format: "%.3f", longest)) s")
    }

    /// The same race for a child's output: each short child (`echo`) writes into a pipe that the test reads to its
    /// end. Had a long child inherited the pipe's write end, that end would come only when the long child exits.
    /// Without the pipe made under the launch lock (tried: `Pipe()` before `ProcessLaunch.run`), 4 of 4 runs had
    /// a read that waited 5 s; with it, the longest took a few milliseconds. (The children are reaped at the end,
    /// so that each iteration is short and all of them overlap the other thread's launches.)
    func testAShortChildsOutputIsNotHeldOpenByALongOneStartedFromAnotherThread() throws {
        for tool in ["/usr/bin/sleep", "/usr/bin/echo"] where !FileManager.default.isExecutableFile(atPath: tool) {
            throw XCTSkip("needs \(tool)")
        }
        let count = 300
        let long = LongChildren(count)
        defer { long.end() }
        var longest: TimeInterval = 0
        var short: [Process] = []
        defer { for p in short { p.waitUntilExit() } }
        for i in 0..<count {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: "/usr/bin/echo")
            p.arguments = ["\(i)"]
            let start = Date()
            let output = try ProcessLaunch.runReadingOutput(p)
            short.append(p)
            let text = String(decoding: output.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            longest = max(longest, Date().timeIntervalSince(start))
            XCTAssertEqual(text, "\(i)\n")
        }
        XCTAssertEqual(long.started, count, "the other thread could not start its children")
        XCTAssertLessThan(longest, 2.5, "a short child's output ended only when a long one started meanwhile exited")
        print("[+] \(count) outputs read to their end beside \(long.started) long children: the longest took "
              + "\(String(format: "%.3f", longest)) s")
    }
}

/// `count` children that sleep 5 s, started one after another through `ProcessLaunch` by a thread of their own,
/// as fast as it can; `end()` waits for that thread, kills the children and reaps them.
private final class LongChildren {
    private final class List: Sendable { let processes = Mutex<[Process]>([]) }
    private let children = List()
    private let launcher: Thread

    init(_ count: Int) {
        let children = self.children
        launcher = Thread {
            for _ in 0..<count {
                let p = Process()
                p.executableURL = URL(fileURLWithPath: "/usr/bin/sleep")
                p.arguments = ["5"]
                guard (try? ProcessLaunch.run(p)) != nil else { break }
                children.processes.withLock { $0.append(p) }
            }
        }
        launcher.start()
    }

    var started: Int { children.processes.withLock { $0.count } }

    func end() {
        while !launcher.isFinished { usleep(10_000) }
        let all = children.processes.withLock { $0 }
        for p in all where p.isRunning { kill(p.processIdentifier, SIGKILL) }
        for p in all { p.waitUntilExit() }
    }
}
