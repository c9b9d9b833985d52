import CShims
import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// The HTTP endpoint of `--metrics-addr`: `GET /healthz` (200 "ok", or 503 with the reason) and `GET /metrics`
/// (Prometheus text). One event-loop thread, swift-nio's HTTP/1 server pipeline, one response per request.
/// Everything it shows comes from the two closures given to `start`; it changes nothing.
public final class MetricsServer: @unchecked Sendable {  // the channel is set once in init
    private let group: MultiThreadedEventLoopGroup
    private let logger: Logger
    private let address: MetricsAddress
    private let providers = ProviderBox()
    private var channel: Channel?

    struct Providers: Sendable {
        var health: @Sendable () -> DaemonHealth
        var metrics: @Sendable () -> String
    }

    /// What the handlers read: set once by `start`, read on every request.
    final class ProviderBox: Sendable {
        let value = Mutex<Providers?>(nil)
    }

    /// "127.0.0.1:9100" as bound; nil once stopped.
    public var localAddress: String? {
        guard let a = channel?.localAddress, let port = a.port else { return nil }
        return "\(a.ipAddress ?? address.host):\(port)"
    }

    /// Binds the listening socket; requests wait for `start`. The kernel's refusal (a port in use) is `.system`,
    /// anything else NIO reports `.failed`.
    ///
    /// The listener is bound with SO_REUSEPORT, so that `up --replace` can bind the same address while the daemon
    /// it replaces still answers there (no scrape finds the port closed during an upgrade). The kernel lets only
    /// sockets of the same effective user into that group, so no unprivileged user can join it. `takeOver` false
    /// (every start but a replacement) first claims the address with a plain bind, so that a second daemon (or
    /// any other program) on the address is refused with "Address already in use" as without SO_REUSEPORT.
    public init(address: MetricsAddress, takeOver: Bool = false, logger: Logger) throws(FlannelError) {
        if !takeOver { try Self.claim(address) }
        self.address = address
        self.logger = logger
        group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let providers = self.providers
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(ChannelOptions.backlog, value: 64)
            .serverChannelOption(ChannelOptions.socketOption(.so_reuseaddr), value: 1)
            .serverChannelOption(ChannelOptions.socketOption(NIOBSDSocket.Option(rawValue: Int32(FU_SO_REUSEPORT))), value: 1)
            .childChannelInitializer { channel in
                channel.pipeline.configureHTTPServerPipeline(withErrorHandling: true).flatMap {
                    channel.pipeline.addHandler(MetricsHandler(providers: providers))
                }
            }
        do {
            channel = try bootstrap.bind(host: address.host, port: address.port).wait()
        } catch {
            try? group.syncShutdownGracefully()
            if let e = error as? IOError {
                throw .system(SystemError("bind metrics endpoint", "\(address)", errno: e.errnoCode))
            }
            throw .failed("bind metrics endpoint \(address): \(error)")
        }
        logger.info("metrics and health endpoint on http://\(localAddress ?? address.description)/metrics, /healthz")
    }

    /// Binds a plain TCP socket (SO_REUSEADDR as the listener has it, no SO_REUSEPORT) to `address` and closes
    /// it: EADDRINUSE when anything listens or is bound there, including a daemon's SO_REUSEPORT listener.
    static func claim(_ address: MetricsAddress) throws(FlannelError) {
        let operation = "bind metrics endpoint"
        let host = address.ip
        let fd = try FlannelError.system(try syscall(operation, "\(address): socket") {
            socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        })
        defer { _ = Glibc.close(fd) }
        var one: Int32 = 1
        _ = try FlannelError.system(try syscall(operation, "\(address): setsockopt SO_REUSEADDR") {
            setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        })
        let endpoint = Endpoint(address: host, port: UInt16(address.port))
        _ = try FlannelError.system(try syscall(operation, "\(address)") {
            endpoint.withSocketAddress { Glibc.bind(fd, $0, $1) }
        })
    }

    func start(health: @escaping @Sendable () -> DaemonHealth, metrics: @escaping @Sendable () -> String) {
        providers.value.withLock { $0 = Providers(health: health, metrics: metrics) }
    }

    /// Closes the endpoint and stops its thread. Idempotent.
    public func stop() {
        guard let channel else { return }
        self.channel = nil
        _ = try? channel.close().wait()
        do { try group.syncShutdownGracefully() } catch { logger.warning("metrics endpoint: shutdown: \(error)") }
    }
}

private final class MetricsHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let providers: MetricsServer.ProviderBox
    private var head: HTTPRequestHead?

    init(providers: MetricsServer.ProviderBox) { self.providers = providers }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let h): head = h
        case .body: break
        case .end:
            guard let head else { return }
            self.head = nil
            respond(context: context, to: head)
        }
    }

    private func respond(context: ChannelHandlerContext, to request: HTTPRequestHead) {
        let p = providers.value.withLock { $0 }
        let path = request.uri.split(separator: "?", maxSplits: 1).first.map(String.init) ?? request.uri
        var status = HTTPResponseStatus.ok
        var body: String
        var contentType = "text/plain; charset=utf-8"
        if request.method != .GET && request.method != .HEAD {
            (status, body) = (.methodNotAllowed, "only GET and HEAD\n")
        } else if path == "/healthz" {
            let h = p?.health() ?? DaemonHealth(healthy: false, reason: "starting")
            (status, body) = h.healthy ? (.ok, "ok\n") : (.serviceUnavailable, h.reason + "\n")
        } else if path == "/metrics" {
            body = p?.metrics() ?? ""
            contentType = PrometheusText.contentType
        } else {
            (status, body) = (.notFound, "not found; try /metrics or /healthz\n")
        }
        let keepAlive = request.isKeepAlive
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: contentType)
        headers.add(name: "Content-Length", value: String(body.utf8.count))
        headers.add(name: "Connection", value: keepAlive ? "keep-alive" : "close")
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: request.version, status: status, headers: headers))), promise: nil)
        if request.method != .HEAD {
            context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: body)))), promise: nil)
        }
        let done = context.writeAndFlush(wrapOutboundOut(.end(nil)))
        if !keepAlive {
            let channel = context.channel
            done.whenComplete { _ in channel.close(promise: nil) }
        }
    }
}
