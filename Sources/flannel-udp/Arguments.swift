import ArgumentParser
import FlannelUDP

// Typed command-line values: a bad value is reported by the parser with the value and what is wrong, before any
// command runs.

extension IPv4Network: ExpressibleByArgument {
    public init?(argument: String) {
        guard let n = try? IPv4Network(parsing: argument) else { return nil }
        self = n
    }
    public static var defaultCompletionKind: CompletionKind { .default }
}

extension IPv4Address: ExpressibleByArgument {
    public init?(argument: String) { self.init(argument) }
}

extension PeerCheck: ExpressibleByArgument {}

extension MasqueradeBackend: ExpressibleByArgument {}

/// Parses a network argument with a precise message ("... has host bits set (did you mean ...)").
func parseNetwork(_ text: String, strict: Bool = true) throws -> IPv4Network {
    do { return try IPv4Network(parsing: text, strict: strict) } catch { throw ValidationError(error.description) }
}

/// Options for naming the device, shared by down, status and route.
struct DeviceOptions: ParsableArguments {
    @Option(name: .long, help: ArgumentHelp("The overlay device.", valueName: "name"))
    var device: String = FlannelDefault.device

    func validate() throws {
        if let problem = TunDevice.validateName(device) { throw ValidationError("--device: \(problem)") }
    }

    var paths: RuntimePaths { RuntimePaths(device: device) }
}

struct OutputOptions: ParsableArguments {
    @Flag(name: .long, help: "Print JSON for scripts instead of a table.")
    var json = false
}
