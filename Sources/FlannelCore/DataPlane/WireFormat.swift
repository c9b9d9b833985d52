/// flannel's UDP wire format, the one contract between flannel-udp and every other flannel node (flannel's own
/// proxy included), stated once:
///
/// - One datagram carries exactly one IPv4 packet, as it left the sending pod: no header of flannel's own, no
///   framing, nothing after it. The outer packet is IPv4 (20 bytes) + UDP (8 bytes) + that inner packet.
/// - An inner packet is at most the tun MTU, so a datagram's payload is at most MTU bytes and the outer packet at
///   most MTU + 28 (`overhead`): the tun MTU is the underlay MTU - 28, so nothing is fragmented on the underlay.
/// - Every offload below keeps this on the wire: TSO super-packets are cut into whole IPv4 packets before they are
///   sent, UDP GSO cuts a message at exactly those boundaries (one packet per datagram), UDP GRO buffers are split
///   back into their datagrams (`GROSplit`) before anything is decided, and TCP coalescing happens only on the way
///   into the local tun, never on the wire.
public enum WireFormat {
    /// IPv4 (20) + UDP (8): what the encapsulation costs on the underlay.
    public static let overhead = 28
    /// The largest datagram payload: one inner packet of at most the tun MTU.
    public static func largestPayload(mtu: Int) -> Int { mtu }
    /// The largest outer packet on the underlay for a tun MTU.
    public static func largestOuterPacket(mtu: Int) -> Int { mtu + overhead }
}
