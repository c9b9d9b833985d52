import Atomics
import CShims
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// Which kernel offloads the forwarder uses, probed once when it is created. Each one the kernel refuses is
/// left off with one log line naming it; the data plane then takes the plain path for that part.
final class OffloadState: Sendable {
    /// Reads and writes on the tun carry a virtio_net_hdr (IFF_VNET_HDR).
    let vnetHeader: Bool
    /// The tun hands out TCP super-packets (TUN_F_TSO4) and packets with partial checksums (TUN_F_CSUM).
    let tso: Bool
    /// UDP_GRO on the socket: receives may return several datagrams in one buffer.
    let udpGRO: Bool
    /// Consecutive TCP segments are merged before they are written into the tun.
    let coalesce: Bool
    /// UDP_SEGMENT on send. Turned off for good when the kernel refuses a GSO send (EIO: the route's device
    /// cannot checksum; EINVAL).
    let udpGSO: ManagedAtomic<Bool>
    /// TCP super-packets read from the tun and segmented here (TSO at work).
    let superPacketsSegmented = ManagedAtomic<UInt64>(0)
    /// Super-packets written into the tun that merged two or more segments (coalescing at work).
    let superPacketsCoalesced = ManagedAtomic<UInt64>(0)
    /// UDP receives that returned several datagrams in one buffer (GRO at work).
    let groBuffers = ManagedAtomic<UInt64>(0)
    /// The largest datagram payload received (each datagram of a GRO buffer counted on its own): never more than
    /// the peer's tun MTU when the peer keeps the wire contract.
    let largestDatagramReceived = ManagedAtomic<UInt64>(0)

    init(vnetHeader: Bool, tso: Bool, udpGSO: Bool, udpGRO: Bool, coalesce: Bool) {
        self.vnetHeader = vnetHeader
        self.tso = tso
        self.udpGSO = ManagedAtomic(udpGSO)
        self.udpGRO = udpGRO
        self.coalesce = coalesce
    }

    var active: [String] {
        var names = ["batching"]
        if tso { names.append("tso") }
        if udpGSO.load(ordering: .relaxed) { names.append("gso") }
        if udpGRO { names.append("gro") }
        if coalesce { names.append("coalesce") }
        return names
    }

    /// Errors by which the kernel says "not here": the feature is left off, not a failure.
    static func isRefusal(_ e: Int32) -> Bool {
        e == EINVAL || e == EIO || e == ENOPROTOOPT || e == EOPNOTSUPP || e == ENOTTY
    }

    /// Sets up and probes the offloads. With `vnetHeader`, the header size is set to 10 bytes (a failure there is
    /// fatal: the reads could not be parsed); everything else is optional.
    /// The tun's settings belong to the device (one queue's descriptor sets them for all); the UDP options are set
    /// on every socket, and an offload counts as on only when every socket took it.
    static func probe(tunFD: Int32, tunName: String, vnetHeader: Bool, sockets: [UDPSocket], enabled: Bool,
                      logger: Logger) throws(SystemError) -> OffloadState {
        var tso = false
        if vnetHeader {
            try syscall("set virtio header size on", tunName) {
                fu_tun_set_vnet_hdr_size(tunFD, Int32(VirtioNetHeader.length))
            }
            let flags = enabled ? UInt32(FU_TUN_F_CSUM | FU_TUN_F_TSO4) : 0
            if fu_tun_set_offload(tunFD, flags) == 0 {
                tso = enabled
            } else {
                let e = errno
                guard isRefusal(e) else { throw SystemError("set offloads (TUNSETOFFLOAD) on", tunName, errno: e) }
                if enabled {
                    let why = SystemError.describe(e)
                    logger.warning("offload tso off: \(tunName) refuses TUNSETOFFLOAD csum+tso4: \(why)")
                }
            }
        }
        // UDP_SEGMENT size 0 is "no GSO by default": accepted by every kernel that knows the option, changes nothing.
        let gso = enabled && sockets.allSatisfy {
            setUDPOption($0, Int32(FU_UDP_SEGMENT), 0, refused: "offload gso off: UDP_SEGMENT", logger)
        }
        var gro = enabled
        for socket in sockets {
            // Set on every socket, or off on every one: a receive must never hold several datagrams unasked (a
            // socket may have been used with GRO before).
            if gro { gro = setUDPOption(socket, Int32(FU_UDP_GRO), 1, refused: "offload gro off: UDP_GRO", logger) }
        }
        if !gro {
            for socket in sockets { _ = setUDPOption(socket, Int32(FU_UDP_GRO), 0, refused: nil, logger) }
        }
        return OffloadState(vnetHeader: vnetHeader, tso: tso, udpGSO: gso, udpGRO: gro,
                            coalesce: vnetHeader && tso && enabled)
    }
}

/// setsockopt(SOL_UDP, `option`, `value`) on `socket`; true when the kernel took it. A refusal is logged as
/// "`refused` refused on ADDRESS: reason" unless `refused` is nil.
private func setUDPOption(_ socket: UDPSocket, _ option: Int32, _ value: Int32, refused: String?,
                          _ logger: Logger) -> Bool {
    var v = value
    if setsockopt(socket.fd, Int32(FU_SOL_UDP), option, &v, socklen_t(MemoryLayout<Int32>.size)) == 0 { return true }
    let why = SystemError.describe(errno)
    if let refused { logger.warning("\(refused) refused on \(socket.localEndpoint): \(why)") }
    return false
}

extension OffloadState {
    var statistics: OffloadStatistics {
        OffloadStatistics(active: active,
                          superPacketsSegmented: superPacketsSegmented.load(ordering: .relaxed),
                          superPacketsCoalesced: superPacketsCoalesced.load(ordering: .relaxed),
                          groBuffers: groBuffers.load(ordering: .relaxed),
                          largestDatagramReceived: largestDatagramReceived.load(ordering: .relaxed))
    }
}
