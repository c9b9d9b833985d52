import ArgumentParser
import FlannelUDP

@main
struct FlannelUDPCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "flannel-udp",
        abstract: "Run flannel's UDP overlay backend on a Linux node.",
        discussion: """
            flannel-udp creates the overlay's tun device, gives it the node subnet's network address as a /32, \
            installs one route for the whole overlay network and forwards IPv4 packets between the device and UDP \
            port \(FlannelDefault.port), one packet per datagram, wire-compatible with flannel's udp backend.

            Exit codes: 0 success; 1 a system error; 3 (status) no daemon is running; 64 bad usage or input \
            (nothing was changed); 77 not running as root.
            """,
        version: Daemon.version,
        subcommands: [Up.self, Down.self, RouteCommand.self, Status.self, Cleanup.self]
    )

    /// The parser's own main, except that `up` also takes its options from the environment (`UpEnvironment`),
    /// and a bad value from there is reported as one line naming the variable.
    static func main() {
        // Output into a closed pipe or a control socket the daemon closed is an error where it happens, not death
        // by SIGPIPE; the daemon spawned by --detach starts with it ignored too.
        Console.ignoreBrokenPipes()
        var arguments = Array(CommandLine.arguments.dropFirst())
        var settings: [EnvironmentOptions.Setting] = []
        if arguments.first == "up" {
            do throws(EnvironmentOptions.Invalid) {
                (arguments, settings) = try UpEnvironment.expand(Array(arguments.dropFirst()))
            } catch {
                Console.writeError("flannel-udp up: \(error)\n")
                exit(withError: Exit.usage)
            }
        }
        var command: ParsableCommand
        do {
            command = try parseAsRoot(arguments)
        } catch {
            if exitCode(for: error) != .success, let line = UpEnvironment.attribute(error, to: settings) {
                Console.writeError("flannel-udp up: \(line)\n")
                exit(withError: Exit.usage)
            }
            exit(withError: error)
        }
        do {
            try command.run()
        } catch {
            exit(withError: error)
        }
    }
}

/// Exit codes shared by every subcommand (documented in the README and the man page).
enum Exit {
    static let failure = ExitCode(1)
    static let notRunning = ExitCode(3)
    static let usage = ExitCode(64)     // EX_USAGE
    static let noPermission = ExitCode(77)  // EX_NOPERM
}

/// Prints one line to stderr, prefixed with the command name, and returns the exit code to throw.
func fail(_ command: String, _ message: String, _ code: ExitCode = Exit.failure) -> ExitCode {
    Console.writeError("flannel-udp \(command): \(message)\n")
    return code
}

/// The one mapping from the library's domain error to the documented exit codes.
func fail(_ command: String, _ error: FlannelError) -> ExitCode {
    switch error {
    case .usage(let message): return fail(command, message, Exit.usage)
    case .system, .failed, .stopped: return fail(command, error.description, Exit.failure)
    case .notRunning(let message): return fail(command, message, Exit.notRunning)
    }
}

func requireRoot(_ command: String) throws {
    if !Console.isRoot {
        throw fail(command, "must be run as root (it changes network devices and routes)", Exit.noPermission)
    }
}
