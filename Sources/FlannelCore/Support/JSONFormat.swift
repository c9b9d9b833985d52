import Foundation

/// The one JSON set-up for what flannel-udp writes for programs to read: the control protocol, the daemon's state
/// file and every `--json` output. Keys sorted, dates in ISO 8601, `/` written as it is (not `\/`).
public enum JSONFormat {
    /// `pretty`: indented, for people and `--json`; otherwise one line (the control protocol's framing).
    public static func encoder(pretty: Bool = false) -> JSONEncoder {
        let encoder = JSONEncoder()
        encoder.dateEncodingStrategy = .iso8601
        encoder.outputFormatting = pretty ? [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
                                          : [.sortedKeys, .withoutEscapingSlashes]
        return encoder
    }

    public static func decoder() -> JSONDecoder {
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        return decoder
    }

    /// `value` as indented text, the form of `--json` output.
    public static func text<T: Encodable>(_ value: T) throws -> String {
        String(decoding: try encoder(pretty: true).encode(value), as: UTF8.self)
    }
}
