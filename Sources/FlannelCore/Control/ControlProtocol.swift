import Foundation

/// The control endpoint's protocol: one JSON request per connection, terminated by a newline, answered by one
/// JSON response, after which the daemon closes the connection. Requests are at most `maxRequestBytes`; anything
/// longer, slower than `requestTimeout`, or not valid JSON gets an error response and changes nothing.
public enum ControlProtocol {
    public static let maxRequestBytes = 64 * 1024
    public static let requestTimeoutSeconds = 2
}

public enum ControlRequest: Codable, Equatable, Sendable {
    case status
    case routeAdd(subnet: String, endpoint: String)
    case routeDel(subnet: String)
    case routeList
    case reloadPeers
    /// Stop the daemon; with `keepLease` an etcd lease is left in the registry (it expires by itself).
    case shutdown(keepLease: Bool)
}

/// `up --replace`: the replacing daemon's requests to the running one, which answers them knowing the client's
/// pid (Node/Handover.swift). On the wire they are requests like the others: `{"handoverBegin":{"version":1}}`.
public enum HandoverRequest: Codable, Equatable, Sendable {
    /// Pause self-healing and answer with what the replacing daemon needs (`.handover`).
    case begin(version: Int)
    /// The replacing daemon forwards: let go of the data plane and exit without tearing anything down.
    case commit(token: String)
    /// The replacing daemon gave up: carry on as before.
    case abort(token: String)

    enum CodingKeys: String, CodingKey {
        case begin = "handoverBegin", commit = "handoverCommit", abort = "handoverAbort"
    }
}

/// One request line as the control endpoint reads it: an ordinary request, or a handover's. A line that reads as
/// neither, or as both (a key of each), is malformed.
public enum ControlMessage: Codable, Equatable, Sendable {
    case request(ControlRequest)
    case handover(HandoverRequest)

    public init(from decoder: Decoder) throws {
        switch (try? ControlRequest(from: decoder), try? HandoverRequest(from: decoder)) {
        case (let request?, nil): self = .request(request)
        case (nil, let handover?): self = .handover(handover)
        default:
            throw DecodingError.dataCorrupted(DecodingError.Context(
                codingPath: decoder.codingPath, debugDescription: "not exactly one known request"))
        }
    }

    public func encode(to encoder: Encoder) throws {
        switch self {
        case .request(let request): try request.encode(to: encoder)
        case .handover(let handover): try handover.encode(to: encoder)
        }
    }
}

/// One route as the daemon reports it.
public struct RouteInfo: Codable, Equatable, Sendable {
    public var subnet: String
    public var endpoint: String
    public var origin: String
    public var txPackets: UInt64
    public var txBytes: UInt64
    public var rxPackets: UInt64
    public var rxBytes: UInt64

    public init(subnet: String, endpoint: String, origin: String, txPackets: UInt64 = 0, txBytes: UInt64 = 0,
                rxPackets: UInt64 = 0, rxBytes: UInt64 = 0) {
        self.subnet = subnet
        self.endpoint = endpoint
        self.origin = origin
        self.txPackets = txPackets
        self.txBytes = txBytes
        self.rxPackets = rxPackets
        self.rxBytes = rxBytes
    }
}

/// What the daemon says about itself in answer to `status`.
public struct DaemonStatus: Codable, Equatable, Sendable {
    public var pid: Int32
    public var version: String
    public var startedAt: Date
    public var uptimeSeconds: Double
    public var device: String
    public var network: String
    public var subnet: String
    public var mtu: Int
    public var listen: String
    public var publicIP: String
    public var underlay: String
    public var subnetFile: String?
    public var peersFile: String?
    public var peerCheck: String
    public var routes: [RouteInfo]
    /// Per-direction packets and bytes, ICMP sent, and drops by reason ("noRoute", "unknownPeer", ...).
    public var counters: DataPlaneCountersSnapshot
    /// Offloads in use ("batching", "tso", "gso", "gro").
    public var offloads: [String]
    /// The registry lease, when running against etcd.
    public var lease: LeaseInfo?
    /// What the offloads did: super-packets segmented and coalesced, GRO buffers, largest datagram received.
    public var offloadStatistics: OffloadStatistics?
    /// Packets each worker pair moved (pair k: tun queue k and socket k). Absent from daemons that predate it.
    public var workers: [WorkerCounts]?
    /// The express lane thread's realtime priority and what it did with it; absent when it has none.
    public var expressPriority: ExpressPriorityCounts?
    /// The express lane's spin and what it took; absent with no lane, and from daemons that predate it.
    public var expressSpin: ExpressSpinCounts?
    /// The masquerade rules with --ip-masq: where they are, whether they are in place, how often they were restored.
    public var masquerade: MasqueradeStatus?
    /// Self-healing: how often the overlay route, the address, the link's up state and the MTU were put back.
    public var repairs: RepairStatus?
    /// Where the daemon's life stands. Absent from daemons that predate it.
    public var phase: DaemonPhase?

    public init(pid: Int32, version: String, startedAt: Date, uptimeSeconds: Double, device: String, network: String,
                subnet: String, mtu: Int, listen: String, publicIP: String, underlay: String, subnetFile: String?,
                peersFile: String?, peerCheck: String, routes: [RouteInfo], counters: DataPlaneCountersSnapshot, offloads: [String], lease: LeaseInfo?) {
        self.pid = pid
        self.version = version
        self.startedAt = startedAt
        self.uptimeSeconds = uptimeSeconds
        self.device = device
        self.network = network
        self.subnet = subnet
        self.mtu = mtu
        self.listen = listen
        self.publicIP = publicIP
        self.underlay = underlay
        self.subnetFile = subnetFile
        self.peersFile = peersFile
        self.peerCheck = peerCheck
        self.routes = routes
        self.counters = counters
        self.offloads = offloads
        self.lease = lease
    }
}

/// Where a daemon's life stands, as `status` reports it (`phase`, its raw value in JSON).
///
/// A phase this version does not know (one a later daemon reports) decodes as `other`, with its string, rather
/// than failing the whole status: a CLI older than its daemon still shows everything else, and the phase as it
/// came (as `ExpressSpinCounts` tolerates counts that an older daemon lacks).
public enum DaemonPhase: RawRepresentable, Codable, Equatable, Sendable {
    /// Start-up runs: etcd may still be unreachable; only pid, device and uptime are filled in.
    case starting
    case running
    /// An `up --replace` takes the node over: self-healing and the peer watch paused, still forwarding.
    case handingOver
    /// The moment before the daemon exits, its node handed over.
    case handedOver
    /// A phase unknown to this version, as the daemon wrote it. Never one of the strings above.
    case other(String)

    public init(rawValue: String) {
        switch rawValue {
        case "starting": self = .starting
        case "running": self = .running
        case "handing over": self = .handingOver
        case "handed over": self = .handedOver
        default: self = .other(rawValue)
        }
    }

    public var rawValue: String {
        switch self {
        case .starting: "starting"
        case .running: "running"
        case .handingOver: "handing over"
        case .handedOver: "handed over"
        case .other(let text): text
        }
    }

    public init(from decoder: any Decoder) throws {
        self.init(rawValue: try decoder.singleValueContainer().decode(String.self))
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(rawValue)
    }
}

/// Where the masquerade and forward rules live: nftables (flanneld's default) or iptables.
public enum MasqueradeBackend: String, Sendable, Codable, CaseIterable {
    case nftables
    case iptables
}

/// What the old daemon hands a replacing one (`up --replace`, Handover.swift in FlannelUDP): its identity, the
/// peer table with origins, the masquerade backend and the registry lease.
public struct HandoverState: Codable, Equatable, Sendable {
    /// The protocol spoken; a daemon refuses another version.
    public static let version = 1

    public var token: String
    public var daemonVersion: String
    public var device: String
    public var deviceIndex: Int32
    public var network: String
    public var subnet: String
    public var publicIP: String
    public var port: UInt16
    public var mtu: Int
    public var vnetHeader: Bool
    /// The old daemon's sockets in the reuseport group (its `--workers`): the new ones join after them.
    public var sockets: Int
    public var subnetFile: String?
    public var subnetFileContents: String?
    public var routes: [RouteInfo]
    /// The masquerade backend with --ip-masq, nil without.
    public var masquerade: MasqueradeBackend?
    /// The registry lease with --etcd-endpoints: the new daemon keeps that etcd lease alive instead of taking one.
    public var lease: HandoverLease?
    /// The old daemon's service manager (sd_notify), when one supervises it: a successor that was not started by
    /// that manager (`up --replace` from a shell) reports to it from the switch on. Absent from daemons that
    /// predate it, and then nobody tells the manager (it sees its main process exit).
    public var serviceManager: ServiceManagerLink?

    package init(token: String, daemonVersion: String, device: String, deviceIndex: Int32, network: String,
                 subnet: String, publicIP: String, port: UInt16, mtu: Int, vnetHeader: Bool, sockets: Int,
                 subnetFile: String?, subnetFileContents: String?, routes: [RouteInfo],
                 masquerade: MasqueradeBackend?, lease: HandoverLease?, serviceManager: ServiceManagerLink? = nil) {
        self.token = token
        self.daemonVersion = daemonVersion
        self.device = device
        self.deviceIndex = deviceIndex
        self.network = network
        self.subnet = subnet
        self.publicIP = publicIP
        self.port = port
        self.mtu = mtu
        self.vnetHeader = vnetHeader
        self.sockets = sockets
        self.subnetFile = subnetFile
        self.subnetFileContents = subnetFileContents
        self.routes = routes
        self.masquerade = masquerade
        self.lease = lease
        self.serviceManager = serviceManager
    }
}

/// Where a daemon's service manager listens (`NOTIFY_SOCKET`) and its watchdog timeout (`WATCHDOG_USEC`), handed
/// from an old daemon to its successor.
public struct ServiceManagerLink: Codable, Equatable, Sendable {
    public var notifySocket: String
    public var watchdogMicroseconds: UInt64?

    public init(notifySocket: String, watchdogMicroseconds: UInt64?) {
        self.notifySocket = notifySocket
        self.watchdogMicroseconds = watchdogMicroseconds
    }
}

public struct HandoverLease: Codable, Equatable, Sendable {
    public var subnet: String
    public var etcdLeaseID: Int64
}

extension HandoverLease {
    /// What a replacing daemon needs of this node's registry lease: its subnet and the etcd lease to keep alive.
    package init(_ lease: SubnetLease) {
        self.init(subnet: lease.subnet.description, etcdLeaseID: lease.etcdLeaseID)
    }
}

/// What `status` shows about the masquerade rules.
public struct MasqueradeStatus: Codable, Equatable, Sendable {
    /// "nftables" or "iptables".
    public var backend: String
    /// Where the rules live ("table ip flannel-ipv4 (chains postrtg, forward)").
    public var objects: [String]
    /// Whether the last check found every rule in place.
    public var inPlace: Bool
    /// The check period in seconds.
    public var resyncSeconds: Double
    /// How often the rules had to be put back since start.
    public var restored: Int
    public var lastRestored: Date?
    /// The last failed check or reinstall, cleared by the next success.
    public var lastError: String?

    package init(backend: String, objects: [String], inPlace: Bool, resyncSeconds: Double, restored: Int,
                 lastRestored: Date?, lastError: String?) {
        self.backend = backend
        self.objects = objects
        self.inPlace = inPlace
        self.resyncSeconds = resyncSeconds
        self.restored = restored
        self.lastRestored = lastRestored
        self.lastError = lastError
    }
}

/// What `status` shows about self-healing: how often each piece was put back.
public struct RepairStatus: Codable, Equatable, Sendable {
    /// The overlay route was re-added.
    public var route = 0
    /// The /32 address was re-added.
    public var address = 0
    /// The link was set up again.
    public var linkUp = 0
    /// The MTU was set back.
    public var mtu = 0
    /// The last repair, as logged ("restored route 10.244.0.0/16 dev flannel0 (it was missing)").
    public var last: String?
    public var lastAt: Date?
    /// The last failed repair or check, cleared by the next successful check.
    public var lastError: String?
    /// How often the state is checked without a notification, in seconds.
    public var checkSeconds: Double

    public init(checkSeconds: Double) { self.checkSeconds = checkSeconds }

    public var total: Int { route + address + linkUp + mtu }
}

public struct LeaseInfo: Codable, Equatable, Sendable {
    public var subnet: String
    public var expires: Date
    public var endpoints: [String]
    public init(subnet: String, expires: Date, endpoints: [String]) {
        self.subnet = subnet
        self.expires = expires
        self.endpoints = endpoints
    }
}

public enum ControlResponse: Codable, Equatable, Sendable {
    case ok
    case status(DaemonStatus)
    case routes([RouteInfo])
    case error(String)
    /// The answer to `HandoverRequest.begin` (Node/Handover.swift).
    case handover(HandoverState)
}

extension ControlProtocol {
    /// Encodes a message as one line (JSON has no raw newlines in it).
    public static func encodeLine<T: Encodable>(_ value: T) -> [UInt8] {
        var bytes = Array((try? JSONFormat.encoder().encode(value)) ?? Data("{}".utf8))
        bytes.append(UInt8(ascii: "\n"))
        return bytes
    }

    public static func decode<T: Decodable>(_ type: T.Type, from bytes: some Collection<UInt8>) throws -> T {
        try JSONFormat.decoder().decode(type, from: Data(bytes))
    }
}
