import Foundation
import XCTest
@testable import FlannelCore
@testable import FlannelUDP
#if canImport(Glibc)
import Glibc
#endif

/// The service layer's pure parts: options from the environment, the sd_notify wire format, the watchdog
/// settings, --metrics-addr and the Prometheus text. No privileges needed.
final class ServiceUnitTests: XCTestCase {
    let options = [
        EnvironmentOptions.Option(long: "etcd-endpoints", isFlag: false),
        EnvironmentOptions.Option(long: "port", isFlag: false),
        EnvironmentOptions.Option(long: "ip-masq", isFlag: true),
        EnvironmentOptions.Option(long: "verbose", shorts: ["v"], isFlag: true),
        EnvironmentOptions.Option(long: "mtu", isFlag: false),
    ]

    func testEnvironmentNamesPrecedenceAndFlags() throws {
        let env = ["FLANNEL_UDP_ETCD_ENDPOINTS": "http://a:2379", "FLANNELD_ETCD_ENDPOINTS": "http://b:2379",
                   "FLANNELD_IP_MASQ": "true", "FLANNEL_UDP_PORT": "9000", "FLANNEL_UDP_VERBOSE": "1",
                   "FLANNEL_UDP_MTU": "", "FLANNELD_PORT": "1"]
        let r = try EnvironmentOptions.arguments(options: options, environment: env, commandLine: [])
        // FLANNEL_UDP_* beats FLANNELD_*; FLANNELD_PORT is not one of flanneld's options; empty is unset.
        XCTAssertEqual(r.arguments, ["--etcd-endpoints=http://a:2379", "--port=9000", "--ip-masq", "--verbose"])
        XCTAssertEqual(r.settings.map(\.variable),
                       ["FLANNEL_UDP_ETCD_ENDPOINTS", "FLANNEL_UDP_PORT", "FLANNELD_IP_MASQ", "FLANNEL_UDP_VERBOSE"])
    }

    func testFlanneldsOwnNameForAnOptionWeNameDifferently() throws {
        let resync = [EnvironmentOptions.Option(long: "masq-resync", isFlag: false)]
        let flanneld = try EnvironmentOptions.arguments(options: resync, environment: ["FLANNELD_IPTABLES_RESYNC": "7",
                                                                                      "FLANNELD_MASQ_RESYNC": "8"],
                                                        commandLine: [])
        // flanneld has no --masq-resync, so FLANNELD_MASQ_RESYNC means nothing.
        XCTAssertEqual(flanneld.arguments, ["--masq-resync=7"])
        XCTAssertEqual(flanneld.settings.map(\.variable), ["FLANNELD_IPTABLES_RESYNC"])
        let ours = try EnvironmentOptions.arguments(options: resync, environment: ["FLANNELD_IPTABLES_RESYNC": "7",
                                                                                  "FLANNEL_UDP_MASQ_RESYNC": "9"],
                                                    commandLine: [])
        XCTAssertEqual(ours.arguments, ["--masq-resync=9"])
    }

    func testCommandLineWins() throws {
        let env = ["FLANNEL_UDP_PORT": "9000", "FLANNEL_UDP_VERBOSE": "true", "FLANNEL_UDP_IP_MASQ": "0",
                   "FLANNEL_UDP_ETCD_ENDPOINTS": "-leading-dash"]
        let r = try EnvironmentOptions.arguments(options: options, environment: env, commandLine: ["--port=1", "-v"])
        XCTAssertEqual(r.arguments, ["--etcd-endpoints=-leading-dash"])  // false flag adds nothing
        let after = try EnvironmentOptions.arguments(options: options, environment: env, commandLine: ["--", "--port"])
        XCTAssertTrue(after.arguments.contains("--port=9000"), "names after -- are not options")
    }

    func testBadBooleanNamesTheVariable() {
        XCTAssertThrowsError(try EnvironmentOptions.arguments(options: options, environment: ["FLANNELD_IP_MASQ": "yes please"], commandLine: [])) {
            XCTAssertEqual("\($0)", "FLANNELD_IP_MASQ=yes please: not a boolean for --ip-masq (use true, false, 1 or 0)")
        }
        let secret = EnvironmentOptions.Setting(variable: "FLANNEL_UDP_ETCD_PASSWORD", value: "hunter2", option: "etcd-password")
        XCTAssertFalse(secret.shown.contains("hunter2"))
    }

    func testNotifierSendsToPathSocket() throws {
        let path = NSTemporaryDirectory() + "fu-notify-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue), 0)
        XCTAssertGreaterThanOrEqual(fd, 0)
        defer { close(fd); unlink(path) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in for (i, b) in path.utf8.enumerated() { raw[i] = b } }
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        XCTAssertEqual(rc, 0, String(cString: strerror(errno)))

        let notifier = try XCTUnwrap(try SystemdNotifier.fromEnvironment(["NOTIFY_SOCKET": path]))
        try notifier.send(["READY=1", SystemdNotifier.status("a\nb")])
        var buffer = [UInt8](repeating: 0, count: 512)
        let n = recv(fd, &buffer, buffer.count, 0)  // already queued: send() returned
        XCTAssertGreaterThan(n, 0)
        XCTAssertEqual(String(decoding: buffer[0..<max(n, 0)], as: UTF8.self), "READY=1\nSTATUS=a b")
        XCTAssertTrue(SystemdNotifier.monotonicNow().hasPrefix("MONOTONIC_USEC="))
    }

    func testNotifierEnvironment() throws {
        XCTAssertNil(try SystemdNotifier.fromEnvironment([:]))
        XCTAssertNil(try SystemdNotifier.fromEnvironment(["NOTIFY_SOCKET": ""]))
        XCTAssertThrowsError(try SystemdNotifier(socketPath: "relative/path")) {
            XCTAssertTrue("\($0)".hasPrefix("NOTIFY_SOCKET=relative/path: "), "\($0)")
        }
        XCTAssertThrowsError(try SystemdNotifier(socketPath: "@"))
        XCTAssertThrowsError(try SystemdNotifier(socketPath: "/" + String(repeating: "x", count: 200)))
        XCTAssertNoThrow(try SystemdNotifier(socketPath: "@fu-abstract"))
        // A receiver that is not there: the send fails with the path and the errno, nothing crashes.
        let gone = try SystemdNotifier(socketPath: "/nonexistent-\(getpid())/notify")
        XCTAssertThrowsError(try gone.send(["READY=1"])) {
            XCTAssertTrue("\($0)".contains("send sd_notify message to /nonexistent-"), "\($0)")
        }
    }

    func testWatchdogSettings() throws {
        XCTAssertNil(try WatchdogSettings.fromEnvironment([:]))
        let w = try XCTUnwrap(try WatchdogSettings.fromEnvironment(["WATCHDOG_USEC": "2000000"], pid: 42))
        XCTAssertEqual(w.pingIntervalSeconds, 1)
        XCTAssertEqual(w.heartbeatMilliseconds, 250)
        XCTAssertEqual(try WatchdogSettings.fromEnvironment(["WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"], pid: 42)?.heartbeatMilliseconds, 1000)
        XCTAssertNil(try WatchdogSettings.fromEnvironment(["WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "43"], pid: 42))
        XCTAssertThrowsError(try WatchdogSettings.fromEnvironment(["WATCHDOG_USEC": "soon"])) {
            XCTAssertEqual("\($0)", "WATCHDOG_USEC=soon: not a positive integer")
        }
    }

    func testMetricsAddress() throws {
        XCTAssertEqual(try MetricsAddress(parsing: "127.0.0.1:9100"), try MetricsAddress(parsing: "localhost:9100"))
        XCTAssertEqual(try MetricsAddress(parsing: "0.0.0.0:1").port, 1)
        for bad in ["9100", "127.0.0.1:0", "127.0.0.1:70000", "127.0.0.1:", "nohost:80", "10.0.0.256:80", ":80"] {
            XCTAssertThrowsError(try MetricsAddress(parsing: bad), bad) {
                XCTAssertTrue("\($0)".hasPrefix("--metrics-addr \(bad): "), "\($0)")
            }
        }
    }

    func testPrometheusTextFromStatus() {
        var drops: [String: UInt64] = [:]
        for r in DropReason.allCases { drops[r.rawValue] = 0 }
        drops["noRoute"] = 3
        var status = DaemonStatus(
            pid: 1, version: "0.1.0", startedAt: Date(timeIntervalSince1970: 1000), uptimeSeconds: 1, device: "flannel0",
            network: "10.244.0.0/16", subnet: "10.244.1.0/24", mtu: 1472, listen: "192.168.1.1:8285",
            publicIP: "192.168.1.1", underlay: "eth0", subnetFile: nil, peersFile: nil, peerCheck: "strict",
            routes: [RouteInfo(subnet: "10.244.2.0/24", endpoint: "192.168.1.2:8285", origin: "manual", txPackets: 5,
                               txBytes: 500, rxPackets: 6, rxBytes: 600)],
            counters: DataPlaneCountersSnapshot(tunToUDP: DirectionCounts(packets: 7, bytes: 700),
                                                udpToTun: DirectionCounts(packets: 8, bytes: 800), icmpSent: 2,
                                                icmpRateLimited: 0, drops: drops),
            offloads: ["batching"], lease: LeaseInfo(subnet: "10.244.1.0/24", expires: Date(timeIntervalSince1970: 2000), endpoints: []))
        status.offloadStatistics = nil
        status.expressSpin = ExpressSpinCounts(microseconds: 50, budgetPerMille: 20, spins: 9, spunNanoseconds: 1_500_000,
                                               cut: 4, held: 6)
        let text = PrometheusText.render(status: status, health: DaemonHealth(healthy: true, reason: "ok"), version: "0.1.0")
        for line in [
            "# TYPE flannel_udp_packets_total counter",
            #"flannel_udp_packets_total{direction="tunToUDP"} 7"#,
            #"flannel_udp_bytes_total{direction="udpToTun"} 800"#,
            #"flannel_udp_dropped_packets_total{reason="noRoute"} 3"#,
            #"flannel_udp_peer_packets_total{direction="rx",endpoint="192.168.1.2:8285",origin="manual",subnet="10.244.2.0/24"} 6"#,
            "flannel_udp_icmp_sent_total 2",
            #"flannel_udp_lease_expiry_timestamp_seconds{subnet="10.244.1.0/24"} 2000.0"#,
            #"flannel_udp_build_info{version="0.1.0"} 1"#,
            "flannel_udp_healthy 1",
            "# TYPE flannel_udp_express_spin_seconds_total counter",
            "flannel_udp_express_spins_total 9",
            "flannel_udp_express_spin_seconds_total 0.0015",
            "flannel_udp_express_spins_cut_total 4",
            "flannel_udp_express_spins_held_total 6",
        ] {
            XCTAssertTrue(text.contains(line + "\n"), "missing \(line) in\n\(text)")
        }
        let bare = PrometheusText.render(status: nil, health: DaemonHealth(healthy: false, reason: "x"), version: "1")
        XCTAssertTrue(bare.contains("flannel_udp_healthy 0\n"))
        XCTAssertFalse(bare.contains("packets_total"))
    }
}
