import ArgumentParser
import FlannelUDP
import Foundation

struct Cleanup: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Remove what an earlier flannel backend left inside the overlay network.",
        discussion: """
            Removes host-gw routes to subnets of the network via a gateway; any flannel backend's device \
            (flannel.<VNI> and flannel-v6.<VNI> vxlan, flannel.ipip, flannel-wg and flannel-wg-v6 wireguard, a \
            \(FlannelDefault.device) tun that no live flannel-udp daemon owns) with its routes and neighbour entries; flanneld's \
            masquerade rules (nftables tables ip flannel-ipv4 and ip6 flannel-ipv6, iptables and ip6tables chains \
            FLANNEL-POSTRTG and FLANNEL-FWD with every jump to them); and the state of a dead flannel-udp daemon. \
            A cni0 bridge with an address outside this node's subnet is reported, and with --fix-cni0 \
            re-addressed (the stale address deleted, the subnet's gateway address added). Prints each change as \
            '[#] ...' as it makes it; --dry-run prints them without making them. Nothing outside the network is \
            ever touched. The network and subnet come from --network and --subnet, else from the subnet file.
            """
    )

    @Option(help: ArgumentHelp("The overlay network (default: FLANNEL_NETWORK from the subnet file).", valueName: "cidr"))
    var network: String?

    @Option(help: ArgumentHelp("This node's subnet, to check cni0 against (default: FLANNEL_SUBNET from the subnet file).", valueName: "cidr"))
    var subnet: String?

    @Option(name: .customLong("subnet-file"), help: ArgumentHelp("The subnet file to read the network and subnet from.", valueName: "path"))
    var subnetFile: String = SubnetFile.defaultPath

    @Flag(name: .customLong("fix-cni0"), help: "Re-address a cni0 bridge whose address is outside this node's subnet.")
    var fixCNI0 = false

    @Flag(name: .customLong("dry-run"), help: "Print what would be removed and change nothing.")
    var dryRun = false

    func validate() throws {
        if let network { _ = try parseNetwork(network) }
        if let subnet { _ = try parseNetwork(subnet, strict: false) }
    }

    func run() throws {
        if !dryRun { try requireRoot("cleanup") }
        let file = try? SubnetFile.load(path: subnetFile)
        let net: IPv4Network
        if let network {
            net = try parseNetwork(network)
        } else {
            do { net = try SubnetFile.load(path: subnetFile).network } catch {
                throw fail("cleanup", "no --network given and \(error)", Exit.usage)
            }
        }
        let nodeSubnet = try subnet.map { try parseNetwork($0, strict: false) } ?? file.map(\.subnet)
        let ownSubnet = nodeSubnet.map { IPv4Network(address: $0.address, prefixLength: $0.prefixLength) }

        let system: CleanupSystem
        let actions: [FlannelUDP.Cleanup.Action]
        do {
            system = try CleanupSystem()
            actions = try system.plan(network: net, subnet: ownSubnet, fixCNI0: fixCNI0, netfilterOptional: dryRun) {
                Console.writeError("flannel-udp cleanup: \($0)\n")
            }
        } catch {
            throw fail("cleanup", "\(error)")
        }

        for note in actions where !note.isChange { print(note) }
        let changes = actions.filter(\.isChange)
        if changes.isEmpty {
            print("nothing to clean up in \(net)")
            return
        }
        var failures = 0
        for action in changes {
            if dryRun {
                print("[dry-run] \(action)")
                continue
            }
            print("[#] \(action)")
            do { try system.apply(action) } catch {
                Console.writeError("flannel-udp cleanup: \(action): \(error)\n")
                failures += 1
            }
        }
        if failures > 0 { throw Exit.failure }
    }
}
