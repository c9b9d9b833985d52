import ArgumentParser
import FlannelUDP
import Foundation

struct Down: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Stop the daemon of a device and remove everything it made.",
        discussion: """
            Asks the daemon over its control socket to stop (also while it is still starting); it removes its \
            masquerade rules, its route, its device, the subnet file it wrote (if nobody has changed it since) and \
            its state. Waits until it has exited and the device is \
            gone; after --timeout it is killed. Only a daemon verified as such is asked or signalled: the control \
            socket's owner must be root and the process the state file records. If no daemon is running, removes \
            what a dead one left (state, socket, lock, log). Succeeds when there is nothing to remove.
            """
    )

    @OptionGroup var deviceOptions: DeviceOptions

    @Flag(name: .customLong("keep-lease"), help: "Leave this node's etcd lease in the registry (it expires by itself).")
    var keepLease = false

    @Option(help: ArgumentHelp("Seconds to wait for the daemon to stop before killing it.", valueName: "s"))
    var timeout: Int = 10

    func run() throws {
        try requireRoot("down")
        let device = deviceOptions.device
        let outcome: DaemonStop.Outcome
        do {
            outcome = try DaemonStop.stop(paths: deviceOptions.paths, keepLease: keepLease, timeoutSeconds: timeout) {
                Console.writeError("flannel-udp down: \($0)\n")
            }
        } catch {
            throw fail("down", error)
        }
        switch outcome {
        case .notRunning(let removed):
            for path in removed { print("[#] remove \(path)") }
            print("flannel-udp: no daemon running for \(device); nothing to stop")
        case .stopped(let removed):
            for path in removed { print("[#] remove \(path)") }
            print("flannel-udp: \(device) is down")
        }
    }
}
