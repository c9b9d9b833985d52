import Foundation
import Logging
import XCTest
@testable import FlannelCore
@testable import FlannelUDP

/// The etcd registry against a real etcd (Debian's etcd-server) on loopback. Root only; each test gets its own
/// etcd with a fresh data directory, removed in tearDown.
final class EtcdRegistryTests: XCTestCase {
    private var server: EtcdTestServer!
    private var registries: [EtcdRegistry] = []
    private var runs: [Task<Void, Error>] = []

    private let configKey = "/coreos.com/network/config"
    private let udpConfig = #"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#

    override func setUp() async throws {
        try EtcdTestServer.requirements()
        let server = try EtcdTestServer()
        self.server = server
        do {
            try await server.start()
        } catch {
            server.destroy()
            throw error
        }
    }

    override func tearDown() async throws {
        for task in runs { task.cancel() }
        for task in runs { _ = await task.result }
        for registry in registries { try? await registry.shutdown() }
        runs = []
        registries = []
        server?.destroy()
    }

    // MARK: Helpers

    /// Authentication on: users root (password rootpw) and flannel (secret), flannel with read and write access
    /// to flannel's prefix only.
    private func enableAuthentication() async throws {
        try await server.etcdctl("user", "add", "root:rootpw")
        try await server.etcdctl("user", "add", "flannel:secret")
        try await server.etcdctl("role", "add", "flannel")
        try await server.etcdctl("role", "grant-permission", "flannel", "--prefix=true", "readwrite", "/coreos.com/network/")
        try await server.etcdctl("user", "grant-role", "flannel", "flannel")
        try await server.etcdctl("auth", "enable")
    }

    /// The EtcdError `registry.loadConfig(maxAttempts:)` fails with; nil (and `failure` reported) when it
    /// succeeds. Any other error is thrown on.
    private func loadConfigError(_ registry: EtcdRegistry, maxAttempts: Int, _ failure: String,
                                 file: StaticString = #filePath, line: UInt = #line) async throws -> EtcdError? {
        do {
            _ = try await registry.loadConfig(maxAttempts: maxAttempts)
            XCTFail(failure, file: file, line: line)
            return nil
        } catch let error as EtcdError {
            return error
        }
    }

    private func makeRegistry(_ ip: String, endpoints: [String]? = nil, tweak: (inout EtcdOptions) -> Void = { _ in })
        throws -> EtcdRegistry {
        var options = EtcdOptions(endpoints: endpoints ?? [server.endpoint])
        tweak(&options)
        var logger = Logger(label: "etcd-\(ip)")
        logger.logLevel = ProcessInfo.processInfo.environment["ETCD_TEST_DEBUG"] != nil ? .debug : .info
        let registry = try EtcdRegistry(options: options, publicIP: IPv4Address(ip)!, logger: logger)
        registries.append(registry)
        return registry
    }

    private func start(_ registry: EtcdRegistry) -> EtcdRunObserver {
        let observer = EtcdRunObserver()
        runs.append(Task {
            try await registry.run(onPeers: { observer.peers($0) }, onLeaseLost: { observer.lost() })
        })
        return observer
    }

    /// A registry with a lease, running.
    private func node(_ ip: String, config: NetworkConfig,
                      previousSubnet: IPv4Network? = nil) async throws -> (EtcdRegistry, SubnetLease, EtcdRunObserver) {
        let registry = try makeRegistry(ip)
        let lease = try await registry.acquireLease(config: config, previousSubnet: previousSubnet)
        let observer = start(registry)
        try await etcdEventually("first peer list of \(ip)") { observer.routes != nil }
        return (registry, lease, observer)
    }

    private func putConfig(_ json: String? = nil) async throws -> NetworkConfig {
        try await server.etcdctl("put", configKey, json ?? udpConfig)
        return try NetworkConfig(json: json ?? udpConfig)
    }

    private func value(of subnet: IPv4Network) async throws -> String {
        try await server.etcdctl("get", "--print-value-only", SubnetKey.key(prefix: "/coreos.com/network", subnet: subnet))
            .trimmingCharacters(in: .newlines)
    }

    // MARK: Tests

    func testLoadsConfigAndFailsOverToAWorkingEndpoint() async throws {
        let expected = try await putConfig(#"{"Network":"10.50.0.0/16","SubnetLen":26,"Backend":{"Type":"udp","Port":9123}}"#)
        // The first endpoint refuses connections; the registry moves on to the second.
        let dead = "http://127.0.0.1:\(try EtcdTestServer.freePort())"
        let registry = try makeRegistry("192.168.10.1", endpoints: [dead, server.endpoint])
        let config = try await registry.loadConfig(maxAttempts: 1)
        XCTAssertEqual(config, expected)
        XCTAssertEqual(config.port, 9123)
        XCTAssertEqual(config.subnetLength, 26)
    }

    func testConfigErrors() async throws {
        let registry = try makeRegistry("192.168.10.1")
        if let error = try await loadConfigError(registry, maxAttempts: 2, "no config yet") {
            XCTAssertEqual(error, .configNotFound(key: configKey))
        }
        _ = try await server.etcdctl("put", configKey, #"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#)
        do {
            _ = try await registry.loadConfig()
            XCTFail("vxlan config accepted")
        } catch let error as NetworkConfigError {
            XCTAssertEqual(error.message, "flannel config Backend.Type 'vxlan' is not supported: flannel-udp "
                           + "implements only the udp backend (etcd key /coreos.com/network/config)")
        }
        // Nothing listens: every attempt fails, each is logged, and the last error names the endpoint.
        let nowhere = try makeRegistry("192.168.10.1", endpoints: ["http://127.0.0.1:\(try EtcdTestServer.freePort())"])
        if let error = try await loadConfigError(nowhere, maxAttempts: 2, "unreachable etcd answered") {
            guard case .unreachable = error else { return XCTFail("\(error)") }
        }
    }

    func testConfigAppearingLaterIsPickedUpByTheRetryLoop() async throws {
        let registry = try makeRegistry("192.168.10.1")
        let load = Task { try await registry.loadConfig() }
        try await Task.sleep(for: .milliseconds(300))   // the first attempt finds no key
        let expected = try await putConfig()
        let config = try await load.value
        XCTAssertEqual(config, expected)
    }

    func testThreeNodesGetDistinctSubnetsInFlannelsFormat() async throws {
        let config = try await putConfig()
        var subnets: [IPv4Network] = []
        for i in 1...3 {
            let lease = try await makeRegistry("192.168.1.\(i)").acquireLease(config: config, previousSubnet: nil)
            XCTAssertTrue(config.admits(lease.subnet), "\(lease.subnet)")
            XCTAssertGreaterThan(lease.expiration.timeIntervalSinceNow, 23 * 3600)
            subnets.append(lease.subnet)
            // Exactly the bytes flannel's udp backend writes.
            let stored = try await value(of: lease.subnet)
            XCTAssertEqual(stored, #"{"PublicIP":"192.168.1.\#(i)","PublicIPv6":null}"#)
            // ...attached to a 24 h etcd lease.
            let ttl = try await server.etcdctl("lease", "timetolive", String(lease.etcdLeaseID, radix: 16))
            XCTAssertTrue(ttl.contains("granted with TTL(86400s)"), ttl)
        }
        XCTAssertEqual(Set(subnets).count, 3, "\(subnets)")

        // A restarted node (same public IP) gets its subnet back even when asked for another one.
        let again = try await makeRegistry("192.168.1.2")
            .acquireLease(config: config, previousSubnet: try IPv4Network(parsing: "10.244.200.0/24"))
        XCTAssertEqual(again.subnet, subnets[1])
        // A new node asking for its previous subnet gets it when it is free (one the three random leases missed).
        let previous = try freeSubnet(notIn: subnets, thirdOctets: 201...204)
        let fourth = try await makeRegistry("192.168.1.4").acquireLease(config: config, previousSubnet: previous)
        XCTAssertEqual(fourth.subnet, previous)
    }

    func testTenConcurrentNodesGetDistinctSubnets() async throws {
        // Twelve subnets for ten nodes: random picks collide and the losers must choose again.
        let config = try await putConfig(#"{"Network":"10.244.0.0/16","SubnetMin":"10.244.1.0","SubnetMax":"10.244.12.0"}"#)
        let nodes = try (1...10).map { try makeRegistry("192.168.2.\($0)") }
        let leases = try await withThrowingTaskGroup(of: SubnetLease.self) { group in
            for registry in nodes {
                group.addTask { try await registry.acquireLease(config: config, previousSubnet: nil) }
            }
            return try await group.reduce(into: []) { $0.append($1) }
        }
        XCTAssertEqual(leases.count, 10)
        XCTAssertEqual(Set(leases.map(\.subnet)).count, 10, "\(leases.map(\.subnet))")
        let keys = try await server.etcdctl("get", "--prefix", "--keys-only", "/coreos.com/network/subnets/")
        XCTAssertEqual(keys.split(separator: "\n").count, 10, keys)
    }

    func testWatchSeesNodesComeAndGo() async throws {
        let config = try await putConfig()
        var observers: [EtcdRunObserver] = []
        var leases: [SubnetLease] = []
        for i in 1...3 {
            let (_, lease, observer) = try await node("192.168.3.\(i)", config: config)
            observers.append(observer)
            leases.append(lease)
        }
        // Each node sees the other two, never itself.
        for (i, observer) in observers.enumerated() {
            let others = Set(leases.enumerated().filter { $0.offset != i }.map(\.element.subnet.description))
            try await etcdEventually("node \(i + 1) sees the others") { observer.subnets == others }
        }
        // A fourth node shows up at the first three within 2 s, with its public IP and the backend port.
        let (fourth, fourthLease, _) = try await node("192.168.3.4", config: config)
        for observer in observers {
            try await etcdEventually("the fourth node", timeout: 2) {
                observer.routes?.contains(PeerRoute(subnet: fourthLease.subnet,
                                                    endpoint: Endpoint(address: IPv4Address(192, 168, 3, 4), port: 8285))) == true
            }
        }
        // Its lease goes: it disappears from the others' routes.
        try await fourth.releaseLease()
        for observer in observers {
            try await etcdEventually("the fourth node removed", timeout: 2) {
                !observer.subnets.contains(fourthLease.subnet.description)
            }
        }
        // Deleting a key by hand works the same way.
        try await server.etcdctl("del", SubnetKey.key(prefix: "/coreos.com/network", subnet: leases[2].subnet))
        try await etcdEventually("node 3 removed at node 1") { observers[0].subnets == [leases[1].subnet.description] }
        XCTAssertEqual(observers[0].lostCount, 0)
        try await etcdEventually("node 3 told its lease is lost") { observers[2].lostCount == 1 }
    }

    func testLeaseWrittenByFlannelBecomesARoute() async throws {
        let config = try await putConfig(#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp","Port":8399}}"#)
        let (_, _, observer) = try await node("192.168.4.1", config: config, previousSubnet: Self.pinnedSubnet)
        // What a flannel udp node writes, on its own 24 h lease, by hand with etcdctl.
        let grant = try await server.etcdctl("lease", "grant", "86400")
        let leaseID = try XCTUnwrap(grant.split(separator: " ").dropFirst().first.map(String.init))
        try await server.etcdctl("put", "--lease=\(leaseID)", "/coreos.com/network/subnets/10.244.77.0-24",
                                 #"{"PublicIP":"192.168.4.77","PublicIPv6":null}"#)
        // An older flannel's value without PublicIPv6, and a vxlan node's.
        try await server.etcdctl("put", "/coreos.com/network/subnets/10.244.78.0-24", #"{"PublicIP":"192.168.4.78"}"#)
        try await server.etcdctl("put", "/coreos.com/network/subnets/10.244.79.0-24",
                                 #"{"PublicIP":"192.168.4.79","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"6e:2f:3a:aa:01:02"}}"#)
        // Garbage is skipped, not fatal.
        try await server.etcdctl("put", "/coreos.com/network/subnets/10.244.80.0-24", "not json")
        try await server.etcdctl("put", "/coreos.com/network/subnets/bogus", #"{"PublicIP":"192.168.4.81"}"#)
        let expected = [
            PeerRoute(subnet: try IPv4Network(parsing: "10.244.77.0/24"), endpoint: Endpoint(address: IPv4Address(192, 168, 4, 77), port: 8399)),
            PeerRoute(subnet: try IPv4Network(parsing: "10.244.78.0/24"), endpoint: Endpoint(address: IPv4Address(192, 168, 4, 78), port: 8399)),
            PeerRoute(subnet: try IPv4Network(parsing: "10.244.79.0/24"), endpoint: Endpoint(address: IPv4Address(192, 168, 4, 79), port: 8399)),
        ]
        try await etcdEventually("hand-written leases as routes") { observer.routes == expected }
        // A second node sees the same set from its initial listing (plus the first node).
        let (_, _, second) = try await node("192.168.4.2", config: config)
        XCTAssertEqual(second.routes?.filter { $0.endpoint.address != IPv4Address(192, 168, 4, 1) }, expected)
    }

    func testWatchResumesAfterEtcdRestart() async throws {
        let config = try await putConfig()
        let (_, lease1, observer) = try await node("192.168.5.1", config: config)
        let (_, lease2, _) = try await node("192.168.5.2", config: config)
        try await etcdEventually("node 2 seen") { observer.subnets == [lease2.subnet.description] }

        server.kill()
        try await Task.sleep(for: .milliseconds(500))  // let the watch notice and start retrying
        try await server.start()

        // Routes survive the outage, and changes after the restart arrive.
        XCTAssertEqual(observer.subnets, [lease2.subnet.description])
        let (_, lease3, _) = try await node("192.168.5.3", config: config)
        try await etcdEventually("node 3 seen after the restart", timeout: 10) {
            observer.subnets == [lease2.subnet.description, lease3.subnet.description]
        }
        try await server.etcdctl("del", SubnetKey.key(prefix: "/coreos.com/network", subnet: lease2.subnet))
        try await etcdEventually("node 2 gone after the restart") { observer.subnets == [lease3.subnet.description] }
        XCTAssertEqual(observer.lostCount, 0)
        let stored = try await value(of: lease1.subnet)
        XCTAssertEqual(stored, #"{"PublicIP":"192.168.5.1","PublicIPv6":null}"#)
    }

    /// Our own lease in the tests that then write a peer at a fixed subnet: a random lease can be that very
    /// subnet (1 in 255), and the peer's write would then take our lease away. Free in a fresh registry, so
    /// acquireLease takes it as the previous subnet.
    static let pinnedSubnet = IPv4Network(address: IPv4Address(10, 244, 1, 0), prefixLength: 24)

    func testWatchRelistsAfterCompaction() async throws {
        let config = try await putConfig()
        let registry = try makeRegistry("192.168.6.1")
        _ = try await registry.acquireLease(config: config, previousSubnet: Self.pinnedSubnet)
        try await server.etcdctl("put", "/coreos.com/network/subnets/10.244.90.0-24", #"{"PublicIP":"192.168.6.90"}"#)
        // Take a listing, then change and compact the history after it, so that the watch resuming from the
        // listing's revision is told its start is compacted and has to list again and apply the difference.
        let (leases, _, revision) = try await registry.listLeases()
        XCTAssertEqual(leases.count, 2)
        try await server.etcdctl("put", "/coreos.com/network/subnets/10.244.91.0-24", #"{"PublicIP":"192.168.6.91"}"#)
        try await server.etcdctl("del", "/coreos.com/network/subnets/10.244.90.0-24")
        try await server.etcdctl("put", "/unrelated", "x")
        let status = try await server.etcdctl("endpoint", "status", "--write-out=json")
        let current = try XCTUnwrap(status.range(of: #""revision":"#).map { status[$0.upperBound...].prefix { $0.isNumber } })
        XCTAssertGreaterThan(Int64(current) ?? 0, revision + 2)
        try await server.etcdctl("compaction", String(current))

        let observer = EtcdRunObserver()
        runs.append(Task {
            try await registry.run(snapshot: (leases, revision), onPeers: { observer.peers($0) },
                                   onLeaseLost: { observer.lost() })
        })
        try await etcdEventually("the snapshot's routes") { observer.routes != nil }
        try await etcdEventually("the difference after compaction") { observer.subnets == ["10.244.91.0/24"] }
        XCTAssertEqual(observer.lostCount, 0)
    }

    func testOwnLeaseDeletedIsReported() async throws {
        let config = try await putConfig()
        let (registry, lease, observer) = try await node("192.168.7.1", config: config)
        let run = try XCTUnwrap(runs.last)
        try await server.etcdctl("del", SubnetKey.key(prefix: "/coreos.com/network", subnet: lease.subnet))
        try await etcdEventually("onLeaseLost") { observer.lostCount == 1 }
        // run returns by itself once the lease is lost.
        _ = try await run.value
        XCTAssertEqual(observer.lostCount, 1)
        _ = registry
    }

    func testRunReturnsQuietlyWhenCancelled() async throws {
        let config = try await putConfig()
        let (registry, lease, observer) = try await node("192.168.7.3", config: config)
        let run = try XCTUnwrap(runs.popLast())
        run.cancel()
        try await run.value   // returns, does not throw
        XCTAssertEqual(observer.lostCount, 0)
        // Cancelling is not releasing: the lease stays for the node's next start, as with flannel.
        let stored = try await value(of: lease.subnet)
        XCTAssertEqual(stored, #"{"PublicIP":"192.168.7.3","PublicIPv6":null}"#)
        try await registry.releaseLease()
        let after = try await server.etcdctl("get", "--prefix", "--keys-only", "/coreos.com/network/subnets/")
        XCTAssertEqual(after.trimmingCharacters(in: .whitespacesAndNewlines), "")
        XCTAssertNil(registry.currentLease)
    }

    func testRevokedEtcdLeaseIsReported() async throws {
        let config = try await putConfig()
        let (_, lease, observer) = try await node("192.168.7.2", config: config)
        try await server.etcdctl("lease", "revoke", String(lease.etcdLeaseID, radix: 16))
        try await etcdEventually("onLeaseLost after revoke") { observer.lostCount == 1 }
    }

    func testLeaseIsRenewedBeforeItExpires() async throws {
        let config = try await putConfig()
        // A 4 s lease renewed 3 s before expiry: without renewal the key would be gone after 4 s.
        let registry = try makeRegistry("192.168.8.1") { $0.leaseTTL = .seconds(4); $0.renewMargin = .seconds(3) }
        let lease = try await registry.acquireLease(config: config, previousSubnet: nil)
        let observer = start(registry)
        try await Task.sleep(for: .seconds(6))
        let stored = try await value(of: lease.subnet)
        XCTAssertEqual(stored, #"{"PublicIP":"192.168.8.1","PublicIPv6":null}"#)
        XCTAssertEqual(observer.lostCount, 0)
        XCTAssertGreaterThan(try XCTUnwrap(registry.currentLease).expiration, lease.expiration)
    }

    func testPasswordAuthentication() async throws {
        _ = try await putConfig()
        try await enableAuthentication()

        let anonymous = try makeRegistry("192.168.9.1")
        if let error = try await loadConfigError(anonymous, maxAttempts: 1, "read without credentials") {
            XCTAssertTrue("\(error)".contains("user name is empty") || "\(error)".contains("permission denied"), "\(error)")
        }
        let wrong = try makeRegistry("192.168.9.1") { $0.username = "flannel"; $0.password = "nope" }
        if let error = try await loadConfigError(wrong, maxAttempts: 1, "wrong password accepted") {
            XCTAssertTrue("\(error)".contains("authentication failed"), "\(error)")
        }
        let registry = try makeRegistry("192.168.9.1") { $0.username = "flannel"; $0.password = "secret" }
        let config = try await registry.loadConfig(maxAttempts: 1)
        let lease = try await registry.acquireLease(config: config, previousSubnet: Self.pinnedSubnet)
        let observer = start(registry)
        try await etcdEventually("watch with a token") { observer.routes != nil }
        try await server.etcdctl("--user=root:rootpw", "put", "/coreos.com/network/subnets/10.244.99.0-24",
                                 #"{"PublicIP":"192.168.9.99","PublicIPv6":null}"#)
        try await etcdEventually("peer seen through the authenticated watch") { observer.subnets == ["10.244.99.0/24"] }
        XCTAssertTrue(config.admits(lease.subnet))
    }

    func testExpiredTokensAreReplaced() async throws {
        // Simple tokens that live 1 s, and that all vanish when etcd restarts.
        server.kill()
        server.extraArguments = ["--auth-token-ttl=1"]
        try await server.start()
        _ = try await putConfig()
        try await enableAuthentication()

        let registry = try makeRegistry("192.168.9.2") { $0.username = "flannel"; $0.password = "secret" }
        let config = try await registry.loadConfig(maxAttempts: 1)
        try await Task.sleep(for: .seconds(3))  // the token has expired by now
        let lease = try await registry.acquireLease(config: config, previousSubnet: Self.pinnedSubnet)
        let observer = start(registry)
        try await etcdEventually("first routes") { observer.routes != nil }
        // After a restart every token is unknown: the watch has to authenticate again to resume.
        server.kill()
        try await server.start()
        try await server.etcdctl("--user=root:rootpw", "put", "/coreos.com/network/subnets/10.244.98.0-24",
                                 #"{"PublicIP":"192.168.9.98","PublicIPv6":null}"#)
        try await etcdEventually("peer seen after re-authenticating", timeout: 10) {
            observer.subnets == ["10.244.98.0/24"]
        }
        XCTAssertEqual(observer.lostCount, 0)
        XCTAssertTrue(config.admits(lease.subnet))
    }

    func testTLSWithClientCertificate() async throws {
        server.kill()
        let tls = try await EtcdTestCertificates(directory: server.dataDir)
        server.tls = tls
        try await server.start()
        let expected = try await putConfig()

        // flanneld's three files: the CA to trust, and our certificate and key.
        let registry = try makeRegistry("192.168.11.1") {
            $0.caFile = tls.caCert; $0.certFile = tls.clientCert; $0.keyFile = tls.clientKey
        }
        XCTAssertTrue(server.endpoint.hasPrefix("https://"))
        let config = try await registry.loadConfig(maxAttempts: 1)
        XCTAssertEqual(config, expected)
        _ = try await registry.acquireLease(config: config, previousSubnet: Self.pinnedSubnet)
        let observer = start(registry)
        try await server.etcdctl("put", "/coreos.com/network/subnets/10.244.97.0-24", #"{"PublicIP":"192.168.11.97"}"#)
        try await etcdEventually("peer over TLS") { observer.subnets == ["10.244.97.0/24"] }

        // Without a client certificate the server refuses the handshake.
        let anonymous = try makeRegistry("192.168.11.2") { $0.caFile = tls.caCert }
        if let error = try await loadConfigError(anonymous, maxAttempts: 1,
                                                 "etcd accepted a client without a certificate") {
            guard case .unreachable = error else { return XCTFail("\(error)") }
        }
    }

    func testReservationIsKeptWithoutExpiry() async throws {
        let config = try await putConfig()
        // flannel's reservations: a key without an etcd lease, put by an operator for a node's public IP.
        let key = "/coreos.com/network/subnets/10.244.66.0-24"
        try await server.etcdctl("put", key, #"{"PublicIP":"192.168.12.1","PublicIPv6":null}"#)
        let registry = try makeRegistry("192.168.12.1")
        let lease = try await registry.acquireLease(config: config, previousSubnet: nil)
        XCTAssertEqual(lease.subnet.description, "10.244.66.0/24")
        XCTAssertEqual(lease.etcdLeaseID, 0)
        XCTAssertEqual(lease.expiration, .distantFuture)
        let stored = try await server.etcdctl("get", key, "--write-out=json")
        XCTAssertFalse(stored.contains(#""lease""#), "the reservation got an expiring lease: \(stored)")
        let observer = start(registry)
        try await etcdEventually("routes") { observer.routes != nil }
        try await server.etcdctl("del", key)
        try await etcdEventually("reservation deleted is reported") { observer.lostCount == 1 }
    }
}
