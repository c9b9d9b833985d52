import Foundation
import XCTest
@testable import FlannelCore
@testable import FlannelUDP
import TestSupport

extension CommandResult: CustomStringConvertible {
    var description: String { "exit \(status)\nstdout: \(stdout)\nstderr: \(stderr)" }
}

/// Runs a command (in the caller's namespace) with extra environment variables; see `Command.run`.
func runCommand(_ args: [String], environment: [String: String] = [:]) -> CommandResult {
    let env = environment.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }
    do { return try Command.run(env + args) } catch {
        return CommandResult(status: -1, stdout: "", stderr: "\(error)")
    }
}

/// The flannel-udp binary built next to the test bundle.
func flannelUDPBinary() -> String {
    let exe = (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
    var dir = URL(fileURLWithPath: exe).deletingLastPathComponent()
    // On Linux the test runner is <bin>/flannel-udpPackageTests.xctest; the tool sits beside it.
    if dir.lastPathComponent.hasSuffix(".xctest") { dir = dir.deletingLastPathComponent() }
    return dir.appendingPathComponent("flannel-udp").path
}

/// Skips the test when not root; integration tests create network namespaces.
func requireRoot() throws { try TestNamespace.requireRoot() }

/// Skips the test unless each of `tools` is installed (found as the daemon finds a tool, `ExternalTool.locate`);
/// `packages` are the Debian packages that bring them.
func requireTools(_ tools: [String], packages: String) throws {
    for tool in tools where ExternalTool.locate(tool) == nil {
        throw XCTSkip("\(tool) is not installed (apt-get install -y \(packages); scripts/test.sh does); skipping")
    }
}

/// Polls `condition` until it holds; throws `TimedOut` naming `what` when `timeout` passes first.
func waitFor(_ what: String, timeout: TimeInterval = 10, _ condition: () throws -> Bool) throws {
    if try !waitUntil(timeout: timeout, interval: 0.02, condition) {
        throw TimedOut(what: what, seconds: timeout)
    }
}

struct TimedOut: Error, CustomStringConvertible {
    var what: String
    var seconds: TimeInterval
    var description: String { "timed out after \(seconds) s waiting until \(what)" }
}

/// Starts a long-running command (a server) without waiting for it; the caller terminates it. Used instead of a
/// tool's own daemon mode (`iperf3 -D`), whose forked child would inherit the descriptors Foundation watches to
/// notice that the started process exited, and so keep `Command.run` waiting forever. Its stdout goes to
/// `output` and its stderr to `errors` (both discarded by default; `errors` follows `output` when only that is
/// given). `Command.run` starts its commands here too, then waits.
func startBackground(_ args: [String], output: FileHandle = .nullDevice, errors: FileHandle? = nil) throws -> Process {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
    p.arguments = args
    p.standardInput = FileHandle.nullDevice
    p.standardOutput = output
    p.standardError = errors ?? output
    try ProcessLaunch.run(p)
    return p
}

/// Ends a process `startBackground` started, if it still runs, and reaps it.
func stopBackground(_ process: Process) {
    if process.isRunning { process.terminate() }
    process.waitUntilExit()
}

/// Starts a one-shot iperf3 server (`-s -1`) in `pod` bound to `address` and returns once it listens; the caller
/// stops it with `stopBackground` (which also ends one whose client never came). Stopped here if it never listens.
func startIperf3Server(in pod: TestNamespace, address: String) throws -> Process {
    let server = try startBackground(["ip", "netns", "exec", pod.name, "iperf3", "-s", "-1", "-B", address])
    do {
        try waitFor("iperf3 listens") { (try? pod.run(["ss", "-ltn"]))?.contains(":5201") == true }
    } catch {
        stopBackground(server)
        throw error
    }
    return server
}

extension TestWire {
    /// Starts a one-member etcd in the wire's namespace, listening for clients on `clientURL` and for peers on
    /// `peerURL` (addresses of the bridge), its data in `dataDirectory`. Returns at once: the caller keeps the
    /// process to stop it in teardown, then calls `waitForEtcd`.
    func startEtcd(clientURL: String, peerURL: String = "http://192.168.77.250:2380", dataDirectory: String)
        throws -> Process {
        try startBackground(["ip", "netns", "exec", ns.name, "etcd", "--name", "fu",
                             "--data-dir", dataDirectory, "--listen-client-urls", clientURL,
                             "--advertise-client-urls", clientURL, "--listen-peer-urls", peerURL,
                             "--initial-advertise-peer-urls", peerURL, "--initial-cluster", "fu=\(peerURL)"])
    }

    /// Waits until the etcd at `clientURL` reports itself healthy.
    func waitForEtcd(clientURL: String) throws {
        try waitFor("etcd is healthy", timeout: 20) {
            (try? ns.run(["etcdctl", "--endpoints", clientURL, "--command-timeout=1s", "endpoint", "health"])) != nil
        }
    }
}

/// The etcd tests' topology: an underlay switch (`underlay`, a bridge at 192.168.77.250/24) with a one-member etcd
/// on it at `etcdURL`, and nodes plugged in at 192.168.77.<index> (`plugNode`). etcd is stopped and the switch
/// removed when the test ends; every daemon uses `tmp/run` as its run directory.
///
///                   wire (bridge br0, etcd on 192.168.77.250:2379)
///        +----------------+----------------+
///     node (.1)        node (.2)   ...
class EtcdWireTestCase: XCTestCase {
    var tmp = ""
    var underlay: TestWire!
    var wire: TestNamespace { underlay.ns }
    var etcd: Process?
    let etcdURL = "http://192.168.77.250:2379"

    /// Skips the test unless etcd and etcdctl are installed.
    func requireEtcd() throws {
        try requireTools(["etcd", "etcdctl"], packages: "etcd-server etcd-client")
    }

    /// The test directory `/tmp/<prefix>-…` and the switch (`<prefix>w-…`); call from `setUpWithError`.
    func setUpWire(_ prefix: String) throws {
        tmp = try makeTestDirectory(prefix, for: self)
        underlay = try TestWire(prefix: prefix + "w", address: "192.168.77.250/24")
        addTeardownBlock { [weak self] in
            self?.stopEtcd()
            self?.underlay.destroy()
        }
    }

    /// Starts etcd (its data in `tmp/etcd`, kept across a restart) and waits until it is healthy.
    func startEtcd() throws {
        etcd = try underlay.startEtcd(clientURL: etcdURL, dataDirectory: tmp + "/etcd")
        try underlay.waitForEtcd(clientURL: etcdURL)
    }

    func stopEtcd() {
        guard let etcd else { return }
        kill(etcd.processIdentifier, SIGKILL)
        // `ip netns exec` execs etcd, so the process we started is etcd itself.
        etcd.waitUntilExit()
        self.etcd = nil
    }

    /// flannel's network config, 10.244.0.0/16 unless told otherwise, at `/coreos.com/network/config`.
    func putNetworkConfig(_ json: String = #"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#) throws {
        try etcdctl(["put", "/coreos.com/network/config", json])
    }

    @discardableResult
    func etcdctl(_ args: [String]) throws -> String {
        try wire.run(["etcdctl", "--endpoints", etcdURL] + args)
    }

    /// A node namespace `<prefix>-…` on the switch at 192.168.77.<index>/24; when the test ends its daemon is
    /// stopped (`down`) and the namespace removed.
    func plugNode(prefix: String, index: Int) throws -> TestNamespace {
        let ns = try TestNamespace(prefix: prefix)
        addTeardownBlock { [tmp] in
            _ = runFlannelUDP(in: ns, ["down"], runDirectory: tmp + "/run")
            ns.destroy()
        }
        try underlay.plug(ns, address: "192.168.77.\(index)/24")
        return ns
    }
}

/// An underlay "switch": a namespace holding a bridge that node namespaces plug into with a veth as their eth0.
final class TestWire {
    let ns: TestNamespace
    private var ports = 0

    /// - Parameter address: an address for the bridge itself (e.g. to run etcd on the underlay), "A.B.C.D/N".
    init(prefix: String, address: String? = nil) throws {
        ns = try TestNamespace(prefix: prefix)
        try ns.run(["ip", "link", "add", "br0", "type", "bridge"])
        if let address { try ns.run(["ip", "addr", "add", address, "dev", "br0"]) }
        try ns.run(["ip", "link", "set", "br0", "up"])
    }

    /// Gives `node` an eth0 on the switch with `address` ("192.168.77.1/24").
    func plug(_ node: TestNamespace, address: String) throws {
        ports += 1
        let port = "p\(ports)"
        try ns.run(["ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", node.name])
        try ns.run(["ip", "link", "set", port, "master", "br0", "up"])
        try node.run(["ip", "addr", "add", address, "dev", "eth0"])
        try node.run(["ip", "link", "set", "eth0", "up"])
    }

    /// A node namespace `<prefix>n-…` plugged in at 192.168.77.<index> with a pod `<prefix>p-…` behind it in
    /// 10.244.<index>.0/24 (`attachPod`), not started: the `OverlayNode` layout. When `test` ends the node's
    /// daemon (run directory `runDirectory`) is stopped and both namespaces are removed. With `disableIPv6`,
    /// IPv6 is off in the node before any device exists, so that no router solicitation reaches a tun whose drops
    /// a test counts.
    func overlayNode(_ index: Int, prefix: String, runDirectory: String, for test: XCTestCase,
                     disableIPv6: Bool = false) throws -> OverlayNode {
        let ns = try TestNamespace(prefix: prefix + "n")
        let pod = try TestNamespace(prefix: prefix + "p")
        test.addTeardownBlock {
            _ = runFlannelUDP(in: ns, ["down"], runDirectory: runDirectory)
            pod.destroy()
            ns.destroy()
        }
        if disableIPv6 {
            try ns.run(["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"])
            try ns.run(["sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"])
        }
        try plug(ns, address: "192.168.77.\(index)/24")
        try attachPod(pod, to: ns, subnet: IPv4Network(address: IPv4Address(10, 244, UInt8(index), 0), prefixLength: 24))
        return OverlayNode(index: index, ns: ns, pod: pod)
    }

    func destroy() { ns.destroy() }
}

/// Nodes with a pod each (`OverlayNode`) on one underlay switch (`wire`), every daemon's files under the test's
/// own directory (`tmp/run`): the topology of the overlay, hostile-traffic, masquerade and service tests.
class WireTestCase: XCTestCase {
    /// The start of the test's names: its directory `/tmp/<prefix>-…`, the switch `<prefix>w-…`, and each node
    /// and pod `<prefix>n-…`, `<prefix>p-…`.
    class var prefix: String { "fu-w" }
    /// Options added to every `up` (the worker variants in WorkersTests.swift run the same tests with more pairs).
    var upOptions: [String] { [] }
    /// IPv6 off in every node from the start, for the tests that count the tun's drops exactly.
    var nodesWithoutIPv6: Bool { false }
    var tmp = ""
    var wire: TestWire!

    override func setUpWithError() throws {
        try requireRoot()
        tmp = try makeTestDirectory(Self.prefix, for: self)
        wire = try TestWire(prefix: Self.prefix + "w")
        addTeardownBlock { [wire] in wire?.destroy() }
    }

    /// Joins a namespace to the switch as eth0 with 192.168.77.<index>/24.
    func plug(_ ns: TestNamespace, index: Int) throws {
        try wire.plug(ns, address: "192.168.77.\(index)/24")
    }

    /// A node and its pod (`TestWire.overlayNode`); with `start` the node runs `flannel-udp up --detach` (`up`).
    func makeNode(_ index: Int, start: Bool = true, extra: [String] = []) throws -> OverlayNode {
        let node = try wire.overlayNode(index, prefix: Self.prefix, runDirectory: tmp + "/run", for: self,
                                        disableIPv6: nodesWithoutIPv6)
        if start {
            let up = self.up(node, extra)
            XCTAssertEqual(up.status, 0, up.description)
        }
        return node
    }

    /// `up --detach` for the node's subnet in 10.244.0.0/16, its subnet file `tmp/subnet-<index>.env`.
    func up(_ node: OverlayNode, _ extra: [String] = []) -> CommandResult {
        fu(node, ["up", "--network", "10.244.0.0/16", "--subnet", node.subnet, "--iface", "eth0",
                  "--subnet-file", "\(tmp)/subnet-\(node.index).env", "--detach"] + upOptions + extra)
    }

    /// flannel-udp in the node's namespace, with the test's run directory.
    @discardableResult
    func fu(_ node: OverlayNode, _ args: [String], environment: [String: String] = [:]) -> CommandResult {
        runFlannelUDP(in: node.ns, args, runDirectory: tmp + "/run", environment: environment)
    }

    /// Sends datagrams from one UDP socket opened inside `ns` (the socket belongs to the namespace of the thread
    /// that creates it, so they leave from `ns`'s eth0) to `endpoint` (port 8285 unless given). Returns how many
    /// the kernel took.
    @discardableResult
    func sendUDP(from ns: TestNamespace, to endpoint: String, _ payloads: [[UInt8]]) throws -> Int {
        let target = try Endpoint(parsing: endpoint, defaultPort: 8285)
        return try ns.withEntered {
            let fd = socket(AF_INET, Int32(SOCK_DGRAM.rawValue), 0)
            guard fd >= 0 else { throw SystemError.current("socket", "udp") }
            defer { close(fd) }
            var big: Int32 = 1 << 20
            setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &big, socklen_t(MemoryLayout<Int32>.size))
            var sent = 0
            for payload in payloads {
                guard sendDatagram(payload, from: fd, to: target) == payload.count else {
                    throw SystemError.current("sendto", endpoint)
                }
                sent += 1
            }
            return sent
        }
    }

    /// One datagram, as `sendUDP(from:to:_:)` sends them.
    func sendUDP(from ns: TestNamespace, to endpoint: String, _ payload: [UInt8]) throws {
        try sendUDP(from: ns, to: endpoint, [payload])
    }
}

/// Puts `pod` behind `node` the way the flannel CNI plugin would: `cni0` on the node with the subnet's first
/// host address, the pod at the second, MTU 1472 on both ends, the pod's default route via the node, and IPv4
/// forwarding on inside the node namespace.
func attachPod(_ pod: TestNamespace, to node: TestNamespace, subnet: IPv4Network) throws {
    let gateway = IPv4Address(subnet.address.value + 1)
    let address = IPv4Address(subnet.address.value + 2)
    try node.run(["ip", "link", "add", "cni0", "mtu", "1472", "type", "veth", "peer", "name", "eth0", "mtu", "1472", "netns", pod.name])
    try node.run(["ip", "addr", "add", "\(gateway)/\(subnet.prefixLength)", "dev", "cni0"])
    try node.run(["ip", "link", "set", "cni0", "up"])
    try node.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
    try pod.run(["ip", "addr", "add", "\(address)/\(subnet.prefixLength)", "dev", "eth0"])
    try pod.run(["ip", "link", "set", "eth0", "up"])
    try pod.run(["ip", "route", "add", "default", "via", "\(gateway)"])
}

/// A node namespace on the test underlay (192.168.77.<index>/24) with a pod namespace behind it, whose subnet is
/// 10.244.<index>.0/24 and whose pod is .2 in it: the layout of the overlay and hostile-topology tests.
struct OverlayNode {
    var index: Int
    var ns: TestNamespace
    var pod: TestNamespace
    var underlay: String { "192.168.77.\(index)" }
    var subnet: String { "10.244.\(index).0/24" }
    var podAddress: String { "10.244.\(index).2" }
}

/// One ping from `pod` to `target` (numeric, waiting `seconds` for the reply), with `extra` options such as `-t 1`.
func ping(from pod: TestNamespace, _ target: String, _ extra: [String] = [], wait seconds: Int = 2) -> CommandResult {
    runCommand(["ip", "netns", "exec", pod.name, "ping", "-n", "-c", "1", "-W", "\(seconds)"] + extra + [target])
}

/// The "daemon" object of a `flannel-udp status --json` run, which must have succeeded.
func daemonJSON(_ r: CommandResult, file: StaticString = #filePath, line: UInt = #line) throws -> [String: Any] {
    XCTAssertEqual(r.status, 0, r.description, file: file, line: line)
    let json = try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any]
    return try XCTUnwrap(json?["daemon"] as? [String: Any], r.stdout, file: file, line: line)
}

/// A fresh directory for one test's files, `/tmp/<prefix>-<pid>-<random>`, mode 0755 whatever the umask: the
/// daemon writes its subnet file, state and log under it, and refuses a directory that group or others can write
/// (`SecureDirectory`). Removed when the test ends.
func makeTestDirectory(_ prefix: String, for test: XCTestCase) throws -> String {
    let path = NSTemporaryDirectory() + "\(prefix)-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
    try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true,
                                            attributes: [.posixPermissions: 0o755])
    try FileManager.default.setAttributes([.posixPermissions: 0o755], ofItemAtPath: path)
    test.addTeardownBlock { try? FileManager.default.removeItem(atPath: path) }
    return path
}

/// Runs the flannel-udp binary inside `ns` with `runDirectory` as its run directory (FLANNEL_UDP_RUN_DIR).
func runFlannelUDP(in ns: TestNamespace, _ args: [String], runDirectory: String,
                   environment: [String: String] = [:]) -> CommandResult {
    runCommand(["ip", "netns", "exec", ns.name, flannelUDPBinary()] + args,
               environment: environment.merging(["FLANNEL_UDP_RUN_DIR": runDirectory]) { _, run in run })
}

/// Gives a lone node its underlay: `eth0` at `address` (MTU 1500), up. This kernel has no dummy driver, so it is
/// a veth pair whose far end (`eth0peer`) stays unused in the same namespace.
func addLoneUnderlay(_ ns: TestNamespace, address: String = "192.168.77.1/24") throws {
    try ns.run(["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0peer"])
    try ns.run(["ip", "link", "set", "eth0peer", "up"])
    try ns.run(["ip", "addr", "add", address, "dev", "eth0"])
    try ns.run(["ip", "link", "set", "eth0", "up"])
}
