import CShims
#if canImport(Glibc)
import Glibc
#endif

/// A Linux tun device opened through /dev/net/tun (IFF_TUN | IFF_NO_PI, optionally IFF_VNET_HDR).
///
/// The device exists for as long as this file descriptor is open: flannel-udp never makes it persistent, so a
/// daemon that dies, however it dies, takes its device and the device's routes with it.
public final class TunDevice: @unchecked Sendable {
    /// The name the kernel gave the device (the requested one, or e.g. "tun0" for a pattern).
    public let name: String
    /// The open /dev/net/tun descriptor, owned by this object.
    public let fd: Int32
    /// True when every read and write carries a `virtio_net_hdr` in front of the packet.
    public let vnetHeader: Bool

    private var closed = false

    /// The longest name the kernel accepts (IFNAMSIZ - 1).
    public static let maxNameLength = Int(FU_IFNAMSIZ) - 1

    /// Checks an interface name the way the kernel's dev_valid_name() does, so a bad name is reported before any
    /// system call: 1-15 bytes, not "." or "..", no '/', ':' or whitespace.
    public static func validateName(_ name: String) -> String? {
        let bytes = Array(name.utf8)
        if bytes.isEmpty { return "interface name is empty" }
        if bytes.count > maxNameLength {
            return "interface name '\(name)' is \(bytes.count) bytes long; the kernel allows at most \(maxNameLength)"
        }
        if name == "." || name == ".." { return "'\(name)' is not a valid interface name" }
        for b in bytes where b == UInt8(ascii: "/") || b == UInt8(ascii: ":") || b <= 0x20 || b == 0x7f {
            return "interface name '\(name)' contains '/', ':', whitespace or a control character"
        }
        return nil
    }

    /// Opens /dev/net/tun and attaches to (creating if needed) the tun device `name`.
    /// - Parameter vnetHeader: ask for IFF_VNET_HDR, needed for TSO/checksum offload.
    /// - Throws: `SystemError` naming the device; EBUSY when another process holds it.
    public init(name: String, vnetHeader: Bool = false) throws(SystemError) {
        if let problem = TunDevice.validateName(name) {
            throw SystemError("open tun device", problem, errno: EINVAL)
        }
        let fd = try syscall("open", "/dev/net/tun") { open("/dev/net/tun", O_RDWR | O_CLOEXEC) }
        var flags = Int16(FU_IFF_TUN | FU_IFF_NO_PI)
        if vnetHeader { flags |= Int16(FU_IFF_VNET_HDR) }
        var out = [CChar](repeating: 0, count: Int(FU_IFNAMSIZ))
        do {
            try syscall("create tun device", name) { fu_tun_set_iff(fd, name, flags, &out) }
        } catch {
            _ = Glibc.close(fd)
            throw error
        }
        self.fd = fd
        self.name = String(decoding: out.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        self.vnetHeader = vnetHeader
    }

    /// Switches the descriptor between blocking and non-blocking mode.
    public func setNonBlocking(_ on: Bool) throws(SystemError) {
        let flags = try syscall("get flags of tun device", name) { fcntl(fd, F_GETFL) }
        let new = on ? flags | O_NONBLOCK : flags & ~O_NONBLOCK
        try syscall("set O_NONBLOCK on tun device", name) { fcntl(fd, F_SETFL, new) }
    }

    /// Closes the descriptor; the kernel then removes the device and every route through it. Idempotent.
    public func close() {
        guard !closed else { return }
        closed = true
        _ = Glibc.close(fd)
    }

    deinit { close() }
}
