import Foundation
import XCTest

extension CommandResult: CustomStringConvertible {
    var description: String { "exit \(status)\nstdout: \(stdout)\nstderr: \(stderr)" }
}

/// Runs a command (in the caller's namespace) with extra environment variables; see `Command.run`.
func runCommand(_ args: [String], environment: [String: String] = [:]) -> CommandResult {
    let env = environment.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }
    do { return try Command.run(env + args) } catch {
        return CommandResult(status: -1, stdout: "", stderr: "\(error)")
    }
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
func requireRoot() throws { try TestNamespace.requireRoot() }

/// Polls `condition` until it holds; throws `TimedOut` naming `what` when `timeout` passes first.
func waitFor(_ what: String, timeout: TimeInterval = 10, _ condition: () throws -> Bool) throws {
    if try !waitUntil(timeout: timeout, interval: 0.02, condition) {
        throw TimedOut(what: what, seconds: timeout)
    }
}

struct TimedOut: Error, CustomStringConvertible {
    var what: String
    var seconds: TimeInterval
    var description: String { "timed out after \(seconds) s waiting until \(what)" }
}

/// Starts a long-running command (a server) without waiting for it; the caller terminates it. Used instead of a
/// tool's own daemon mode (`iperf3 -D`), whose forked child would inherit the descriptors Foundation watches to
/// notice that the started process exited, and so keep `Command.run` waiting forever.
func startBackground(_ args: [String]) throws -> Process {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    p.arguments = args
    p.standardInput = FileHandle.nullDevice
    p.standardOutput = FileHandle.nullDevice
    p.standardError = FileHandle.nullDevice
    try p.run()
    return p
}
