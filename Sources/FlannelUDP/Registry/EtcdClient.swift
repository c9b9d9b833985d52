import AsyncHTTPClient
import Foundation
import Logging
import NIOCore
import NIOHTTP1
import NIOSSL
import Synchronization

/// How to reach etcd, named as flanneld names its flags (`--etcd-endpoints`, `--etcd-prefix`, `--etcd-username`,
/// `--etcd-password`, `--etcd-cafile`, `--etcd-certfile`, `--etcd-keyfile`).
public struct EtcdOptions: Sendable, Equatable {
    /// Client URLs, tried in order; the first that answers is used until it fails.
    public var endpoints: [String]
    /// The key prefix of the network (flannel's default "/coreos.com/network"), without a trailing slash.
    public var prefix: String
    public var username: String?
    public var password: String?
    /// PEM files for TLS: the CA to trust, and the client certificate and key to present.
    public var caFile: String?
    public var certFile: String?
    public var keyFile: String?
    /// The TTL of the etcd lease a subnet key is attached to (flannel: 24 h).
    public var leaseTTL: Duration
    /// How long before expiry the lease is renewed (flannel's --subnet-lease-renew-margin: 60 min).
    public var renewMargin: Duration
    /// The deadline of each unary request.
    public var requestTimeout: Duration

    public static let defaultEndpoints = ["http://127.0.0.1:2379"]

    public init(endpoints: [String] = EtcdOptions.defaultEndpoints, prefix: String = FlannelDefault.etcdPrefix,
                username: String? = nil, password: String? = nil,
                caFile: String? = nil, certFile: String? = nil, keyFile: String? = nil,
                leaseTTL: Duration = .seconds(24 * 3600), renewMargin: Duration = .seconds(3600),
                requestTimeout: Duration = .seconds(10)) {
        self.endpoints = endpoints
        self.prefix = prefix
        self.username = username
        self.password = password
        self.caFile = caFile
        self.certFile = certFile
        self.keyFile = keyFile
        self.leaseTTL = leaseTTL
        self.renewMargin = renewMargin
        self.requestTimeout = requestTimeout
    }

    /// Splits flanneld's comma-separated `--etcd-endpoints` value and checks each URL.
    public static func parseEndpoints(_ text: String) throws(EtcdError) -> [String] {
        let parts = text.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
        guard !parts.isEmpty else { throw .invalidOption("--etcd-endpoints '\(text)' names no URL") }
        return try parts.map { (p) throws(EtcdError) in try normalizeEndpoint(p) }
    }

    /// "http://host:port" with no path and no trailing slash.
    static func normalizeEndpoint(_ text: String) throws(EtcdError) -> String {
        var url = text
        while url.hasSuffix("/") { url.removeLast() }
        guard url.hasPrefix("http://") || url.hasPrefix("https://"),
              let parsed = URL(string: url), let host = parsed.host, !host.isEmpty,
              parsed.path.isEmpty || parsed.path == "/"
        else {
            throw .invalidOption("etcd endpoint '\(text)' is not an http:// or https:// URL such as "
                                 + "http://127.0.0.1:2379")
        }
        // user:password@ in a URL would put the secret in argv (and it is never used): refused, without echoing it.
        if parsed.user != nil || parsed.password != nil || text.contains("@") {
            throw .invalidOption("etcd endpoint for host '\(host)' carries credentials in the URL; give "
                                 + "--etcd-username and --etcd-password-file instead")
        }
        return url
    }

    /// The prefix with one leading slash and no trailing slash.
    static func normalizePrefix(_ text: String) throws(EtcdError) -> String {
        var p = text
        while p.hasSuffix("/") { p.removeLast() }
        guard !p.isEmpty else { throw .invalidOption("--etcd-prefix '\(text)' is empty") }
        if !p.hasPrefix("/") { p = "/" + p }
        return p
    }
}

/// What went wrong talking to etcd, or with the lease this node holds there (the config's own errors are
/// `NetworkConfigError`).
public enum EtcdError: Error, CustomStringConvertible, Sendable, Equatable {
    /// An option cannot be used (bad URL, unreadable TLS file...).
    case invalidOption(String)
    /// No endpoint could be reached; `reason` is the last endpoint's failure.
    case unreachable(endpoints: [String], reason: String)
    /// etcd answered with an error (gRPC `code`).
    case server(endpoint: String, operation: String, code: Int, message: String)
    /// The answer could not be understood.
    case badResponse(endpoint: String, operation: String, reason: String)
    /// The flannel config key does not exist.
    case configNotFound(key: String)
    /// `run` or `releaseLease` was called before `acquireLease` succeeded.
    case noLease
    /// Other nodes took every subnet we tried to create, this many times in a row.
    case contention(attempts: Int)
    /// A lease another daemon said was ours is not (`adoptLease`).
    case notOurs(String)

    public var description: String {
        switch self {
        case .invalidOption(let m): return m
        case .unreachable(let eps, let reason):
            return "cannot reach etcd at \(eps.joined(separator: ",")): \(reason)"
        case .server(let ep, let op, let code, let message):
            return "etcd \(ep) refused \(op): \(message) (code \(code))"
        case .badResponse(let ep, let op, let reason):
            return "etcd \(ep) gave an unreadable answer to \(op): \(reason)"
        case .configNotFound(let key):
            return "no flannel config at \(key) in etcd (create it with: etcdctl put \(key) "
                + "'{\"Network\": \"10.244.0.0/16\", \"Backend\": {\"Type\": \"udp\"}}')"
        case .noLease: return "no subnet lease has been acquired from etcd"
        case .contention(let n):
            return "gave up acquiring a subnet lease after \(n) attempts: other nodes took each chosen subnet first"
        case .notOurs(let why): return "not taking over the lease: \(why)"
        }
    }

    /// gRPC codes after which another endpoint, or a later try, may succeed: Unavailable, DeadlineExceeded,
    /// Aborted, ResourceExhausted, Internal (etcd returns "no leader" and "leader changed" this way).
    var isTransient: Bool {
        switch self {
        case .unreachable: return true
        case .server(_, _, let code, _): return [14, 4, 10, 8, 13].contains(code)
        default: return false
        }
    }
}

/// A small etcd v3 client over the JSON gateway: just the calls the subnet registry makes. Endpoints are tried
/// in order and the first that answers is kept; with a username, a token from /v3/auth/authenticate goes with
/// every request and is fetched again when etcd says it expired.
final class EtcdClient: Sendable {
    let endpoints: [String]
    private let http: HTTPClient
    private let options: EtcdOptions
    private let logger: Logger
    private let state = Mutex(State())

    private struct State {
        var current = 0
        var token: String?
    }

    init(options: EtcdOptions, logger: Logger) throws(EtcdError) {
        guard !options.endpoints.isEmpty else { throw .invalidOption("no etcd endpoint given") }
        endpoints = try options.endpoints.map { (e) throws(EtcdError) in try EtcdOptions.normalizeEndpoint(e) }
        self.options = options
        self.logger = logger

        var config = HTTPClient.Configuration()
        // Unary calls have their own deadline; the read timeout only has to catch a watch whose server
        // vanished, and etcd sends a progress notification on an idle watch every 10 minutes. AsyncHTTPClient
        // keeps retrying a refused connection until the connect timeout, which is therefore also how long a
        // dead endpoint delays failover to the next one.
        config.timeout = .init(connect: .seconds(3), read: .minutes(15))
        config.redirectConfiguration = .disallow
        config.tlsConfiguration = try Self.tlsConfiguration(options)
        http = HTTPClient(eventLoopGroup: HTTPClient.defaultEventLoopGroup, configuration: config,
                          backgroundActivityLogger: logger)
    }

    /// TLS as flanneld sets it up: the client certificate and key when both are given, the CA file as the only
    /// trust root when given (the system's roots otherwise).
    static func tlsConfiguration(_ options: EtcdOptions) throws(EtcdError) -> TLSConfiguration? {
        let hasCert = options.certFile != nil || options.keyFile != nil
        guard hasCert || options.caFile != nil else { return nil }
        guard (options.certFile == nil) == (options.keyFile == nil) else {
            throw .invalidOption("--etcd-certfile and --etcd-keyfile must be given together")
        }
        var tls = TLSConfiguration.makeClientConfiguration()
        tls.minimumTLSVersion = .tlsv12
        for path in [options.caFile, options.certFile, options.keyFile].compactMap({ $0 })
        where !FileManager.default.isReadableFile(atPath: path) {
            throw .invalidOption("etcd TLS file '\(path)' cannot be read")
        }
        do {
            if let ca = options.caFile {
                tls.trustRoots = .certificates(try NIOSSLCertificate.fromPEMFile(ca))
            }
            if let cert = options.certFile, let key = options.keyFile {
                tls.certificateChain = try NIOSSLCertificate.fromPEMFile(cert).map { .certificate($0) }
                tls.privateKey = .privateKey(try NIOSSLPrivateKey(file: key, format: .pem))
            }
        } catch {
            throw .invalidOption("etcd TLS files cannot be loaded: \(error)")
        }
        return tls
    }

    func shutdown() async throws {
        try await http.shutdown()
    }

    // MARK: KV

    /// Reads one key, or every key under `prefix` when `prefix` is true. Returns the pairs and the store
    /// revision they are as of.
    func range(_ key: String, prefix: Bool = false) async throws -> (kvs: [EtcdGateway.KeyValue], revision: Int64) {
        let request = EtcdGateway.RangeRequest(
            key: EtcdBytes(key), range_end: prefix ? EtcdBytes(EtcdGateway.prefixRangeEnd(key)) : nil)
        let response: EtcdGateway.RangeResponse = try await call("/v3/kv/range", request, operation: "range \(key)")
        return (response.kvs ?? [], response.header?.revision?.value ?? 0)
    }

    @discardableResult
    func put(_ key: String, value: String, lease: Int64 = 0) async throws -> Int64 {
        let request = EtcdGateway.PutRequest(key: EtcdBytes(key), value: EtcdBytes(value),
                                         lease: lease == 0 ? nil : EtcdInt64(lease))
        let response: EtcdGateway.PutResponse = try await call("/v3/kv/put", request, operation: "put \(key)")
        return response.header?.revision?.value ?? 0
    }

    /// Puts `key` only if it does not exist (its version is 0), atomically. Returns false if it exists.
    func create(_ key: String, value: String, lease: Int64) async throws -> Bool {
        let request = EtcdGateway.TxnRequest(
            compare: [.init(key: EtcdBytes(key), target: "VERSION", result: "EQUAL", version: 0)],
            success: [.init(request_put: .init(key: EtcdBytes(key), value: EtcdBytes(value),
                                               lease: EtcdInt64(lease)))])
        let response: EtcdGateway.TxnResponse = try await call("/v3/kv/txn", request, operation: "create \(key)")
        return response.succeeded ?? false
    }

    /// Deletes `key`; returns how many keys went.
    @discardableResult
    func delete(_ key: String) async throws -> Int64 {
        let request = EtcdGateway.DeleteRangeRequest(key: EtcdBytes(key), range_end: nil)
        let response: EtcdGateway.DeleteRangeResponse =
            try await call("/v3/kv/deleterange", request, operation: "delete \(key)")
        return response.deleted?.value ?? 0
    }

    // MARK: Leases

    func grant(ttl: Int64) async throws -> (id: Int64, ttl: Int64) {
        let response: EtcdGateway.LeaseResponse =
            try await call("/v3/lease/grant", EtcdGateway.LeaseGrantRequest(TTL: EtcdInt64(ttl)), operation: "lease grant")
        guard let id = response.ID?.value, id != 0 else {
            throw EtcdError.badResponse(endpoint: currentEndpoint, operation: "lease grant",
                                        reason: response.error ?? "no lease ID")
        }
        return (id, response.TTL?.value ?? ttl)
    }

    /// Refreshes a lease; returns its new TTL in seconds, 0 if the lease no longer exists.
    func keepAlive(_ id: Int64) async throws -> Int64 {
        let message: EtcdGateway.StreamMessage<EtcdGateway.LeaseResponse> =
            try await call("/v3/lease/keepalive", EtcdGateway.LeaseIDRequest(ID: EtcdInt64(id)),
                           operation: "lease keepalive")
        if let error = message.error {
            // Some etcd versions answer a lease they do not know with NotFound instead of a TTL of 0.
            if error.grpc_code == 5 || error.message?.contains("lease not found") == true { return 0 }
            throw noteAuthFailure(.server(endpoint: currentEndpoint, operation: "lease keepalive",
                                          code: error.grpc_code ?? 0, message: error.message ?? "stream error"))
        }
        return message.result?.TTL?.value ?? 0
    }

    func revoke(_ id: Int64) async throws {
        let _: EtcdGateway.PutResponse =
            try await call("/v3/lease/revoke", EtcdGateway.LeaseIDRequest(ID: EtcdInt64(id)), operation: "lease revoke")
    }

    // MARK: Watch

    /// Watches every key under `prefix` from `startRevision` and hands each response to `handler` until the
    /// handler returns false, the server ends the stream (returns normally), or the connection fails (throws).
    func watch(prefix: String, startRevision: Int64,
               _ handler: (EtcdGateway.WatchResponse) async throws -> Bool) async throws {
        let request = EtcdGateway.WatchCreateRequest(create_request: .init(
            key: EtcdBytes(prefix), range_end: EtcdBytes(EtcdGateway.prefixRangeEnd(prefix)),
            start_revision: EtcdInt64(startRevision), progress_notify: true))
        let body = try EtcdGateway.encoder.encode(request)
        // The deadline covers only the wait for the response head; the stream then lasts until cancelled.
        // "hasleader" (flannel's WithRequireLeader) makes a member that loses its leader cancel the watch
        // instead of going quiet, so that the caller reconnects, possibly to another endpoint.
        let (response, endpoint) = try await send("/v3/watch", body: body, operation: "watch \(prefix)",
                                                  headers: [("Grpc-Metadata-hasleader", "true")])
        guard (200..<300).contains(response.status.code) else {
            let data = Data((try? await response.body.collect(upTo: 1 << 20))?.readableBytesView ?? .init())
            throw noteAuthFailure(Self.serverError(data, status: response.status, endpoint: endpoint,
                                                   operation: "watch \(prefix)"))
        }
        var splitter = JSONObjectSplitter()
        let decoder = JSONDecoder()
        for try await chunk in response.body {
            for object in try splitter.append(chunk.readableBytesView) {
                let message: EtcdGateway.StreamMessage<EtcdGateway.WatchResponse>
                do {
                    message = try decoder.decode(EtcdGateway.StreamMessage<EtcdGateway.WatchResponse>.self, from: object)
                } catch {
                    throw EtcdError.badResponse(endpoint: endpoint, operation: "watch", reason: "\(error)")
                }
                if let error = message.error {
                    throw noteAuthFailure(.server(endpoint: endpoint, operation: "watch", code: error.grpc_code ?? 0,
                                                  message: error.message ?? "stream error"))
                }
                // A watch refused for its token comes back as a cancellation, not as an error.
                if let result = message.result, result.canceled == true, let reason = result.cancel_reason,
                   reason.contains("invalid auth token") || reason.contains("Unauthenticated") {
                    throw noteAuthFailure(.server(endpoint: endpoint, operation: "watch", code: 16, message: reason))
                }
                if let result = message.result, try await !handler(result) { return }
            }
        }
    }

    // MARK: Transport

    private var currentEndpoint: String { endpoints[state.withLock { $0.current }] }

    /// A unary call: encodes `request`, decodes the answer, authenticating first when a username is set and
    /// once more if etcd rejects the token.
    private func call<Request: Encodable, Response: Decodable>(_ path: String, _ request: Request,
                                                               operation: String) async throws -> Response {
        let body = try EtcdGateway.encoder.encode(request)
        var reauthenticated = false
        while true {
            do {
                let (response, endpoint) = try await send(path, body: body, operation: operation)
                let data: Data
                do {
                    data = Data(try await response.body.collect(upTo: 64 << 20).readableBytesView)
                } catch where !Task.isCancelled {
                    // The connection broke after the response head: as transient as a refused connection.
                    throw EtcdError.unreachable(endpoints: [endpoint], reason: "\(operation): \(error)")
                }
                guard (200..<300).contains(response.status.code) else {
                    throw Self.serverError(data, status: response.status, endpoint: endpoint, operation: operation)
                }
                do {
                    return try JSONDecoder().decode(Response.self, from: data)
                } catch {
                    throw EtcdError.badResponse(endpoint: endpoint, operation: operation,
                                                reason: "\(error) in '\(String(decoding: data.prefix(200), as: UTF8.self))'")
                }
            } catch let error as EtcdError {
                // An expired or revoked token: get a new one and try again, once.
                if isAuthFailure(error), !reauthenticated {
                    reauthenticated = true
                    _ = noteAuthFailure(error)
                    continue
                }
                throw error
            }
        }
    }

    /// True for etcd's answer to a token it no longer knows (simple tokens expire after --auth-token-ttl, and
    /// all of them go when etcd restarts).
    private func isAuthFailure(_ error: EtcdError) -> Bool {
        guard options.username != nil, case .server(_, _, let code, let message) = error else { return false }
        return code == 16 || message.contains("invalid auth token")
    }

    /// Forgets the token after an authentication failure, so that the next request fetches a new one.
    private func noteAuthFailure(_ error: EtcdError) -> EtcdError {
        if isAuthFailure(error) { state.withLock { $0.token = nil } }
        return error
    }

    static func serverError(_ data: Data, status: HTTPResponseStatus, endpoint: String,
                            operation: String) -> EtcdError {
        if let body = try? JSONDecoder().decode(EtcdGateway.ErrorBody.self, from: data),
           let message = body.message ?? body.error {
            return .server(endpoint: endpoint, operation: operation, code: body.code ?? 0, message: message)
        }
        let text = String(decoding: data.prefix(200), as: UTF8.self)
        return .server(endpoint: endpoint, operation: operation, code: 0,
                       message: "HTTP \(status.code) \(status.reasonPhrase) \(text)")
    }

    /// Sends one POST to the current endpoint, moving on to the next on a transport failure or an etcd
    /// "unavailable" answer, until every endpoint has been tried once. Returns the response with its body
    /// unread, and the endpoint that gave it.
    private func send(_ path: String, body: Data, operation: String,
                      headers: [(String, String)] = []) async throws -> (HTTPClientResponse, String) {
        let first = state.withLock { $0.current }
        var lastReason = "no endpoint"
        for attempt in 0..<endpoints.count {
            try Task.checkCancellation()
            let index = (first + attempt) % endpoints.count
            let endpoint = endpoints[index]
            do {
                let token = try await authToken(endpoint: endpoint)
                var request = HTTPClientRequest(url: endpoint + path)
                request.method = .POST
                request.headers.add(name: "Content-Type", value: "application/json")
                if let token { request.headers.add(name: "Authorization", value: token) }
                for (name, value) in headers { request.headers.add(name: name, value: value) }
                request.body = .bytes(ByteBuffer(bytes: body))
                let response = try await http.execute(request, timeout: .nanoseconds(
                    Int64(options.requestTimeout.components.seconds) * 1_000_000_000
                        + options.requestTimeout.components.attoseconds / 1_000_000_000))
                if response.status == .serviceUnavailable && endpoints.count > 1 {
                    lastReason = "HTTP 503"
                    continue
                }
                if index != first {
                    state.withLock { $0.current = index }
                    logger.info("etcd: using endpoint \(endpoint)")
                }
                return (response, endpoint)
            } catch let error as EtcdError where !error.isTransient {
                throw error
            } catch is CancellationError {
                throw CancellationError()
            } catch {
                if Task.isCancelled { throw CancellationError() }
                lastReason = "\(endpoint): \(error)"
                logger.debug("etcd: \(operation) via \(endpoint) failed: \(error)")
            }
        }
        throw EtcdError.unreachable(endpoints: endpoints, reason: lastReason)
    }

    /// The auth token to send, fetched with the username and password the first time it is needed.
    private func authToken(endpoint: String) async throws -> String? {
        guard let username = options.username else { return nil }
        if let token = state.withLock({ $0.token }) { return token }
        var request = HTTPClientRequest(url: endpoint + "/v3/auth/authenticate")
        request.method = .POST
        request.headers.add(name: "Content-Type", value: "application/json")
        request.body = .bytes(ByteBuffer(bytes: try EtcdGateway.encoder.encode(
            EtcdGateway.AuthenticateRequest(name: username, password: options.password ?? ""))))
        let response = try await http.execute(request, timeout: .seconds(10))
        let data = Data(try await response.body.collect(upTo: 1 << 20).readableBytesView)
        guard (200..<300).contains(response.status.code) else {
            let error = Self.serverError(data, status: response.status, endpoint: endpoint,
                                         operation: "authenticate as '\(username)'")
            throw error
        }
        guard let token = try JSONDecoder().decode(EtcdGateway.AuthenticateResponse.self, from: data).token,
              !token.isEmpty
        else {
            throw EtcdError.badResponse(endpoint: endpoint, operation: "authenticate", reason: "no token")
        }
        state.withLock { $0.token = token }
        logger.info("etcd: authenticated as '\(username)' at \(endpoint)")
        return token
    }
}
