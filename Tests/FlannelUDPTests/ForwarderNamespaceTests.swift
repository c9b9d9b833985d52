import XCTest
import Foundation
import Atomics
import Logging
import CShims
@testable import FlannelCore
@testable import FlannelUDP
import TestSupport
#if canImport(Glibc)
import Glibc
#endif

/// A network namespace owned by one test, named fu-dp-<pid>-<n>, for the data plane's root-only tests.
/// Everything is done with `ip -n NAME ...` or from a thread moved into the namespace; nothing here touches the
/// root namespace's devices, addresses, routes or sysctls.
struct DPNamespace: Sendable {
    let name: String

    static func tool(_ name: String) -> String? {
        for dir in ["/usr/sbin", "/sbin", "/usr/bin", "/bin"] where access("\(dir)/\(name)", X_OK) == 0 {
            return "\(dir)/\(name)"
        }
        return nil
    }

    /// Runs a command, returning its exit status and combined output.
    @discardableResult
    static func run(_ argv: [String]) -> (status: Int32, output: String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: argv[0])
        p.arguments = Array(argv.dropFirst())
        let pipe: Pipe
        do { pipe = try ProcessLaunch.runReadingOutput(p, errorsToo: true) } catch { return (-1, "\(argv[0]): \(error)") }
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: data, as: UTF8.self))
    }

    static func create(_ n: Int) throws -> DPNamespace {
        let ns = DPNamespace(name: "fu-dp-\(getpid())-\(n)")
        let r = run([tool("ip")!, "netns", "add", ns.name])
        guard r.status == 0 else { throw XCTSkip("cannot create network namespace \(ns.name): \(r.output)") }
        return ns
    }

    func delete() { DPNamespace.run([DPNamespace.tool("ip")!, "netns", "del", name]) }

    /// `ip -n NAME args...`, failing the test with the command's output if it fails.
    func ip(_ args: String..., file: StaticString = #filePath, line: UInt = #line) {
        let r = DPNamespace.run([DPNamespace.tool("ip")!, "-n", name] + args)
        XCTAssertEqual(r.status, 0, "ip -n \(name) \(args.joined(separator: " ")): \(r.output)", file: file, line: line)
    }

    /// `ip netns exec NAME argv...`.
    func exec(_ argv: [String]) -> (status: Int32, output: String) {
        DPNamespace.run([DPNamespace.tool("ip")!, "netns", "exec", name] + argv)
    }

    /// Two nodes joined by a veth underlay `under0` (192.168.77.1/24 and .2/24), each with a pod behind a `cni0`
    /// veth: 10.244.N.1/24 on the node, 10.244.N.2/24 on the pod with its default route there, MTU 1472 (the
    /// overlay's, as the flannel CNI plugin sets it), and forwarding on inside the node namespaces only.
    static func plumbNodesAndPods(_ node1: DPNamespace, _ node2: DPNamespace, _ pod1: DPNamespace,
                                  _ pod2: DPNamespace, file: StaticString = #filePath, line: UInt = #line) {
        node1.ip("link", "add", "under0", "type", "veth", "peer", "name", "under0", "netns", node2.name)
        node1.ip("addr", "add", "192.168.77.1/24", "dev", "under0")
        node2.ip("addr", "add", "192.168.77.2/24", "dev", "under0")
        for (node, pod, third) in [(node1, pod1, 1), (node2, pod2, 2)] {
            node.ip("link", "set", "lo", "up")
            node.ip("link", "set", "under0", "up")
            node.ip("link", "add", "cni0", "type", "veth", "peer", "name", "eth0", "netns", pod.name)
            node.ip("addr", "add", "10.244.\(third).1/24", "dev", "cni0")
            node.ip("link", "set", "cni0", "up", "mtu", "1472")
            pod.ip("link", "set", "lo", "up")
            pod.ip("addr", "add", "10.244.\(third).2/24", "dev", "eth0")
            pod.ip("link", "set", "eth0", "up", "mtu", "1472")
            pod.ip("route", "add", "default", "via", "10.244.\(third).1")
            let r = node.exec(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
            XCTAssertEqual(r.status, 0, r.output, file: file, line: line)
        }
    }


    /// Runs `body` on a new thread that has joined this namespace (so a tun device or socket it creates lives
    /// here). The thread ends afterwards, so no thread of the test process is left in the namespace.
    func inside<T: Sendable>(_ body: @escaping @Sendable () throws -> T) throws -> T {
        let box = DPResultBox<T>()
        let done = DispatchSemaphore(value: 0)
        let path = "/run/netns/\(name)"
        Thread.detachNewThread {
            defer { done.signal() }
            let fd = open(path, O_RDONLY | O_CLOEXEC)
            guard fd >= 0, fu_setns_net(fd) == 0 else {
                box.result = .failure(SystemError.current("enter network namespace", path))
                if fd >= 0 { close(fd) }
                return
            }
            close(fd)
            box.result = Result { try body() }
        }
        done.wait()
        return try box.result!.get()
    }
}

/// Hands a thread's result back to the waiting test thread (the semaphore orders the accesses).
final class DPResultBox<T>: @unchecked Sendable {
    var result: Result<T, Error>?
}

/// Two flannel nodes and two pods, each in its own namespace, with the real data plane in this process:
///
///     pod1 (10.244.1.2) --veth-- node1 [flannel0 10.244.1.0/32, Forwarder 192.168.77.1:8285]
///                                  || veth underlay 192.168.77.0/24
///     pod2 (10.244.2.2) --veth-- node2 [flannel0 10.244.2.0/32, Forwarder 192.168.77.2:8285]
///                                  || veth 192.168.78.0/24
///                                stranger (192.168.78.3), not a peer
final class ForwarderNamespaceTests: XCTestCase {
    func testPodsPingThroughTwoForwardersAndICMPErrorsReachThePod() throws {
        guard getuid() == 0 else { throw XCTSkip("needs root: creates network namespaces (fu-dp-<pid>-N)") }
        guard DPNamespace.tool("ip") != nil, let ping = DPNamespace.tool("ping"),
              access("/dev/net/tun", R_OK | W_OK) == 0 else {
            throw XCTSkip("needs ip (iproute2), ping and /dev/net/tun")
        }
        var namespaces: [DPNamespace] = []
        addTeardownBlock { for ns in namespaces.reversed() { ns.delete() } }
        for n in 1...5 { namespaces.append(try DPNamespace.create(n)) }
        let (node1, node2, pod1, pod2, stranger) = (namespaces[0], namespaces[1], namespaces[2], namespaces[3],
                                                    namespaces[4])

        // Underlay, pods, and the stranger's link.
        DPNamespace.plumbNodesAndPods(node1, node2, pod1, pod2)
        node2.ip("link", "add", "side0", "type", "veth", "peer", "name", "eth0", "netns", stranger.name)
        node2.ip("addr", "add", "192.168.78.2/24", "dev", "side0")
        stranger.ip("addr", "add", "192.168.78.3/24", "dev", "eth0")
        stranger.ip("link", "set", "eth0", "up")
        stranger.ip("route", "add", "default", "via", "192.168.78.2")
        node2.ip("link", "set", "side0", "up")

        // Tun devices and sockets are created by a thread inside each node's namespace.
        struct Node: Sendable { let tun: TunDevice; let socket: UDPSocket }
        func openNode(_ ns: DPNamespace, _ address: String) throws -> Node {
            try ns.inside {
                let tun = try TunDevice(name: "flannel0")
                let socket = try UDPSocket(bind: Endpoint(address: IPv4Address(address)!, port: 8285))
                return Node(tun: tun, socket: socket)
            }
        }
        let n1 = try openNode(node1, "192.168.77.1")
        let n2 = try openNode(node2, "192.168.77.2")
        addTeardownBlock {
            n1.tun.close(); n1.socket.close()
            n2.tun.close(); n2.socket.close()
        }
        for (node, third) in [(node1, 1), (node2, 2)] {
            node.ip("addr", "add", "10.244.\(third).0/32", "dev", "flannel0")
            node.ip("link", "set", "flannel0", "up", "mtu", "1472")
            node.ip("route", "add", "10.244.0.0/16", "dev", "flannel0")
        }

        let overlay = net("10.244.0.0/16")
        var logger = Logger(label: "test.namespace-forwarder")
        logger.logLevel = .warning
        let c1 = DataPlaneCounters(), c2 = DataPlaneCounters()
        let t1 = RouteTable([route("10.244.2.0/24", "192.168.77.2:8285")])
        let t2 = RouteTable([route("10.244.1.0/24", "192.168.77.1:8285")])
        let f1 = try Forwarder(tun: n1.tun, socket: n1.socket, table: t1,
                               config: ForwardingConfig(network: overlay, subnet: net("10.244.1.0/24")),
                               counters: c1, logger: logger)
        let f2 = try Forwarder(tun: n2.tun, socket: n2.socket, table: t2,
                               config: ForwardingConfig(network: overlay, subnet: net("10.244.2.0/24")),
                               counters: c2, logger: logger)
        try f1.start()
        addTeardownBlock { f1.stop() }
        try f2.start()
        addTeardownBlock { f2.stop() }

        // 1. Pod to pod, both ways. Poll with a deadline: the first packets wait for neighbour resolution.
        func pingUntilOK(_ from: DPNamespace, _ to: String) -> String {
            let deadline = Date().addingTimeInterval(10)
            var last = ""
            while Date() < deadline {
                let r = from.exec([ping, "-n", "-c", "1", "-W", "1", to])
                if r.status == 0 { return r.output }
                last = r.output
            }
            XCTFail("\(from.name) cannot ping \(to): \(last)")
            return last
        }
        _ = pingUntilOK(pod1, "10.244.2.2")
        _ = pingUntilOK(pod2, "10.244.1.2")
        // A full-size packet: 1472 - 28 = 1444 bytes of ICMP data, DF set, goes through unfragmented.
        let big = pod1.exec([ping, "-n", "-c", "1", "-W", "2", "-M", "do", "-s", "1444", "10.244.2.2"])
        XCTAssertEqual(big.status, 0, big.output)
        XCTAssertGreaterThan(c1.snapshot().tunToUDP.packets, 0)
        XCTAssertGreaterThan(c2.snapshot().udpToTun.packets, 0)
        XCTAssertGreaterThan(t1.snapshot().peers[0].counters.snapshot.txPackets, 0)
        XCTAssertGreaterThan(t1.snapshot().peers[0].counters.snapshot.rxPackets, 0)

        // 2. No route: the pod's ping sees net unreachable from the overlay address (flannel's is lost as a
        //    martian, and flannel never answers an echo request with an error anyway).
        let unreachable = pod1.exec([ping, "-n", "-c", "1", "-W", "2", "10.244.9.9"])
        XCTAssertNotEqual(unreachable.status, 0)
        XCTAssertTrue(unreachable.output.contains("From 10.244.0.0") &&
                      unreachable.output.contains("Destination Net Unreachable"), unreachable.output)
        XCTAssertGreaterThanOrEqual(c1.drops(.noRoute), 1)

        // 3. TTL expiring in node1's forwarder (sending side): time exceeded from the overlay address.
        let ttl2 = pod1.exec([ping, "-n", "-c", "1", "-W", "2", "-t", "2", "10.244.2.2"])
        XCTAssertTrue(ttl2.output.contains("From 10.244.0.0") && ttl2.output.contains("Time to live exceeded"),
                      ttl2.output)
        // 4. TTL expiring in node2's forwarder (receiving side): time exceeded from node2's tun address, sent
        //    back over UDP and delivered to the pod by node1.
        let ttl3 = pod1.exec([ping, "-n", "-c", "1", "-W", "2", "-t", "3", "10.244.2.2"])
        XCTAssertTrue(ttl3.output.contains("From 10.244.2.0") && ttl3.output.contains("Time to live exceeded"),
                      ttl3.output)
        XCTAssertGreaterThanOrEqual(c2.drops(.ttlExpired), 1)

        // 5. A datagram from a namespace that is not a peer, carrying a packet that claims to come from node1's
        //    pod: dropped as unknownPeer, never written into node2's tun.
        let delivered = c2.snapshot().udpToTun.packets
        let forged = makeIPv4(source: ip("10.244.1.2"), destination: ip("10.244.2.2"), proto: 17,
                              payload: [0x30, 0x39, 0x30, 0x39, 0, 12, 0, 0, 0x66, 0x6f, 0x72, 0x67])
        let py = "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); " +
                 "s.sendto(bytes.fromhex('\(hexString(forged))'), ('192.168.77.2', 8285))"
        let sent = stranger.exec(["python3", "-c", py])
        XCTAssertEqual(sent.status, 0, sent.output)
        _ = waitUntil { c2.drops(.unknownPeer) > 0 }
        XCTAssertEqual(c2.drops(.unknownPeer), 1)
        XCTAssertEqual(c2.snapshot().udpToTun.packets, delivered)

        f1.stop()
        f2.stop()
        XCTAssertNil(f1.failure)
        XCTAssertNil(f2.failure)
    }
}
