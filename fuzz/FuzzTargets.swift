// libFuzzer entry point for flannel-udp's parsers and per-packet decisions.
//
// Built by scripts/fuzz.sh together with the library sources it exercises (swiftc -sanitize=fuzzer,address), one
// binary for all targets; FLANNEL_FUZZ_TARGET picks the target of a process. Besides "does not crash", each
// target checks invariants that must hold for every input (lengths in bounds, generated packets well formed,
// round trips); a violated invariant is a fatalError, so libFuzzer saves the input as a crash.
import Foundation

@inline(__always)
func require(_ condition: @autoclosure () -> Bool, _ message: @autoclosure () -> String) {
    if !condition() { fatalError("invariant violated: \(message())") }
}

/// The target this process fuzzes, from FLANNEL_FUZZ_TARGET (scripts/fuzz.sh sets it).
let fuzzTarget: (UnsafeRawBufferPointer) -> Void = {
    let name = ProcessInfo.processInfo.environment["FLANNEL_FUZZ_TARGET"] ?? ""
    switch name {
    case "packet": return fuzzPacket
    case "control": return fuzzControl
    case "peers": return fuzzPeers
    case "subnetfile": return fuzzSubnetFile
    case "etcd": return fuzzEtcd
    default: fatalError("FLANNEL_FUZZ_TARGET must be one of packet, control, peers, subnetfile, etcd (got '\(name)')")
    }
}()

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    fuzzTarget(UnsafeRawBufferPointer(start: size > 0 ? data : nil, count: size))
    return 0
}

// MARK: - packet validator, ICMP builder, PacketDecider.fromTun/fromUDP

/// Node 10.244.1.0/24 of 10.244.0.0/16, with peers covering a nested prefix, a covering route and a /32.
let fuzzNetwork = try! IPv4Network(parsing: "10.244.0.0/16")
let fuzzSubnet = try! IPv4Network(parsing: "10.244.1.0/24")
let fuzzTable = RouteTable([
    PeerRoute(subnet: try! IPv4Network(parsing: "10.244.2.0/24"), endpoint: Endpoint(address: IPv4Address(192, 168, 77, 2), port: 8285)),
    PeerRoute(subnet: try! IPv4Network(parsing: "10.244.3.0/24"), endpoint: Endpoint(address: IPv4Address(192, 168, 77, 3), port: 8286)),
    PeerRoute(subnet: try! IPv4Network(parsing: "10.244.3.128/25"), endpoint: Endpoint(address: IPv4Address(192, 168, 77, 4), port: 8285)),
    PeerRoute(subnet: try! IPv4Network(parsing: "10.244.0.0/16"), endpoint: Endpoint(address: IPv4Address(192, 168, 77, 9), port: 8285)),
    PeerRoute(subnet: try! IPv4Network(parsing: "10.244.9.9/32"), endpoint: Endpoint(address: IPv4Address(192, 168, 77, 2), port: 8285)),
])
nonisolated(unsafe) var strictDecider = PacketDecider(config: ForwardingConfig(network: fuzzNetwork, subnet: fuzzSubnet))
nonisolated(unsafe) var relaxedDecider = PacketDecider(
    config: ForwardingConfig(network: fuzzNetwork, subnet: fuzzSubnet, peerCheck: .relaxed, maxPacketLength: 1500))
let outerSources: [IPv4Address] = [IPv4Address(192, 168, 77, 2), IPv4Address(192, 168, 77, 3),
                                   IPv4Address(192, 168, 77, 4), IPv4Address(192, 168, 77, 9),
                                   IPv4Address(192, 168, 77, 100), IPv4Address(10, 244, 1, 5)]
let scratchSize = 576
let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: scratchSize, alignment: 16)

/// An ICMP error the deciders built must be a complete, well-formed IPv4/ICMP packet of at most 576 bytes.
func checkICMP(_ length: Int, about original: IPv4Packet) {
    require(length >= 28 && length <= scratchSize, "ICMP length \(length)")
    let out = UnsafeRawBufferPointer(scratch)
    guard case .valid(let icmp) = IPv4Packet.parse(UnsafeRawBufferPointer(rebasing: out[0..<length])) else {
        fatalError("invariant violated: generated ICMP does not parse")
    }
    require(icmp.totalLength == length, "ICMP total length \(icmp.totalLength) != \(length)")
    require(icmp.proto == 1, "ICMP protocol")
    require(icmp.destination == original.source, "ICMP goes to the original source")
    require(InternetChecksum.compute(UnsafeRawBufferPointer(rebasing: out[0..<20])) == 0, "IP checksum")
    require(InternetChecksum.compute(UnsafeRawBufferPointer(rebasing: out[20..<length])) == 0, "ICMP checksum")
}

func fuzzPacket(_ input: UnsafeRawBufferPointer) {
    // Byte 0 picks the decider and outer source; the rest is the packet.
    guard input.count >= 1 else { return }
    let selector = Int(input[0])
    let body = UnsafeRawBufferPointer(rebasing: input[1...])
    let parsed = IPv4Packet.parse(body)
    if case .valid(let ip) = parsed {
        require(ip.headerLength >= 20 && ip.headerLength <= 60, "header length \(ip.headerLength)")
        require(ip.totalLength >= ip.headerLength && ip.totalLength <= body.count, "total length \(ip.totalLength)")
        // The builders on their own, also about packets the deciders would never report.
        for error in [ICMPError.netUnreachable, .timeExceeded] {
            let n = error.build(about: ip, body, source: IPv4Address(10, 244, 0, 0), identification: 7, into: scratch)
            checkICMP(n, about: ip)
            // Too small a buffer must be refused, never overrun.
            let small = UnsafeMutableRawBufferPointer(rebasing: scratch[0..<min(n - 1, 100)])
            require(error.build(about: ip, body, source: IPv4Address(10, 244, 0, 0), identification: 7, into: small) == 0,
                    "builder accepted a short buffer")
        }
        _ = ICMPError.mayReport(ip, body)
    }

    // The deciders work on a private, mutable copy (they decrement the TTL in place).
    let copy = UnsafeMutableRawBufferPointer.allocate(byteCount: max(body.count, 1), alignment: 16)
    defer { copy.deallocate() }
    let packet = UnsafeMutableRawBufferPointer(rebasing: copy[0..<body.count])
    if body.count > 0 { packet.copyMemory(from: body) }
    let snapshot = fuzzTable.snapshot()
    let useRelaxed = selector & 1 == 1
    let outer = outerSources[(selector >> 1) % outerSources.count]
    let originalTTL = body.count > 8 ? body[8] : 0

    if selector & 0x80 == 0 {
        let verdict = useRelaxed ? relaxedDecider.fromTun(packet, snapshot: snapshot, scratch: scratch)
                                 : strictDecider.fromTun(packet, snapshot: snapshot, scratch: scratch)
        switch verdict {
        case .forward(let peer, let length):
            guard case .valid(let ip) = parsed else { fatalError("invariant violated: forwarded an invalid packet") }
            require(peer >= 0 && peer < snapshot.peers.count, "peer index \(peer)")
            require(length == ip.totalLength && length <= body.count, "forward length \(length)")
            require(originalTTL > 1 && packet[8] == originalTTL - 1, "TTL not decremented")
            require(snapshot.peers[peer].route.subnet.contains(ip.destination), "peer does not own the destination")
        case .icmpToTun(let length, _):
            guard case .valid(let ip) = parsed else { fatalError("invariant violated: ICMP about an invalid packet") }
            checkICMP(length, about: ip)
            require(ICMPError.mayReport(ip, body), "ICMP about a packet that may not be reported")
        case .drop:
            break
        }
    } else {
        let verdict = useRelaxed
            ? relaxedDecider.fromUDP(packet, outerSource: outer, snapshot: snapshot, scratch: scratch)
            : strictDecider.fromUDP(packet, outerSource: outer, snapshot: snapshot, scratch: scratch)
        switch verdict {
        case .deliver(let peer, let length):
            guard case .valid(let ip) = parsed else { fatalError("invariant violated: delivered an invalid packet") }
            require(peer >= 0 && peer < snapshot.peers.count, "peer index \(peer)")
            require(length == ip.totalLength && length <= body.count, "deliver length \(length)")
            require(!fuzzSubnet.contains(ip.source), "delivered a packet from our own subnet")
            require(snapshot.peers[peer].route.subnet.contains(ip.source), "sender's subnet does not hold the source")
            if !useRelaxed {
                require(snapshot.peers[peer].route.endpoint.address == outer, "strict check let a stranger through")
            }
            require(originalTTL > 1 && packet[8] == originalTTL - 1, "TTL not decremented")
        case .icmpToPeer(let length, let peer, _):
            guard case .valid(let ip) = parsed else { fatalError("invariant violated: ICMP about an invalid packet") }
            require(peer >= 0 && peer < snapshot.peers.count, "peer index \(peer)")
            checkICMP(length, about: ip)
        case .drop:
            break
        }
    }
}

// MARK: - control protocol request decoder

func fuzzControl(_ input: UnsafeRawBufferPointer) {
    // The server decodes whatever a client sent before the newline, up to maxRequestBytes.
    let bytes = Array(input.prefix(ControlProtocol.maxRequestBytes))
    guard let request = try? ControlProtocol.decode(ControlRequest.self, from: bytes) else { return }
    var line = ControlProtocol.encodeLine(request)
    require(line.last == UInt8(ascii: "\n") && !line.dropLast().contains(UInt8(ascii: "\n")), "one line")
    line.removeLast()
    let again = try? ControlProtocol.decode(ControlRequest.self, from: line)
    require(again == request, "request does not round-trip: \(request)")
    // The responses the daemon builds from it must encode too.
    _ = ControlProtocol.encodeLine(ControlResponse.error("\(request)"))
}

// MARK: - peers file

func fuzzPeers(_ input: UnsafeRawBufferPointer) {
    let text = String(decoding: input, as: UTF8.self)
    guard let routes = try? PeersFile.parse(text, path: "fuzz", defaultPort: 8285) else { return }
    for route in routes {
        require((0...32).contains(route.subnet.prefixLength), "prefix length")
        require(route.subnet.address.value & ~IPv4Network.mask(route.subnet.prefixLength) == 0, "host bits set")
        require(route.endpoint.port != 0, "port 0 accepted")
    }
    // The table must take whatever the parser accepted.
    let table = RouteTable(routes)
    _ = table.snapshot().lookup(IPv4Address(10, 244, 2, 1))
}

// MARK: - subnet file

func fuzzSubnetFile(_ input: UnsafeRawBufferPointer) {
    let text = String(decoding: input, as: UTF8.self)
    guard let file = try? SubnetFile.parse(text, path: "fuzz") else { return }
    require(file.mtu > 0, "mtu")
    // What we write must read back the same (the CNI plugin and `cleanup --subnet-file` read it).
    guard let again = try? SubnetFile.parse(file.contents, path: "fuzz") else {
        fatalError("invariant violated: written subnet file does not parse: \(file.contents)")
    }
    require(again.network == file.network && again.mtu == file.mtu && again.ipMasq == file.ipMasq, "round trip")
    require(again.subnet.prefixLength == file.subnet.prefixLength, "subnet round trip")
}

// MARK: - etcd JSON: network config, lease attributes, subnet keys

func fuzzEtcd(_ input: UnsafeRawBufferPointer) {
    guard input.count >= 1 else { return }
    let body = UnsafeRawBufferPointer(rebasing: input[1...])
    switch input[0] % 3 {
    case 0:
        if let config = try? NetworkConfig(json: Data(body)) {
            require(config.subnetLength >= config.network.prefixLength && config.subnetLength <= 32,
                    "subnet length \(config.subnetLength) for \(config.network)")
            require(config.subnetMin <= config.subnetMax, "subnetMin > subnetMax")
            require(config.network.contains(config.subnetMin) && config.network.contains(config.subnetMax),
                    "subnet range outside the network")
            _ = config.description
        }
    case 1:
        if let attributes = try? LeaseAttributes(json: Data(body)) { _ = attributes.hashValue }
    default:
        let key = String(decoding: body, as: UTF8.self)
        if let subnet = SubnetKey.parse(key) {
            require(SubnetKey.parse(SubnetKey.name(for: subnet)) == subnet, "subnet key round trip")
            require(SubnetKey.parse(SubnetKey.key(prefix: "/coreos.com/network", subnet: subnet)) == subnet,
                    "subnet key round trip with prefix")
        }
    }
}
