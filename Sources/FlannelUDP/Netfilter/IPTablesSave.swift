/// One table of `iptables-save` output: its chains and its rules, in order. Pure, for tests.
public struct IPTablesSave: Sendable, Equatable {
    public struct Rule: Sendable, Equatable {
        /// The chain the rule is in ("POSTROUTING").
        public var chain: String
        /// The rule after `-A <chain> `, exactly as iptables-save printed it (quotes included), so that
        /// `-D <chain> <spec>` in iptables-restore deletes exactly this rule.
        public var spec: String

        public init(chain: String, spec: String) {
            self.chain = chain
            self.spec = spec
        }

        /// The chain this rule jumps or goes to (`-j X` / `-g X`), if any.
        public var target: String? {
            let words = spec.split(separator: " ")
            for (i, w) in words.enumerated() where (w == "-j" || w == "-g" || w == "--jump" || w == "--goto") {
                if i + 1 < words.count { return String(words[i + 1]) }
            }
            return nil
        }

        /// The line as iptables-save prints it.
        public var line: String { "-A \(chain) \(spec)" }
    }

    /// The table name ("nat", "filter").
    public var table: String
    /// Chains declared in the table, built-in and user-defined.
    public var chains: [String]
    public var rules: [Rule]

    public init(table: String, chains: [String] = [], rules: [Rule] = []) {
        self.table = table
        self.chains = chains
        self.rules = rules
    }

    /// Parses the block of `table` out of iptables-save output (which may hold several tables); an absent table
    /// gives an empty one.
    public static func parse(_ text: String, table: String) -> IPTablesSave {
        var result = IPTablesSave(table: table)
        var inside = false
        for raw in text.split(separator: "\n", omittingEmptySubsequences: true) {
            let line = raw.trimmingCharacters(in: .whitespaces)
            if line.hasPrefix("#") { continue }
            if line.hasPrefix("*") {
                inside = line.dropFirst() == table
                continue
            }
            guard inside else { continue }
            if line == "COMMIT" {
                inside = false
            } else if line.hasPrefix(":") {
                if let name = line.dropFirst().split(separator: " ").first { result.chains.append(String(name)) }
            } else if line.hasPrefix("-A ") {
                let rest = line.dropFirst(3)
                guard let space = rest.firstIndex(of: " ") else {
                    result.rules.append(Rule(chain: String(rest), spec: ""))
                    continue
                }
                result.rules.append(Rule(chain: String(rest[..<space]), spec: String(rest[rest.index(after: space)...])))
            }
        }
        return result
    }

    /// Rules that jump to `chain` from another chain.
    public func jumps(to chain: String) -> [Rule] {
        rules.filter { $0.chain != chain && $0.target == chain }
    }

    /// Rules inside `chain`.
    public func rules(in chain: String) -> [Rule] {
        rules.filter { $0.chain == chain }
    }

    /// iptables-restore --noflush lines that remove `chain` entirely: every jump to it, then its rules, then the
    /// chain. Empty when the chain does not exist and nothing jumps to it.
    public func removalLines(for chain: String) -> [String] {
        var lines = jumps(to: chain).map { "-D \($0.chain) \($0.spec)" }
        if chains.contains(chain) {
            lines += ["-F \(chain)", "-X \(chain)"]
        }
        return lines
    }
}
