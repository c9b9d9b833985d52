/// Everything `up` was asked to do, already parsed and checked for form (but not yet against the system).
public struct NodeConfig: Sendable {
    public var network: IPv4Network
    public var subnet: IPv4Network
    public var device: String = "flannel0"
    /// The underlay interface; nil means the interface of the default route.
    public var underlay: String?
    /// The address peers send to; nil means the underlay's first IPv4 address.
    public var publicIP: IPv4Address?
    public var port: UInt16 = defaultFlannelPort
    /// The tun MTU; nil means the underlay's MTU minus 28 (IPv4 + UDP headers).
    public var mtu: Int?
    /// Where to write flannel's subnet.env; nil to skip.
    public var subnetFile: String? = SubnetFile.defaultPath
    public var peersFile: String?
    public var ipMasq = false
    public var peerCheck: PeerCheck = .strict

    public init(network: IPv4Network, subnet: IPv4Network) {
        self.network = network
        self.subnet = subnet
    }

    /// IPv4 (20) + UDP (8): what the encapsulation costs on the underlay.
    public static let encapsulationOverhead = 28

    /// The tun device's address: the subnet's network address as a /32 (10.244.1.0/24 -> 10.244.1.0/32).
    public var tunAddress: IPv4Address { subnet.address }

    /// Checks the parts that need no system access. Each message names the value and what is wrong with it.
    public func validate() -> String? {
        if !network.contains(subnet) || subnet.prefixLength <= network.prefixLength {
            return "subnet \(subnet) is not inside network \(network)"
        }
        if network.prefixLength > 30 { return "network \(network) is too small for an overlay (at most /30)" }
        if let problem = TunDevice.validateName(device) { return "device: \(problem)" }
        if let underlay, let problem = TunDevice.validateName(underlay) { return "iface: \(problem)" }
        if port == 0 { return "port 0 is not a valid UDP port (1-65535)" }
        if let mtu, !(NodeConfig.mtuRange).contains(mtu) {
            return "mtu \(mtu) is outside \(NodeConfig.mtuRange.lowerBound)-\(NodeConfig.mtuRange.upperBound)"
        }
        return nil
    }

    /// IPv4 needs at least 68; the tun driver allows up to 65535, minus our 28 bytes of headers on the underlay.
    public static let mtuRange = 68...(65535 - encapsulationOverhead)
}
