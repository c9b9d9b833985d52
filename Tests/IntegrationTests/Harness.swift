import Foundation
import XCTest

/// What a finished command printed and how it exited.
struct CommandResult: CustomStringConvertible {
    var status: Int32
    var stdout: String
    var stderr: String
    var description: String { "exit \(status)\nstdout: \(stdout)\nstderr: \(stderr)" }
}

/// Runs a command to completion, capturing stdout and stderr. The environment is the test's plus `environment`.
func runCommand(_ args: [String], environment: [String: String] = [:], input: String? = nil) -> CommandResult {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    p.arguments = args
    p.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
    let out = Pipe(), err = Pipe()
    p.standardOutput = out
    p.standardError = err
    p.standardInput = FileHandle.nullDevice
    do { try p.run() } catch { return CommandResult(status: -1, stdout: "", stderr: "\(error)") }
    // Read both pipes concurrently so neither fills up and blocks the child.
    let group = DispatchGroup()
    nonisolated(unsafe) var errData = Data()
    group.enter()
    DispatchQueue.global().async {
        errData = err.fileHandleForReading.readDataToEndOfFile()
        group.leave()
    }
    let outData = out.fileHandleForReading.readDataToEndOfFile()
    group.wait()
    p.waitUntilExit()
    return CommandResult(status: p.terminationStatus, stdout: String(decoding: outData, as: UTF8.self),
                         stderr: String(decoding: errData, as: UTF8.self))
}

/// The flannel-udp binary built next to the test bundle.
func flannelUDPBinary() -> String {
    let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
    var dir = URL(fileURLWithPath: exe).deletingLastPathComponent()
    // On Linux the test runner is <bin>/flannel-udpPackageTests.xctest; the tool sits beside it.
    if dir.lastPathComponent.hasSuffix(".xctest") { dir = dir.deletingLastPathComponent() }
    return dir.appendingPathComponent("flannel-udp").path
}

/// Skips the test when not root; integration tests create network namespaces.
func requireRoot() throws {
    if geteuid() != 0 {
        throw XCTSkip("integration tests need root: they create network namespaces (run scripts/test.sh as root)")
    }
}

/// Polls `condition` every 20 ms until it holds or `timeout` passes (then fails the test with `what`).
func waitUntil(_ what: String, timeout: TimeInterval = 10, _ condition: () throws -> Bool) throws {
    let deadline = Date().addingTimeInterval(timeout)
    while Date() < deadline {
        if try condition() { return }
        usleep(20_000)
    }
    throw TimedOut(what: what, seconds: timeout)
}

struct TimedOut: Error, CustomStringConvertible {
    var what: String
    var seconds: TimeInterval
    var description: String { "timed out after \(seconds) s waiting until \(what)" }
}
