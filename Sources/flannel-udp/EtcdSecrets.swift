import ArgumentParser
import FlannelUDP

extension EtcdArguments {
    /// The etcd password, from (first found) `--etcd-password`, `--etcd-password-file`, `FLANNEL_UDP_ETCD_PASSWORD`,
    /// `FLANNELD_ETCD_PASSWORD`. Whichever wins, both variables are erased from this process's environment and the
    /// value of `--etcd-password` is overwritten in its argv, so neither /proc/PID/environ nor /proc/PID/cmdline
    /// holds the secret from here on, and nothing this process starts inherits it (see `EtcdPassword`).
    ///
    /// For the generic FLANNEL_UDP_<OPTION> environment mechanism: it must leave `EtcdPassword.variables` to this
    /// function (turned into `--etcd-password`, the value would be warned about as if typed on the command line,
    /// and not erased); `FLANNEL_UDP_ETCD_PASSWORD_FILE` can go through it like any other path option.
    func takePassword() throws -> String? {
        let fromEnvironment = EtcdPassword.takeFromEnvironment()
        if let password {
            EtcdPassword.scrubCommandLine()
            warn("up", "--etcd-password on the command line can be read by every local user (ps, /proc/PID/cmdline) "
                 + "until flannel-udp has started, and stays in shell history: use --etcd-password-file or "
                 + "\(EtcdPassword.variable)")
            return password
        }
        if let passwordFile {
            do { return try EtcdPassword.read(file: passwordFile) } catch {
                throw fail("up", "--etcd-password-file: \(error)", Exit.usage)
            }
        }
        return fromEnvironment?.value
    }
}

/// Prints a warning to stderr, prefixed with the command name; the command goes on.
func warn(_ command: String, _ message: String) {
    Console.writeError("flannel-udp \(command): warning: \(message)\n")
}
