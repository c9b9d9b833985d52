import XCTest
import Foundation
import Logging
@testable import FlannelCore
@testable import FlannelUDP
import TestSupport
#if canImport(Glibc)
import Glibc
#endif

/// TCP through two forwarders with the kernel offloads, in namespaces of our own (fu-dp-<pid>-N):
///
///     pod1 (10.244.1.2) --veth mtu 1472-- node1 [flannel0 (vnet hdr?) 10.244.1.0/32, Forwarder 192.168.77.1:8285]
///                                           || veth underlay 192.168.77.0/24, mtu 1500
///     pod2 (10.244.2.2) --veth mtu 1472-- node2 [flannel0 (vnet hdr?) 10.244.2.0/32, Forwarder 192.168.77.2:8285]
///
/// Each scenario opens fresh tun devices and sockets: offloads on at both ends, and on at one end with the other
/// forced to the plain path (a stock flannel node), with iperf3 in both directions. The wire contract is checked
/// on the receiving sockets: no datagram (each datagram of a GRO buffer counted on its own) exceeds the tun MTU.
final class OffloadNamespaceTests: XCTestCase {
    struct Node: Sendable {
        let tun: TunDevice
        let socket: UDPSocket
    }

    func testTCPWithOffloadsOnBothEndsAndAgainstThePlainPath() throws {
        guard getuid() == 0 else { throw XCTSkip("needs root: creates network namespaces (fu-dp-<pid>-N)") }
        guard DPNamespace.tool("ip") != nil, let iperf = DPNamespace.tool("iperf3"),
              let ping = DPNamespace.tool("ping"), access("/dev/net/tun", R_OK | W_OK) == 0 else {
            throw XCTSkip("needs ip (iproute2), iperf3, ping and /dev/net/tun")
        }
        var namespaces: [DPNamespace] = []
        addTeardownBlock { for ns in namespaces.reversed() { ns.delete() } }
        // Numbers 11-14: apart from the other namespace test's, which may run in the same process.
        for n in 11...14 { namespaces.append(try DPNamespace.create(n)) }
        let (node1, node2, pod1, pod2) = (namespaces[0], namespaces[1], namespaces[2], namespaces[3])

        DPNamespace.plumbNodesAndPods(node1, node2, pod1, pod2)

        var logger = Logger(label: "test.offload-namespace")
        logger.logLevel = .warning
        let overlay = net("10.244.0.0/16")

        func open(_ ns: DPNamespace, _ address: String, vnet: Bool) throws -> Node {
            try ns.inside {
                let tun = try TunDevice(name: "flannel0", vnetHeader: vnet)
                let socket = try UDPSocket(bind: Endpoint(address: IPv4Address(address)!, port: 8285))
                return Node(tun: tun, socket: socket)
            }
        }

        /// Runs iperf3 from `client` to `server`'s address (`reverse`: the server sends), 40 MB of TCP, or with
        /// `udp` one second of 1400-byte datagrams at 20 Mbit/s; true when it worked (and, for UDP, when under
        /// 10 % were lost: a datagram with a wrong checksum never reaches iperf3).
        func runIperf(_ client: DPNamespace, _ server: DPNamespace, _ address: String, reverse: Bool,
                      udp: Bool = false) -> Bool {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: DPNamespace.tool("ip")!)
            p.arguments = ["netns", "exec", server.name, iperf, "-s", "-1", "-B", address]
            p.standardOutput = FileHandle.nullDevice
            p.standardError = FileHandle.nullDevice
            guard (try? ProcessLaunch.run(p)) != nil else { XCTFail("cannot start iperf3 -s"); return false }
            defer {
                if p.isRunning { kill(p.processIdentifier, SIGTERM) }
                p.waitUntilExit()
            }
            // The server needs a moment to listen: retry the client until a deadline.
            let deadline = Date().addingTimeInterval(10)
            var last = ""
            while Date() < deadline {
                let load = udp ? ["-u", "-b", "20M", "-l", "1400", "-t", "1", "-J"] : ["-n", "40M"]
                let r = client.exec([iperf, "-c", address, "--connect-timeout", "2000"] + load
                                    + (reverse ? ["-R"] : []))
                if r.status == 0 && !udp { return true }
                // iperf3 -J may exit 0 on a connection error too, saying so in the JSON.
                if r.status == 0 && !r.output.contains("Connection refused") {
                    let json = try? JSONSerialization.jsonObject(with: Data(r.output.utf8)) as? [String: Any]
                    let sum = (json?["end"] as? [String: Any])?["sum"] as? [String: Any]
                    let lost = (sum?["lost_percent"] as? Double) ?? 100
                    let packets = (sum?["packets"] as? Int) ?? 0
                    XCTAssertLessThan(lost, 10, "UDP \(client.name) -> \(address) reverse \(reverse): \(r.output.suffix(1500))")
                    XCTAssertGreaterThan(packets, 1000)
                    return lost < 10
                }
                last = r.output
                if !last.contains("Connection refused") { break }
                usleep(50_000)
            }
            XCTFail("iperf3 \(client.name) -> \(address) reverse \(reverse): \(last)")
            return false
        }

        // (offloads node1, offloads node2, node2's tun has the vnet header): both on; one end plain (a stock
        // flannel node), each way round; node2 forced off on a vnet tun (`--no-offload` on a daemon that always
        // opens the tun with IFF_VNET_HDR).
        for (offload1, offload2, vnet2) in [(true, true, true), (true, false, false), (false, true, true),
                                            (true, false, true)] {
            let what = "offloads node1 \(offload1), node2 \(offload2) (vnet \(vnet2))"
            let n1 = try open(node1, "192.168.77.1", vnet: offload1)
            let n2 = try open(node2, "192.168.77.2", vnet: vnet2)
            for (node, third) in [(node1, 1), (node2, 2)] {
                node.ip("addr", "add", "10.244.\(third).0/32", "dev", "flannel0")
                node.ip("link", "set", "flannel0", "up", "mtu", "1472")
                node.ip("route", "add", "10.244.0.0/16", "dev", "flannel0")
            }
            let c1 = DataPlaneCounters(), c2 = DataPlaneCounters()
            let f1 = try Forwarder(tun: n1.tun, socket: n1.socket,
                                   table: RouteTable([route("10.244.2.0/24", "192.168.77.2:8285")]),
                                   config: ForwardingConfig(network: overlay, subnet: net("10.244.1.0/24")),
                                   counters: c1, logger: logger, options: ForwarderOptions(offloads: offload1))
            let f2 = try Forwarder(tun: n2.tun, socket: n2.socket,
                                   table: RouteTable([route("10.244.1.0/24", "192.168.77.1:8285")]),
                                   config: ForwardingConfig(network: overlay, subnet: net("10.244.2.0/24")),
                                   counters: c2, logger: logger, options: ForwarderOptions(offloads: offload2))
            let all = ["batching", "tso", "gso", "gro", "coalesce"]
            XCTAssertEqual(f1.activeOffloads, offload1 ? all : ["batching"], what)
            XCTAssertEqual(f2.activeOffloads, offload2 ? all : ["batching"], what)
            try f1.start()
            try f2.start()
            defer {
                f1.stop(); f2.stop()
                n1.tun.close(); n1.socket.close()
                n2.tun.close(); n2.socket.close()
            }

            // The first pings wait for neighbour resolution.
            let reached = waitUntil(timeout: 10, interval: 0) {
                pod1.exec([ping, "-n", "-c", "1", "-W", "1", "10.244.2.2"]).status == 0
            }
            XCTAssertTrue(reached, "\(what): pod1 cannot ping pod2")

            XCTAssertTrue(runIperf(pod1, pod2, "10.244.2.2", reverse: false), what)  // pod1 -> pod2
            XCTAssertTrue(runIperf(pod1, pod2, "10.244.2.2", reverse: true), what)   // pod2 -> pod1
            // UDP: the tun hands these out with partial checksums (NEEDS_CSUM), completed before sending.
            XCTAssertTrue(runIperf(pod1, pod2, "10.244.2.2", reverse: false, udp: true), what)
            XCTAssertTrue(runIperf(pod1, pod2, "10.244.2.2", reverse: true, udp: true), what)

            for (f, c, on, label) in [(f1, c1, offload1, "node1"), (f2, c2, offload2, "node2")] {
                let o = f.offloads
                let stats = f.offloadStatistics
                XCTAssertEqual(stats.active, f.activeOffloads)
                XCTAssertEqual(stats.superPacketsSegmented, o.superPacketsSegmented.load(ordering: .relaxed))
                let largest = stats.largestDatagramReceived
                XCTAssertGreaterThan(largest, 1400, "\(what): \(label) saw full-size datagrams")
                XCTAssertLessThanOrEqual(largest, 1472, "\(what): \(label) received a datagram over the tun MTU")
                XCTAssertGreaterThan(c.snapshot().udpToTun.packets, 10_000, "\(what): \(label)")
                XCTAssertEqual(c.drops(.malformed) + c.drops(.oversize), 0, "\(what): \(label)")
                if on {
                    XCTAssertGreaterThan(o.superPacketsSegmented.load(ordering: .relaxed), 100, "\(what): \(label) TSO")
                    XCTAssertGreaterThan(o.superPacketsCoalesced.load(ordering: .relaxed), 100,
                                         "\(what): \(label) coalescing")
                } else {
                    XCTAssertEqual(o.superPacketsSegmented.load(ordering: .relaxed), 0, "\(what): \(label)")
                    XCTAssertEqual(o.groBuffers.load(ordering: .relaxed), 0, "\(what): \(label)")
                }
            }
            XCTAssertNil(f1.failure)
            XCTAssertNil(f2.failure)
        }
    }
}
