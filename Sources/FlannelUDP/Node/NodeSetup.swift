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
        /// The network, our subnet and the port, as the peer source gave them.
        public var membership: Membership
        public var underlay: Link
        public var underlayAddress: IPv4Address
        public var publicIP: IPv4Address
        public var mtu: Int
        public var listen: Endpoint

        /// What `bringUp` writes to `config.subnetFile`, byte for byte (recorded in the state file, so that `down`
        /// can tell a killed daemon's subnet file from one that someone else wrote since).
        public var subnetFileContents: String {
            SubnetFile(network: membership.network, subnet: membership.subnet, mtu: mtu, ipMasq: config.ipMasq).contents
        }
    }

    /// `.usage` when the request does not fit this system (missing interface, no address, ...), `.system` when the
    /// kernel refused a change.
    public typealias Failure = FlannelError

    public let netlink: Netlink
    private let logger: Logger
    private var undo: [(String, () -> Void)] = []
    public private(set) var tun: TunDevice?
    /// With --ip-masq: the installed rules and the thread that keeps them in place.
    public private(set) var masquerade: MasqueradeResync?
    private var routeInstalled: Route?
    /// Set by `started()` once the node is up: from then on teardown removes the subnet file instead of putting
    /// back what was there before `up`.
    private var running = false
    /// The device, address, MTU and route as installed, once the route is in: what `NodeGuard` keeps in place.
    public private(set) var installed: OverlayDevice?

    public init(logger: Logger) throws(SystemError) {
        netlink = try Netlink()
        self.logger = logger
    }

    /// The underlay interface (named, or that of the default route) and its first IPv4 address.
    public func resolveUnderlay(_ name: String?) throws(Failure) -> (link: Link, address: IPv4Address) {
        let link: Link
        if let name {
            guard let l = try Failure.system(try netlink.link(named: name)) else {
                throw .usage("iface \(name): no such interface")
            }
            link = l
        } else {
            guard let index = try Failure.system(try netlink.defaultRouteInterface()),
                  let l = try Failure.system(try netlink.link(index: index)) else {
                throw .usage("no default route to pick the underlay interface from; give --iface")
            }
            link = l
        }
        guard let first = try Failure.system(try netlink.addresses(index: link.index)).first else {
            throw .usage("iface \(link.name) has no IPv4 address")
        }
        return (link, first.address)
    }

    /// Resolves the underlay, MTU and addresses for `membership`. Changes nothing.
    /// - Parameter adopting: `up --replace`: the device (with this index) and its route are the running daemon's,
    ///   and are to be taken over rather than refused.
    public func plan(_ config: NodeConfig, membership: Membership, adopting: Int32? = nil) throws(Failure) -> Plan {
        if let problem = config.validate() ?? membership.validate() { throw .usage(problem) }
        let (link, underlayAddress) = try resolveUnderlay(config.underlay)
        if let problem = PeerRouteRules.checkNetwork(membership.network, underlay: underlayAddress,
                                                     publicIP: config.publicIP) {
            throw .usage(problem)
        }
        if link.name == config.device {
            throw .usage("iface \(link.name) is the overlay device itself; give the underlay interface")
        }
        let existingDevice = try Failure.system(try netlink.link(named: config.device))
        if let adopting, existingDevice?.index != adopting {
            throw .failed("device \(config.device) is not the one the running daemon reported (index \(adopting)); not replacing")
        }
        if adopting == nil, existingDevice != nil {
            throw .usage("device \(config.device) already exists; run 'flannel-udp down --device \(config.device)' or 'flannel-udp cleanup'")
        }
        let mtu = config.mtu ?? (link.mtu - NodeConfig.encapsulationOverhead)
        if !NodeConfig.mtuRange.contains(mtu) {
            throw .usage("iface \(link.name) has MTU \(link.mtu), which leaves \(mtu) for the overlay (needs \(NodeConfig.mtuRange.lowerBound)-\(NodeConfig.mtuRange.upperBound)); give --mtu")
        }
        if let existing = try Failure.system(try netlink.routes()).first(where: { $0.destination == membership.network && $0.gateway == nil && $0.outputInterface != nil }),
           let idx = existing.outputInterface, idx != adopting, let other = try Failure.system(try netlink.link(index: idx)) {
            throw .usage("network \(membership.network) is already routed to \(other.name); is another overlay running? ('flannel-udp cleanup --network \(membership.network)')")
        }
        return Plan(config: config, membership: membership, underlay: link, underlayAddress: underlayAddress,
                    publicIP: config.publicIP ?? underlayAddress, mtu: mtu,
                    listen: Endpoint(address: underlayAddress, port: membership.port))
    }

    /// Checks, before anything is changed, where `up` will write: the subnet file's directory (0755) and the run
    /// directory that holds the state (0700), created where missing (see `SecureDirectory.ensure`), and the subnet
    /// file itself, which may be missing or a regular file but nothing else: a symlink there is refused rather
    /// than replaced, so that neither the link nor its target changes.
    public static func checkPaths(subnetFile: String?, runDirectory: String) throws(SystemError) {
        if let subnetFile {
            try SecureDirectory.ensure(AtomicFile.split(subnetFile).directory, mode: 0o755, owner: geteuid())
            var st = stat()
            if lstat(subnetFile, &st) != 0 {
                if errno != ENOENT { throw SystemError.current("inspect subnet file", subnetFile) }
            } else if st.st_mode & S_IFMT == S_IFLNK {
                throw SystemError("use subnet file", "\(subnetFile) (a symlink)", errno: ELOOP)
            } else if st.st_mode & S_IFMT != S_IFREG {
                throw SystemError("use subnet file", "\(subnetFile) (not a regular file)", errno: EINVAL)
            }
        }
        try SecureDirectory.ensure(runDirectory, mode: 0o700, owner: geteuid())
    }

    private func step(_ what: String) { logger.info("[#] \(what)") }

    /// Creates and configures the tun device, installs the overlay route and writes the subnet file.
    /// On any failure everything done so far is undone before the error is thrown.
    public func bringUp(_ plan: Plan) throws(Failure) -> TunDevice {
        do throws(Failure) {
            let tun = try Failure.system(try createDevice(plan))
            if plan.config.ipMasq {
                do { try installMasquerade(plan) } catch { throw .failed(error.description) }
            }
            if let path = plan.config.subnetFile { try Failure.system(try writeSubnetFile(path, plan)) }
            return tun
        } catch {
            rollback()
            throw error
        }
    }

    /// The tun device with its MTU, queue length, address and up state, and the overlay route.
    private func createDevice(_ plan: Plan) throws(SystemError) -> TunDevice {
        let config = plan.config
        step("create tun device \(config.device)")
        // IFF_VNET_HDR only when offloads are wanted: the forwarder then reads TSO super-packets.
        let tun = try TunDevice(name: config.device, vnetHeader: config.offloads, queues: config.pairs)
        self.tun = tun
        undo.append(("close tun device \(config.device)", { tun.close(); self.tun = nil }))
        guard let link = try netlink.link(named: tun.name) else {
            throw SystemError("look up link", tun.name, errno: ENODEV)
        }
        step("set mtu \(plan.mtu) dev \(tun.name)")
        try netlink.setMTU(plan.mtu, index: link.index)
        step("set txqueuelen \(NodeConfig.tunTxQueueLength) dev \(tun.name)")
        try netlink.setTxQueueLength(NodeConfig.tunTxQueueLength, index: link.index)
        let address = InterfaceAddress(index: link.index, address: plan.membership.tunAddress, prefixLength: 32)
        step("add address \(plan.membership.tunAddress)/32 dev \(tun.name)")
        try netlink.addAddress(address)
        step("set \(tun.name) up")
        try netlink.setUp(true, index: link.index)
        let route = Route(destination: plan.membership.network, gateway: nil, outputInterface: link.index,
                          scope: Route.scopeLink)
        step("add route \(route.description(device: tun.name))")
        try addOverlayRoute(route)
        routeInstalled = route
        installed = OverlayDevice(name: tun.name, index: link.index, address: address, mtu: plan.mtu, route: route)
        return tun
    }

    /// flannel's subnet file at `path`; undone by putting back what was there (`undoSubnetFile`).
    private func writeSubnetFile(_ path: String, _ plan: Plan) throws(SystemError) {
        let previous = try AtomicFile.read(path)
        let ours = plan.subnetFileContents
        step("write \(path)")
        try AtomicFile.write(ours, to: path, mode: 0o644)
        undo.append(("undo write \(path)", { [self] in
            NodeSetup.undoSubnetFile(path: path, ours: ours, previous: running ? nil : previous, logger: logger)
        }))
    }

    /// `up --replace`: takes the running daemon's tun queues (`fds`, passed over the control socket; the old
    /// daemon keeps its own descriptors of the same queues, so closing ours changes nothing while it lives) and
    /// checks that the device is still the one with `index`. Changes nothing else.
    public func adopt(_ plan: Plan, index: Int32, fds: [Int32], vnetHeader: Bool) throws(Failure) -> TunDevice {
        let name = plan.config.device
        step("take over \(fds.count) queue(s) of tun device \(name)")
        let tun = TunDevice(adopting: fds, name: name, vnetHeader: vnetHeader)
        guard let link = try? netlink.link(named: tun.name), link.index == index else {
            tun.close()
            throw .failed("tun device \(name) (index \(index)) disappeared during the replacement")
        }
        self.tun = tun
        undo.append(("close our descriptors of tun device \(name)", { tun.close(); self.tun = nil }))
        return tun
    }

    /// `up --replace`, once the old daemon has let go: the device, its address and route, the masquerade rules and
    /// the subnet file are ours from now on, removed by `tearDown` as if `bringUp` had made them.
    public func adopted(_ plan: Plan, index: Int32) throws(Failure) {
        let config = plan.config
        let address = InterfaceAddress(index: index, address: plan.membership.tunAddress, prefixLength: 32)
        let route = Route(destination: plan.membership.network, gateway: nil, outputInterface: index,
                          scope: Route.scopeLink)
        routeInstalled = route
        installed = OverlayDevice(name: config.device, index: index, address: address, mtu: plan.mtu, route: route)
        if config.ipMasq {
            do {
                let rules = try makeMasqueradeRules(config.masqBackend, spec: MasqueradeSpec(
                    network: plan.membership.network, subnet: plan.membership.subnet))
                keepMasquerade(rules, config).checkOnce()  // in place, as the old daemon left them
            } catch {
                throw .failed("\(error)")
            }
        }
        if let path = config.subnetFile {
            let ours = plan.subnetFileContents
            undo.append(("undo write \(path)", { [logger] in
                NodeSetup.undoSubnetFile(path: path, ours: ours, previous: nil, logger: logger)
            }))
        }
        running = true
    }

    /// Installs the masquerade and forward rules (one transaction, so a failure changes nothing) and starts keeping
    /// them in place. Undo stops the checks first, then removes the rules.
    private func installMasquerade(_ plan: Plan) throws(NetfilterError) {
        let config = plan.config
        let rules = try makeMasqueradeRules(config.masqBackend,
                                            spec: MasqueradeSpec(network: plan.membership.network, subnet: plan.membership.subnet))
        let objects = rules.objects.joined(separator: ", ")
        step("install masquerade rules: \(rules.backend.rawValue) \(objects)")
        try rules.install()
        keepMasquerade(rules, config)
    }

    /// Registers the rules' removal and starts the thread that keeps them in place.
    @discardableResult
    private func keepMasquerade(_ rules: MasqueradeRules, _ config: NodeConfig) -> MasqueradeResync {
        let objects = rules.objects.joined(separator: ", ")
        undo.append(("remove masquerade rules: \(rules.backend.rawValue) \(objects)", { [logger] in
            do { try rules.remove() } catch { logger.warning("\(error)") }
        }))
        let resync = MasqueradeResync(rules: rules, period: config.masqResyncSeconds, logger: logger)
        resync.start()
        masquerade = resync
        undo.append(("stop masquerade resync", { resync.stop(); self.masquerade = nil }))
        return resync
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
        installed = nil
    }

    /// The node is up: a teardown from now on is the end of a run, not the undo of a failed start.
    public func started() { running = true }

    /// Orderly teardown after a normal run: the route, then the device (closing it deletes it), then the subnet
    /// file. Errors are logged, never thrown: teardown goes on past a piece that is already gone.
    public func tearDown() {
        if let route = routeInstalled, let tun {
            step("delete route \(route.description(device: tun.name))")
            do { try netlink.deleteRoute(route) } catch where error.errno == ESRCH || error.errno == ENODEV {
            } catch {
                logger.warning("\(error)")
            }
        }
        rollback()
    }

    /// Undoes the subnet file, only if it still holds exactly what this daemon wrote (a file someone rewrote while
    /// we ran is theirs now, and is left alone):
    /// - after a failed start (`previous` is what the file held before `up`, nil if there was none), the file is
    ///   put back as it was, so a failed `up` changes nothing;
    /// - at the end of a run (`previous` nil), it is removed. What an older run left there is not brought back:
    ///   it describes a node that is gone, and the CNI plugin must not find it.
    static func undoSubnetFile(path: String, ours: String, previous: Data?, logger: Logger) {
        do {
            guard let current = try AtomicFile.read(path) else { return }
            guard current == Data(ours.utf8) else {
                logger.warning("\(path) was changed by someone else since it was written; leaving it")
                return
            }
            if let previous {
                try AtomicFile.write(String(decoding: previous, as: UTF8.self), to: path, mode: 0o644)
            } else {
                try syscall("remove", path) { unlink(path) }
            }
        } catch {
            logger.warning("\(error)")
        }
    }
}
