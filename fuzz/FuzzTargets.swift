// libFuzzer entry point for flannel-udp's parsers, per-packet decisions and offload paths.
//
// Built by scripts/fuzz.sh together with the library sources it exercises (swiftc -sanitize=fuzzer,address), one
// binary for all targets; FLANNEL_FUZZ_TARGET picks the target of a process. Besides "does not crash", each
// target checks invariants that must hold for every input (lengths in bounds, generated packets well formed,
// round trips); a violated invariant is a fatalError, so libFuzzer saves the input as a crash.
import Foundation
#if canImport(Glibc)
import Glibc
#endif

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
    case "tso": return fuzzTSO
    case "gro": return fuzzGRO
    case "netlink": return fuzzNetlink
    default:
        fatalError("FLANNEL_FUZZ_TARGET must be one of packet, control, peers, subnetfile, etcd, tso, gro, netlink (got '\(name)')")
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
            require(fuzzNetwork.contains(ip.destination), "delivered a packet for \(ip.destination), outside the network")
            require(snapshot.peers[peer].route.subnet.contains(ip.source), "sender's subnet does not hold the source")
            if !useRelaxed {
                require(snapshot.peers[peer].route.endpoint.address == outer, "strict check let a stranger through")
            }
            require(originalTTL > 1 && packet[8] == originalTTL - 1, "TTL not decremented")
        case .icmpToPeer(let length, let peer, _):
            guard case .valid(let ip) = parsed else { fatalError("invariant violated: ICMP about an invalid packet") }
            require(peer >= 0 && peer < snapshot.peers.count, "peer index \(peer)")
            require(fuzzNetwork.contains(ip.destination), "answered a packet for \(ip.destination), outside the network")
            checkICMP(length, about: ip)
        case .drop(.outsideNetwork, _):
            guard case .valid(let ip) = parsed else { fatalError("invariant violated: outsideNetwork for an invalid packet") }
            require(!fuzzNetwork.contains(ip.destination), "dropped \(ip.destination) as outside the network")
        case .drop:
            break
        }
    }
}

// MARK: - control protocol request decoder

func fuzzControl(_ input: UnsafeRawBufferPointer) {
    // The server decodes whatever a client sent before the newline, up to maxRequestBytes.
    let bytes = Array(input.prefix(ControlProtocol.maxRequestBytes))
    guard let request = try? ControlProtocol.decode(ControlMessage.self, from: bytes) else { return }
    var line = ControlProtocol.encodeLine(request)
    require(line.last == UInt8(ascii: "\n") && !line.dropLast().contains(UInt8(ascii: "\n")), "one line")
    line.removeLast()
    let again = try? ControlProtocol.decode(ControlMessage.self, from: line)
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

// MARK: - tun -> UDP offloads: virtio-net header, NEEDS_CSUM completion, TSO segmentation

/// The bytes of one packet a send queue holds (its one or two pieces, joined).
func segmentBytes(_ queue: SendQueue, _ k: Int) -> [UInt8] {
    var out: [UInt8] = []
    var i = queue.segmentIov[k]
    for _ in 0..<queue.segmentParts[k] {
        let v = queue.iovs[i]
        out += UnsafeRawBufferPointer(start: v.iov_base, count: v.iov_len)
        i += 1
    }
    return out
}

func word(_ b: [UInt8], _ at: Int) -> UInt16 { UInt16(b[at]) << 8 | UInt16(b[at + 1]) }

/// The TCP checksum of a whole IPv4/TCP packet verifies (pseudo-header, header, payload).
func tcpChecksumValid(_ p: [UInt8], ihl: Int) -> Bool {
    p.withUnsafeBytes { b in
        let pseudo = InternetChecksum.pseudoHeaderSum(b.baseAddress!, proto: 6, length: p.count - ihl)
        let sum = InternetChecksum.sum(UnsafeRawBufferPointer(rebasing: b[ihl...]), initial: UInt32(pseudo))
        return InternetChecksum.fold(sum) == 0xFFFF
    }
}

let tsoQueue = SendQueue(capacity: 1024, gso: true)
nonisolated(unsafe) var tsoDecider = PacketDecider(config: ForwardingConfig(network: fuzzNetwork, subnet: fuzzSubnet))

/// What the tun -> UDP worker does with one read (Forwarder.forwardBatch, minus the I/O): the virtio header,
/// checksum completion for a NEEDS_CSUM packet, the decision, and segmentation of a TSO super-packet into the
/// send queue. The input is the read: a 10-byte virtio_net_hdr, then the packet (up to 64 KiB).
func fuzzTSO(_ input: UnsafeRawBufferPointer) {
    guard input.count >= VirtioNetHeader.length else { return }  // counted as malformed
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: input.count, alignment: 16)
    defer { buffer.deallocate() }
    buffer.copyMemory(from: input)
    let h = VirtioNetHeader(from: buffer.baseAddress!)
    let packet = UnsafeMutableRawBufferPointer(rebasing: buffer[VirtioNetHeader.length...])
    let gsoType = h.gsoType & ~VirtioNetHeader.gsoECN
    let gsoSize = Int(h.gsoSize)
    if gsoType == VirtioNetHeader.gsoNone {
        if h.needsChecksum {
            let before = Array(UnsafeRawBufferPointer(packet))
            let start = Int(h.checksumStart), offset = Int(h.checksumOffset)
            let fits = start >= 20 && start + offset + 2 <= packet.count
            let done = InternetChecksum.complete(packet, start: start, offset: offset)
            require(done == fits, "complete() = \(done) for start \(start) offset \(offset) in \(packet.count) bytes")
            guard done else { return }
            let field = start + offset
            for i in 0..<packet.count where i != field && i != field + 1 {
                if packet[i] != before[i] { fatalError("invariant violated: completion wrote byte \(i)") }
            }
            if offset % 2 == 0 {
                // The receiver's check: the pseudo-header sum the field held plus the covered bytes (now holding
                // the checksum) is all ones.
                let pseudo = UInt32(word(before, field))
                let sum = InternetChecksum.sum(UnsafeRawBufferPointer(rebasing: UnsafeRawBufferPointer(packet)[start...]),
                                               initial: pseudo)
                require(InternetChecksum.fold(sum) == 0xFFFF, "completed checksum does not verify")
                require(packet[field] != 0 || packet[field + 1] != 0, "checksum 0 stored (UDP's 'none')")
            }
        }
    } else if gsoType != VirtioNetHeader.gsoTCPv4 {
        return  // counted as malformed: only TSO4 is switched on
    }
    let snapshot = fuzzTable.snapshot()
    guard case .forward(let peer, let length) = tsoDecider.fromTun(packet, snapshot: snapshot, scratch: scratch),
          gsoType == VirtioNetHeader.gsoTCPv4 else { return }
    let superPacket = UnsafeMutableRawBufferPointer(rebasing: packet[0..<length])
    let original = Array(UnsafeRawBufferPointer(superPacket))
    let needed = TCPSegmenter.segmentCount(UnsafeRawBufferPointer(superPacket), gsoSize: gsoSize)
    tsoQueue.reset()
    tsoQueue.gso = true
    let outcome = TCPSegmenter.segment(superPacket, gsoSize: gsoSize, peer: peer, name: sockaddr_in(), into: tsoQueue)
    switch outcome {
    case .invalid:
        require(needed == 0, "refused a packet of \(needed) segments")
        return
    case .tooManySegments:
        require(needed > tsoQueue.capacity, "too many segments: \(needed)")
        return
    case .segmented(let n):
        require(n == needed && n == tsoQueue.segmentCount && n >= 1, "segments \(n), expected \(needed)")
    }
    require(Array(UnsafeRawBufferPointer(superPacket)) == original, "segmentation changed the super-packet")
    guard let (headerLength, total) = TCPSegmenter.headers(UnsafeRawBufferPointer(superPacket)) else {
        fatalError("invariant violated: segmented a packet without TCP/IPv4 headers")
    }
    let ihl = Int(original[0] & 0x0F) * 4
    let count = tsoQueue.segmentCount
    let seq0 = UInt32(word(original, ihl + 4)) << 16 | UInt32(word(original, ihl + 6))
    let flags0 = original[ihl + 13]
    var offset = headerLength
    for k in 0..<count {
        let seg = segmentBytes(tsoQueue, k)
        // A whole IPv4 packet of at most headers + gso_size bytes: within the MTU the kernel chose gso_size for.
        require(seg.count > headerLength || (count == 1 && seg.count == headerLength), "segment \(k): \(seg.count) bytes")
        require(seg.count <= headerLength + gsoSize || (count == 1 && total == headerLength), "segment \(k) too long")
        let parsed = seg.withUnsafeBytes { IPv4Packet.parse($0) }
        guard case .valid(let ip) = parsed else { fatalError("invariant violated: segment \(k) does not parse") }
        require(ip.totalLength == seg.count && ip.headerLength == ihl, "segment \(k) lengths")
        require(seg.withUnsafeBytes { InternetChecksum.compute(UnsafeRawBufferPointer(rebasing: $0[0..<ihl])) } == 0,
                "segment \(k): IP checksum")
        require(tcpChecksumValid(seg, ihl: ihl), "segment \(k): TCP checksum")
        require(word(seg, 4) == word(original, 4) &+ UInt16(truncatingIfNeeded: k), "segment \(k): identification")
        let seq = UInt32(word(seg, ihl + 4)) << 16 | UInt32(word(seg, ihl + 6))
        require(seq == seq0 &+ UInt32(truncatingIfNeeded: k * gsoSize), "segment \(k): sequence")
        let f = seg[ihl + 13]
        require(f & (TCPHeader.fin | TCPHeader.psh) == (k == count - 1 ? flags0 & (TCPHeader.fin | TCPHeader.psh) : 0),
                "segment \(k): FIN/PSH")
        require(f & TCPHeader.cwr == (k == 0 ? flags0 & TCPHeader.cwr : 0), "segment \(k): CWR")
        // Every other header byte as in the super-packet; the payload is the next piece of it.
        for i in 0..<headerLength where !(2..<6).contains(i) && !(10..<12).contains(i)
            && !(ihl + 4..<ihl + 8).contains(i) && i != ihl + 13 && !(ihl + 16..<ihl + 18).contains(i) {
            if seg[i] != original[i] { fatalError("invariant violated: segment \(k) header byte \(i) changed") }
        }
        let payload = seg.count - headerLength
        require(Array(seg[headerLength...]) == Array(original[offset..<offset + payload]), "segment \(k): payload")
        offset += payload
    }
    require(offset == total, "segments carry \(offset - headerLength) of \(total - headerLength) payload bytes")
    // GSO messages: runs of equal-size segments to one peer, the last possibly shorter, within the kernel's limits.
    tsoQueue.prepareMessages()
    var covered = 0
    for m in 0..<tsoQueue.messageCount {
        let first = tsoQueue.messageFirst[m], n = tsoQueue.messageSegments[m]
        require(first == covered && n >= 1 && n <= SendQueue.maxSegmentsPerSend, "message \(m) segments")
        require(tsoQueue.messageBytes[m] <= max(SendQueue.maxBytesPerSend, tsoQueue.segmentLength[first]),
                "message \(m) bytes")
        for j in first..<first + n {
            require(tsoQueue.segmentLength[j] == tsoQueue.messageSegmentSize[m] || j == first + n - 1,
                    "message \(m): unequal segment inside")
            require(tsoQueue.segmentLength[j] <= tsoQueue.messageSegmentSize[m], "message \(m): longer last")
        }
        covered += n
    }
    require(covered == count, "messages cover \(covered) of \(count) segments")
}

// MARK: - UDP -> tun offloads: GRO split, decision, TCP coalescing

let groCoalescer = TCPCoalescer()
let groHeader = UnsafeMutableRawPointer.allocate(byteCount: 16, alignment: 16)
let groQueue = SendQueue(capacity: 1024, gso: false)

/// What the UDP -> tun worker does with one receive (Forwarder.deliverBatch, minus the I/O): the buffer split
/// into datagrams at the GRO segment size, each decided, deliverable TCP runs coalesced. Input: byte 0 picks the
/// decider and outer source as in `packet`, bytes 1-2 the segment size (signed, as the control message's int),
/// the rest is the receive buffer (up to 64 KiB).
func fuzzGRO(_ input: UnsafeRawBufferPointer) {
    guard input.count >= 3 else { return }
    let selector = Int(input[0])
    let segmentSize = Int(Int16(bitPattern: UInt16(input[1]) << 8 | UInt16(input[2])))
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max(input.count - 3, 1), alignment: 16)
    defer { buffer.deallocate() }
    let body = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<(input.count - 3)])
    if body.count > 0 { body.copyMemory(from: UnsafeRawBufferPointer(rebasing: input[3...])) }
    let snapshot = fuzzTable.snapshot()
    let useRelaxed = selector & 1 == 1
    let outer = outerSources[(selector >> 1) % outerSources.count]

    var group: [[UInt8]] = []
    func flush() {
        let pieces = groCoalescer.finish(header: groHeader)
        var written: [UInt8] = []
        for v in pieces { written += UnsafeRawBufferPointer(start: v.iov_base, count: v.iov_len) }
        checkWrite(written, group: group)
        group = []
    }

    var split = GROSplit(total: body.count, segmentSize: segmentSize)
    var end = 0
    while let datagram = split.next() {
        require(datagram.lowerBound == end && !datagram.isEmpty && datagram.count <= split.step, "split \(datagram)")
        end = datagram.upperBound
        let packet = UnsafeMutableRawBufferPointer(rebasing: body[datagram])
        let verdict = useRelaxed
            ? relaxedDecider.fromUDP(packet, outerSource: outer, snapshot: snapshot, scratch: scratch)
            : strictDecider.fromUDP(packet, outerSource: outer, snapshot: snapshot, scratch: scratch)
        guard case .deliver(_, let length) = verdict else { continue }
        let p = UnsafeMutableRawBufferPointer(rebasing: packet[0..<length])
        if groCoalescer.isOpen {
            if groCoalescer.append(UnsafeRawBufferPointer(p)) {
                group.append(Array(UnsafeRawBufferPointer(p)))
                continue
            }
            flush()
        }
        if TCPCoalescer.isCandidate(UnsafeRawBufferPointer(p)) {
            groCoalescer.begin(p)
            group = [Array(UnsafeRawBufferPointer(p))]
            continue
        }
        VirtioNetHeader.none.store(to: groHeader)
        checkWrite(Array(UnsafeRawBufferPointer(start: groHeader, count: VirtioNetHeader.length))
                   + Array(UnsafeRawBufferPointer(p)), group: [Array(UnsafeRawBufferPointer(p))])
    }
    require(end == body.count, "split covered \(end) of \(body.count) bytes")
    if groCoalescer.isOpen { flush() }
}

/// One write into the tun (virtio header + packet) made from the delivered packets in `group`: a single packet
/// goes in as it came; a coalesced super-packet is a well-formed TSO packet that the kernel's segmentation (ours
/// stands in for it) cuts back into exactly the packets that were merged.
func checkWrite(_ written: [UInt8], group: [[UInt8]]) {
    require(written.count > VirtioNetHeader.length && !group.isEmpty, "empty write")
    let h = written.withUnsafeBytes { VirtioNetHeader(from: $0.baseAddress!) }
    var packet = Array(written[VirtioNetHeader.length...])
    let parsed = packet.withUnsafeBytes { IPv4Packet.parse($0) }
    guard case .valid(let ip) = parsed else { fatalError("invariant violated: written packet does not parse") }
    require(ip.totalLength == packet.count, "written packet length \(packet.count) != \(ip.totalLength)")
    require(fuzzNetwork.contains(ip.destination), "wrote a packet for \(ip.destination) into the tun")
    require(!fuzzSubnet.contains(ip.source), "wrote a packet from our own subnet")
    if group.count == 1 {
        require(h == .none && packet == group[0], "a single packet is written as it came")
        return
    }
    require(group.count <= TCPCoalescer.maxSegments && packet.count <= TCPCoalescer.maxLength, "group size")
    let thl = Int(packet[32] >> 4) * 4
    let gsoSize = group[0].count - 20 - thl
    require(h.gsoType == VirtioNetHeader.gsoTCPv4 && h.needsChecksum && h.checksumStart == 20
            && h.checksumOffset == 16 && Int(h.gsoSize) == gsoSize && Int(h.headerLength) == 20 + thl,
            "virtio header \(h)")
    require(packet.withUnsafeBytes { InternetChecksum.compute(UnsafeRawBufferPointer(rebasing: $0[0..<20])) } == 0,
            "super-packet IP checksum")
    require(packet.count == 20 + thl + group.reduce(0) { $0 + $1.count - 20 - thl }, "super-packet payload")
    // What the receiving kernel does: complete the checksum, then (forwarding it on) segment at gso_size.
    let completed = packet.withUnsafeMutableBytes { InternetChecksum.complete($0, start: 20, offset: 16) }
    require(completed && tcpChecksumValid(packet, ihl: 20), "super-packet TCP checksum")
    groQueue.reset()
    let outcome = packet.withUnsafeMutableBytes {
        TCPSegmenter.segment($0, gsoSize: gsoSize, peer: 0, name: sockaddr_in(), into: groQueue)
    }
    require(outcome == .segmented(group.count), "re-segmented into \(outcome), merged \(group.count)")
    for k in 0..<group.count {
        var again = segmentBytes(groQueue, k)
        var merged = group[k]
        require(again.count == merged.count, "segment \(k) length")
        // The merged packets' own checksums were not verified (see TCPCoalescer), and the urgent pointer means
        // nothing without URG (never merged), so the kernel does not compare it either: all but those.
        for i in [10, 11, 36, 37, 38, 39] { again[i] = 0; merged[i] = 0 }
        require(again == merged, "segment \(k) differs from the packet merged")
    }
}

// MARK: - netlink replies

/// The reply side of a netlink exchange (ReplyCollector over libmnl, and the link/address/route/status
/// parsers), fed datagrams as a hostile or buggy kernel-side peer could send them to sequence 77, port id 4242.
/// Input: byte 0 picks the expected reply type; the rest is a run of datagrams, each a 2-byte little-endian
/// length and that many bytes (the last takes what is left).
func fuzzNetlink(_ input: UnsafeRawBufferPointer) {
    guard input.count >= 1 else { return }
    let types: [UInt16] = [16, 20, 24]  // RTM_NEWLINK, RTM_NEWADDR, RTM_NEWROUTE
    let replyType = types[Int(input[0]) % types.count]
    let collector = ReplyCollector(sequence: 77, portID: 4242, replyType: replyType) { message in
        // Handed only whole messages of this request and this type.
        require(message.count >= 16, "message of \(message.count) bytes")
        let length = Int(message.loadUnaligned(fromByteOffset: 0, as: UInt32.self))
        require(length == message.count, "message length \(length) != \(message.count)")
        require(message.loadUnaligned(fromByteOffset: 4, as: UInt16.self) == replyType, "message type")
        // libmnl's rule: this request's sequence number, or 0 (what the kernel puts on notifications).
        let sequence = message.loadUnaligned(fromByteOffset: 8, as: UInt32.self)
        require(sequence == 77 || sequence == 0, "sequence \(sequence)")
        switch replyType {
        case 16:
            guard let link = NetlinkMessages.parseLink(message) else { return false }
            require(link.mtu >= 0, "mtu \(link.mtu)")
            _ = link.name.utf8.count
        case 20:
            guard let address = NetlinkMessages.parseAddress(message) else { return false }
            require((0...32).contains(address.prefixLength), "address prefix \(address.prefixLength)")
        default:
            guard let route = NetlinkMessages.parseRoute(message) else { return false }
            let d = route.route.destination
            require((0...32).contains(d.prefixLength) && d.address.value & ~d.mask == 0, "route \(d)")
        }
        return true
    }
    var rest = UnsafeRawBufferPointer(rebasing: input[1...])
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max(rest.count, 1), alignment: 16)
    defer { buffer.deallocate() }
    while !rest.isEmpty {
        var n = rest.count
        if rest.count >= 2 {
            n = min(Int(rest[0]) | Int(rest[1]) << 8, rest.count - 2)
            rest = UnsafeRawBufferPointer(rebasing: rest[2...])
        }
        // Received into an aligned buffer, as the socket's receive buffer is.
        let datagram = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n])
        if n > 0 { datagram.copyMemory(from: UnsafeRawBufferPointer(rebasing: rest[0..<n])) }
        rest = UnsafeRawBufferPointer(rebasing: rest[n...])
        switch collector.feed(UnsafeRawBufferPointer(datagram)) {
        case .more: continue
        case .finished:
            require(collector.status.errno >= 0, "errno \(collector.status.errno)")
            return
        case .outOfStep(let e):
            require(e > 0, "outOfStep(\(e))")
            return
        }
    }
}
