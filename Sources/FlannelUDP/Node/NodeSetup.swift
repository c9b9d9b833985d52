import Foundation
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// The system side of `up`: look everything up first, then make each change with its undo registered before the
/// next one, so that a failure anywhere leaves the namespace as it was (wg-quick's discipline).
public final class NodeSetup: @unchecked Sendable {  // used from the daemon's main thread only
    /// What `up` found out about the system before changing anything.
    public struct Plan: Sendable {
        public var config: NodeConfig
        public var underlay: Link
        public var underlayAddress: IPv4Address
        public var publicIP: IPv4Address
        public var mtu: Int
        public var listen: Endpoint
    }

    public enum Failure: Error, CustomStringConvertible {
        /// The request does not fit this system (missing interface, no address, ...): a usage error.
        case invalid(String)
        case system(SystemError)

        public var description: String {
            switch self {
            case .invalid(let m): return m
            case .system(let e): return e.description
            }
        }
    }

    public let netlink: Netlink
    private let logger: Logger
    private var undo: [(String, () -> Void)] = []
    public private(set) var tun: TunDevice?
    private var routeInstalled: Route?
    private var subnetFileBackup: (path: String, previous: Data?)?

    public init(logger: Logger) throws(SystemError) {
        netlink = try Netlink()
        self.logger = logger
    }

    /// The underlay interface (named, or that of the default route) and its first IPv4 address.
    public func resolveUnderlay(_ name: String?) throws(Failure) -> (link: Link, address: IPv4Address) {
        do {
            let link: Link
            if let name {
                guard let l = try netlink.link(named: name) else { throw Failure.invalid("iface \(name): no such interface") }
                link = l
            } else {
                guard let index = try netlink.defaultRouteInterface(), let l = try netlink.link(index: index) else {
                    throw Failure.invalid("no default route to pick the underlay interface from; give --iface")
                }
                link = l
            }
            guard let first = try netlink.addresses(index: link.index).first else {
                throw Failure.invalid("iface \(link.name) has no IPv4 address")
            }
            return (link, first.address)
        } catch let e as Failure {
            throw e
        } catch let e as SystemError {
            throw .system(e)
        } catch {
            throw .invalid("\(error)")
        }
    }

    /// Resolves the underlay, MTU and addresses. Changes nothing.
    public func plan(_ config: NodeConfig) throws(Failure) -> Plan {
        if let problem = config.validate() { throw .invalid(problem) }
        let (link, underlayAddress) = try resolveUnderlay(config.underlay)
        do {
            if let problem = PeerRouteRules.checkNetwork(config.network, underlay: underlayAddress,
                                                         publicIP: config.publicIP) {
                throw Failure.invalid(problem)
            }
            if link.name == config.device {
                throw Failure.invalid("iface \(link.name) is the overlay device itself; give the underlay interface")
            }
            if try netlink.link(named: config.device) != nil {
                throw Failure.invalid("device \(config.device) already exists; run 'flannel-udp down --device \(config.device)' or 'flannel-udp cleanup'")
            }
            let mtu = config.mtu ?? (link.mtu - NodeConfig.encapsulationOverhead)
            if !NodeConfig.mtuRange.contains(mtu) {
                throw Failure.invalid("iface \(link.name) has MTU \(link.mtu), which leaves \(mtu) for the overlay (needs \(NodeConfig.mtuRange.lowerBound)-\(NodeConfig.mtuRange.upperBound)); give --mtu")
            }
            if let existing = try netlink.routes().first(where: { $0.destination == config.network && $0.gateway == nil && $0.outputInterface != nil }),
               let idx = existing.outputInterface, let other = try netlink.link(index: idx) {
                throw Failure.invalid("network \(config.network) is already routed to \(other.name); is another overlay running? ('flannel-udp cleanup --network \(config.network)')")
            }
            return Plan(config: config, underlay: link, underlayAddress: underlayAddress,
                        publicIP: config.publicIP ?? underlayAddress, mtu: mtu,
                        listen: Endpoint(address: underlayAddress, port: config.port))
        } catch let e as Failure {
            throw e
        } catch let e as SystemError {
            throw .system(e)
        } catch {
            throw .invalid("\(error)")
        }
    }

    private func step(_ what: String) { logger.info("[#] \(what)") }

    /// Creates and configures the tun device, installs the overlay route and writes the subnet file.
    /// On any failure everything done so far is undone before the error is thrown.
    public func bringUp(_ plan: Plan) throws(Failure) -> TunDevice {
        let config = plan.config
        do {
            step("create tun device \(config.device)")
            // IFF_VNET_HDR only when offloads are wanted: the forwarder then reads TSO super-packets.
            let tun = try TunDevice(name: config.device, vnetHeader: config.offloads)
            self.tun = tun
            undo.append(("close tun device \(config.device)", { tun.close(); self.tun = nil }))
            guard let link = try netlink.link(named: tun.name) else {
                throw SystemError("look up link", tun.name, errno: ENODEV)
            }
            step("set mtu \(plan.mtu) dev \(tun.name)")
            try netlink.setMTU(plan.mtu, index: link.index)
            step("set txqueuelen \(NodeConfig.tunTxQueueLength) dev \(tun.name)")
            try netlink.setTxQueueLength(NodeConfig.tunTxQueueLength, index: link.index)
            let address = InterfaceAddress(index: link.index, address: config.tunAddress, prefixLength: 32)
            step("add address \(config.tunAddress)/32 dev \(tun.name)")
            try netlink.addAddress(address)
            step("set \(tun.name) up")
            try netlink.setUp(true, index: link.index)
            let route = Route(destination: config.network, gateway: nil, outputInterface: link.index,
                              scope: Route.scopeLink)
            step("add route \(config.network) dev \(tun.name)")
            try addOverlayRoute(route)
            routeInstalled = route
            if let path = config.subnetFile {
                let previous = FileManager.default.contents(atPath: path)
                let file = SubnetFile(network: config.network, subnet: config.subnet, mtu: plan.mtu, ipMasq: config.ipMasq)
                step("write \(path)")
                try file.write(to: path)
                subnetFileBackup = (path, previous)
                undo.append(("restore \(path)", { [logger] in
                    NodeSetup.restore(path: path, previous: previous, logger: logger)
                }))
            }
            return tun
        } catch let e as SystemError {
            rollback()
            throw .system(e)
        } catch {
            rollback()
            throw .invalid("\(error)")
        }
    }

    /// Adds the overlay route. An identical route already there is fine (the contract says so); EEXIST for
    /// anything else under that key (same prefix and metric, another device or a gateway) is not.
    private func addOverlayRoute(_ route: Route) throws(SystemError) {
        do {
            try netlink.addRoute(route)
        } catch {
            guard error.errno == EEXIST else { throw error }
            let same = try netlink.routes().contains {
                $0.destination == route.destination && $0.outputInterface == route.outputInterface && $0.gateway == nil
            }
            if !same { throw error }
        }
    }

    /// Undoes everything `bringUp` did, newest first.
    public func rollback() {
        while let (what, action) = undo.popLast() {
            logger.info("[#] \(what)")
            action()
        }
        routeInstalled = nil
        subnetFileBackup = nil
    }

    /// Orderly teardown after a normal run: the route, then the device (closing it deletes it), then the subnet
    /// file. Errors are logged, never thrown: teardown goes on past a piece that is already gone.
    public func tearDown() {
        if let route = routeInstalled, let tun {
            step("delete route \(route.destination) dev \(tun.name)")
            do { try netlink.deleteRoute(route) } catch where error.errno == ESRCH || error.errno == ENODEV {
            } catch {
                logger.warning("\(error)")
            }
        }
        rollback()
    }

    static func restore(path: String, previous: Data?, logger: Logger) {
        if let previous {
            do { try AtomicFile.write(String(decoding: previous, as: UTF8.self), to: path, mode: 0o644) } catch {
                logger.warning("\(error)")
            }
        } else if unlink(path) != 0 && errno != ENOENT {
            logger.warning("\(SystemError.current("remove", path))")
        }
    }
}
