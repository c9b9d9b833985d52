import CShims
#if canImport(Glibc)
import Glibc
#endif

/// A Linux tun device opened through /dev/net/tun (IFF_TUN | IFF_NO_PI | IFF_MULTI_QUEUE, optionally
/// IFF_VNET_HDR), with one descriptor per queue: the kernel spreads the packets routed into the device over its
/// queues by flow hash, one forwarding worker reads each. Multi-queue even with one queue, so that another process
/// (a replacing daemon) can attach queues of its own to the same device.
///
/// The device exists for as long as this file descriptor is open: flannel-udp never makes it persistent, so a
/// daemon that dies, however it dies, takes its device and the device's routes with it.
public final class TunDevice: @unchecked Sendable {
    /// The name the kernel gave the device (the requested one, or e.g. "tun0" for a pattern).
    public let name: String
    /// The first queue's /dev/net/tun descriptor, owned by this object.
    public var fd: Int32 { queueFDs[0] }
    /// One descriptor per queue, all owned by this object.
    public let queueFDs: [Int32]
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

    /// Opens /dev/net/tun `queues` times and attaches each to (creating if needed) the tun device `name`.
    /// - Parameter vnetHeader: ask for IFF_VNET_HDR, needed for TSO/checksum offload.
    /// - Throws: `SystemError` naming the device (and the queue when there are several); EBUSY when another
    ///   process holds it without IFF_MULTI_QUEUE, EINVAL when it was made with other flags.
    public init(name: String, vnetHeader: Bool = false, queues: Int = 1) throws(SystemError) {
        if let problem = TunDevice.validateName(name) {
            throw SystemError("open tun device", problem, errno: EINVAL)
        }
        precondition(queues >= 1)
        var flags = Int16(FU_IFF_TUN | FU_IFF_NO_PI | FU_IFF_MULTI_QUEUE)
        if vnetHeader { flags |= Int16(FU_IFF_VNET_HDR) }
        var fds: [Int32] = []
        var actual = name
        do throws(SystemError) {
            for q in 0..<queues {
                let fd = try syscall("open", "/dev/net/tun") { open("/dev/net/tun", O_RDWR | O_CLOEXEC) }
                fds.append(fd)
                var out = [CChar](repeating: 0, count: Int(FU_IFNAMSIZ))
                // Queues after the first attach to the device the first one made (its name, if a pattern was given).
                let what = q == 0 ? (queues == 1 ? "create tun device" : "create tun device (queue 1 of \(queues))")
                                  : "attach queue \(q + 1) of \(queues) to tun device"
                try syscall(what, actual) { fu_tun_set_iff(fd, actual, flags, &out) }
                if q == 0 { actual = String(decoding: out.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self) }
            }
        } catch {
            for fd in fds { _ = Glibc.close(fd) }
            throw error
        }
        queueFDs = fds
        self.name = actual
        self.vnetHeader = vnetHeader
    }

    /// Takes over queue descriptors of the device `name` (a running daemon's, passed to a replacing one; or
    /// queues attached by `attachQueues`): this object owns and closes them from now on. `vnetHeader` must be the
    /// device's flag.
    public init(adopting fds: [Int32], name: String, vnetHeader: Bool) {
        precondition(!fds.isEmpty)
        queueFDs = fds
        self.name = name
        self.vnetHeader = vnetHeader
    }

    /// Attaches `count` more queues to the existing multi-queue device `name` (TUNSETIFF with the same name and
    /// flags: `vnetHeader` must be the device's); the caller owns the descriptors.
    public static func attachQueues(name: String, vnetHeader: Bool, count: Int) throws(SystemError) -> [Int32] {
        if count == 0 { return [] }
        return try TunDevice(name: name, vnetHeader: vnetHeader, queues: count).release()
    }

    /// Gives up the descriptors without closing them.
    private func release() -> [Int32] {
        closed = true
        return queueFDs
    }

    /// Picks the queue of every packet routed into the device with `FlowSteering.tunProgram` (its first `workers`
    /// queues by flow, queue `workers` for the express lane's short packets), or with `workers` nil, hands the
    /// choice back to the kernel's flow hash (no program). The program is the device's, whichever queue sets it,
    /// and replaces the one before atomically.
    /// - Throws: `SystemError` naming the step and the device; a verifier refusal carries the verifier's last line.
    public func steer(workers: Int?, express: Int?) throws(SystemError) {
        guard let workers else {
            try syscall("detach steering program (TUNSETSTEERINGEBPF) from tun device", name) {
                fu_tun_set_steering_ebpf(fd, -1)
            }
            return
        }
        let program = FlowSteering.tunProgram(workers: workers, express: express)
        var log = [CChar](repeating: 0, count: 4096)
        let prog = program.withUnsafeBufferPointer { insns in
            log.withUnsafeMutableBufferPointer {
                fu_bpf_load_socket_filter(insns.baseAddress, UInt32(insns.count), $0.baseAddress, UInt32($0.count))
            }
        }
        if prog < 0 {
            let code = errno
            let said = String(decoding: log.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
            let last = said.split(separator: "\n").last.map { " (verifier: \($0))" } ?? ""
            throw SystemError("load steering program (BPF_PROG_LOAD) for tun device", name + last, errno: code)
        }
        defer { _ = Glibc.close(prog) }  // the device holds its own reference
        try syscall("attach steering program (TUNSETSTEERINGEBPF) to tun device", name) {
            fu_tun_set_steering_ebpf(fd, prog)
        }
    }

    /// Switches every queue's descriptor between blocking and non-blocking mode.
    public func setNonBlocking(_ on: Bool) throws(SystemError) {
        for fd in queueFDs {
            let flags = try syscall("get flags of tun device", name) { fcntl(fd, F_GETFL) }
            let new = on ? flags | O_NONBLOCK : flags & ~O_NONBLOCK
            try syscall("set O_NONBLOCK on tun device", name) { fcntl(fd, F_SETFL, new) }
        }
    }

    /// Closes every queue; the kernel then removes the device and every route through it. Idempotent.
    public func close() {
        guard !closed else { return }
        closed = true
        for fd in queueFDs { _ = Glibc.close(fd) }
    }

    deinit { close() }
}
