import Foundation

// The request and response bodies of etcd's JSON gateway (grpc-gateway over the v3 API, served on the client
// port under /v3/). Conventions of that gateway, which these types follow:
// - keys and values are bytes, sent and received base64-encoded;
// - 64-bit integers (revisions, lease IDs, TTLs) come back as JSON strings ("revision":"12"), and lease IDs do
//   not fit a double, so they are sent as strings too;
// - fields at their zero value are left out of responses (no "kvs" for an empty range, no "type" for a PUT
//   event, no "succeeded" for a failed txn);
// - a failed unary call answers with a non-2xx status and {"error":"...","message":"...","code":N} (a gRPC
//   code); a stream wraps each message as {"result":{...}} or {"error":{...}}, one JSON object per line.

/// A signed 64-bit integer that decodes from either a JSON string or a JSON number.
struct EtcdInt64: Codable, Sendable, Equatable, ExpressibleByIntegerLiteral {
    var value: Int64

    init(_ value: Int64) { self.value = value }
    init(integerLiteral value: Int64) { self.value = value }

    init(from decoder: any Decoder) throws {
        let c = try decoder.singleValueContainer()
        if let s = try? c.decode(String.self) {
            guard let v = Int64(s) ?? UInt64(s).map({ Int64(bitPattern: $0) }) else {
                throw DecodingError.dataCorruptedError(in: c, debugDescription: "'\(s)' is not an integer")
            }
            value = v
        } else {
            value = try c.decode(Int64.self)
        }
    }

    func encode(to encoder: any Encoder) throws {
        var c = encoder.singleValueContainer()
        try c.encode(String(value))
    }
}

/// Bytes carried base64-encoded.
struct EtcdBytes: Codable, Sendable, Equatable {
    var data: Data

    init(_ data: Data) { self.data = data }
    init(_ string: String) { data = Data(string.utf8) }

    var string: String { String(decoding: data, as: UTF8.self) }

    init(from decoder: any Decoder) throws {
        let c = try decoder.singleValueContainer()
        let text = try c.decode(String.self)
        guard let d = Data(base64Encoded: text) else {
            throw DecodingError.dataCorruptedError(in: c, debugDescription: "'\(text.prefix(40))' is not base64")
        }
        data = d
    }

    func encode(to encoder: any Encoder) throws {
        var c = encoder.singleValueContainer()
        try c.encode(data.base64EncodedString())
    }
}

enum EtcdGateway {
    struct Header: Codable, Sendable, Equatable {
        var revision: EtcdInt64?
    }

    struct KeyValue: Codable, Sendable, Equatable {
        var key: EtcdBytes
        var value: EtcdBytes?
        var create_revision: EtcdInt64?
        var mod_revision: EtcdInt64?
        var version: EtcdInt64?
        var lease: EtcdInt64?
    }

    // MARK: KV

    struct RangeRequest: Codable, Sendable, Equatable {
        var key: EtcdBytes
        var range_end: EtcdBytes?
        var revision: EtcdInt64?
    }

    struct RangeResponse: Codable, Sendable, Equatable {
        var header: Header?
        var kvs: [KeyValue]?
        var count: EtcdInt64?
    }

    struct PutRequest: Codable, Sendable, Equatable {
        var key: EtcdBytes
        var value: EtcdBytes
        var lease: EtcdInt64?
    }

    struct PutResponse: Codable, Sendable, Equatable {
        var header: Header?
    }

    struct DeleteRangeRequest: Codable, Sendable, Equatable {
        var key: EtcdBytes
        var range_end: EtcdBytes?
    }

    struct DeleteRangeResponse: Codable, Sendable, Equatable {
        var header: Header?
        var deleted: EtcdInt64?
    }

    /// A txn with one compare and one put, which is all the registry needs: "create the key if it is absent".
    struct TxnRequest: Codable, Sendable, Equatable {
        struct Compare: Codable, Sendable, Equatable {
            var key: EtcdBytes
            var target: String      // "VERSION"
            var result: String      // "EQUAL"
            var version: EtcdInt64
        }
        struct RequestOp: Codable, Sendable, Equatable {
            var request_put: PutRequest
        }
        var compare: [Compare]
        var success: [RequestOp]
    }

    struct TxnResponse: Codable, Sendable, Equatable {
        var header: Header?
        var succeeded: Bool?
    }

    // MARK: Leases

    struct LeaseGrantRequest: Codable, Sendable, Equatable {
        var TTL: EtcdInt64
    }

    struct LeaseIDRequest: Codable, Sendable, Equatable {
        var ID: EtcdInt64
    }

    /// The answer to a grant, and each result of keepalive, which is a stream: one {"result": ...} per request. A
    /// TTL of 0 (left out) means the lease is gone; `error` is the grant's reason for giving no ID.
    struct LeaseResponse: Codable, Sendable, Equatable {
        var header: Header?
        var ID: EtcdInt64?
        var TTL: EtcdInt64?
        var error: String?
    }

    // MARK: Auth

    struct AuthenticateRequest: Codable, Sendable, Equatable {
        var name: String
        var password: String
    }

    struct AuthenticateResponse: Codable, Sendable, Equatable {
        var header: Header?
        var token: String?
    }

    // MARK: Watch

    struct WatchCreateRequest: Codable, Sendable, Equatable {
        struct Create: Codable, Sendable, Equatable {
            var key: EtcdBytes
            var range_end: EtcdBytes
            var start_revision: EtcdInt64
            var progress_notify: Bool
        }
        var create_request: Create
    }

    struct Event: Codable, Sendable, Equatable {
        /// "PUT" is the zero value and so left out; "DELETE" is spelled out.
        var type: String?
        var kv: KeyValue
    }

    struct WatchResponse: Codable, Sendable, Equatable {
        var header: Header?
        var watch_id: EtcdInt64?
        var created: Bool?
        var canceled: Bool?
        var compact_revision: EtcdInt64?
        var cancel_reason: String?
        var events: [Event]?
    }

    /// One element of a gateway stream.
    struct StreamMessage<Result: Codable & Sendable & Equatable>: Codable, Sendable, Equatable {
        var result: Result?
        var error: StreamError?
    }

    struct StreamError: Codable, Sendable, Equatable {
        var grpc_code: Int?
        var http_code: Int?
        var message: String?
        var http_status: String?
    }

    /// The body of a failed unary call.
    struct ErrorBody: Codable, Sendable, Equatable {
        var error: String?
        var message: String?
        var code: Int?
    }

    /// The end of the key range that covers every key starting with `prefix`: the prefix with its last byte
    /// incremented (bytes of 0xff are dropped first); "\0" means "to the end of the keyspace".
    static func prefixRangeEnd(_ prefix: String) -> Data {
        var bytes = Array(prefix.utf8)
        while let last = bytes.last {
            if last < 0xff {
                bytes[bytes.count - 1] = last + 1
                return Data(bytes)
            }
            bytes.removeLast()
        }
        return Data([0])
    }

    static let encoder = JSONFormat.encoder()
}

/// Splits a byte stream into top-level JSON objects, however the transport chunks it: the gateway writes one
/// object per line, but nothing here depends on the newlines. Tracks string literals so that braces inside
/// values do not count.
struct JSONObjectSplitter: Sendable {
    private var buffer: [UInt8] = []
    private var depth = 0
    private var inString = false
    private var escaped = false
    private var start: Int?
    private var scanned = 0

    /// A stream element larger than this is refused (a watch response with thousands of leases is a few MB).
    static let maxObjectSize = 64 << 20

    struct Overflow: Error, CustomStringConvertible {
        var description: String { "etcd stream message exceeds \(JSONObjectSplitter.maxObjectSize) bytes" }
    }

    /// Appends `bytes` and returns every object completed by them.
    mutating func append<C: Collection>(_ bytes: C) throws -> [Data] where C.Element == UInt8 {
        buffer.append(contentsOf: bytes)
        var objects: [Data] = []
        var i = scanned
        while i < buffer.count {
            let b = buffer[i]
            if inString {
                if escaped {
                    escaped = false
                } else if b == UInt8(ascii: "\\") {
                    escaped = true
                } else if b == UInt8(ascii: "\"") {
                    inString = false
                }
            } else if b == UInt8(ascii: "\"") {
                if depth > 0 { inString = true }
            } else if b == UInt8(ascii: "{") {
                if depth == 0 { start = i }
                depth += 1
            } else if b == UInt8(ascii: "}") && depth > 0 {
                depth -= 1
                if depth == 0, let s = start {
                    objects.append(Data(buffer[s...i]))
                    start = nil
                }
            }
            i += 1
        }
        // Drop what has been consumed; keep the unfinished object.
        if let s = start {
            buffer.removeFirst(s)
            start = 0
            scanned = buffer.count
        } else {
            buffer.removeAll(keepingCapacity: true)
            scanned = 0
        }
        if buffer.count > Self.maxObjectSize { throw Overflow() }
        return objects
    }
}
