/// How strictly the UDP -> tun direction checks who sent a datagram.
public enum PeerCheck: String, Codable, Sendable, CaseIterable {
    /// The datagram's source address must be the endpoint address of the peer whose subnet contains the inner
    /// packet's source (the port is not checked: a peer's socket may send from another port behind some NATs).
    case strict
    /// For peers behind NAT, whose datagrams arrive from an address other than the one they registered: any
    /// outer source is accepted as long as the inner source lies in some peer's subnet.
    case relaxed
}

/// What the per-packet decisions need to know about this node.
public struct ForwardingConfig: Equatable, Sendable {
    /// The whole overlay network (10.244.0.0/16).
    public var network: IPv4Network
    /// This node's subnet (10.244.1.0/24).
    public var subnet: IPv4Network
    /// The address of the tun device: the subnet's network address (10.244.1.0). Source of the time-exceeded
    /// errors sent back to a peer over UDP.
    public var tunAddress: IPv4Address
    /// Source of the ICMP errors written into the local tun. It must not be an address of this node, or the
    /// kernel drops the error as a martian; see `defaultICMPSource`.
    public var icmpSource: IPv4Address
    public var peerCheck: PeerCheck
    /// Longest packet forwarded; longer ones are dropped as `oversize`. 65535 accepts every IPv4 packet.
    public var maxPacketLength: Int

    public init(network: IPv4Network, subnet: IPv4Network, peerCheck: PeerCheck = .strict,
                icmpSource: IPv4Address? = nil, maxPacketLength: Int = 65535) {
        self.network = network
        self.subnet = subnet
        tunAddress = subnet.address
        self.icmpSource = icmpSource ?? ForwardingConfig.defaultICMPSource(network: network, subnet: subnet)
        self.peerCheck = peerCheck
        self.maxPacketLength = maxPacketLength
    }

    /// The overlay network's own address (10.244.0.0 for 10.244.0.0/16), unless that lies inside this node's
    /// subnet (the node that leased 10.244.0.0/24), in which case the overlay's last address (10.244.255.255).
    /// Either way it is not an address of this node and is routed via the tun, so the kernel's martian and
    /// reverse-path checks let the error through to the pod. (flannel uses the tun's own /32, a local address,
    /// and every such error is dropped by the kernel.)
    public static func defaultICMPSource(network: IPv4Network, subnet: IPv4Network) -> IPv4Address {
        subnet.contains(network.address) ? network.broadcast : network.address
    }
}

/// The decision for a packet read from the tun.
public enum TunVerdict: Equatable, Sendable {
    /// Send `length` bytes of the packet (TTL already decremented in place) to `peers[peer]`.
    case forward(peer: Int, length: Int)
    /// Drop the packet for `reason`, and write the `length`-byte ICMP error built in the scratch buffer into
    /// the tun.
    case icmpToTun(length: Int, reason: DropReason)
    /// Drop the packet; `icmpRateLimited` when an ICMP error was due but the rate limit suppressed it.
    case drop(DropReason, icmpRateLimited: Bool = false)
}

/// The decision for a datagram received from the underlay.
public enum UDPVerdict: Equatable, Sendable {
    /// Write `length` bytes of the packet (TTL already decremented in place) into the tun; it came from
    /// `peers[peer]`.
    case deliver(peer: Int, length: Int)
    /// Drop the packet for `reason` and send the `length`-byte ICMP error in the scratch buffer back to
    /// `peers[peer]` over UDP.
    case icmpToPeer(length: Int, peer: Int, reason: DropReason)
    case drop(DropReason, icmpRateLimited: Bool = false)
}

/// The per-packet forwarding decisions of one worker: pure functions of the packet, the route snapshot and the
/// configuration, plus the worker's ICMP rate limiter and identification counter. No system calls (other than
/// the rate limiter's clock read, via vDSO, when an ICMP error is due), no allocation, no locks.
public struct PacketDecider: Sendable {
    public let config: ForwardingConfig
    public var rateLimiter: ICMPRateLimiter
    /// Identification of the next generated ICMP error.
    public var nextICMPIdentification: UInt16 = 0

    public init(config: ForwardingConfig, rateLimiter: ICMPRateLimiter = ICMPRateLimiter()) {
        self.config = config
        self.rateLimiter = rateLimiter
    }

    /// tun -> UDP: validate, find the peer by longest prefix, decrement the TTL; net unreachable or time
    /// exceeded into `scratch` (at least 576 bytes) when that is not possible.
    public mutating func fromTun(_ packet: UnsafeMutableRawBufferPointer, snapshot: RouteSnapshot,
                                 scratch: UnsafeMutableRawBufferPointer) -> TunVerdict {
        let bytes = UnsafeRawBufferPointer(packet)
        let ip: IPv4Packet
        switch admit(bytes) {
        case .valid(let p): ip = p
        case .invalid(let reason): return .drop(reason)
        }
        guard let peer = snapshot.lookup(ip.destination) else {
            return icmpToTun(.netUnreachable, ip, bytes, scratch: scratch, reason: .noRoute)
        }
        guard IPv4Header.decrementTTL(packet) else {
            return icmpToTun(.timeExceeded, ip, bytes, scratch: scratch, reason: .ttlExpired)
        }
        return .forward(peer: peer, length: ip.totalLength)
    }

    /// UDP -> tun: validate, check that the inner destination lies inside the overlay network and that
    /// `outerSource` (the datagram's source address) may send this packet, decrement the TTL; time exceeded back to the peer when the TTL runs out.
    public mutating func fromUDP(_ packet: UnsafeMutableRawBufferPointer, outerSource: IPv4Address,
                                 snapshot: RouteSnapshot, scratch: UnsafeMutableRawBufferPointer) -> UDPVerdict {
        let bytes = UnsafeRawBufferPointer(packet)
        let ip: IPv4Packet
        switch admit(bytes) {
        case .valid(let p): ip = p
        case .invalid(let reason): return .drop(reason)
        }
        // Peers reach pods, nothing else: a packet for the node's underlay, a host beyond it or the internet would
        // be accepted or forwarded by this node's kernel as if one of our pods had sent it. Checked before the
        // sender, so every such packet is counted here whoever sent it. (The tun's own address lies inside the
        // network and stays reachable.)
        if !config.network.contains(ip.destination) { return .drop(.outsideNetwork) }
        // No peer may send from inside this node's own subnet, even through a covering route (10.244.0.0/16 via
        // a gateway node; PeerRouteRules refuses one, but the table is not the only line of defence): such a
        // packet would appear to come from one of our own pods.
        if config.subnet.contains(ip.source) {
            return .drop(snapshot.isPeerAddress(outerSource) ? .spoofedSource : .unknownPeer)
        }
        let owner = snapshot.lookup(ip.source)
        let accepted: Int?
        switch config.peerCheck {
        case .strict:
            if let p = owner, snapshot.peers[p].route.endpoint.address == outerSource {
                accepted = p
            } else {
                accepted = nil
            }
        case .relaxed:
            accepted = owner
        }
        guard let peer = accepted else {
            return .drop(snapshot.isPeerAddress(outerSource) ? .spoofedSource : .unknownPeer)
        }
        guard IPv4Header.decrementTTL(packet) else {
            guard ICMPError.mayReport(ip, bytes) else { return .drop(.ttlExpired) }
            guard rateLimiter.allow() else { return .drop(.ttlExpired, icmpRateLimited: true) }
            let n = ICMPError.timeExceeded.build(about: ip, bytes, source: config.tunAddress,
                                                 identification: takeIdentification(), into: scratch)
            return n > 0 ? .icmpToPeer(length: n, peer: peer, reason: .ttlExpired) : .drop(.ttlExpired)
        }
        return .deliver(peer: peer, length: ip.totalLength)
    }

    /// What both directions accept: a valid IPv4 packet no longer than `maxPacketLength`.
    @inline(__always)
    private func admit(_ bytes: UnsafeRawBufferPointer) -> IPv4Packet.Parse {
        let parse = IPv4Packet.parse(bytes)
        if case .valid(let ip) = parse, ip.totalLength > config.maxPacketLength { return .invalid(.oversize) }
        return parse
    }

    private mutating func icmpToTun(_ error: ICMPError, _ ip: IPv4Packet, _ bytes: UnsafeRawBufferPointer,
                                    scratch: UnsafeMutableRawBufferPointer, reason: DropReason) -> TunVerdict {
        guard ICMPError.mayReport(ip, bytes) else { return .drop(reason) }
        guard rateLimiter.allow() else { return .drop(reason, icmpRateLimited: true) }
        let n = error.build(about: ip, bytes, source: config.icmpSource, identification: takeIdentification(),
                            into: scratch)
        return n > 0 ? .icmpToTun(length: n, reason: reason) : .drop(reason)
    }

    private mutating func takeIdentification() -> UInt16 {
        defer { nextICMPIdentification &+= 1 }
        return nextICMPIdentification
    }
}
