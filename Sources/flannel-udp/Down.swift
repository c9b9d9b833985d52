import ArgumentParser
import FlannelUDP
import Foundation
#if canImport(Glibc)
import Glibc
#endif

struct Down: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Stop the daemon of a device and remove everything it made.",
        discussion: """
            Asks the daemon over its control socket to stop; it removes its masquerade rules, its route, its \
            device, the subnet file it wrote (if nobody has changed it since) and its state. Waits until the \
            device is gone. If no daemon is running, removes what a dead \
            one left (state file, log). Succeeds when there is nothing to remove.
            """
    )

    @OptionGroup var deviceOptions: DeviceOptions

    @Flag(name: .customLong("keep-lease"), help: "Leave this node's etcd lease in the registry (it expires by itself).")
    var keepLease = false

    @Option(help: ArgumentHelp("Seconds to wait for the daemon to stop before killing it.", valueName: "s"))
    var timeout: Int = 10

    func run() throws {
        try requireRoot("down")
        let paths = deviceOptions.paths
        let device = deviceOptions.device
        let state = DaemonState.load(path: paths.stateFile)

        var pid: Int32? = state?.isAlive == true ? state?.pid : nil
        let response: ControlResponse
        do {
            if case .status(let s) = try ControlClient.send(.status, paths: paths) { pid = s.pid }
            response = try ControlClient.send(.shutdown(keepLease: keepLease), paths: paths)
        } catch {
            if case .notRunning = error {
                removeLeftovers(paths: paths, state: state)
                print("flannel-udp: no daemon running for \(device); nothing to stop")
                return
            }
            throw fail("down", error.description)
        }
        if case .error(let m) = response { throw fail("down", "daemon refused: \(m)") }

        // Wait for the daemon to let go of its control socket (it does so last) and the device to disappear.
        if !waitStopped(paths: paths, seconds: timeout) {
            if let pid {
                FileHandle.standardErrorWrite("flannel-udp down: daemon (pid \(pid)) did not stop within \(timeout) s; killing it\n")
                kill(pid, SIGKILL)
            }
            guard waitStopped(paths: paths, seconds: 5) else {
                throw fail("down", "the daemon for \(device) did not stop")
            }
        }
        removeLeftovers(paths: paths, state: state)
        print("flannel-udp: \(device) is down")
    }

    private func daemonGone(_ paths: RuntimePaths) -> Bool {
        do {
            _ = try ControlClient.send(.routeList, paths: paths, timeoutSeconds: 1)
            return false
        } catch {
            if case .notRunning = error { return true }
            return false
        }
    }

    private func waitStopped(paths: RuntimePaths, seconds: Int) -> Bool {
        let deadline = Date().addingTimeInterval(TimeInterval(seconds))
        while Date() < deadline {
            if daemonGone(paths), (try? Netlink().link(named: paths.device)) ?? nil == nil { return true }
            usleep(20_000)
        }
        return false
    }

    /// A daemon that was killed cannot clean up after itself: its device and route went with it (the tun is not
    /// persistent), but its state file, log and subnet file remain. The subnet file goes only if it still holds
    /// exactly what that daemon wrote (recorded in its state); anything else there is someone else's.
    private func removeLeftovers(paths: RuntimePaths, state: DaemonState?) {
        if let state, !state.isAlive, let subnetFile = state.subnetFile, let written = state.subnetFileContents {
            do {
                if try AtomicFile.removeIfUnchanged(subnetFile, expected: written) { print("[#] remove \(subnetFile)") }
            } catch {
                FileHandle.standardErrorWrite("flannel-udp down: \(error)\n")
            }
        }
        for path in [paths.stateFile, paths.logFile] where unlink(path) == 0 {
            if path == paths.stateFile { print("[#] remove \(path)") }
        }
        rmdir(paths.stateDirectory)
    }
}
