import ArgumentParser
import FlannelUDP
import Foundation
import Logging

struct Up: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Bring the node up and forward overlay traffic until stopped.",
        discussion: """
            Creates the tun device (default \(FlannelDefault.device)) with the subnet's network address as /32, MTU \
            underlay MTU - 28 and a transmit queue of 1000 packets, installs '<network> dev <device>', \
            writes flannel's subnet.env and forwards packets \
            between the device and UDP until SIGINT, SIGTERM or 'flannel-udp down'. SIGHUP re-reads --peers. \
            With --detach it returns once the node is ready (exit 0) or start-up failed (non-zero, with the reason). \
            A failed start leaves nothing behind. \
            With --replace, a daemon already running for the device hands the node over without losing a packet \
            (like 'ip route replace': without one it is a plain 'up'): the new daemon takes the old one's peer table \
            (routes added with 'route add' included), its etcd lease, and its tun queues and UDP sockets (passed \
            over the control socket), and forwards as soon as the old one lets go and exits; the device, its address \
            and route, the subnet file, the masquerade rules and the lease stay. \
            Options that would change the node's identity (network, subnet, public IP, port, MTU, subnet file, \
            --ip-masq, offloads) are refused with the reason, and a failed replacement leaves the old daemon \
            forwarding. --metrics-addr may stay the same: the new daemon joins the old one's listener. \
            --ip-masq adds flanneld's masquerade and forward rules (pods' traffic out of the network leaves with \
            the node's address; inside it, and kube-proxy's marked packets, untouched), in one transaction, kept \
            in place every --masq-resync seconds.

            \(Up.serviceHelp)

            \(UpEnvironment.help)
            """
    )

    @Option(help: ArgumentHelp("The whole overlay network, e.g. 10.244.0.0/16 (not with --etcd-endpoints).", valueName: "cidr"))
    var network: String?

    @Option(help: ArgumentHelp("This node's subnet inside the network, e.g. 10.244.1.0/24 (not with --etcd-endpoints).", valueName: "cidr"))
    var subnet: String?

    @OptionGroup(title: "etcd registry (flannel's key layout)")
    var etcd: EtcdArguments

    @Option(name: .customLong("iface"), help: ArgumentHelp("The underlay interface (default: the interface of the default route).", valueName: "name"))
    var underlay: String?

    @Option(name: .customLong("public-ip"), help: ArgumentHelp("The address peers send to (default: the underlay's first IPv4 address).", valueName: "ip"))
    var publicIP: IPv4Address?

    @Option(help: ArgumentHelp("The UDP port (1-65535).", valueName: "port"))
    var port: Int = Int(FlannelDefault.port)

    @Option(help: ArgumentHelp("The overlay MTU (default: underlay MTU - 28).", valueName: "n"))
    var mtu: Int?

    @Option(help: ArgumentHelp("The tun device to create.", valueName: "name"))
    var device: String = FlannelDefault.device

    @Option(help: ArgumentHelp("A peers file: one 'SUBNET IP[:PORT]' per line, '#' comments; re-read on SIGHUP.", valueName: "file"))
    var peers: String?

    @Option(name: .customLong("subnet-file"), help: ArgumentHelp("Where to write flannel's subnet.env.", valueName: "path"))
    var subnetFile: String = SubnetFile.defaultPath

    @Flag(name: .customLong("ip-masq"), help: "Install flanneld's masquerade and forward rules (kept in place, removed by 'down') and write FLANNEL_IPMASQ=true to the subnet file.")
    var ipMasq = false

    @Option(name: .customLong("masq-backend"), help: ArgumentHelp("With --ip-masq: nftables (table ip flannel-ipv4) or iptables (chains FLANNEL-POSTRTG, FLANNEL-FWD).", valueName: "backend"))
    var masqBackend: MasqueradeBackend = .nftables

    @Option(name: .customLong("masq-resync"), help: ArgumentHelp("With --ip-masq: seconds between checks that put the rules back if they were removed (flanneld's --iptables-resync).", valueName: "s"))
    var masqResync: Double = 5

    @Option(name: .customLong("peer-check"), help: ArgumentHelp("strict: accept a datagram only from the peer that owns its inner source; relaxed: any sender, if the inner source is in a known peer subnet (NAT).", valueName: "mode"))
    var peerCheck: PeerCheck = .strict

    @Flag(name: .customLong("no-offload"), help: "Force the plain data path: no TUN TSO, UDP GSO/GRO or TCP coalescing (each is otherwise probed and used when the kernel allows).")
    var noOffload = false

    @Option(name: .customLong("codel-target"), help: ArgumentHelp("Receive-side CoDel: how long, in milliseconds, a bulk flow's datagrams may keep waiting in the UDP socket queue before it loses one (or has it ECN-marked); sparse flows are never dropped. Shortens the queue small flows wait behind when the senders back off on loss (cubic, reno), costs bulk throughput; 0 turns it off.", valueName: "ms"))
    var codelTarget: Double = 0.5

    @Option(name: .customLong("express-size"), help: ArgumentHelp("Inner packets of at most this many bytes (pings, handshakes, short requests; not bare TCP acknowledgements, which stay with their flow) take a worker pair of their own in both directions, on one thread, so they wait neither behind bulk flows nor for a busy worker; 0 turns the express lane off.", valueName: "bytes"))
    var expressSize: Int = ForwarderOptions.defaultExpressLength

    @Option(name: .customLong("express-spin"), help: ArgumentHelp("After the express lane forwards a packet, its thread keeps looking for the next one this many microseconds, yielding the CPU between looks, before it sleeps: a shorter round trip on an idle node, for up to that much CPU per packet that arrives alone, and never more than 2 % of a CPU past a 10 ms burst, however the packets come. It spins only while the other worker pairs have moved nothing for 10 ms, so not beside bulk flows; 0-1000, 0 sleeps at once.", valueName: "us"))
    var expressSpin: Int = ForwarderOptions.defaultExpressSpinMicroseconds

    @Option(name: .customLong("express-priority"), help: ArgumentHelp("The SCHED_FIFO priority the express lane's thread takes while the CPUs are busy, so that short packets do not wait for a CPU behind the node's bulk work; it drops back to the normal scheduler when the CPUs are idle again, and for a flood (1 ms without sleeping, or 5 % of a CPU); 1-99, 0 never. Needs CAP_SYS_NICE or RLIMIT_RTPRIO; without either the lane keeps the normal scheduler (logged).", valueName: "prio"))
    var expressPriority: Int32 = ForwarderOptions.defaultExpressPriority

    @Option(help: ArgumentHelp("Worker pairs, 1-64: each a tun queue, a UDP socket on the port and a thread per direction, beside the express lane's pair; one inner flow stays on one pair (default: the CPUs this process may run on, at most 8).", valueName: "n"))
    var workers: Int?

    @Option(name: .customLong("metrics-addr"), help: ArgumentHelp("Serve /healthz and Prometheus /metrics over HTTP on this IPv4 address and port, e.g. 127.0.0.1:9100 (off by default).", valueName: "host:port"))
    var metricsAddr: String?

    @Flag(help: "Return once the node is ready, leaving the daemon running in the background.")
    var detach = false

    @Flag(help: "Take over from a daemon running for the device without losing a packet (a plain 'up' if none runs).")
    var replace = false

    @Option(name: .customLong("log-file"), help: ArgumentHelp("With --detach: where the daemon logs (default: its state directory).", valueName: "path"))
    var logFile: String?

    @Flag(name: .shortAndLong, help: "Log each packet-level event (debug level).")
    var verbose = false

    /// Set by --detach when it starts the daemon: the pipe to report readiness on.
    @Option(name: .customLong("ready-fd"), help: .hidden)
    var readyFD: Int32?

    func validate() throws {
        if !(1...65535).contains(port) { throw ValidationError("--port \(port) is outside 1-65535") }
        if let workers, let problem = Workers.validate(workers) { throw ValidationError(problem) }
        if !(codelTarget >= 0 && codelTarget <= 1000) {
            throw ValidationError("--codel-target \(codelTarget) is outside 0-1000 milliseconds (0 turns CoDel off)")
        }
        if let problem = (expressSize == 0 ? nil : NodeConfig.expressSizeProblem(expressSize))
                         ?? ForwarderOptions.expressSpinProblem(expressSpin)
                         ?? ForwarderOptions.expressPriorityProblem(expressPriority)
                         ?? NodeConfig.masqResyncProblem(masqResync) {
            throw ValidationError("--" + problem)
        }
        if let metricsAddr {
            do { _ = try MetricsAddress(parsing: metricsAddr) } catch { throw ValidationError(error.description) }
        }
        if etcd.password != nil && etcd.passwordFile != nil {
            throw ValidationError("give --etcd-password or --etcd-password-file, not both")
        }
        if etcd.endpoints != nil {
            if network != nil || subnet != nil {
                throw ValidationError("--network and --subnet come from etcd when --etcd-endpoints is given")
            }
            guard let options = try etcd.options() else { return }
            var config = NodeConfig(source: .etcd(options))
            config.device = device
            config.underlay = underlay
            config.mtu = mtu
            if let problem = config.validate() { throw ValidationError(problem) }
            return
        }
        guard let network, let subnet else {
            throw ValidationError("give --network and --subnet, or --etcd-endpoints to take them from etcd")
        }
        let net = try parseNetwork(network)
        let sub = try parseNetwork(subnet)
        var config = NodeConfig(network: net, subnet: sub)
        config.device = device
        config.underlay = underlay
        config.port = UInt16(port)
        config.mtu = mtu
        if let problem = config.validate() { throw ValidationError(problem) }
    }

    /// The node's config; with --etcd-endpoints its source is the registry, reached with `etcdPassword`.
    func makeConfig(etcdPassword: String? = nil) throws -> NodeConfig {
        var config: NodeConfig
        if var options = try etcd.options() {
            options.password = etcdPassword
            config = NodeConfig(source: .etcd(options))
        } else if let network, let subnet {
            config = NodeConfig(network: try parseNetwork(network), subnet: try parseNetwork(subnet))
        } else {
            throw ValidationError("give --network and --subnet, or --etcd-endpoints to take them from etcd")
        }
        config.device = device
        config.underlay = underlay
        config.publicIP = publicIP
        config.port = UInt16(port)
        config.mtu = mtu
        config.subnetFile = subnetFile
        config.peersFile = peers.map { URL(fileURLWithPath: $0).path }
        config.ipMasq = ipMasq
        config.masqBackend = masqBackend
        config.masqResyncSeconds = masqResync
        config.peerCheck = peerCheck
        config.offloads = !noOffload
        config.codel = CoDelParameters(targetNanoseconds: UInt64((codelTarget * 1_000_000).rounded()))
        config.workers = workers ?? Workers.defaultCount()
        config.express = expressSize == 0 ? nil : expressSize
        config.expressSpinMicroseconds = expressSpin
        config.expressPriority = expressPriority
        return config
    }

    func run() throws {
        try requireRoot("up")
        let etcdPassword = try etcd.takePassword()
        let config = try makeConfig(etcdPassword: etcdPassword)
        if case .etcd(let options) = config.source, let warning = options.plainTextCredentialsWarning {
            warn("up", warning)
        }
        if detach {
            do throws(FlannelError) {
                let daemon = try DaemonSpawn.start(device: config.device, logFile: logFile, etcdPassword: etcdPassword)
                print("flannel-udp: \(config.device) is up (pid \(daemon.pid), log \(daemon.log))")
            } catch {
                throw fail("up", error)
            }
            return
        }
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = verbose ? .debug : .info
            return handler
        }
        var logger = Logger(label: "flannel-udp")
        logger.logLevel = verbose ? .debug : .info
        let daemon = Daemon(config: config, logger: logger)
        daemon.replace = replace
        let service = try startService(logger: logger)  // UpService.swift
        daemon.observer = service
        defer { service.shutdown() }
        do {
            try daemon.run(readiness: Readiness(fd: readyFD))
        } catch {
            throw fail("up", error)
        }
    }
}

/// flanneld's etcd options.
struct EtcdArguments: ParsableArguments {
    @Option(name: .customLong("etcd-endpoints"), help: ArgumentHelp("Comma-separated etcd URLs; the network and this node's subnet then come from flannel's registry there.", valueName: "urls"))
    var endpoints: String?

    @Option(name: .customLong("etcd-prefix"), help: ArgumentHelp("The registry's key prefix.", valueName: "path"))
    var prefix: String = FlannelDefault.etcdPrefix

    @Option(name: .customLong("etcd-username"), help: ArgumentHelp("etcd user name.", valueName: "name"))
    var username: String?

    @Option(name: .customLong("etcd-password"), help: ArgumentHelp("etcd password; every local user can read it in ps until 'up' starts: prefer --etcd-password-file or $\(EtcdPassword.variable).", valueName: "password"))
    var password: String?

    @Option(name: .customLong("etcd-password-file"), help: ArgumentHelp("A file holding the etcd password (one trailing newline ignored): a regular file owned by root, mode 600 or stricter.", valueName: "path"))
    var passwordFile: String?

    @Option(name: .customLong("etcd-cafile"), help: ArgumentHelp("CA certificate for etcd's TLS.", valueName: "path"))
    var caFile: String?

    @Option(name: .customLong("etcd-certfile"), help: ArgumentHelp("Client certificate for etcd's TLS.", valueName: "path"))
    var certFile: String?

    @Option(name: .customLong("etcd-keyfile"), help: ArgumentHelp("Client key for etcd's TLS.", valueName: "path"))
    var keyFile: String?

    /// nil without --etcd-endpoints. The password is left to `takePassword()`.
    func options() throws -> EtcdOptions? {
        guard let endpoints else { return nil }
        do {
            return EtcdOptions(endpoints: try EtcdOptions.parseEndpoints(endpoints), prefix: prefix, username: username,
                               caFile: caFile, certFile: certFile, keyFile: keyFile)
        } catch {
            throw ValidationError("--etcd-endpoints: \(error)")
        }
    }
}
