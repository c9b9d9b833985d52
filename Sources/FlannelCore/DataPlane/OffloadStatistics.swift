/// What the offloads are doing, for `status --json` and troubleshooting: which are on, and evidence that they
/// work (super-packets cut and built, GRO buffers split) and that the wire contract holds (the largest datagram
/// a peer sent).
public struct OffloadStatistics: Codable, Equatable, Sendable {
    /// As `Forwarder.activeOffloads`.
    public var active: [String]
    /// TCP super-packets read from the tun and segmented (tso).
    public var superPacketsSegmented: UInt64
    /// Super-packets of two or more segments written into the tun (coalesce).
    public var superPacketsCoalesced: UInt64
    /// Receives that returned several datagrams in one buffer (gro).
    public var groBuffers: UInt64
    /// The largest datagram payload received from a peer: at most its tun MTU.
    public var largestDatagramReceived: UInt64
}
