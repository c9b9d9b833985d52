import Foundation

/// flannel's network configuration, as stored in etcd under `<prefix>/config`, e.g.
///
///     {"Network": "10.244.0.0/16", "SubnetLen": 24, "Backend": {"Type": "udp", "Port": 8285}}
///
/// Parsing and defaults follow flannel (`pkg/subnet/config.go`): keys match case-insensitively like Go's
/// encoding/json, unknown keys are ignored, `SubnetLen` defaults to 24 when the network is a /22 or larger and to
/// the network's prefix + 2 otherwise, `SubnetMin` defaults to the second subnet (the first would put a node's
/// address on the network address), `SubnetMax` to the last one. IPv6 settings are accepted and ignored: the udp
/// backend is IPv4 only.
public struct NetworkConfig: Sendable, Equatable, CustomStringConvertible {
    /// The whole overlay network (`Network`).
    public var network: IPv4Network
    /// The prefix length of each node's subnet (`SubnetLen`).
    public var subnetLength: Int
    /// The lowest and highest subnet addresses a node may lease (`SubnetMin`, `SubnetMax`), both aligned to
    /// `subnetLength`.
    public var subnetMin: IPv4Address
    public var subnetMax: IPv4Address
    /// `Backend.Type`; always "udp" once parsed (anything else is refused).
    public var backendType: String
    /// `Backend.Port`: the UDP port every node of the network listens on (default 8285).
    public var port: UInt16

    public var description: String {
        "Network \(network), SubnetLen \(subnetLength), SubnetMin \(subnetMin), SubnetMax \(subnetMax), "
            + "Backend \(backendType) port \(port)"
    }

    /// The number of addresses in one node subnet.
    public var subnetSize: UInt64 { UInt64(1) << UInt64(32 - subnetLength) }

    /// True when `subnet` could have been leased under this configuration: right length, between SubnetMin and
    /// SubnetMax. A lease that fails this (after the network was reconfigured, say) is not reused.
    public func admits(_ subnet: IPv4Network) -> Bool {
        subnet.prefixLength == subnetLength && subnet.address >= subnetMin && subnet.address <= subnetMax
    }
}

/// Why a flannel config was refused: one line that names the setting and the value.
public struct NetworkConfigError: Error, Equatable, CustomStringConvertible, Sendable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

extension NetworkConfig {
    /// Parses and validates a flannel config document (the value of `<prefix>/config`).
    public init(json text: String) throws(NetworkConfigError) {
        try self.init(json: Data(text.utf8))
    }

    public init(json data: Data) throws(NetworkConfigError) {
        let root: JSONValue
        do {
            root = try JSONDecoder().decode(JSONValue.self, from: data)
        } catch {
            let preview = String(decoding: data.prefix(60), as: UTF8.self)
            throw NetworkConfigError("flannel config is not valid JSON: '\(preview)'")
        }
        guard case .object(let object) = root else {
            throw NetworkConfigError("flannel config must be a JSON object, e.g. {\"Network\": \"10.244.0.0/16\"}")
        }
        let doc = GoJSONObject(object)

        // IPv4 is on unless EnableIPv4 says otherwise; the udp backend has nothing to offer without it.
        if let enabled = try doc.bool("EnableIPv4"), !enabled {
            throw NetworkConfigError("flannel config sets EnableIPv4 to false: the udp backend carries IPv4 only")
        }

        guard let networkText = try doc.string("Network"), !networkText.isEmpty else {
            throw NetworkConfigError(
                "flannel config has no Network: add e.g. \"Network\": \"10.244.0.0/16\"")
        }
        // Like Go's net.ParseCIDR, host bits are cleared rather than refused ("10.244.1.0/16" is 10.244.0.0/16).
        let network: IPv4Network
        do {
            network = try IPv4Network(parsing: networkText, strict: false)
        } catch {
            throw NetworkConfigError("flannel config Network \(error)")
        }

        var subnetLength = 0
        if let len = try doc.unsigned("SubnetLen") {
            subnetLength = len > 1024 ? 1024 : Int(len)  // anything this long is refused below
        }
        if subnetLength > 0 {
            // Each subnet needs room for the tun address and at least one pod.
            guard subnetLength <= 30 else {
                throw NetworkConfigError("flannel config SubnetLen \(subnetLength) is too long: it must be 30 or less")
            }
            // The first subnet is never handed out, so the network has to hold at least four.
            guard subnetLength >= network.prefixLength + 2 else {
                throw NetworkConfigError(
                    "flannel config SubnetLen \(subnetLength) leaves Network \(network) fewer than four subnets "
                        + "(use \(network.prefixLength + 2) or more)")
            }
        } else if network.prefixLength > 28 {
            throw NetworkConfigError(
                "flannel config Network \(network) is too small: the smallest useful network is a /28")
        } else if network.prefixLength <= 22 {
            subnetLength = 24
        } else {
            subnetLength = network.prefixLength + 2
        }

        let subnetSize = UInt64(1) << UInt64(32 - subnetLength)
        let networkEnd = UInt64(network.address.value) + (UInt64(1) << UInt64(32 - network.prefixLength))

        /// SubnetMin or SubnetMax: an address inside the network, `fallback` when absent or empty.
        func bound(_ key: String, fallback: IPv4Address) throws(NetworkConfigError) -> IPv4Address {
            guard let text = try doc.string(key), !text.isEmpty else { return fallback }
            guard let ip = IPv4Address(text) else {
                throw NetworkConfigError("flannel config \(key) '\(text)' is not an IPv4 address")
            }
            guard network.contains(ip) else {
                throw NetworkConfigError("flannel config \(key) \(ip) is not inside Network \(network)")
            }
            return ip
        }
        let subnetMin = try bound("SubnetMin",
                                  fallback: IPv4Address(UInt32(UInt64(network.address.value) + subnetSize)))
        let subnetMax = try bound("SubnetMax", fallback: IPv4Address(UInt32(networkEnd - subnetSize)))
        let mask = IPv4Network.mask(subnetLength)
        for (key, address) in [("SubnetMin", subnetMin), ("SubnetMax", subnetMax)]
        where address.value & mask != address.value {
            throw NetworkConfigError(
                "flannel config \(key) \(address) is not on a /\(subnetLength) boundary (SubnetLen)")
        }
        guard subnetMin <= subnetMax else {
            throw NetworkConfigError("flannel config SubnetMin \(subnetMin) is above SubnetMax \(subnetMax)")
        }

        // Backend: absent means udp (flannel's default); a Backend object without Type is read the same way.
        var backendType = "udp"
        var port = FlannelDefault.port
        if let backend = try doc.object("Backend") {
            if let type = try backend.string("Type"), !type.isEmpty {
                guard type == "udp" else {
                    throw NetworkConfigError(
                        "flannel config Backend.Type '\(type)' is not supported: flannel-udp implements only the "
                            + "udp backend")
                }
                backendType = type
            }
            if let p = try backend.integer("Port") {
                guard (1...65535).contains(p) else {
                    throw NetworkConfigError("flannel config Backend.Port \(p) is outside 1-65535")
                }
                port = UInt16(p)
            }
        }

        self.init(network: network, subnetLength: subnetLength, subnetMin: subnetMin, subnetMax: subnetMax,
                  backendType: backendType, port: port)
    }
}

/// A JSON object looked up the way Go's encoding/json fills a struct: an exact key first, then any key that
/// matches case-insensitively; null reads as absent. Type mismatches are errors that name the key.
package struct GoJSONObject {
    package let fields: [String: JSONValue]
    package let path: String

    package init(_ fields: [String: JSONValue], path: String = "") {
        self.fields = fields
        self.path = path
    }

    package func value(_ key: String) -> JSONValue? {
        if let v = fields[key] { return v == .null ? nil : v }
        let lower = key.lowercased()
        for (k, v) in fields where k.lowercased() == lower { return v == .null ? nil : v }
        return nil
    }

    private func name(_ key: String) -> String { path.isEmpty ? key : "\(path).\(key)" }

    package func string(_ key: String) throws(NetworkConfigError) -> String? {
        guard let v = value(key) else { return nil }
        guard case .string(let s) = v else {
            throw NetworkConfigError("flannel config \(name(key)) must be a string, not \(v)")
        }
        return s
    }

    package func bool(_ key: String) throws(NetworkConfigError) -> Bool? {
        guard let v = value(key) else { return nil }
        guard case .bool(let b) = v else {
            throw NetworkConfigError("flannel config \(name(key)) must be true or false, not \(v)")
        }
        return b
    }

    package func integer(_ key: String) throws(NetworkConfigError) -> Int? {
        guard let v = value(key) else { return nil }
        guard case .number(let d) = v, let i = Int(exactly: d) else {
            throw NetworkConfigError("flannel config \(name(key)) must be an integer, not \(v)")
        }
        return i
    }

    package func unsigned(_ key: String) throws(NetworkConfigError) -> UInt? {
        guard let i = try integer(key) else { return nil }
        guard i >= 0 else {
            throw NetworkConfigError("flannel config \(name(key)) must not be negative, not \(i)")
        }
        return UInt(i)
    }

    package func object(_ key: String) throws(NetworkConfigError) -> GoJSONObject? {
        guard let v = value(key) else { return nil }
        guard case .object(let o) = v else {
            throw NetworkConfigError("flannel config \(name(key)) must be an object, not \(v)")
        }
        return GoJSONObject(o, path: name(key))
    }
}
