/// Options from the environment: every option of a command can also be set as `FLANNEL_UDP_<OPTION>` (the long
/// name upper-cased, '-' as '_': `--etcd-endpoints` is `FLANNEL_UDP_ETCD_ENDPOINTS`), and the options that mean
/// the same as one of flanneld's flags also as flanneld's `FLANNELD_<OPTION>`, so an operator's flanneld
/// environment file keeps working. Precedence: the command line, then `FLANNEL_UDP_*`, then `FLANNELD_*`.
///
/// The option list is not kept here: the caller passes the command's own option definitions (the CLI takes them
/// from swift-argument-parser), so a new option is configurable from the environment the day it is added.
///
/// The result is a list of extra arguments for the parser of *this* process only. They are never written into
/// argv: a re-spawned daemon (`--detach`) inherits the environment and derives them again, so a secret that came
/// from the environment never shows up in /proc/PID/cmdline.
public enum EnvironmentOptions {
    public static let prefix = "FLANNEL_UDP_"
    public static let flanneldPrefix = "FLANNELD_"

    /// Long names of flannel-udp options that flanneld has too, with the same meaning (flanneld reads its flags
    /// from `FLANNELD_<FLAG>`).
    public static let flanneldOptions: [String] = [
        "etcd-endpoints", "etcd-prefix", "etcd-username", "etcd-cafile", "etcd-certfile",
        "etcd-keyfile", "iface", "public-ip", "ip-masq", "subnet-file",
    ]

    /// flannel-udp options that flanneld has under another name, with the same meaning and unit: ours -> flanneld's
    /// (`--masq-resync` seconds is flanneld's `--iptables-resync` seconds, `FLANNELD_IPTABLES_RESYNC`).
    public static let flanneldRenamed: [String: String] = ["masq-resync": "iptables-resync"]

    /// flanneld's name for `long` when flanneld has that option (the same name, or its own), else nil.
    public static func flanneldName(for long: String) -> String? {
        flanneldOptions.contains(long) ? long : flanneldRenamed[long]
    }

    /// One option as the command defines it.
    public struct Option: Sendable, Equatable {
        /// The long name without dashes ("etcd-endpoints").
        public var long: String
        /// Short names ("v" for -v).
        public var shorts: [String]
        /// A flag takes no value: the variable is a boolean (true/false/1/0) and true adds `--long`.
        public var isFlag: Bool

        public init(long: String, shorts: [String] = [], isFlag: Bool) {
            self.long = long
            self.shorts = shorts
            self.isFlag = isFlag
        }
    }

    /// A value that came from the environment.
    public struct Setting: Sendable, Equatable {
        public var variable: String
        public var value: String
        public var option: String

        /// "FLANNEL_UDP_PORT=99999", with the value hidden for secrets.
        public var shown: String { "\(variable)=\(EnvironmentOptions.isSecret(option) ? "(hidden)" : value)" }
    }

    public struct Invalid: Error, CustomStringConvertible, Sendable {
        public var setting: Setting
        public var problem: String
        public var description: String { "\(setting.shown): \(problem)" }
    }

    /// An option whose value must never be echoed in a message.
    public static func isSecret(_ long: String) -> Bool { long.contains("password") }

    /// `FLANNEL_UDP_ETCD_ENDPOINTS` for "etcd-endpoints".
    public static func variable(for long: String, prefix: String = prefix) -> String {
        prefix + long.uppercased().replacingOccurrences(of: "-", with: "_")
    }

    /// The variable names that can set `option`, strongest first.
    public static func variables(for option: Option) -> [String] {
        var names = [variable(for: option.long)]
        if let flanneld = flanneldName(for: option.long) { names.append(variable(for: flanneld, prefix: flanneldPrefix)) }
        return names
    }

    /// The extra arguments that the environment contributes to `commandLine` (the arguments after the
    /// subcommand), and where each came from. An option present on the command line is left alone; an empty
    /// variable counts as unset. Arguments come as `--long=value`, so a value starting with '-' stays a value.
    /// - Throws: `Invalid` for a flag variable that is not true/false/1/0.
    public static func arguments(options: [Option], environment: [String: String],
                                 commandLine: [String]) throws(Invalid) -> (arguments: [String], settings: [Setting]) {
        let given = namesOnCommandLine(commandLine)
        var arguments: [String] = []
        var settings: [Setting] = []
        for option in options {
            if given.contains("--" + option.long) || option.shorts.contains(where: { given.contains("-" + $0) }) {
                continue
            }
            guard let (name, value) = variables(for: option).lazy
                .compactMap({ name in environment[name].flatMap { $0.isEmpty ? nil : (name, $0) } }).first
            else { continue }
            let setting = Setting(variable: name, value: value, option: option.long)
            if option.isFlag {
                guard let on = parseBoolean(value) else {
                    throw Invalid(setting: setting, problem: "not a boolean for --\(option.long) (use true, false, 1 or 0)")
                }
                if on { arguments.append("--" + option.long) }
            } else {
                arguments.append("--\(option.long)=\(value)")
            }
            settings.append(setting)
        }
        return (arguments, settings)
    }

    /// true/false/1/0, case-insensitive.
    public static func parseBoolean(_ text: String) -> Bool? {
        switch text.lowercased() {
        case "true", "1": return true
        case "false", "0": return false
        default: return nil
        }
    }

    /// The option names used on a command line ("--port", "-v"), up to a "--" terminator; "--port=1" counts as
    /// "--port" and "-vx" as "-v" and "-x".
    static func namesOnCommandLine(_ commandLine: [String]) -> Set<String> {
        var names: Set<String> = []
        for arg in commandLine {
            if arg == "--" { break }
            if arg.hasPrefix("--") {
                names.insert(String(arg.prefix(while: { $0 != "=" })))
            } else if arg.hasPrefix("-"), arg.count > 1 {
                for c in arg.dropFirst() { names.insert("-\(c)") }
            }
        }
        return names
    }
}
