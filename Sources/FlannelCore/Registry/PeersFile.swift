import Foundation

/// The `--peers FILE` format: one route per line, `SUBNET IP[:PORT]`, with `#` comments and blank lines allowed.
///
///     # node B
///     10.244.2.0/24  192.168.77.2
///     10.244.3.0/24  192.168.77.3:8286   # a node on another port
public enum PeersFile {
    public struct ParseError: Error, CustomStringConvertible, Equatable {
        public let path: String
        public let line: Int
        public let message: String
        public var description: String { "\(path):\(line): \(message)" }
    }

    /// Parses the whole text; the first bad line is reported with its number and nothing is returned.
    public static func parse(_ text: String, path: String, defaultPort: UInt16) throws(ParseError) -> [PeerRoute] {
        var routes: [PeerRoute] = []
        var seen: [IPv4Network: Int] = [:]
        var lineNumber = 0
        for rawLine in text.split(separator: "\n", omittingEmptySubsequences: false) {
            lineNumber += 1
            var line = rawLine
            if let hash = line.firstIndex(of: "#") { line = line[..<hash] }
            let fields = line.split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == "\r" })
            if fields.isEmpty { continue }
            guard fields.count == 2 else {
                throw ParseError(path: path, line: lineNumber,
                                 message: "expected 'SUBNET IP[:PORT]', found \(fields.count) field\(fields.count == 1 ? "" : "s")")
            }
            let subnet: IPv4Network
            do { subnet = try IPv4Network(parsing: String(fields[0])) } catch {
                throw ParseError(path: path, line: lineNumber, message: error.description)
            }
            let endpoint: Endpoint
            do { endpoint = try Endpoint(parsing: String(fields[1]), defaultPort: defaultPort) } catch {
                throw ParseError(path: path, line: lineNumber, message: error.description)
            }
            if let first = seen[subnet] {
                throw ParseError(path: path, line: lineNumber, message: "subnet \(subnet) is already listed on line \(first)")
            }
            seen[subnet] = lineNumber
            routes.append(PeerRoute(subnet: subnet, endpoint: endpoint))
        }
        return routes
    }

    /// Reads and parses a file. I/O errors become a `ParseError` at line 0 naming the errno's text.
    public static func load(path: String, defaultPort: UInt16) throws(ParseError) -> [PeerRoute] {
        let data: Data
        do { data = try Data(contentsOf: URL(fileURLWithPath: path)) } catch {
            throw ParseError(path: path, line: 0, message: "cannot read: \((error as NSError).localizedDescription)")
        }
        guard let text = String(data: data, encoding: .utf8) else {
            throw ParseError(path: path, line: 0, message: "not UTF-8 text")
        }
        return try parse(text, path: path, defaultPort: defaultPort)
    }
}
