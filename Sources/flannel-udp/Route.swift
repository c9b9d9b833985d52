import ArgumentParser
import FlannelUDP
import Foundation

struct RouteCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "route",
        abstract: "Change or show the running daemon's peer table.",
        subcommands: [Add.self, Del.self, List.self]
    )

    struct Add: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Send a peer subnet to a node: route add SUBNET via IP[:PORT].")

        @Argument(help: ArgumentHelp("The peer's subnet, e.g. 10.244.2.0/24.", valueName: "subnet"))
        var subnet: String
        @Argument(help: ArgumentHelp("The word 'via'.", valueName: "via"))
        var via: String
        @Argument(help: ArgumentHelp("The peer's public address and optional UDP port.", valueName: "ip[:port]"))
        var endpoint: String
        @OptionGroup var deviceOptions: DeviceOptions

        func validate() throws {
            _ = try parseNetwork(subnet)
            if via != "via" { throw ValidationError("expected 'via' after the subnet, found '\(via)'") }
            do { _ = try Endpoint(parsing: endpoint, defaultPort: FlannelDefault.port) } catch {
                throw ValidationError(error.description)
            }
        }

        func run() throws {
            try requireRoot("route add")
            try send(.routeAdd(subnet: subnet, endpoint: endpoint), device: deviceOptions, command: "route add")
        }
    }

    struct Del: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Remove the route for a peer subnet.")

        @Argument(help: ArgumentHelp("The peer's subnet.", valueName: "subnet"))
        var subnet: String
        @OptionGroup var deviceOptions: DeviceOptions

        func validate() throws { _ = try parseNetwork(subnet) }

        func run() throws {
            try requireRoot("route del")
            try send(.routeDel(subnet: subnet), device: deviceOptions, command: "route del")
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Show the kernel's overlay route and the daemon's peer table with counters.")

        @OptionGroup var deviceOptions: DeviceOptions
        @OptionGroup var output: OutputOptions

        struct Listing: Codable {
            var kernelRoutes: [String]
            var peers: [RouteInfo]
        }

        func run() throws {
            try requireRoot("route list")
            var kernel: [String] = []
            if let nl = try? Netlink(), let link = try? nl.link(named: deviceOptions.device) {
                kernel = ((try? nl.routes()) ?? []).filter { $0.outputInterface == link.index }
                    .map { $0.description(device: link.name) }
            }
            let response: ControlResponse
            do { response = try ControlClient.send(.routeList, paths: deviceOptions.paths) } catch {
                throw fail("route list", error)
            }
            guard case .routes(let peers) = response else {
                if case .error(let m) = response { throw fail("route list", m) }
                throw fail("route list", "unexpected response from daemon")
            }
            if output.json {
                print(try JSONFormat.text(Listing(kernelRoutes: kernel, peers: peers)))
            } else {
                print("kernel: \(kernel.isEmpty ? "-" : kernel.joined(separator: "; "))")
                if peers.isEmpty { print("peers:  none") } else { printRoutes(peers) }
            }
        }
    }
}

/// Sends a request that answers `ok` or `error`.
private func send(_ request: ControlRequest, device: DeviceOptions, command: String) throws {
    let response: ControlResponse
    do { response = try ControlClient.send(request, paths: device.paths) } catch {
        throw fail(command, error)
    }
    switch response {
    case .ok: return
    case .error(let m): throw fail(command, m, Exit.usage)
    default: throw fail(command, "unexpected response from daemon")
    }
}
