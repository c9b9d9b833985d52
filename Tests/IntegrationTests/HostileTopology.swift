import Foundation
import XCTest
@testable import FlannelCore
@testable import FlannelUDP

/// The topology shared by the hostile-traffic and fault tests: nodes with a pod each on one underlay switch, and
/// strangers on the same switch, all in fresh namespaces (names `fu-h*-<pid>-N`), removed on exit.
///
///                          wire (bridge br0)
///          +------------------+------------------+
///     eth0 192.168.77.1   eth0 .2             eth0 .99
///       node 1              node 2            stranger
///     flannel0 10.244.1.0 flannel0 10.244.2.0
///     cni0 10.244.1.1       cni0 10.244.2.1
///       pod 1 10.244.1.2    pod 2 10.244.2.2
///
/// IPv6 is disabled inside the node namespaces so the kernel's router solicitations on a new tun do not show up
/// as `notIPv4` drops in the exact counts the tests assert.
class HostileTopologyTestCase: WireTestCase {
    override class var prefix: String { "fu-h" }
    override var nodesWithoutIPv6: Bool { true }

    typealias Node = OverlayNode

    var environment: [String: String] { ["FLANNEL_UDP_RUN_DIR": tmp + "/run"] }

    /// Two running nodes that know each other.
    func makePair() throws -> (Node, Node) {
        let a = try makeNode(1)
        let b = try makeNode(2)
        XCTAssertEqual(fu(a, ["route", "add", b.subnet, "via", b.underlay]).status, 0)
        XCTAssertEqual(fu(b, ["route", "add", a.subnet, "via", a.underlay]).status, 0)
        return (a, b)
    }

    func daemonStatus(_ node: Node) throws -> [String: Any] {
        try daemonJSON(fu(node, ["status", "--json"]))
    }

    struct Counters {
        var drops: [String: Int]
        var udpToTun: Int
        var tunToUDP: Int
        var icmpSent: Int
        var peers: [String: [String: Any]]
        func drop(_ reason: String) -> Int { drops[reason] ?? 0 }
        func rx(_ subnet: String) -> Int { peers[subnet]?["rxPackets"] as? Int ?? 0 }
    }

    func counters(_ node: Node) throws -> Counters {
        let daemon = try daemonStatus(node)
        let c = try XCTUnwrap(daemon["counters"] as? [String: Any])
        let drops = try XCTUnwrap(c["drops"] as? [String: Int])
        let udpToTun = try XCTUnwrap((c["udpToTun"] as? [String: Any])?["packets"] as? Int)
        let tunToUDP = try XCTUnwrap((c["tunToUDP"] as? [String: Any])?["packets"] as? Int)
        var peers: [String: [String: Any]] = [:]
        for r in (daemon["routes"] as? [[String: Any]]) ?? [] { peers[r["subnet"] as? String ?? ""] = r }
        return Counters(drops: drops, udpToTun: udpToTun, tunToUDP: tunToUDP, icmpSent: c["icmpSent"] as? Int ?? 0,
                        peers: peers)
    }

    /// setpriv's prefix that runs a command as nobody (uid/gid 65534, no supplementary groups).
    static let asNobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

    /// The node's state directory: `<run dir>/ns-<inode of the node's netns>`.
    func stateDirectory(_ node: Node) throws -> String {
        let inode = try node.ns.run(["stat", "-L", "-c", "%i", "/proc/self/ns/net"]).trimmingCharacters(in: .whitespacesAndNewlines)
        return "\(tmp)/run/ns-\(inode)"
    }

    func controlSocket(_ node: Node) throws -> String { try stateDirectory(node) + "/flannel0.sock" }

    /// Simulates a misconfigured node on which other users can reach the control socket: run and state directory
    /// traversable (not writable) by others, socket mode 0666. The daemon's own SO_PEERCRED check must then
    /// refuse them.
    func loosenControlDirectory(_ node: Node) throws {
        let dir = try stateDirectory(node)
        for (path, mode) in [(tmp + "/run", 0o711), (dir, 0o711), (dir + "/flannel0.sock", 0o666)] {
            guard chmod(path, mode_t(mode)) == 0 else { throw SystemError.current("chmod", path) }
        }
    }

    func daemonPID(_ node: Node) throws -> pid_t {
        let pid = try XCTUnwrap(try daemonStatus(node)["pid"] as? Int)
        return pid_t(pid)
    }
}

/// Builds IPv4 packets with correct checksums (unless told otherwise).
enum Forge {
    static func checksum(_ bytes: ArraySlice<UInt8>) -> UInt16 {
        var s: UInt32 = 0
        var i = bytes.startIndex
        while i < bytes.endIndex {
            s += UInt32(bytes[i]) << 8 | UInt32(i + 1 < bytes.endIndex ? bytes[i + 1] : 0)
            i += 2
        }
        while s > 0xffff { s = (s & 0xffff) + (s >> 16) }
        return ~UInt16(s)
    }

    static func ipv4(source: IPv4Address, destination: IPv4Address, proto: UInt8, payload: [UInt8], ttl: UInt8 = 64,
                     flagsFragment: UInt16 = 0) -> [UInt8] {
        let total = 20 + payload.count
        var p: [UInt8] = [0x45, 0, UInt8(total >> 8), UInt8(total & 0xff), 0x12, 0x34,
                          UInt8(flagsFragment >> 8), UInt8(flagsFragment & 0xff), ttl, proto, 0, 0]
        for a in [source, destination] {
            let o = a.octets
            p += [o.0, o.1, o.2, o.3]
        }
        let h = checksum(p[0..<20])
        p[10] = UInt8(h >> 8); p[11] = UInt8(h & 0xff)
        return p + payload
    }

    static func icmp(type: UInt8, code: UInt8, rest: [UInt8] = [0, 0, 0, 0], data: [UInt8] = []) -> [UInt8] {
        var m = [type, code, 0, 0] + rest + data
        let c = checksum(m[0...])
        m[2] = UInt8(c >> 8); m[3] = UInt8(c & 0xff)
        return m
    }

    static func echo(source: IPv4Address, destination: IPv4Address, ttl: UInt8 = 64) -> [UInt8] {
        ipv4(source: source, destination: destination, proto: 1,
             payload: icmp(type: 8, code: 0, rest: [0xab, 0xcd, 0, 1], data: Array(repeating: 0x61, count: 16)),
             ttl: ttl)
    }

    /// What the daemon must count for a datagram from a sender that is no peer: the validator's verdict first
    /// (IPv4Packet.parse), then `outsideNetwork` for an inner destination outside 10.244.0.0/16, and every other
    /// valid packet as `unknownPeer`.
    static func strangerDropReason(_ d: [UInt8]) -> String {
        guard let first = d.first else { return "malformed" }
        guard first >> 4 == 4 else { return "notIPv4" }
        let hl = Int(first & 0x0f) * 4
        guard hl >= 20, d.count >= hl else { return "malformed" }
        let total = Int(d[2]) << 8 | Int(d[3])
        guard total >= hl, total <= d.count else { return "malformed" }
        guard d[16] == 10 && d[17] == 244 else { return "outsideNetwork" }
        return "unknownPeer"
    }
}
