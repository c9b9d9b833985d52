import Foundation
import XCTest
@testable import FlannelCore
@testable import FlannelUDP

/// `up --ip-masq` end to end, once per backend: what pods' traffic looks like on the far side, the forward rules
/// under a DROP policy, the resync, and `down` leaving no rule behind.
///
///                              wire (bridge br0)
///          +-------------------------+-------------------------+
///     eth0 192.168.77.1        eth0 192.168.77.2          eth0 192.168.77.99
///       node A (--ip-masq,       node B                     outside: a UDP listener,
///        forwarding DROP)                                    not in the overlay
///     flannel0 10.244.1.0      flannel0 10.244.2.0
///     cni0 10.244.1.1          cni0 10.244.2.1
///       pod A 10.244.1.2         pod B 10.244.2.2
///
/// Every rule lives in node A's namespace; the listener reports the source address of each datagram it gets.
final class MasqueradeTests: WireTestCase {
    override class var prefix: String { "fu-mq" }

    override func setUpWithError() throws {
        try requireTools(["nft", "iptables", "iptables-save"], packages: "nftables iptables")
        try super.setUpWithError()
    }

    func testNFTablesMasqueradeForwardResyncAndDown() throws {
        try masqueradeEndToEnd(backend: "nftables")
    }

    func testIPTablesMasqueradeForwardResyncAndDown() throws {
        try masqueradeEndToEnd(backend: "iptables")
    }

    private func masqueradeEndToEnd(backend: String) throws {
        let a = try makeNode(1, start: false)
        let b = try makeNode(2, start: false)
        let outside = try TestNamespace(prefix: "fu-mqo")
        addTeardownBlock { outside.destroy() }
        try wire.plug(outside, address: "192.168.77.99/24")

        // Node A forwards nothing by default. In iptables that is the FORWARD policy; nftables has no policy that
        // another table's accept could override (a drop in any base chain is final), so there the DROP policy sits
        // on the chain our accept rules go into, as a node whose forward chain defaults to drop would have it.
        switch backend {
        case "iptables":
            try a.ns.run(["iptables", "-P", "FORWARD", "DROP"])
        default:
            try a.ns.run(["nft", "add table ip flannel-ipv4; add chain ip flannel-ipv4 forward { type filter hook forward priority filter; policy drop; }"])
        }
        XCTAssertFalse(probe(from: a.pod, to: outside, address: "192.168.77.99", expect: nil, timeout: 0.5),
                       "node A forwarded a packet before any rule of ours accepted it: the DROP policy is not in force")

        let log = "\(tmp)/a.log"
        start(a, ["--ip-masq", "--masq-backend", backend, "--masq-resync", "1", "--log-file", log])
        start(b, [])
        XCTAssertEqual(fu(a, ["route", "add", b.subnet, "via", b.underlay]).status, 0)
        XCTAssertEqual(fu(b, ["route", "add", a.subnet, "via", a.underlay]).status, 0)
        XCTAssertTrue(try String(contentsOfFile: "\(tmp)/subnet-1.env", encoding: .utf8).contains("FLANNEL_IPMASQ=true"))

        // Out of the network: masqueraded to node A's underlay address.
        XCTAssertTrue(probe(from: a.pod, to: outside, address: "192.168.77.99", expect: a.underlay),
                      "pod A -> outside did not arrive from \(a.underlay)")
        // Inside the network, both ways through A's forward rules: the pods' own addresses.
        XCTAssertTrue(probe(from: a.pod, to: b.pod, address: b.podAddress, expect: a.podAddress))
        XCTAssertTrue(probe(from: b.pod, to: a.pod, address: a.podAddress, expect: b.podAddress))

        let daemon = try daemonJSON(fu(a, ["status", "--json"]))
        let masq = try XCTUnwrap(daemon["masquerade"] as? [String: Any], "status --json has no masquerade")
        XCTAssertEqual(masq["backend"] as? String, backend)
        XCTAssertEqual(masq["inPlace"] as? Bool, true)
        XCTAssertEqual(masq["restored"] as? Int, 0, "a restore without anyone touching the rules: \(masq)")
        let table = fu(a, ["status"])
        XCTAssertTrue(table.stdout.contains("masquerade: \(backend) "), table.stdout)
        XCTAssertNil(try daemonJSON(fu(b, ["status", "--json"]))["masquerade"], "node B has no --ip-masq")

        // up --replace: the rules stay, and the new daemon keeps them in place (below) and removes them on down.
        let old = try daemonJSON(fu(a, ["status", "--json"]))["pid"] as? Int
        start(a, ["--ip-masq", "--masq-backend", backend, "--masq-resync", "1", "--log-file", log, "--replace"])
        XCTAssertNotEqual(try daemonJSON(fu(a, ["status", "--json"]))["pid"] as? Int, old)
        XCTAssertTrue(probe(from: a.pod, to: outside, address: "192.168.77.99", expect: a.underlay),
                      "pod A -> outside after the replacement")

        // Someone deletes our rules: back within the resync period (1 s; 5 s allowed for a loaded machine), logged.
        switch backend {
        case "iptables":
            // The jump, the chain's rules and the chain in one transaction: three separate commands race the 1 s
            // resync (a jump put back between -D and -X makes -X fail with "chain in use").
            try a.ns.run(["sh", "-c", "printf '%s\\n' '*nat' '-D POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG' '-F FLANNEL-POSTRTG' '-X FLANNEL-POSTRTG' COMMIT | iptables-restore --noflush"])
        default:
            try a.ns.run(["nft", "delete", "table", "ip", "flannel-ipv4"])
        }
        try waitFor("masquerading is back and logged", timeout: 5) {
            probe(from: a.pod, to: outside, address: "192.168.77.99", expect: a.underlay, timeout: 0.2)
                && ((try? String(contentsOfFile: log, encoding: .utf8)) ?? "").contains("were missing or changed; restored")
        }
        let after = try XCTUnwrap(try daemonJSON(fu(a, ["status", "--json"]))["masquerade"] as? [String: Any])
        XCTAssertGreaterThanOrEqual(after["restored"] as? Int ?? 0, 1, "\(after)")
        XCTAssertTrue(probe(from: b.pod, to: a.pod, address: a.podAddress, expect: b.podAddress),
                      "the forward rules did not come back with the masquerade rules")

        // down: nothing of ours in either view of the rules.
        let down = fu(a, ["down"])
        XCTAssertEqual(down.status, 0, down.description)
        let nft = try a.ns.run(["nft", "-j", "list", "ruleset"])
        XCTAssertFalse(nft.contains("flannel"), nft)
        let save = try a.ns.run(["iptables-save"])
        XCTAssertFalse(save.contains("FLANNEL") || save.contains("flanneld"), save)
        if backend == "iptables" { XCTAssertTrue(save.contains(":FORWARD DROP"), "down must not touch the policy: \(save)") }
    }

    /// up fails after the rules went in: the subnet file already there is too big to be flannel's (over
    /// AtomicFile.readLimit, EFBIG), which only the step that writes it finds out, after the rules. The rules go
    /// with everything else, and the file is left as it was.
    func testFailedUpRemovesTheRulesItInstalled() throws {
        let a = try makeNode(1, start: false)
        let subnetFile = tmp + "/subnet.env"
        let oversized = String(repeating: "# not flannel's\n", count: 5000)  // 80 KB
        try oversized.write(toFile: subnetFile, atomically: false, encoding: .utf8)
        for backend in ["nftables", "iptables"] {
            let up = fu(a, ["up", "--network", "10.244.0.0/16", "--subnet", a.subnet, "--iface", "eth0", "--ip-masq",
                            "--masq-backend", backend, "--subnet-file", subnetFile])
            XCTAssertNotEqual(up.status, 0, up.description)
            XCTAssertTrue(up.stderr.contains("read \(subnetFile): File too large"), up.stderr)
            XCTAssertEqual(try String(contentsOfFile: subnetFile, encoding: .utf8), oversized)
            // In the foreground the log is on stderr: the rules did go in before the failure, and came out.
            XCTAssertTrue(up.stderr.contains("[#] install masquerade rules"), up.stderr)
            XCTAssertTrue(up.stderr.contains("[#] remove masquerade rules"), up.stderr)
            XCTAssertFalse(try a.ns.run(["nft", "-s", "list", "ruleset"]).contains("flannel"), "\(backend) rules left by a failed up")
            XCTAssertFalse(try a.ns.run(["iptables-save"]).contains("FLANNEL"), "\(backend) rules left by a failed up")
            XCTAssertFalse(try a.ns.run(["ip", "-o", "link", "show"]).contains("flannel0"))
        }
    }

    /// The install batch cannot go in (a chain of ours exists with another hook): up fails naming nft's error,
    /// and the batch changed nothing, not even the chains it would have flushed.
    func testRulesThatCannotBeInstalledStopUpAndChangeNothing() throws {
        let a = try makeNode(1, start: false)
        try a.ns.run(["nft", "add table ip flannel-ipv4; add chain ip flannel-ipv4 postrtg { type filter hook input priority 0; }; add rule ip flannel-ipv4 postrtg accept"])
        let before = try a.ns.run(["nft", "-s", "list", "ruleset"])
        let up = fu(a, ["up", "--network", "10.244.0.0/16", "--subnet", a.subnet, "--iface", "eth0", "--ip-masq",
                        "--subnet-file", tmp + "/subnet.env", "--detach"])
        XCTAssertNotEqual(up.status, 0, up.description)
        XCTAssertTrue(up.stderr.contains("nftables: install table ip flannel-ipv4: Error: Could not process rule"), up.stderr)
        XCTAssertEqual(try a.ns.run(["nft", "-s", "list", "ruleset"]), before)
        XCTAssertFalse(try a.ns.run(["ip", "-o", "link", "show"]).contains("flannel0"))
        XCTAssertFalse(FileManager.default.fileExists(atPath: tmp + "/subnet.env"))
    }

    // MARK: - helpers

    private func start(_ node: OverlayNode, _ extra: [String]) {
        let up = self.up(node, extra)
        XCTAssertEqual(up.status, 0, up.description)
    }

    /// Sends one UDP datagram from a fresh socket in `source` (a new port, so a new conntrack entry and a fresh
    /// NAT decision) to `address`:9999, where a socket opened in `destination` listens, and reports whether it
    /// arrived from `expect` (nil: whether it arrived at all) within `timeout`.
    private func probe(from source: TestNamespace, to destination: TestNamespace, address: String,
                       expect: String?, timeout: TimeInterval = 2) -> Bool {
        guard let listener = try? destination.withEntered({ try UDPProbeSocket(bind: address, port: 9999) }) else {
            XCTFail("cannot listen on \(address):9999 in \(destination.name)")
            return false
        }
        let token = Array("probe-\(UInt64.random(in: 0...UInt64.max))".utf8)
        do {
            try source.withEntered {
                let sender = try UDPProbeSocket(bind: nil, port: 0)
                try sender.send(token, to: address, port: 9999)
            }
        } catch {
            XCTFail("send from \(source.name): \(error)")
            return false
        }
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            guard let (from, payload) = listener.receive(timeout: deadline.timeIntervalSinceNow) else { return false }
            if payload == token { return expect == nil || from == expect }
        }
        return false
    }
}

/// A plain UDP socket for the probes, closed on deinit. It stays in the namespace of the thread that made it.
final class UDPProbeSocket {
    let fd: Int32

    init(bind address: String?, port: UInt16) throws {
        fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
        guard fd >= 0 else { throw SystemError.current("socket", "udp") }
        guard let address else { return }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var sa = Self.makeAddress(address, port)
        let rc = withUnsafePointer(to: &sa) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard rc == 0 else {
            let error = SystemError.current("bind", "\(address):\(port)")
            close(fd)
            throw error
        }
    }

    deinit { close(fd) }

    static func makeAddress(_ address: String, _ port: UInt16) -> sockaddr_in {
        var sa = sockaddr_in()
        sa.sin_family = sa_family_t(AF_INET)
        sa.sin_port = port.bigEndian
        sa.sin_addr = in_addr(s_addr: IPv4Address(address)?.networkOrder ?? 0)
        return sa
    }

    func send(_ payload: [UInt8], to address: String, port: UInt16) throws {
        var sa = Self.makeAddress(address, port)
        let n = payload.withUnsafeBytes { buf in
            withUnsafePointer(to: &sa) {
                $0.withMemoryRebound(to: Glibc.sockaddr.self, capacity: 1) {
                    sendto(fd, buf.baseAddress, buf.count, 0, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
                }
            }
        }
        guard n == payload.count else { throw SystemError.current("sendto", "\(address):\(port)") }
    }

    /// The next datagram's source address and payload, or nil when none comes within `timeout`.
    func receive(timeout: TimeInterval) -> (String, [UInt8])? {
        guard timeout > 0 else { return nil }
        var tv = timeval(tv_sec: Int(timeout), tv_usec: Int((timeout - Double(Int(timeout))) * 1_000_000))
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        var buffer = [UInt8](repeating: 0, count: 2048)
        var from = sockaddr_in()
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let n = buffer.withUnsafeMutableBytes { buf in
            withUnsafeMutablePointer(to: &from) {
                $0.withMemoryRebound(to: Glibc.sockaddr.self, capacity: 1) { recvfrom(fd, buf.baseAddress, buf.count, 0, $0, &length) }
            }
        }
        guard n >= 0 else { return nil }
        let source = IPv4Address(UInt32(bigEndian: from.sin_addr.s_addr))
        return ("\(source)", Array(buffer[..<n]))
    }
}
