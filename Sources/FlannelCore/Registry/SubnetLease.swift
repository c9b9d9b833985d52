import Foundation

/// The value flannel stores for each lease (`LeaseAttrs` in flannel's `pkg/lease`), e.g. for a udp node:
///
///     {"PublicIP":"192.168.1.2","PublicIPv6":null}
///
/// flannel's udp backend fills in only PublicIP; Go writes the fields in declaration order, PublicIPv6 always
/// (a nil pointer is `null`), and BackendType, BackendData and BackendV6Data only when set. Values written by
/// flannel before IPv6 support have no PublicIPv6; values written by other backends carry a BackendType and
/// BackendData (vxlan's `{"VNI":1,"VtepMAC":"..."}`), which are kept but not interpreted.
public struct LeaseAttributes: Sendable, Hashable {
    public var publicIP: IPv4Address
    /// PublicIPv6 as written (an IPv6 address), or nil for `null`/absent. Not used by the udp backend.
    public var publicIPv6: String?
    public var backendType: String?
    public var backendData: JSONValue?
    public var backendV6Data: JSONValue?

    public init(publicIP: IPv4Address, publicIPv6: String? = nil, backendType: String? = nil,
                backendData: JSONValue? = nil, backendV6Data: JSONValue? = nil) {
        self.publicIP = publicIP
        self.publicIPv6 = publicIPv6
        self.backendType = backendType
        self.backendData = backendData
        self.backendV6Data = backendV6Data
    }

    /// Why a lease value could not be read.
    public struct DecodeError: Error, Equatable, CustomStringConvertible, Sendable {
        public let message: String
        public var description: String { message }
    }

    /// Reads a lease value. Key names match case-insensitively (as Go's encoding/json does); PublicIP must be an
    /// IPv4 address, since a lease without one gives no endpoint to send to.
    public init(json data: Data) throws(DecodeError) {
        let preview = String(decoding: data.prefix(80), as: UTF8.self)
        guard let root = try? JSONDecoder().decode(JSONValue.self, from: data),
              case .object(let fields) = root
        else { throw DecodeError(message: "lease value is not a JSON object: '\(preview)'") }
        let doc = GoJSONObject(fields)
        guard case .string(let ipText)? = doc.value("PublicIP") else {
            throw DecodeError(message: "lease value has no PublicIP string: '\(preview)'")
        }
        guard let ip = IPv4Address(ipText) else {
            throw DecodeError(message: "lease PublicIP '\(ipText)' is not an IPv4 address")
        }
        publicIP = ip
        if case .string(let v6)? = doc.value("PublicIPv6") { publicIPv6 = v6 } else { publicIPv6 = nil }
        if case .string(let type)? = doc.value("BackendType") { backendType = type } else { backendType = nil }
        backendData = doc.value("BackendData")
        backendV6Data = doc.value("BackendV6Data")
    }

    public init(json text: String) throws(DecodeError) {
        try self.init(json: Data(text.utf8))
    }

    /// The value as flannel's Go code would marshal it: same field order, same omissions.
    public var json: String {
        var out = "{\"PublicIP\":\"\(publicIP)\",\"PublicIPv6\":"
        out += publicIPv6.map { "\"\(Self.escape($0))\"" } ?? "null"
        if let t = backendType, !t.isEmpty { out += ",\"BackendType\":\"\(Self.escape(t))\"" }
        if let d = backendData, d != .null { out += ",\"BackendData\":\(d.jsonText)" }
        if let d = backendV6Data, d != .null { out += ",\"BackendV6Data\":\(d.jsonText)" }
        return out + "}"
    }

    /// The attributes flannel's udp backend writes for a node: only its public address.
    public static func udp(publicIP: IPv4Address) -> LeaseAttributes { LeaseAttributes(publicIP: publicIP) }

    private static func escape(_ s: String) -> String {
        guard let data = try? JSONFormat.encoder().encode(s) else { return "" }
        return String(decoding: data.dropFirst().dropLast(), as: UTF8.self)
    }
}

/// flannel's etcd key names for leases: `<prefix>/subnets/10.244.1.0-24` for the subnet 10.244.1.0/24. A
/// dual-stack lease appends `&<ipv6>-<len>`; the IPv4 part is all the udp backend reads.
public enum SubnetKey {
    /// The last path element for `subnet`: "10.244.1.0-24".
    public static func name(for subnet: IPv4Network) -> String {
        "\(subnet.address)-\(subnet.prefixLength)"
    }

    /// The full key: "<prefix>/subnets/10.244.1.0-24".
    public static func key(prefix: String, subnet: IPv4Network) -> String {
        "\(prefix)/subnets/\(name(for: subnet))"
    }

    /// Reads the subnet from a key or its last element ("/coreos.com/network/subnets/10.244.1.0-24",
    /// "10.244.1.0-24", "10.244.1.0-24&fc00::-64"). Returns nil for anything else, including a subnet whose
    /// address has host bits set, which no flannel node writes.
    public static func parse(_ key: String) -> IPv4Network? {
        var name = Substring(key)
        if let slash = name.lastIndex(of: "/") { name = name[name.index(after: slash)...] }
        if let amp = name.firstIndex(of: "&") { name = name[..<amp] }
        guard let dash = name.lastIndex(of: "-"), let ip = IPv4Address(name[..<dash]) else { return nil }
        let lenText = name[name.index(after: dash)...]
        guard !lenText.isEmpty, lenText.count <= 2, lenText.allSatisfy({ $0.isASCII && $0.isNumber }),
              let len = Int(lenText), (0...32).contains(len)
        else { return nil }
        let subnet = IPv4Network(address: ip, prefixLength: len)
        return subnet.address == ip ? subnet : nil
    }
}

/// This node's lease as acquired from the registry.
public struct SubnetLease: Sendable, Equatable, CustomStringConvertible {
    /// The node's subnet, e.g. 10.244.1.0/24.
    public var subnet: IPv4Network
    /// What is stored under the subnet's key.
    public var attributes: LeaseAttributes
    /// When etcd drops the key unless the lease is renewed.
    public var expiration: Date
    /// The etcd lease the key is attached to; 0 for a reservation (a key put without a lease, which never
    /// expires; its `expiration` is `Date.distantFuture`).
    public var etcdLeaseID: Int64

    public init(subnet: IPv4Network, attributes: LeaseAttributes, expiration: Date, etcdLeaseID: Int64) {
        self.subnet = subnet
        self.attributes = attributes
        self.expiration = expiration
        self.etcdLeaseID = etcdLeaseID
    }

    public var description: String {
        "\(subnet) for \(attributes.publicIP) (etcd lease \(String(etcdLeaseID, radix: 16)), expires \(expiration))"
    }
}
