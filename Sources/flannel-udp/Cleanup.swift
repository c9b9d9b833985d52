import ArgumentParser
import FlannelUDP
import Foundation
#if canImport(Glibc)
import Glibc
#endif

struct Cleanup: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Remove what an earlier backend left inside the overlay network.",
        discussion: """
            Removes host-gw routes to subnets of the network via a gateway, a leftover flannel.<VNI> vxlan device \
            and routes through it, and the state of a dead flannel-udp daemon. Prints each change as it makes it; \
            --dry-run prints them without making them. Nothing outside the network is ever touched. The network \
            comes from --network, else from the subnet file.
            """
    )

    @Option(help: ArgumentHelp("The overlay network (default: FLANNEL_NETWORK from the subnet file).", valueName: "cidr"))
    var network: String?

    @Option(name: .customLong("subnet-file"), help: ArgumentHelp("The subnet file to read the network from.", valueName: "path"))
    var subnetFile: String = SubnetFile.defaultPath

    @Flag(name: .customLong("dry-run"), help: "Print what would be removed and change nothing.")
    var dryRun = false

    func validate() throws {
        if let network { _ = try parseNetwork(network) }
    }

    func run() throws {
        if !dryRun { try requireRoot("cleanup") }
        let net: IPv4Network
        if let network {
            net = try parseNetwork(network)
        } else {
            do { net = try SubnetFile.load(path: subnetFile).network } catch {
                throw fail("cleanup", "no --network given and \(error)", Exit.usage)
            }
        }

        let nl: Netlink
        let actions: [FlannelUDP.Cleanup.Action]
        do {
            nl = try Netlink()
            let links = try nl.links()
            // Devices of live daemons in this namespace are not leftovers.
            let keep = Set(links.map(\.name).filter { name in
                (try? ControlClient.send(.routeList, paths: RuntimePaths(device: name), timeoutSeconds: 1)) != nil
            })
            actions = FlannelUDP.Cleanup.plan(network: net, links: links, addresses: try nl.addresses(),
                                              routes: try nl.routes(), keepDevices: keep)
        } catch {
            throw fail("cleanup", "\(error)")
        }
        let paths = RuntimePaths(device: "flannel0")
        let stale = FlannelUDP.Cleanup.staleStateFiles(runDirectory: paths.runDirectory, namespaceID: paths.namespaceID)
        let all = actions + stale.map { .removeFile($0) }

        if all.isEmpty {
            print("nothing to clean up in \(net)")
            return
        }
        var failures = 0
        for action in all {
            if dryRun {
                print("[dry-run] \(action)")
                continue
            }
            print("[#] \(action)")
            do {
                switch action {
                case .deleteRoute(let route, _):
                    try nl.deleteRoute(route)
                case .deleteLink(let index, _):
                    try nl.deleteLink(index: index)
                case .removeFile(let path):
                    // The dead daemon's state with its log, socket and lock, under its lock (so never a live one's).
                    let device = URL(fileURLWithPath: path).deletingPathExtension().lastPathComponent
                    DaemonLeftovers.remove(paths: RuntimePaths(device: device), state: nil)
                    if FileManager.default.fileExists(atPath: path) {
                        throw SystemError("remove", "\(path) (a daemon holds its lock)", errno: EBUSY)
                    }
                }
            } catch let e as SystemError where e.errno == ESRCH || e.errno == ENODEV {
                // Already gone (a route that went with its device): that is the goal.
            } catch {
                FileHandle.standardErrorWrite("flannel-udp cleanup: \(error)\n")
                failures += 1
            }
        }
        if failures > 0 { throw Exit.failure }
    }
}
