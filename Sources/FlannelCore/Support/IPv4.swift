/// An IPv4 address, stored in host byte order so that masks and comparisons are plain integer operations.
public struct IPv4Address: Hashable, Comparable, Sendable, CustomStringConvertible {
    /// The address in host byte order (10.244.1.0 is 0x0AF4_0100).
    public var value: UInt32

    public init(_ value: UInt32) { self.value = value }

    public init(_ a: UInt8, _ b: UInt8, _ c: UInt8, _ d: UInt8) {
        value = UInt32(a) << 24 | UInt32(b) << 16 | UInt32(c) << 8 | UInt32(d)
    }

    /// Parses dotted-quad notation strictly: four decimal octets 0-255, no leading zeros (so "010.1.1.1" is rejected
    /// rather than silently read as octal or decimal), nothing else.
    public init?(_ text: Substring) {
        var octets = 0
        var current: UInt32 = 0
        var digits = 0
        var result: UInt32 = 0
        for ch in text.utf8 {
            if ch == UInt8(ascii: ".") {
                guard digits > 0, octets < 3 else { return nil }
                result = result << 8 | current
                octets += 1
                current = 0
                digits = 0
            } else if ch >= UInt8(ascii: "0") && ch <= UInt8(ascii: "9") {
                if digits > 0 && current == 0 { return nil }  // leading zero
                current = current * 10 + UInt32(ch - UInt8(ascii: "0"))
                digits += 1
                guard current <= 255, digits <= 3 else { return nil }
            } else {
                return nil
            }
        }
        guard octets == 3, digits > 0 else { return nil }
        value = result << 8 | current
    }

    public init?(_ text: String) { self.init(Substring(text)) }

    /// The address in network byte order, as it goes into a sockaddr_in or a netlink attribute.
    public var networkOrder: UInt32 { value.bigEndian }

    public init(networkOrder: UInt32) { value = UInt32(bigEndian: networkOrder) }

    public var octets: (UInt8, UInt8, UInt8, UInt8) {
        (UInt8(truncatingIfNeeded: value >> 24), UInt8(truncatingIfNeeded: value >> 16),
         UInt8(truncatingIfNeeded: value >> 8), UInt8(truncatingIfNeeded: value))
    }

    public var description: String {
        let o = octets
        return "\(o.0).\(o.1).\(o.2).\(o.3)"
    }

    public static func < (lhs: IPv4Address, rhs: IPv4Address) -> Bool { lhs.value < rhs.value }

    public static let any = IPv4Address(0)
}

/// An IPv4 prefix such as 10.244.0.0/16.
public struct IPv4Network: Hashable, Sendable, CustomStringConvertible {
    /// The address as given; for a network made with `init(parsing:)` in strict mode this has no host bits.
    public let address: IPv4Address
    public let prefixLength: Int

    /// Why a CIDR string was refused; the description is a sentence fragment that names the problem.
    public enum ParseError: Error, Equatable, CustomStringConvertible {
        case malformed(String)
        case badPrefix(String)
        case hostBitsSet(String, network: String)

        public var description: String {
            switch self {
            case .malformed(let t): return "'\(t)' is not an IPv4 CIDR (expected A.B.C.D/N)"
            case .badPrefix(let t): return "'\(t)' has a prefix length outside 0-32"
            case .hostBitsSet(let t, let n): return "'\(t)' has host bits set (did you mean \(n)?)"
            }
        }
    }

    /// Makes a network from an address and length, clearing host bits.
    public init(address: IPv4Address, prefixLength: Int) {
        precondition((0...32).contains(prefixLength), "prefix length \(prefixLength) out of range")
        self.prefixLength = prefixLength
        self.address = IPv4Address(address.value & IPv4Network.mask(prefixLength))
    }

    /// Parses "A.B.C.D/N". With `strict` (the default, for anything that names a network) host bits must be clear.
    public init(parsing text: String, strict: Bool = true) throws(ParseError) {
        let parts = text.split(separator: "/", maxSplits: 1, omittingEmptySubsequences: false)
        guard parts.count == 2, let addr = IPv4Address(parts[0]) else { throw .malformed(text) }
        guard !parts[1].isEmpty, parts[1].utf8.count <= 2, parts[1].allSatisfy({ $0.isASCII && $0.isNumber }),
              let len = Int(parts[1]), (0...32).contains(len), !(parts[1].count == 2 && parts[1].first == "0")
        else { throw .badPrefix(text) }
        let net = IPv4Network(address: addr, prefixLength: len)
        if strict && net.address != addr { throw .hostBitsSet(text, network: net.description) }
        self = net
    }

    @inlinable
    public static func mask(_ prefixLength: Int) -> UInt32 {
        prefixLength == 0 ? 0 : UInt32.max << UInt32(32 - prefixLength)
    }

    public var mask: UInt32 { IPv4Network.mask(prefixLength) }

    @inlinable
    public func contains(_ ip: IPv4Address) -> Bool {
        ip.value & IPv4Network.mask(prefixLength) == address.value
    }

    /// True when `other` lies entirely inside this network (equal counts).
    public func contains(_ other: IPv4Network) -> Bool {
        other.prefixLength >= prefixLength && contains(other.address)
    }

    public func overlaps(_ other: IPv4Network) -> Bool {
        contains(other.address) || other.contains(address)
    }

    /// The first usable host address (network + 1), which flannel puts in FLANNEL_SUBNET. For a /32 or /31 it is
    /// the address itself.
    public var firstHost: IPv4Address {
        prefixLength >= 31 ? address : IPv4Address(address.value &+ 1)
    }

    public var broadcast: IPv4Address { IPv4Address(address.value | ~mask) }

    public var description: String { "\(address)/\(prefixLength)" }
}

/// A UDP endpoint: IPv4 address and port.
public struct Endpoint: Hashable, Sendable, CustomStringConvertible {
    public var address: IPv4Address
    public var port: UInt16

    public init(address: IPv4Address, port: UInt16) {
        self.address = address
        self.port = port
    }

    public enum ParseError: Error, Equatable, CustomStringConvertible {
        case malformed(String)
        case badPort(String)
        public var description: String {
            switch self {
            case .malformed(let t): return "'\(t)' is not an IPv4 address with an optional port (A.B.C.D[:PORT])"
            case .badPort(let t): return "'\(t)' has a port outside 1-65535"
            }
        }
    }

    /// Parses "A.B.C.D" or "A.B.C.D:PORT"; the port defaults to `defaultPort`.
    public init(parsing text: String, defaultPort: UInt16) throws(ParseError) {
        let parts = text.split(separator: ":", maxSplits: 1, omittingEmptySubsequences: false)
        guard let addr = IPv4Address(parts[0]) else { throw .malformed(text) }
        var port = defaultPort
        if parts.count == 2 {
            guard let p = UInt16(parts[1]), p != 0, parts[1].allSatisfy({ $0.isASCII && $0.isNumber }) else {
                throw .badPort(text)
            }
            port = p
        }
        self.init(address: addr, port: port)
    }

    public var description: String { "\(address):\(port)" }
}
