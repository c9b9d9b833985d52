import Logging

/// The daemon's peer table: the routes the data plane reads (`table`) and every edit of them, through one
/// `RouteStore` that checks each against the rules of this node's plan: the peers file (at start-up, on SIGHUP and
/// `reload`), the peer source's set, and `route add`/`route del`. Created once the plan is made (Daemon.peers).
final class PeerTable: Sendable {
    /// What the forwarder looks peers up in.
    let table = RouteTable()
    let store: RouteStore
    /// The port of an endpoint given without one: the overlay's.
    private let defaultPort: UInt16
    private let peersFile: String?
    private let logger: Logger

    init(plan: NodeSetup.Plan, peersFile: String?, logger: Logger) {
        store = RouteStore(publisher: table, rules: PeerRouteRules(
            network: plan.membership.network, ownSubnet: plan.membership.subnet, publicIP: plan.publicIP,
            subnetLength: plan.membership.leaseLength))
        defaultPort = plan.membership.port
        self.peersFile = peersFile
        self.logger = logger
    }

    /// `route add SUBNET ENDPOINT`: a manual route, which wins over the file's and the source's for its subnet.
    func add(subnet subnetText: String, endpoint endpointText: String) -> ControlResponse {
        do {
            let subnet = try IPv4Network(parsing: subnetText)
            let endpoint = try Endpoint(parsing: endpointText, defaultPort: defaultPort)
            try store.add(PeerRoute(subnet: subnet, endpoint: endpoint), origin: .manual)
            logger.info("route add \(subnet) via \(endpoint)")
            return .ok
        } catch {
            return .error("\(error)")
        }
    }

    /// `route del SUBNET`: whichever origin has it.
    func delete(subnet subnetText: String) -> ControlResponse {
        do {
            let subnet = try IPv4Network(parsing: subnetText)
            try store.removeAny(subnet)
            logger.info("route del \(subnet)")
            return .ok
        } catch {
            return .error("\(error)")
        }
    }

    /// Re-reads the peers file (SIGHUP, `reload`): all its routes or, on any error, none changed.
    func reload() -> ControlResponse {
        guard let path = peersFile else { return .error("no peers file was given to 'up'") }
        do {
            let routes = try PeersFile.load(path: path, defaultPort: defaultPort)
            do { try store.replace(routes, origin: .file) } catch {
                return .error("\(path): \(error); the peer table is unchanged")
            }
            logger.info("loaded \(routes.count) peer route(s) from \(path)")
            return .ok
        } catch {
            return .error("\(error); the peer table is unchanged")
        }
    }

    /// Applies every change of the source's peer set until the source stops; `onLost` when the source says our
    /// subnet is lost. A peer the rules refuse is logged once (RegistryRouteFilter).
    func follow(_ source: any PeerSource, onLost: @escaping @Sendable (String) -> Void) {
        let store = self.store
        let logger = self.logger
        let filter = RegistryRouteFilter()
        source.watch(onPeers: { routes in
            let (usable, refused) = filter.filter(routes, store: store)
            for error in refused { logger.warning("etcd: ignoring a lease: \(error)") }
            try? store.replace(usable, origin: .registry)
            logger.info("etcd: \(usable.count) peer route(s)")
        }, onLost: onLost)
    }

    /// The effective routes with their origins and what each peer's traffic counters say (`route list`, `status`,
    /// a handover).
    func routeInfos() -> [RouteInfo] {
        let snapshot = table.snapshot()
        return store.entries().map { entry in
            var info = RouteInfo(subnet: entry.route.subnet.description, endpoint: entry.route.endpoint.description,
                                 origin: entry.origin.rawValue)
            if let peer = snapshot.entry(for: entry.route.subnet) {
                let c = peer.counters.snapshot
                info.txPackets = c.txPackets
                info.txBytes = c.txBytes
                info.rxPackets = c.rxPackets
                info.rxBytes = c.rxBytes
            }
            return info
        }
    }
}
