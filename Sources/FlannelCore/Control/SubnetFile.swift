import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// flannel's `/run/flannel/subnet.env`, read by the flannel CNI plugin:
///
///     FLANNEL_NETWORK=10.244.0.0/16
///     FLANNEL_SUBNET=10.244.1.1/24
///     FLANNEL_MTU=1472
///     FLANNEL_IPMASQ=false
///
/// FLANNEL_SUBNET is the subnet's first host address with the subnet's prefix length, as flanneld writes it.
public struct SubnetFile: Equatable, Sendable {
    public var network: IPv4Network
    public var subnet: IPv4Network
    public var mtu: Int
    public var ipMasq: Bool

    public static let defaultPath = "/run/flannel/subnet.env"

    public init(network: IPv4Network, subnet: IPv4Network, mtu: Int, ipMasq: Bool) {
        self.network = network
        self.subnet = subnet
        self.mtu = mtu
        self.ipMasq = ipMasq
    }

    public var contents: String {
        """
        FLANNEL_NETWORK=\(network)
        FLANNEL_SUBNET=\(subnet.firstHost)/\(subnet.prefixLength)
        FLANNEL_MTU=\(mtu)
        FLANNEL_IPMASQ=\(ipMasq)

        """
    }

    public struct ParseError: Error, CustomStringConvertible, Equatable {
        public let message: String
        public var description: String { message }
    }

    /// Parses flannel's KEY=VALUE format (unknown keys, such as FLANNEL_IPV6_*, are ignored).
    public static func parse(_ text: String, path: String = "subnet file") throws(ParseError) -> SubnetFile {
        var values: [String: String] = [:]
        for line in text.split(whereSeparator: \.isNewline) {
            let trimmed = line.trimmingCharacters(in: .whitespaces)
            if trimmed.isEmpty || trimmed.hasPrefix("#") { continue }
            guard let eq = trimmed.firstIndex(of: "=") else {
                throw ParseError(message: "\(path): line '\(trimmed)' is not KEY=VALUE")
            }
            values[String(trimmed[..<eq])] = String(trimmed[trimmed.index(after: eq)...])
        }
        func need(_ key: String) throws(ParseError) -> String {
            guard let v = values[key] else { throw ParseError(message: "\(path): \(key) is missing") }
            return v
        }
        func parseNetwork(_ key: String, strict: Bool = true) throws(ParseError) -> IPv4Network {
            let text = try need(key)
            do { return try IPv4Network(parsing: text, strict: strict) } catch {
                throw ParseError(message: "\(path): \(error)")
            }
        }
        let network = try parseNetwork("FLANNEL_NETWORK")
        let subnet = try parseNetwork("FLANNEL_SUBNET", strict: false)
        let mtuText = try need("FLANNEL_MTU")
        guard let mtu = Int(mtuText), mtu > 0 else { throw ParseError(message: "\(path): FLANNEL_MTU '\(mtuText)' is not a number") }
        let masq = values["FLANNEL_IPMASQ"] == "true"
        return SubnetFile(network: network, subnet: subnet, mtu: mtu, ipMasq: masq)
    }

    public static func load(path: String) throws(ParseError) -> SubnetFile {
        guard let data = FileManager.default.contents(atPath: path), let text = String(data: data, encoding: .utf8) else {
            throw ParseError(message: "cannot read \(path)")
        }
        return try parse(text, path: path)
    }

    /// Writes the file atomically: a temporary file in the same directory, fsync, rename over the target, so the
    /// CNI plugin never reads a half-written file. The directory is checked (and created, 0755) first: see
    /// `AtomicFile.write`.
    public func write(to path: String) throws(SystemError) {
        try AtomicFile.write(contents, to: path, mode: 0o644)
    }
}
