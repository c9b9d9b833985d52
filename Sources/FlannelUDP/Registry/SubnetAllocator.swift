/// The choice of this node's subnet, made from the leases currently in the registry. Pure: no etcd, no clock,
/// the random source injected, so every rule is unit-tested. The order of preference is flannel's
/// (`tryAcquireLease` in pkg/subnet/etcd/local_manager.go):
///
/// 1. a lease that already carries our public IP and still fits the config is taken over (a restarted node keeps
///    its subnet); one that no longer fits is deleted first;
/// 2. else the previous subnet (from the subnet file of the last run), when it fits the config and nobody holds it;
/// 3. else a random free subnet among the first 100 free ones between SubnetMin and SubnetMax.
public struct SubnetAllocator: Sendable {
    /// How many free subnets flannel collects before choosing one at random.
    public static let candidateLimit = 100

    public let config: NetworkConfig

    public init(config: NetworkConfig) { self.config = config }

    /// What to do with the registry.
    public struct Plan: Equatable, Sendable {
        /// Our own leases that no longer fit the config: delete them before anything else.
        public var delete: [IPv4Network] = []
        /// Take over this existing lease of ours (re-put it with a fresh etcd lease).
        public var reuse: IPv4Network?
        /// Create this subnet's key (only if it is still absent).
        public var create: IPv4Network?
    }

    /// Decides, given every lease in the registry (subnet -> value), our public IP and the previous subnet.
    public func plan<R: RandomNumberGenerator>(leases: [IPv4Network: LeaseAttributes], publicIP: IPv4Address,
                                                previous: IPv4Network?, using rng: inout R)
        throws(FlannelError) -> Plan {
        var plan = Plan()
        // Deterministic order: the lowest subnet carrying our IP wins, as a sorted etcd range would give it.
        let ours = leases.filter { $0.value.publicIP == publicIP }.keys.sorted { $0.address < $1.address }
        if let first = ours.first {
            if config.admits(first) {
                plan.reuse = first
                return plan
            }
            plan.delete.append(first)
        }
        var remaining = leases
        for subnet in plan.delete { remaining[subnet] = nil }

        if let previous, remaining[previous] == nil, config.admits(previous),
           !remaining.keys.contains(where: { $0.overlaps(previous) }) {
            plan.create = previous
            return plan
        }

        let free = freeSubnets(taken: Array(remaining.keys))
        guard !free.isEmpty else {
            throw .failed("no free subnet left between SubnetMin \(config.subnetMin) and SubnetMax \(config.subnetMax) "
                          + "in \(config.network) (every /\(config.subnetLength) is leased)")
        }
        plan.create = free[Int.random(in: 0..<free.count, using: &rng)]
        return plan
    }

    public func plan(leases: [IPv4Network: LeaseAttributes], publicIP: IPv4Address,
                     previous: IPv4Network?) throws(FlannelError) -> Plan {
        var rng = SystemRandomNumberGenerator()
        return try plan(leases: leases, publicIP: publicIP, previous: previous, using: &rng)
    }

    /// Up to `limit` subnets from SubnetMin to SubnetMax, in address order, that overlap none of `taken`.
    public func freeSubnets(taken: [IPv4Network], limit: Int = SubnetAllocator.candidateLimit) -> [IPv4Network] {
        var result: [IPv4Network] = []
        let step = config.subnetSize
        var address = UInt64(config.subnetMin.value)
        let last = UInt64(config.subnetMax.value)
        let sortedTaken = taken.sorted { $0.address < $1.address }
        while address <= last && result.count < limit {
            let candidate = IPv4Network(address: IPv4Address(UInt32(address)), prefixLength: config.subnetLength)
            if !sortedTaken.contains(where: { $0.overlaps(candidate) }) {
                result.append(candidate)
            }
            address += step
        }
        return result
    }
}
