import Foundation
import Synchronization
import Logging
#if canImport(Glibc)
import Glibc
#endif

// `up --replace`: a new daemon takes a running node over without a packet lost (DESIGN: "Upgrading without loss").
//
//     new daemon                                    old daemon
//     checks options, peers file, paths
//     handoverBegin ─────────────────────────────>  stops self-healing; answers identity, peers, masquerade,
//                                                   and passes its tun queues and sockets along (SCM_RIGHTS)
//     refuses a changed identity (handoverAbort)     (watches the new daemon: its death or 20 s resume all)
//     builds its forwarder over those queues and sockets (plus queues attached to the device and sockets
//     joined to the port for more --workers), not started
//     handoverCommit ────────────────────────────>  stops forwarding, answers ("handed over" from then on)
//     (an answer lost on the way is settled by watching the old daemon: HandoverCommit.swift)
//     starts forwarding (what arrived meanwhile waits in the queues and socket buffers); steering over its
//     sockets; state file ─────────────────────────>  (watched) closes its descriptors (the queues and sockets
//                                                   stay open in the new daemon: nothing is detached, nothing
//                                                   torn down), exits 0, releasing the lock last; had the new
//                                                   daemon died before its state file, it forwards on instead
//     control socket renamed over the old one, lock; self-healing, masquerade resync; READY
//
// No queue leaves the tun and no socket the reuseport group while traffic flows (with the same --workers or
// more): the kernel purges a tun queue's ring when it detaches, renumbers the queues and the group's sockets
// when one in the middle goes, and drops what it had already picked a vanished queue for. Taking the same
// descriptors over avoids all three, so no packet is lost. With fewer --workers, the surplus (the last queues
// and sockets, so nothing is renumbered) is closed after the switch, losing what was queued on it then.

/// The old daemon's side: where a handover stands.
final class OutgoingHandover: Sendable {
    enum Phase: Equatable {
        case idle
        /// Begun by the process `pid` (started at `startTicks`); abandoned when it dies or at `deadline`.
        case begun(token: String, pid: pid_t, startTicks: UInt64, deadline: Int64)
        /// Committed: not forwarding, the answer on its way.
        case committing
        /// The answer is out: waiting for the successor to record itself (then we exit) or die (then we resume).
        case handedOver
    }
    static let timeoutMilliseconds: Int64 = 20_000
    /// From the commit's answer until the successor records itself (it forwards by then); else we let go anyway.
    static let successorMilliseconds: Int64 = 30_000

    let phase = Mutex(Phase.idle)

    /// True from the commit on: the data plane's failures (its queues and sockets going away) are expected.
    var leaving: Bool { phase.withLock { $0 == .committing || $0 == .handedOver } }
    var handedOver: Bool { phase.withLock { $0 == .handedOver } }

    /// What `status` says of a running daemon: running, or handing over from the moment a replacing daemon
    /// began until the answer to its commit is out (then handed over) or the handover was abandoned (then
    /// running again; also when the replacing daemon dies after its commit, before it took over).
    var reportedPhase: DaemonPhase {
        switch phase.withLock({ $0 }) {
        case .idle: .running
        case .begun, .committing: .handingOver
        case .handedOver: .handedOver
        }
    }
}

extension Daemon {
    // MARK: - Old daemon

    func handleHandover(_ request: HandoverRequest, from pid: pid_t) -> HandoverReply {
        switch request {
        case .begin(let version):
            guard version == HandoverState.version else {
                return HandoverReply(.error("handover protocol \(version) is not spoken here (version \(HandoverState.version)); stop and start instead"))
            }
            guard let plan, let overlay, let dataPlane else { return HandoverReply(.error("the daemon for \(paths.device) is not forwarding")) }
            guard let ticks = DaemonState.startTicks(of: pid), pid > 1 else { return HandoverReply(.error("the requesting process is gone")) }
            let token = UUID().uuidString
            let begun = outgoing.phase.withLock { phase -> Bool in
                guard phase == .idle else { return false }
                phase = .begun(token: token, pid: pid, startTicks: ticks,
                               deadline: MonotonicClock.milliseconds() + OutgoingHandover.timeoutMilliseconds)
                return true
            }
            guard begun else { return HandoverReply(.error("a handover of \(paths.device) is already in progress")) }
            // Nothing may be "repaired" while two daemons share the device, nor the peer table changed.
            nodeGuard?.stop()
            source.pauseWatch()
            logger.info("handover to pid \(pid) begun; self-healing paused")
            watchHandover(token: token)
            return HandoverReply(.handover(HandoverState(
                token: token, daemonVersion: Daemon.version, device: config.device, deviceIndex: overlay.index,
                network: plan.membership.network.description, subnet: plan.membership.subnet.description,
                publicIP: plan.publicIP.description, port: plan.listen.port, mtu: plan.mtu,
                vnetHeader: dataPlane.tun.vnetHeader, sockets: dataPlane.sockets.count, subnetFile: config.subnetFile,
                subnetFileContents: config.subnetFile == nil ? nil : plan.subnetFileContents, routes: peers.routeInfos(),
                masquerade: config.ipMasq ? config.masqBackend : nil,
                lease: source.handoverLease, serviceManager: observer?.serviceManagerLink)))
        case .abort(let token):
            guard resume(token: token, because: "the replacing daemon gave up") else {
                return HandoverReply(.error(outgoing.leaving ? "too late to abort: the handover was committed and this daemon lets go"
                                                             : "no such handover in progress"))
            }
            return HandoverReply(.ok)
        case .commit(let token):
            let successor = outgoing.phase.withLock { phase -> DaemonIdentity? in
                guard case .begun(token, let pid, let ticks, _) = phase else { return nil }
                phase = .committing
                return DaemonIdentity(pid: pid, startTicks: ticks)
            }
            guard let successor else { return HandoverReply(.error("no such handover in progress (it was abandoned)")) }
            // Not forwarding from here on, so that two daemons never do; the queues and sockets stay open and
            // ours until the answer is out (letting go first could swallow it: see `HandoverClient.commit`).
            forwarder?.stop()
            return HandoverReply(.ok, afterward: { [self] in awaitSuccessor(successor) })
        }
    }

    /// Resumes a begun handover's abandonment when the new daemon dies or the time is up.
    private func watchHandover(token: String) {
        let t = Thread { [self] in
            while true {
                usleep(50_000)
                let verdict = outgoing.phase.withLock { phase -> String?? in
                    guard case .begun(token, let pid, let ticks, let deadline) = phase else { return .some(nil) }
                    if DaemonState.startTicks(of: pid) != ticks { return "the replacing daemon (pid \(pid)) died" }
                    if MonotonicClock.milliseconds() > deadline { return "the replacing daemon (pid \(pid)) did not commit in time" }
                    return nil
                }
                switch verdict {
                case .some(nil): return
                case .some(let reason?): _ = resume(token: token, because: reason); return
                case nil: continue
                }
            }
        }
        t.name = "handover watch"
        t.start()
    }

    /// Back to normal after a handover that did not happen: self-healing again. (The data plane never stopped,
    /// and the new daemon changes the steering only after the commit.)
    private func resume(token: String, because reason: String) -> Bool {
        let resumed = outgoing.phase.withLock { phase -> Bool in
            guard case .begun(token, _, _, _) = phase else { return false }
            phase = .idle
            return true
        }
        guard resumed else { return false }
        nodeGuard?.start()
        watchPeers()
        logger.warning("handover abandoned: \(reason); forwarding on, self-healing resumed")
        return true
    }

    /// Once the commit's answer is out ("handed over" from then on): our workers are stopped, the successor's
    /// forward on the same queues and sockets, which we still hold open. We let go once the successor has recorded
    /// itself as the device's daemon (it writes the state file after it started forwarding, before it waits for
    /// our lock). Should it die before that, nobody would forward: we take the node back instead. A successor that
    /// does neither within `OutgoingHandover.successorMilliseconds` is left to it.
    private func awaitSuccessor(_ successor: DaemonIdentity) {
        outgoing.phase.withLock { $0 = .handedOver }
        let t = Thread { [self] in
            let deadline = MonotonicClock.milliseconds() + OutgoingHandover.successorMilliseconds
            while true {
                if let state = DaemonState.load(path: paths.stateFile),
                   state.pid == successor.pid, state.startTicks == successor.startTicks {
                    return letGo(to: successor)
                }
                if DaemonState.startTicks(of: successor.pid) != successor.startTicks { return takeBack(from: successor) }
                if MonotonicClock.milliseconds() > deadline {
                    logger.warning("the replacing daemon (pid \(successor.pid)) has not recorded itself within \(OutgoingHandover.successorMilliseconds) ms of the commit; letting go all the same")
                    return letGo(to: successor)
                }
                usleep(10_000)
            }
        }
        t.name = "handover wait"
        t.start()
    }

    /// The successor died after the commit, before it took over: forwarding again on our queues and sockets (they
    /// never left the device or the port), self-healing and the peer source resumed.
    private func takeBack(from successor: DaemonIdentity) {
        guard let dataPlane, let membership else { preconditionFailure("a daemon that handed over was forwarding") }
        let why = "the replacing daemon (pid \(successor.pid)) died after the commit, before it took over"
        do throws(Failure) {
            let restarted = try makeForwarder(tun: dataPlane.tun, sockets: dataPlane.sockets, membership: membership)
            forwarder = restarted
            try start(restarted)
            // The successor may have steered the port and the tun for another layout: ours again.
            steer(dataPlane.tun, dataPlane.sockets)
        } catch {
            outgoing.phase.withLock { $0 = .idle }
            return fail("\(why), and forwarding again failed: \(error)")
        }
        outgoing.phase.withLock { $0 = .idle }
        nodeGuard?.start()
        watchPeers()
        logger.warning("handover undone: \(why); forwarding on, self-healing resumed")
    }

    /// Once the successor has taken over: closes our descriptors (it holds the same queues and sockets, so
    /// nothing leaves the device or the port), names the successor to our service manager, if we have one, as its
    /// main process, and has the main thread exit without tearing down.
    private func letGo(to successor: DaemonIdentity) {
        if let dataPlane {
            dataPlane.tun.close()
            for s in dataPlane.sockets { s.close() }
        }
        observer?.daemonHandedOver(self, to: successor.pid)
        logger.info("handed over to pid \(successor.pid); exiting without tearing anything down")
        kill(getpid(), SIGTERM)
    }

    /// The answer to `handoverBegin` carries our tun queues, then our sockets (SCM_RIGHTS).
    public func descriptors(for response: ControlResponse) -> [Int32] {
        guard case .handover = response, let dataPlane else { return [] }
        return dataPlane.tun.queueFDs + dataPlane.sockets.map(\.fd)
    }

    // MARK: - New daemon

    /// `up --replace` when a daemon runs for the device: everything checked, the handover as drawn above. The
    /// caller has loaded the peers file (`fileRoutes`).
    func runReplacing(readiness: Readiness, fileRoutes: [PeerRoute]) throws(Failure) {
        let instance = try Failure.system(try DaemonInstance(replacing: paths, logger: logger))
        defer { instance.release(handingOver: outgoing.handedOver) }
        // The lease is the old daemon's until the commit, ours (released by `down`) after it.
        var leaseHeld = false
        defer { source.leave(keep: !leaseHeld || keepLease.withLock { $0 } || outgoing.handedOver) }
        try Failure.system(try NodeSetup.checkPaths(subnetFile: config.subnetFile, runDirectory: paths.runDirectory))
        let setup = try Failure.system(try NodeSetup(logger: logger))

        let (old, oldDaemon, passed) = try HandoverClient.begin(paths: paths)
        // Before the forwarder is built: its heartbeat follows the watchdog of the manager we are to report to.
        if let link = old.serviceManager { observer?.adoptServiceManager(link) }
        // Ours to close until wrapped: the old daemon's queues (first `old.sockets`), then its sockets.
        var loose = passed
        defer { loose.forEach { _ = close($0) } }
        let plan: NodeSetup.Plan
        var sockets: [UDPSocket] = []
        var surplus: (queues: [Int32], sockets: [UDPSocket]) = ([], [])
        var started = false
        var switchStarted: Int64 = 0
        defer {
            if !started {
                setup.rollback()
                for s in sockets + surplus.sockets { s.close() }
                surplus.queues.forEach { _ = close($0) }
            }
        }
        do throws(Failure) {
            let underlay = try setup.resolveUnderlay(config.underlay)
            let joined: Membership
            do { joined = try source.adopt(old.lease, underlay: underlay.address, publicIP: config.publicIP ?? underlay.address) } catch {
                if case .usage(let why) = error { throw .usage("refusing to replace the daemon for \(config.device): \(why)") }
                throw error
            }
            membership = joined
            plan = try setup.plan(config, membership: joined, adopting: old.deviceIndex)
            if let reason = HandoverClient.identityChange(old, plan: plan) {
                throw Failure.usage("refusing to replace the daemon for \(config.device): \(reason); that changes the node's identity (use 'down' and 'up')")
            }
            self.plan = plan
            try adoptPeers(old.routes, fileRoutes: fileRoutes, port: joined.port)
            let n = old.sockets
            let wanted = config.pairs
            let socketFDs = Array(loose[n...])
            loose = Array(loose[..<n])  // the queues, until the tun takes them
            for (i, fd) in socketFDs.enumerated() {
                do { sockets.append(try UDPSocket(adopting: fd, expecting: plan.listen)) } catch {
                    socketFDs[(i + 1)...].forEach { _ = close($0) }
                    throw .system(error)
                }
            }
            if wanted > n {
                // More workers: queues attached to the device and sockets joined to the group, after the old ones.
                loose += try Failure.system(try TunDevice.attachQueues(name: config.device, vnetHeader: old.vnetHeader,
                                                                        count: wanted - n))
                sockets += try Failure.system(try UDPSocket.join(plan.listen, count: wanted - n, steering: false))
            } else if wanted < n {
                surplus = (Array(loose[wanted...]), Array(sockets[wanted...]))
                loose = Array(loose[..<wanted])
                sockets = Array(sockets[..<wanted])
            }
            let queues = loose
            loose = []  // the tun's from here on, closed by it also when `adopt` fails
            let tun = try setup.adopt(plan, index: old.deviceIndex, fds: queues, vnetHeader: old.vnetHeader)
            dataPlane = (tun, sockets)
            forwarder = try makeForwarder(tun: tun, sockets: sockets, membership: joined)
        } catch {
            HandoverClient.abort(old, paths: paths, logger: logger)
            throw error
        }
        switchStarted = MonotonicClock.milliseconds()
        // Aborts by itself when the old daemon did not let go.
        try HandoverClient.commit(old, daemon: oldDaemon, paths: paths, logger: logger)
        // Ours now: from here on a failure tears down as any daemon's does.
        started = true
        leaseHeld = true
        try setup.adopted(plan, index: old.deviceIndex)
        masquerade = setup.masquerade
        overlay = setup.installed
        defer {
            nodeGuard?.stop()
            forwarder?.stop()
            if outgoing.handedOver { masquerade?.stop() } else { setup.tearDown() }
        }
        try start(forwarder)
        let switched = MonotonicClock.milliseconds() - switchStarted
        // Over our sockets (the group's first indices, in the order they joined), then the surplus goes, last
        // first, so that nothing is renumbered.
        if let dataPlane { steer(dataPlane.tun, dataPlane.sockets) }
        for fd in surplus.queues.reversed() { _ = close(fd) }
        for s in surplus.sockets.reversed() { s.close() }
        surplus = ([], [])
        try Failure.system(try instance.takeOver(state(plan: plan)))
        try startGuard(setup)
        nodeGuard?.start()
        watchPeers()
        instance.control.start(handler: self)
        logger.info("took over \(config.device) from the daemon before (flannel-udp \(old.daemonVersion)): no worker forwarded for \(switched) ms, what arrived meanwhile was queued")
        serve(readiness: readiness, setup: setup, plan: plan, fileRoutes: fileRoutes.count)
        try throwIfFailed()
    }

    /// The old daemon's peer table, origins kept (manual `route add` entries survive), with our peers file's
    /// routes in place of its file routes when we have one.
    private func adoptPeers(_ routes: [RouteInfo], fileRoutes: [PeerRoute], port: UInt16) throws(Failure) {
        var byOrigin: [RouteOrigin: [PeerRoute]] = [:]
        for info in routes {
            guard let origin = RouteOrigin(rawValue: info.origin) else {
                throw .failed("the running daemon reported a route of unknown origin '\(info.origin)'")
            }
            do {
                let route = PeerRoute(subnet: try IPv4Network(parsing: info.subnet),
                                      endpoint: try Endpoint(parsing: info.endpoint, defaultPort: port))
                byOrigin[origin, default: []].append(route)
            } catch {
                throw .failed("the running daemon reported a bad route \(info.subnet) via \(info.endpoint): \(error)")
            }
        }
        if config.peersFile != nil { byOrigin[.file] = fileRoutes }
        for (origin, list) in byOrigin {
            do { try peers.store.replace(list, origin: origin) } catch {
                throw .failed("taking over the running daemon's \(origin.rawValue) routes: \(error)")
            }
        }
    }
}

/// The new daemon's requests to the old one, over the verified control socket (`ControlClient`).
enum HandoverClient {
    typealias Failure = FlannelError

    /// The old daemon's state, who it is (checked as `status` checks it) and its descriptors (its tun queues, then
    /// its sockets), which the caller must close.
    static func begin(paths: RuntimePaths) throws(Failure) -> (HandoverState, DaemonIdentity, [Int32]) {
        let answer: ControlClient.Answer
        do {
            answer = try ControlClient.exchange(.handover(.begin(version: HandoverState.version)), paths: paths,
                                                timeoutSeconds: 10, acceptingDescriptors: true)
        } catch { throw .failed("replace: \(error)") }
        var problem: String?
        switch answer.response {
        case .handover(let state):
            problem = validate(state, device: paths.device)
            if problem == nil && answer.descriptors.count != 2 * state.sockets {
                problem = "\(answer.descriptors.count) descriptors passed for \(state.sockets) queue(s) and socket(s)"
            }
            if problem == nil, answer.daemon == nil { problem = "it did not say who it is" }
            if problem == nil, let daemon = answer.daemon { return (state, daemon, answer.descriptors) }
            // It did begin: tell it we are not going on.
            if let problem { Self.abandon(state, paths: paths, because: problem) }
        case .error(let message):
            answer.descriptors.forEach { _ = close($0) }
            throw .failed("replace: the running daemon refused the handover: \(message)")
        default: problem = "not a handover answer"
        }
        answer.descriptors.forEach { _ = close($0) }
        throw .failed("replace: the running daemon's handover answer is unusable: \(problem ?? "")")
    }

    private static func abandon(_ state: HandoverState, paths: RuntimePaths, because problem: String) {
        _ = try? exchange(.abort(token: state.token), paths: paths)
    }

    /// Best effort: the old daemon also resumes by itself when we die or time out.
    static func abort(_ old: HandoverState, paths: RuntimePaths, logger: Logger) {
        do { _ = try exchange(.abort(token: old.token), paths: paths) } catch {
            logger.warning("telling the running daemon that the replacement failed: \(error)")
        }
    }

    static func exchange(_ request: HandoverRequest, paths: RuntimePaths) throws(Failure) -> ControlResponse {
        do { return try ControlClient.exchange(.handover(request), paths: paths, timeoutSeconds: 10).response } catch {
            throw .failed("replace: \(error)")
        }
    }

    /// What in an answer would make no sense (it comes from another process: checked, never trusted blindly).
    static func validate(_ s: HandoverState, device: String) -> String? {
        if s.device != device { return "it is for device '\(s.device)', not \(device)" }
        if s.token.isEmpty || s.token.utf8.count > 128 { return "bad token" }
        if s.deviceIndex <= 0 { return "device index \(s.deviceIndex)" }
        if !(1...Workers.maximum).contains(s.sockets) { return "\(s.sockets) sockets" }
        if !NodeConfig.mtuRange.contains(s.mtu) { return "MTU \(s.mtu)" }
        if s.routes.count > 100_000 { return "\(s.routes.count) routes" }
        for (what, text) in [("network", s.network), ("subnet", s.subnet)] {
            do { _ = try IPv4Network(parsing: text) } catch { return "\(what) '\(text)': \(error)" }
        }
        if IPv4Address(s.publicIP) == nil { return "public IP '\(s.publicIP)'" }
        return nil
    }

    /// Why the old daemon's node is not the one `plan` describes, if it is not.
    static func identityChange(_ old: HandoverState, plan: NodeSetup.Plan) -> String? {
        let config = plan.config
        var changes: [String] = []
        func compare(_ what: String, _ was: String, _ asked: String) {
            if was != asked { changes.append("\(what) \(was) would become \(asked)") }
        }
        compare("network", old.network, plan.membership.network.description)
        compare("subnet", old.subnet, plan.membership.subnet.description)
        compare("public IP", old.publicIP, plan.publicIP.description)
        compare("port", "\(old.port)", "\(plan.listen.port)")
        compare("MTU", "\(old.mtu)", "\(plan.mtu)")
        compare("subnet file", old.subnetFile ?? "none", config.subnetFile ?? "none")
        compare("masquerade", old.masquerade?.rawValue ?? "off", config.ipMasq ? config.masqBackend.rawValue : "off")
        // The device's IFF_VNET_HDR is the device's, for every queue: offloads cannot change under it.
        compare("offloads", old.vnetHeader ? "on" : "off", config.offloads ? "on" : "off")
        return changes.isEmpty ? nil : changes.joined(separator: ", ")
    }
}
