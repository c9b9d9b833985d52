import ArgumentParser
import FlannelUDP
import Foundation

/// `up`'s options from the environment (see `EnvironmentOptions`). The option list comes from the command's own
/// definitions: swift-argument-parser's tool description (`--experimental-dump-help`), so nothing here names an
/// option one by one.
enum UpEnvironment {
    /// Options not taken from the environment here: `--detach` (a daemon re-spawned by --detach inherits the
    /// environment and would detach again), the parser's built-ins, and `--etcd-password`, whose variables
    /// (FLANNEL_UDP_ETCD_PASSWORD, FLANNELD_ETCD_PASSWORD) `EtcdArguments.takePassword` reads itself so that it
    /// can erase them from the daemon's environment (mapped to the option, the secret would stay there and be
    /// treated as one typed on the command line).
    static let excluded: Set<String> = ["detach", "help", "version", "experimental-dump-help", "etcd-password"]

    /// `up`'s options as the parser defines them, hidden ones left out.
    static func options() -> [EnvironmentOptions.Option] {
        let text: String
        do {
            _ = try FlannelUDPCommand.parseAsRoot(["up", "--experimental-dump-help"])
            return []
        } catch {
            text = FlannelUDPCommand.fullMessage(for: error)
        }
        guard let json = try? JSONSerialization.jsonObject(with: Data(text.utf8)) as? [String: Any],
              let up = json["command"] as? [String: Any],  // the description of the command asked about
              up["commandName"] as? String == "up",
              let arguments = up["arguments"] as? [[String: Any]]
        else { preconditionFailure("swift-argument-parser's tool description is not up's: \(text.prefix(200))") }
        var options: [EnvironmentOptions.Option] = []
        for argument in arguments {
            let kind = argument["kind"] as? String
            guard kind == "option" || kind == "flag", argument["shouldDisplay"] as? Bool ?? true else { continue }
            let all = argument["names"] as? [[String: Any]] ?? []
            func names(_ k: String) -> [String] { all.filter { $0["kind"] as? String == k }.compactMap { $0["name"] as? String } }
            guard let long = names("long").first, !excluded.contains(long) else { continue }
            options.append(EnvironmentOptions.Option(long: long, shorts: names("short"), isFlag: kind == "flag"))
        }
        return options
    }

    /// The arguments to parse for `flannel-udp up <commandLine>`: the environment's after the subcommand name,
    /// then the command line's. Only this process's parser sees them; argv is untouched.
    static func expand(_ commandLine: [String]) throws(EnvironmentOptions.Invalid)
        -> (arguments: [String], settings: [EnvironmentOptions.Setting]) {
        let extra = try EnvironmentOptions.arguments(options: options(),
                                                     environment: ProcessInfo.processInfo.environment,
                                                     commandLine: commandLine)
        return (["up"] + extra.arguments + commandLine, extra.settings)
    }

    /// One line for a parse error that a value from the environment caused, naming the variable; nil when no
    /// environment value is involved (the parser's own message is right then).
    /// A setting is involved when the message names its option or quotes its value (a validation message such
    /// as "subnet 10.245.1.0/24 is not inside network 10.244.0.0/16" names values, not options).
    static func attribute(_ error: Error, to settings: [EnvironmentOptions.Setting]) -> String? {
        let message = FlannelUDPCommand.message(for: error)
        let named = settings.filter { message.contains("--\($0.option)") }
        let quoted = settings.filter {
            !EnvironmentOptions.isSecret($0.option) && $0.value.count > 1 && message.contains($0.value) && !named.contains($0)
        }
        let involved = named + quoted
        guard !involved.isEmpty else { return nil }
        return involved.map(\.shown).joined(separator: ", ") + " (from the environment): \(message)"
    }
}

extension UpEnvironment {
    /// The paragraph of `up --help` (and so of the man page) that explains the variables.
    static var help: String {
        let flanneld = (EnvironmentOptions.flanneldOptions.map { "--\($0)" }
            + EnvironmentOptions.flanneldRenamed.sorted { $0.key < $1.key }.map { "--\($1) (as --\($0))" })
            .joined(separator: ", ")
        return """
            Environment: every option can also be set as FLANNEL_UDP_<OPTION>, the long name in upper case with \
            '_' for '-' (FLANNEL_UDP_ETCD_ENDPOINTS, FLANNEL_UDP_PUBLIC_IP, FLANNEL_UDP_IP_MASQ=true); a flag takes \
            true, false, 1 or 0. flanneld's FLANNELD_<OPTION> names are accepted for the options that mean the \
            same: \(flanneld). The command line wins over FLANNEL_UDP_*, which wins over FLANNELD_*; an empty \
            variable counts as unset; --detach is never taken from the environment. Values from the environment \
            stay there: they are not copied into the daemon's command line. The etcd password's variables, \
            \(EtcdPassword.variable) and \(EtcdPassword.flanneldVariable), are read once and then erased from the \
            daemon's environment.
            """
    }
}
