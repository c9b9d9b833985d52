import Foundation

/// Runs an administration tool (iptables-save, iptables-restore) to completion: input on stdin, stdout returned,
/// a non-zero exit thrown with the tool's stderr.
enum ExternalTool {
    /// Where to look besides $PATH: a daemon started by a service manager or `env -i` may have a PATH without sbin.
    static let fallbackDirectories = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]

    /// The full path of `name`, or nil when it is not installed.
    static func locate(_ name: String) -> String? {
        let path = ProcessInfo.processInfo.environment["PATH"]?.split(separator: ":").map(String.init) ?? []
        for dir in path + fallbackDirectories where FileManager.default.isExecutableFile(atPath: "\(dir)/\(name)") {
            return "\(dir)/\(name)"
        }
        return nil
    }

    /// - Throws: `NetfilterError` naming the command line when the tool is missing, cannot start, or exits
    ///   non-zero (with its stderr as the reason).
    static func run(_ name: String, _ arguments: [String], input: String? = nil) throws(NetfilterError) -> String {
        let commandLine = ([name] + arguments).joined(separator: " ")
        guard let executable = locate(name) else {
            throw NetfilterError("run", commandLine, "\(name) not found (Debian package: iptables)")
        }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        // The pipes are made under the launch lock too, so that no child another thread starts inherits them
        // (`ProcessLaunch`).
        let (stdin, stdout, stderr): (Pipe, Pipe, Pipe)
        do {
            (stdin, stdout, stderr) = try ProcessLaunch.serialized { () throws -> (Pipe, Pipe, Pipe) in
                let pipes = (Pipe(), Pipe(), Pipe())
                process.standardInput = input == nil ? FileHandle.nullDevice : pipes.0
                process.standardOutput = pipes.1
                process.standardError = pipes.2
                try process.run()
                return pipes
            }
        } catch {
            throw NetfilterError("run", commandLine, "\(error)")
        }
        if let input {
            // iptables-restore reads all of its input before it writes anything, so this cannot deadlock.
            do {
                try stdin.fileHandleForWriting.write(contentsOf: Data(input.utf8))
                try stdin.fileHandleForWriting.close()
            } catch {
                process.waitUntilExit()
                throw NetfilterError("write input to", commandLine, "\(error)")
            }
        }
        // stdout first (it can be long: a node's whole nat table); these tools write little to stderr.
        let out = stdout.fileHandleForReading.readDataToEndOfFile()
        let err = stderr.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        guard process.terminationReason == .exit, process.terminationStatus == 0 else {
            let how = process.terminationReason == .exit ? "exit status \(process.terminationStatus)"
                                                         : "signal \(process.terminationStatus)"
            let text = String(decoding: err, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
            throw NetfilterError("run", commandLine, text.isEmpty ? how : "\(how): \(text)")
        }
        return String(decoding: out, as: UTF8.self)
    }
}
