import Logging

/// Everything `up` was asked to do, already parsed and checked for form (but not yet against the system).
public struct NodeConfig: Sendable {
    /// Where the network and this node's subnet come from (`PeerSource`).
    public enum Source: Sendable {
        /// `--network` and `--subnet` (with `--port`).
        case fixed(network: IPv4Network, subnet: IPv4Network)
        /// flannel's etcd registry (`--etcd-endpoints`): the network and port from its config key, the subnet leased.
        case etcd(EtcdOptions)
    }

    public var source: Source
    public var device: String = FlannelDefault.device
    /// The underlay interface; nil means the interface of the default route.
    public var underlay: String?
    /// The address peers send to; nil means the underlay's first IPv4 address.
    public var publicIP: IPv4Address?
    public var port: UInt16 = FlannelDefault.port
    /// The tun MTU; nil means the underlay's MTU minus 28 (IPv4 + UDP headers).
    public var mtu: Int?
    /// Where to write flannel's subnet.env; nil to skip.
    public var subnetFile: String? = SubnetFile.defaultPath
    public var peersFile: String?
    /// Install flanneld's masquerade and forward rules (and promise them in subnet.env's FLANNEL_IPMASQ).
    public var ipMasq = false
    /// Where the masquerade rules go: nftables (flanneld's default) or iptables.
    public var masqBackend: MasqueradeBackend = .nftables
    /// How often the masquerade rules are checked and put back (flanneld's --iptables-resync).
    public var masqResyncSeconds: Double = 5
    public var peerCheck: PeerCheck = .strict
    /// Kernel offloads (TUN TSO with segmentation here, UDP GSO/GRO, TCP coalescing into the tun), each probed
    /// and left off when the kernel refuses it. false is the plain path, one packet per syscall entry.
    public var offloads = true
    /// The receive side's CoDel (`ReceiveCoDel`); `CoDelParameters.off` turns it off.
    public var codel = CoDelParameters()
    /// Worker pairs: tun queues, UDP sockets on the port (SO_REUSEPORT) and two threads per pair (`Workers`).
    public var workers = 1
    /// The express lane's length (`ForwarderOptions.express`): one more worker pair for packets of at most this
    /// many bytes; nil: none.
    public var express: Int? = ForwarderOptions.defaultExpressLength
    /// How long the express lane's thread keeps looking for more after a packet (`ForwarderOptions`).
    public var expressSpinMicroseconds = ForwarderOptions.defaultExpressSpinMicroseconds
    /// The express lane thread's realtime priority while the CPUs are busy (`ForwarderOptions`); 0: never.
    public var expressPriority = ForwarderOptions.defaultExpressPriority
    /// The tun queues, sockets and worker pairs the node runs: the workers and the express lane's.
    public var pairs: Int { workers + (express == nil ? 0 : 1) }

    public init(source: Source) {
        self.source = source
    }

    /// `--network` and `--subnet`.
    public init(network: IPv4Network, subnet: IPv4Network) {
        self.init(source: .fixed(network: network, subnet: subnet))
    }

    /// The peer source this config asks for (`PeerSource`).
    public func peerSource(logger: Logger) -> any PeerSource {
        switch source {
        case .fixed(let network, let subnet):
            return StaticPeerSource(Membership(network: network, subnet: subnet, port: port))
        case .etcd(let options):
            return EtcdPeerSource(options: options, logger: logger)
        }
    }

    /// IPv4 (20) + UDP (8): what the encapsulation costs on the underlay (see `WireFormat`).
    public static let encapsulationOverhead = WireFormat.overhead

    /// The tun's transmit queue: packets routed into the overlay wait there for the forwarder to read them, and the
    /// kernel drops (tx_dropped) what does not fit. The tun driver's default is 500 (flannel keeps it and loses
    /// packets there under load); 1000 is what Linux gives an Ethernet device: room for a couple of milliseconds of
    /// full-rate small packets while the forwarder thread waits for a CPU, without turning TSO super-packets
    /// (up to 64 KiB each) into a bufferbloat queue.
    public static let tunTxQueueLength = 1000

    /// Checks the parts that need no system access (with `--network`/`--subnet`, those too; a registry's are
    /// checked when it answers). Each message names the value and what is wrong with it.
    public func validate() -> String? {
        if case .fixed(let network, let subnet) = source,
           let problem = Membership(network: network, subnet: subnet, port: port).validate() {
            return problem
        }
        if let problem = TunDevice.validateName(device) { return "device: \(problem)" }
        if let underlay, let problem = TunDevice.validateName(underlay) { return "iface: \(problem)" }
        if let problem = NodeConfig.masqResyncProblem(masqResyncSeconds)
                         ?? express.flatMap(NodeConfig.expressSizeProblem) {
            return problem
        }
        if let problem = ForwarderOptions.expressSpinProblem(expressSpinMicroseconds)
                         ?? ForwarderOptions.expressPriorityProblem(expressPriority) {
            return problem
        }
        if let mtu, !(NodeConfig.mtuRange).contains(mtu) {
            return "mtu \(mtu) is outside \(NodeConfig.mtuRange.lowerBound)-\(NodeConfig.mtuRange.upperBound)"
        }
        return nil
    }

    /// IPv4 needs at least 68; the tun driver allows up to 65535, minus our 28 bytes of headers on the underlay.
    public static let mtuRange = 68...(65535 - encapsulationOverhead)
    /// An IPv4 header at least, and a length that fits the header's field.
    public static let expressRange = IPv4Header.minimumLength...Int(UInt16.max)

    /// nil when `seconds` is a valid `masqResyncSeconds`, else why not (named as the option, without its "--").
    public static func masqResyncProblem(_ seconds: Double) -> String? {
        seconds > 0 && seconds <= 3600 ? nil
            : "masq-resync \(seconds) is outside 0-3600 seconds (it must be more than 0)"
    }

    /// nil when `size` is a valid `express` length, else why not (named as the option, without its "--"; the
    /// option's 0 means no lane, `express == nil`, and is never checked here).
    public static func expressSizeProblem(_ size: Int) -> String? {
        expressRange.contains(size) ? nil
            : "express-size \(size) is outside \(expressRange.lowerBound)-\(expressRange.upperBound) bytes (0 turns the express lane off)"
    }
}
