/// flannel's defaults, each defined here once: the command line, its help, the registry and the cleanup all use
/// these names.
public enum FlannelDefault {
    /// The udp backend's tun device.
    public static let device = "flannel0"
    /// The UDP port every node listens on (flannel's `Backend.Port` default).
    public static let port: UInt16 = 8285
    /// The etcd key prefix of flannel's registry.
    public static let etcdPrefix = "/coreos.com/network"
}
