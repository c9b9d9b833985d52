import Foundation
import XCTest
@testable import FlannelCore
@testable import FlannelUDP
#if canImport(Glibc)
import Glibc
#endif

/// The service features in cluster mode, on ClusterTests' topology (etcd on the wire): a node configured with
/// flanneld's FLANNELD_* variables only; and `--metrics-addr`: /metrics scraped with the
/// Prometheus client library's own text parser (Debian's python3-prometheus-client) during traffic and compared
/// with `status --json`; /healthz while the lease is held and after it is deleted from etcd by hand. The endpoint
/// listens on the node namespace's loopback.
extension ClusterTests {
    static let metricsPort: UInt16 = 9100
    /// Debian's python3, for which python3-prometheus-client is installed (a python3 earlier on PATH, e.g. from
    /// pyenv, does not see it).
    static let debianPython = "/usr/bin/python3"

    /// Every sample of /metrics as "name{label=value,...}" -> value, parsed by prometheus_client.
    func scrape(_ node: Node) throws -> [String: Double] {
        let script = """
            import json, sys, urllib.request
            from prometheus_client.parser import text_string_to_metric_families
            text = urllib.request.urlopen(sys.argv[1], timeout=5).read().decode()
            out = {}
            for family in text_string_to_metric_families(text):
                for s in family.samples:
                    out[s.name + "{" + ",".join(k + "=" + v for k, v in sorted(s.labels.items())) + "}"] = s.value
            print(json.dumps(out))
            """
        let out = try node.ns.run([Self.debianPython, "-c", script, "http://127.0.0.1:\(Self.metricsPort)/metrics"])
        return try XCTUnwrap(try JSONSerialization.jsonObject(with: Data(out.utf8)) as? [String: Double], out)
    }

    /// What `status --json` says, in the metrics' names: the expected value of each sample.
    func expectedSamples(_ node: Node) throws -> [String: Double] {
        let d = try daemonJSON(fu(node.ns, ["status", "--json"]))
        let c = try XCTUnwrap(d["counters"] as? [String: Any])
        var e: [String: Double] = [:]
        for (key, direction) in [("tunToUDP", "tunToUDP"), ("udpToTun", "udpToTun")] {
            let counts = try XCTUnwrap(c[key] as? [String: Any])
            e["flannel_udp_packets_total{direction=\(direction)}"] = number(counts["packets"]) ?? 0
            e["flannel_udp_bytes_total{direction=\(direction)}"] = number(counts["bytes"]) ?? 0
        }
        for (reason, n) in try XCTUnwrap(c["drops"] as? [String: Any]) {
            e["flannel_udp_dropped_packets_total{reason=\(reason)}"] = number(n) ?? -1
        }
        e["flannel_udp_icmp_sent_total{}"] = number(c["icmpSent"]) ?? -1
        e["flannel_udp_icmp_rate_limited_total{}"] = number(c["icmpRateLimited"]) ?? -1
        let routes = d["routes"] as? [[String: Any]] ?? []
        e["flannel_udp_peers{}"] = Double(routes.count)
        for r in routes {
            let labels = "endpoint=\(r["endpoint"] ?? ""),origin=\(r["origin"] ?? ""),subnet=\(r["subnet"] ?? "")"
            e["flannel_udp_peer_packets_total{direction=tx,\(labels)}"] = number(r["txPackets"]) ?? -1
            e["flannel_udp_peer_packets_total{direction=rx,\(labels)}"] = number(r["rxPackets"]) ?? -1
            e["flannel_udp_peer_bytes_total{direction=tx,\(labels)}"] = number(r["txBytes"]) ?? -1
            e["flannel_udp_peer_bytes_total{direction=rx,\(labels)}"] = number(r["rxBytes"]) ?? -1
        }
        for name in d["offloads"] as? [String] ?? [] { e["flannel_udp_offload_enabled{offload=\(name)}"] = 1 }
        if let o = d["offloadStatistics"] as? [String: Any] {
            e["flannel_udp_offload_super_packets_segmented_total{}"] = number(o["superPacketsSegmented"]) ?? -1
            e["flannel_udp_offload_super_packets_coalesced_total{}"] = number(o["superPacketsCoalesced"]) ?? -1
            e["flannel_udp_offload_gro_buffers_total{}"] = number(o["groBuffers"]) ?? -1
            e["flannel_udp_offload_largest_datagram_received_bytes{}"] = number(o["largestDatagramReceived"]) ?? -1
        }
        if let x = d["expressPriority"] as? [String: Any] {  // the express lane and its priority are on by default
            let priority = (x["priority"] as? Int).map { "\($0)" } ?? "?"
            e["flannel_udp_express_realtime{priority=\(priority)}"] = x["realtime"] as? Bool == true ? 1 : 0
            e["flannel_udp_express_raised_total{}"] = number(x["raised"]) ?? -1
            e["flannel_udp_express_flood_lowered_total{}"] = number(x["floodLowered"]) ?? -1
        } else {
            e["expressPriority in status --json"] = 1  // missing: reported as a mismatch
        }
        if let x = d["expressSpin"] as? [String: Any] {  // there whenever the lane is
            e["flannel_udp_express_spins_total{}"] = number(x["spins"]) ?? -1
            e["flannel_udp_express_spin_seconds_total{}"] = (number(x["spunNanoseconds"]) ?? -1e9) / 1e9
            e["flannel_udp_express_spins_cut_total{}"] = number(x["cut"]) ?? -1
            e["flannel_udp_express_spins_held_total{}"] = number(x["held"]) ?? -1
        } else {
            e["expressSpin in status --json"] = 1  // missing: reported as a mismatch
        }
        return e
    }

    func testMetricsMatchStatusAndHealthzFollowsTheLease() throws {
        guard (try? Command.run([Self.debianPython, "-c", "import prometheus_client.parser"]))?.succeeded == true else {
            throw XCTSkip("needs Debian's python3-prometheus-client: apt-get install -y python3-prometheus-client (scripts/test.sh does)")
        }
        let a = try makeNode(1, extra: ["--metrics-addr", "127.0.0.1:\(Self.metricsPort)"])
        let b = try makeNode(2)
        try waitFor("the pods reach each other", timeout: 5) { pings(a, b) }
        XCTAssertEqual(try httpGet(a.ns, "/healthz")?.status, 200)

        // During traffic: every scrape parses, and the counters only grow.
        let flood = try startBackground(["ip", "netns", "exec", a.pod.name, "ping", "-q", "-n", "-i", "0.002",
                                         "-c", "1500", b.podAddress])
        addTeardownBlock { stopBackground(flood) }
        var previous: [String: Double] = [:]
        var scrapes = 0
        while flood.isRunning || scrapes < 3 {
            let samples = try scrape(a)
            XCTAssertEqual(samples["flannel_udp_build_info{version=\(Daemon.version)}"], 1)
            XCTAssertEqual(samples["flannel_udp_healthy{}"], 1)
            for (k, v) in samples where k.contains("_total{") { XCTAssertGreaterThanOrEqual(v, previous[k] ?? 0, k) }
            previous = samples
            scrapes += 1
        }
        flood.waitUntilExit()
        XCTAssertEqual(flood.terminationStatus, 0)
        XCTAssertGreaterThanOrEqual(scrapes, 3)

        // Quiet again: /metrics and status --json agree on every counter (read back to back until no packet
        // slips in between the two reads).
        var mismatch = ""
        var samples: [String: Double] = [:]
        do { try waitFor("/metrics agrees with status --json", timeout: 10) {
            samples = try scrape(a)
            let expected = try expectedSamples(a)
            mismatch = expected.filter { samples[$0.key] != $0.value }
                .map { "\($0.key): metrics \(samples[$0.key].map { "\($0)" } ?? "missing"), status \($0.value)" }
                .sorted().joined(separator: "; ")
            return mismatch.isEmpty
        } } catch { XCTFail("\(error): \(mismatch)") }
        let tx = samples.first { $0.key.hasPrefix("flannel_udp_peer_packets_total{direction=tx") }?.value ?? 0
        XCTAssertGreaterThanOrEqual(tx, 1500, "the flood's echo requests, per peer: \(samples)")
        let status = try daemonJSON(fu(a.ns, ["status", "--json"]))
        let lease = try XCTUnwrap(status["lease"] as? [String: Any])
        let expires = try XCTUnwrap(ISO8601DateFormatter().date(from: try XCTUnwrap(lease["expires"] as? String)))
        let metricExpiry = try XCTUnwrap(try scrape(a)["flannel_udp_lease_expiry_timestamp_seconds{subnet=\(a.subnet)}"])
        XCTAssertEqual(metricExpiry, expires.timeIntervalSince1970, accuracy: 1)

        // The lease deleted by hand: /healthz answers 503 with the reason, then the node shuts down (as flanneld
        // does) and the endpoint, closed last (it lingers until its 503 has been seen once, at most 5 s), stops
        // answering.
        // The delete runs in the background while this thread polls: etcdctl may take longer to return on a
        // loaded machine than the daemon lingers (5 s), and a poll begun only after it would find the endpoint
        // already closed.
        let delete = try startBackground(["ip", "netns", "exec", wire.name, "etcdctl", "--endpoints", etcdURL, "del",
                                          "/coreos.com/network/subnets/\(a.subnet.address)-\(a.subnet.prefixLength)"])
        addTeardownBlock { stopBackground(delete) }
        var unhealthy: (status: Int, body: String)?
        var answers503 = 0
        let deadline = Date().addingTimeInterval(30)
        while Date() < deadline {
            let answer: (status: Int, body: String)?
            do { answer = try httpGet(a.ns, "/healthz") } catch {
                // Once the 503 was seen the daemon is shutting down: a connection it took into its listen backlog
                // but no longer serves times out (seen once in CI, on a loaded machine), which is gone as well.
                if unhealthy != nil { break }
                throw error
            }
            guard let r = answer else { break }  // refused: the daemon is gone
            if r.status != 200 { unhealthy = r; answers503 += 1 }
        }
        delete.waitUntilExit()
        XCTAssertEqual(delete.terminationStatus, 0, "etcdctl del")
        print("/healthz answered 503 \(answers503) time(s) before the endpoint closed")
        XCTAssertEqual(unhealthy?.status, 503, "no 503 before the endpoint closed")
        XCTAssertTrue(unhealthy?.body.contains("lease was removed") == true, unhealthy?.body ?? "")
        try waitFor("the node without a lease stops", timeout: 10) { fu(a.ns, ["status"]).status == 3 }
    }

    func testNodeFromFlanneldEnvironmentFileJoinsTheRegistry() throws {
        // What a flanneld environment file holds (flanneld's own flag names), and nothing on the command line but
        // --detach. --etcd-prefix must be honoured too: the registry lives under another prefix here.
        try etcdctl(["put", "/flannel-env/network/config", #"{"Network":"10.250.0.0/16","Backend":{"Type":"udp"}}"#])
        let ns = try plugNode(prefix: "fu-cln", index: 7)
        try ns.run(["ip", "addr", "add", "192.168.77.77/24", "dev", "eth0"])
        let up = fu(ns, ["up", "--detach"], environment: [
            "FLANNELD_ETCD_ENDPOINTS": etcdURL, "FLANNELD_ETCD_PREFIX": "/flannel-env/network",
            "FLANNELD_IFACE": "eth0", "FLANNELD_PUBLIC_IP": "192.168.77.77", "FLANNELD_IP_MASQ": "true",
            "FLANNELD_SUBNET_FILE": "\(tmp)/flanneld-env.env",
        ])
        XCTAssertEqual(up.status, 0, up.description)
        let file = try SubnetFile.load(path: "\(tmp)/flanneld-env.env")
        XCTAssertTrue(try IPv4Network(parsing: "10.250.0.0/16").contains(IPv4Network(address: file.subnet.address, prefixLength: file.subnet.prefixLength)))
        XCTAssertTrue(try String(contentsOfFile: "\(tmp)/flanneld-env.env", encoding: .utf8).contains("FLANNEL_IPMASQ=true"))
        let key = "/flannel-env/network/subnets/\(file.subnet.address)-\(file.subnet.prefixLength)"
        XCTAssertEqual(try etcdctl(["get", key, "--print-value-only"]).trimmingCharacters(in: .whitespacesAndNewlines),
                       #"{"PublicIP":"192.168.77.77","PublicIPv6":null}"#)
    }

    /// A JSON number as JSONSerialization hands it out (an Int, a Double or an NSNumber).
    func number(_ value: Any?) -> Double? {
        switch value {
        case let v as Int: return Double(v)
        case let v as Double: return v
        case let v as NSNumber: return v.doubleValue
        default: return nil
        }
    }

    /// One HTTP/1.0 GET to the node's metrics endpoint over its namespace's loopback; nil when refused.
    func httpGet(_ ns: TestNamespace, _ path: String) throws -> (status: Int, body: String)? {
        let fd = try ns.withEntered { socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
        guard fd >= 0 else { throw NamespaceError("socket", errno) }
        defer { close(fd) }
        var timeout = timeval(tv_sec: 2, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = Self.metricsPort.bigEndian
        addr.sin_addr.s_addr = UInt32(0x7F00_0001).bigEndian
        let rc = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        if rc != 0 {
            // Refused, or reset while the closing endpoint still held this connection in its backlog: gone.
            if errno == ECONNREFUSED || errno == ECONNRESET { return nil }
            throw NamespaceError("connect 127.0.0.1:\(Self.metricsPort)", errno)
        }
        let request = Array("GET \(path) HTTP/1.0\r\nHost: localhost\r\n\r\n".utf8)
        guard send(fd, request, request.count, Int32(MSG_NOSIGNAL)) == request.count else {
            if errno == ECONNRESET || errno == EPIPE { return nil }
            throw NamespaceError("send to 127.0.0.1:\(Self.metricsPort)", errno)
        }
        var response: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = recv(fd, &chunk, chunk.count, 0)
            if n < 0 && errno == EINTR { continue }
            if n < 0 && errno == ECONNRESET { return nil }
            guard n >= 0 else { throw NamespaceError("recv from 127.0.0.1:\(Self.metricsPort)", errno) }
            if n == 0 { break }
            response += chunk[0..<n]
        }
        let text = String(decoding: response, as: UTF8.self)
        guard let line = text.split(separator: "\r\n").first, line.split(separator: " ").count >= 2,
              let status = Int(line.split(separator: " ")[1]) else { return nil }  // closed mid-response
        let body = text.components(separatedBy: "\r\n\r\n").dropFirst().joined(separator: "\r\n\r\n")
        return (status, body)
    }
}
