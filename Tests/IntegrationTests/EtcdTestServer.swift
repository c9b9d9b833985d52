import AsyncHTTPClient
import Foundation
import Logging
import Synchronization
import XCTest
@testable import FlannelCore
@testable import FlannelUDP

#if canImport(Glibc)
import Glibc
#endif

/// A throwaway etcd on loopback for one test: random free ports on 127.0.0.1, a temporary data directory,
/// stopped and removed in teardown whatever happened. Nothing leaves loopback, nothing in the root namespace's
/// network configuration changes.
///
///     test process ──HTTP (JSON gateway)──▶ 127.0.0.1:<client port>  etcd --data-dir /tmp/flannel-udp-etcd-*
///                                            127.0.0.1:<peer port>    (single member, peers unused)
final class EtcdTestServer: @unchecked Sendable {
    static let binary = "/usr/bin/etcd"
    static let etcdctl = "/usr/bin/etcdctl"

    let dataDir: URL
    let clientPort: UInt16
    let peerPort: UInt16
    /// Plain-HTTP port for /health (etcd's metrics listener), usable whatever TLS or auth the client port has.
    let metricsPort: UInt16
    /// When set (before `start()`), the client port speaks TLS and requires a client certificate from this CA.
    var tls: EtcdTestCertificates?
    private var process: Process?
    /// More etcd flags for the next `start()`.
    var extraArguments: [String] = []
    private let logPath: URL

    var endpoint: String { "\(tls == nil ? "http" : "https")://127.0.0.1:\(clientPort)" }

    /// Skips the test unless it runs as root with etcd installed.
    static func requirements() throws {
        guard getuid() == 0 else {
            throw XCTSkip("etcd integration tests run only as root (they start an etcd server on loopback)")
        }
        guard FileManager.default.isExecutableFile(atPath: binary),
              FileManager.default.isExecutableFile(atPath: etcdctl) else {
            throw XCTSkip("etcd integration tests need \(binary) and \(etcdctl): apt-get install -y etcd-server etcd-client")
        }
    }

    init() throws {
        dataDir = FileManager.default.temporaryDirectory
            .appendingPathComponent("flannel-udp-etcd-\(getpid())-\(UInt32.random(in: 0...UInt32.max))")
        try FileManager.default.createDirectory(at: dataDir, withIntermediateDirectories: true)
        logPath = dataDir.appendingPathComponent("etcd.log")
        clientPort = try Self.freePort()
        var ports: Set<UInt16> = [clientPort]
        var peer = try Self.freePort()
        while ports.contains(peer) { peer = try Self.freePort() }
        peerPort = peer
        ports.insert(peer)
        var metrics = try Self.freePort()
        while ports.contains(metrics) { metrics = try Self.freePort() }
        metricsPort = metrics
    }

    /// Starts etcd (again, on the same data directory and ports after `kill`) and waits until it is healthy.
    func start() async throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: Self.binary)
        let peerURL = "http://127.0.0.1:\(peerPort)"
        p.arguments = [
            "--name", "test",
            "--data-dir", dataDir.appendingPathComponent("data").path,
            "--listen-client-urls", endpoint, "--advertise-client-urls", endpoint,
            "--listen-peer-urls", peerURL, "--initial-advertise-peer-urls", peerURL,
            "--initial-cluster", "test=\(peerURL)",
            "--listen-metrics-urls", "http://127.0.0.1:\(metricsPort)",
            "--log-outputs", "stderr",
        ] + extraArguments
        if let tls {
            p.arguments! += ["--cert-file", tls.serverCert, "--key-file", tls.serverKey,
                             "--trusted-ca-file", tls.caCert, "--client-cert-auth"]
        }
        if !FileManager.default.fileExists(atPath: logPath.path) {
            _ = FileManager.default.createFile(atPath: logPath.path, contents: nil)
        }
        let log = try FileHandle(forWritingTo: logPath)
        log.seekToEndOfFile()
        p.standardOutput = log
        p.standardError = log
        try ProcessLaunch.run(p)
        process = p
        try await waitForHealth()
    }

    private func waitForHealth() async throws {
        let deadline = Date().addingTimeInterval(20)
        while Date() < deadline {
            if let p = process, !p.isRunning {
                throw EtcdTestFailure("etcd exited with status \(p.terminationStatus); log:\n\(logTail())")
            }
            // /health answers without credentials, also once auth is enabled.
            var request = HTTPClientRequest(url: "http://127.0.0.1:\(metricsPort)/health")
            request.method = .GET
            if let response = try? await HTTPClient.shared.execute(request, timeout: .seconds(1)),
               let body = try? await response.body.collect(upTo: 4096),
               String(buffer: body).contains(#""health":"true""#) {
                return
            }
            try await Task.sleep(for: .milliseconds(100))
        }
        throw EtcdTestFailure("etcd at \(endpoint) not healthy after 20 s; log:\n\(logTail())")
    }

    /// SIGKILL, as a crash would; the data directory stays for `start()`.
    func kill() {
        guard let p = process else { return }
        Glibc.kill(p.processIdentifier, SIGKILL)
        p.waitUntilExit()
        process = nil
    }

    /// Stops etcd and removes its data directory.
    func destroy() {
        kill()
        try? FileManager.default.removeItem(at: dataDir)
    }

    func logTail() -> String {
        let text = (try? String(contentsOf: logPath, encoding: .utf8)) ?? ""
        return text.split(separator: "\n").suffix(15).joined(separator: "\n")
    }

    // MARK: etcdctl

    /// Runs etcdctl against this server and returns its standard output; fails on a non-zero exit.
    @discardableResult
    func etcdctl(_ args: String...) async throws -> String {
        var options = ["--endpoints=\(endpoint)"]
        if let tls { options += ["--cacert=\(tls.caCert)", "--cert=\(tls.clientCert)", "--key=\(tls.clientKey)"] }
        let result = try await Self.run(Self.etcdctl, options + args)
        guard result.status == 0 else {
            throw EtcdTestFailure("etcdctl \(args.joined(separator: " ")) exited \(result.status): \(result.output)")
        }
        return result.output
    }

    static func run(_ path: String, _ args: [String]) async throws -> (status: Int32, output: String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: path)
        p.arguments = args
        p.environment = ["ETCDCTL_API": "3", "PATH": "/usr/bin:/bin"]
        let out = try ProcessLaunch.runReadingOutput(p, errorsToo: true)
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: data, as: UTF8.self))
    }

    // MARK: Helpers

    static func freePort() throws -> UInt16 {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw EtcdTestFailure("socket: \(errno)") }
        defer { close(fd) }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_addr.s_addr = IPv4Address(127, 0, 0, 1).networkOrder
        addr.sin_port = 0
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let rc = withUnsafeMutablePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { sa in
                bind(fd, sa, len) == 0 ? getsockname(fd, sa, &len) : -1
            }
        }
        guard rc == 0 else { throw EtcdTestFailure("bind 127.0.0.1:0: \(errno)") }
        return UInt16(bigEndian: addr.sin_port)
    }
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl in `directory`.
struct EtcdTestCertificates {
    let caCert: String
    let serverCert: String
    let serverKey: String
    let clientCert: String
    let clientKey: String

    init(directory: URL) async throws {
        guard FileManager.default.isExecutableFile(atPath: "/usr/bin/openssl") else {
            throw XCTSkip("the etcd TLS test needs /usr/bin/openssl")
        }
        let dir = directory.path
        func path(_ name: String) -> String { "\(dir)/\(name)" }
        caCert = path("ca.pem"); serverCert = path("server.pem"); serverKey = path("server-key.pem")
        clientCert = path("client.pem"); clientKey = path("client-key.pem")
        let ext = path("san.cnf")
        try "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n"
            .write(toFile: ext, atomically: true, encoding: .utf8)
        let steps: [[String]] = [
            ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", path("ca-key.pem"), "-out", caCert,
             "-days", "1", "-subj", "/CN=flannel-udp test CA"],
            ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", serverKey, "-out", path("server.csr"),
             "-subj", "/CN=127.0.0.1"],
            ["x509", "-req", "-in", path("server.csr"), "-CA", caCert, "-CAkey", path("ca-key.pem"),
             "-CAcreateserial", "-out", serverCert, "-days", "1", "-extfile", ext],
            ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", clientKey, "-out", path("client.csr"),
             "-subj", "/CN=flannel"],
            ["x509", "-req", "-in", path("client.csr"), "-CA", caCert, "-CAkey", path("ca-key.pem"),
             "-CAcreateserial", "-out", clientCert, "-days", "1", "-extfile", ext],
        ]
        for step in steps {
            let result = try await EtcdTestServer.run("/usr/bin/openssl", step)
            guard result.status == 0 else {
                throw EtcdTestFailure("openssl \(step.joined(separator: " ")): \(result.output)")
            }
        }
    }
}

struct EtcdTestFailure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// The first 10.244.N.0/24, N in `thirdOctets`, that is not in `held`: where a test writes a lease by hand beside
/// nodes whose leases are random. A key on a node's own subnet would take that node's lease away, not add a peer.
func freeSubnet(notIn held: [IPv4Network], thirdOctets: ClosedRange<UInt8>) throws -> IPv4Network {
    try XCTUnwrap(thirdOctets.lazy.map { IPv4Network(address: IPv4Address(10, 244, $0, 0), prefixLength: 24) }
        .first { !held.contains($0) })
}

/// Polls `condition` every 20 ms until it holds or `timeout` passes.
func etcdEventually(_ what: String, timeout: TimeInterval = 2, _ condition: () async throws -> Bool) async throws {
    let deadline = Date().addingTimeInterval(timeout)
    while true {
        if try await condition() { return }
        if Date() >= deadline { throw EtcdTestFailure("timed out after \(timeout) s waiting for \(what)") }
        try await Task.sleep(for: .milliseconds(20))
    }
}

/// What a running registry reported: the latest peer list and whether the lease was lost.
final class EtcdRunObserver: Sendable {
    private let state = Mutex<(routes: [PeerRoute]?, updates: Int, lost: Int)>((nil, 0, 0))

    var routes: [PeerRoute]? { state.withLock { $0.routes } }
    var updates: Int { state.withLock { $0.updates } }
    var lostCount: Int { state.withLock { $0.lost } }

    func peers(_ routes: [PeerRoute]) {
        state.withLock { $0.routes = routes; $0.updates += 1 }
    }

    func lost() { state.withLock { $0.lost += 1 } }

    var subnets: Set<String> { Set((routes ?? []).map(\.subnet.description)) }
}
