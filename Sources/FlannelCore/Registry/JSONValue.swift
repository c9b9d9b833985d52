import Foundation

/// Any JSON document, decoded without a schema: for flannel's config, whose keys Go matches case-insensitively,
/// and for lease values written by other backends, whose BackendData we keep but never interpret.
public enum JSONValue: Sendable, Hashable, Codable, CustomStringConvertible {
    case null
    case bool(Bool)
    case number(Double)
    case string(String)
    case array([JSONValue])
    case object([String: JSONValue])

    public init(from decoder: any Decoder) throws {
        let c = try decoder.singleValueContainer()
        if c.decodeNil() {
            self = .null
        } else if let b = try? c.decode(Bool.self) {
            self = .bool(b)
        } else if let d = try? c.decode(Double.self) {
            self = .number(d)
        } else if let s = try? c.decode(String.self) {
            self = .string(s)
        } else if let a = try? c.decode([JSONValue].self) {
            self = .array(a)
        } else {
            self = .object(try c.decode([String: JSONValue].self))
        }
    }

    public func encode(to encoder: any Encoder) throws {
        var c = encoder.singleValueContainer()
        switch self {
        case .null: try c.encodeNil()
        case .bool(let b): try c.encode(b)
        case .number(let d):
            if let i = Int64(exactly: d) { try c.encode(i) } else { try c.encode(d) }
        case .string(let s): try c.encode(s)
        case .array(let a): try c.encode(a)
        case .object(let o): try c.encode(o)
        }
    }

    /// Compact JSON text with sorted keys (stable, for logs and tests).
    public var jsonText: String {
        guard let data = try? JSONFormat.encoder().encode(self) else { return "null" }
        return String(decoding: data, as: UTF8.self)
    }

    /// How a value is named in an error message: strings quoted, containers by kind.
    public var description: String {
        switch self {
        case .null: return "null"
        case .bool(let b): return b ? "true" : "false"
        case .number(let d): return Int64(exactly: d).map { "\($0)" } ?? "\(d)"
        case .string(let s): return "'\(s)'"
        case .array: return "an array"
        case .object: return "an object"
        }
    }
}
