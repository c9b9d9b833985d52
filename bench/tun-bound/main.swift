// tun-bound: the cheapest forwarder a tun device and a UDP socket allow, for bench/run's `tun-bound` row.
//
// It is not flannel's wire format and not a product: it exists to measure the ceiling of the design. Each TCP
// super-packet the tun hands out (TSO, with its virtio-net header) goes to the peer as one UDP datagram of up to
// 64 KB, and each datagram is written back to the peer's tun as it came. That is the four kernel copies every
// tun/UDP forwarder pays (tun read, UDP send, UDP receive, tun write) and one system call per ~64 KB each way, with
// no user-space work: no segmentation, no checksums, no route lookup, no coalescing. The underlay needs an MTU that
// carries a whole super-packet (bench/run sets 65535 on its veth and a smaller gso_max_size on the pods).
//
// With --wire it is the ceiling for flannel's wire format instead (bench/run's `wire-bound` row): every datagram is
// one IPv4 packet of at most the tun's MTU, as flannel sends them, over an underlay with the usual MTU. A TCP
// super-packet goes out as UDP GSO messages of MTU-sized datagrams, each a copy of the headers (total length,
// sequence number and flags patched) followed by its payload slice where the tun read put it, the same pieces
// flannel-udp hands the kernel; the receiving side takes each UDP GRO buffer, joins consecutive buffers of one flow
// (addresses, ports, acknowledgment, window and options equal, sequence contiguous), and writes one super-packet
// per run with a gather list (the first headers, then every payload in place). What it leaves out is what no
// kernel does for it: the segments' TCP checksums (the receiving side writes with NEEDS_CSUM and lets its kernel
// complete them, which only works because both ends are tun-bound), route lookup, the coalescer's other checks,
// and counters.
//
// With --lane it is the ceiling of an idle round trip instead (bench/run's `lane-bound` row): the technique of
// flannel's proxy and of flannel-udp's express lane, and nothing else. One thread sleeps in one poll() on the tun
// and the socket, then reads the tun and the socket in turn, without blocking, one packet per call, until neither
// has anything: a tun packet goes to the peer as it came, a datagram to the tun behind a zeroed virtio-net header.
// The tun has no offloads, so every packet is whole and at most the MTU. No route lookup, no source check, no
// counters. --spin US keeps reading (sched_yield between reads) that long after the last packet before it sleeps,
// as `up --express-spin` does. --as-node runs that loop on the kernel objects a flannel-udp node has (`laneAsNode`).
//
// usage: tun-bound [--wire | --lane [--as-node [--decide NETWORK SUBNET PEER_SUBNET]] [--spin US]] TUN_NAME LOCAL_IPV4 PEER_IPV4 [PORT]   (runs until killed)
import CShims
import FlannelCore
import Foundation

#if canImport(Glibc)
import Glibc
#endif

@Sendable func fail(_ what: String) -> Never {
    let e = errno
    FileHandle.standardError.write("tun-bound: \(what): \(String(cString: strerror(e))) (errno \(e))\n".data(using: .utf8)!)
    exit(1)
}

/// Bad command-line input: the message and exit status 2.
func usage(_ message: String) -> Never {
    FileHandle.standardError.write("tun-bound: \(message)\n".data(using: .utf8)!)
    exit(2)
}

func ipv4(_ text: String) -> in_addr {
    var a = in_addr()
    guard inet_pton(AF_INET, text, &a) == 1 else { usage("not an IPv4 address: \(text)") }
    return a
}

var args = CommandLine.arguments
let wire = args.count > 1 && args[1] == "--wire"
if wire { args.remove(at: 1) }
let lane = !wire && args.count > 1 && args[1] == "--lane"
if lane { args.remove(at: 1) }
var spinMicroseconds = 0
let asNode = lane && args.count > 1 && args[1] == "--as-node"
if asNode { args.remove(at: 1) }
/// --as-node --decide NETWORK SUBNET PEER_SUBNET: flannel-udp's own decisions and counters on every packet.
var decide: (network: IPv4Network, subnet: IPv4Network, peer: IPv4Network)?
if asNode && args.count > 4 && args[1] == "--decide" {
    do throws(IPv4Network.ParseError) {
        decide = (try IPv4Network(parsing: args[2]), try IPv4Network(parsing: args[3]), try IPv4Network(parsing: args[4]))
    } catch { usage("--decide: \(error)") }
    args.removeSubrange(1...4)
}
if lane && args.count > 2 && args[1] == "--spin" {
    guard let us = Int(args[2]), (0...1_000_000).contains(us) else { usage("--spin: microseconds, 0-1000000: \(args[2])") }
    spinMicroseconds = us
    args.removeSubrange(1...2)
}
guard args.count == 4 || args.count == 5, args[1].utf8.count < Int(FU_IFNAMSIZ) else {
    usage("usage: [--wire | --lane [--as-node [--decide NETWORK SUBNET PEER_SUBNET]] [--spin US]] TUN_NAME LOCAL_IPV4 PEER_IPV4 [PORT]")
}
let port = args.count == 5 ? UInt16(args[4]) : 8285
guard let port, port != 0 else { usage("not a UDP port: \(args[4])") }

if asNode { laneAsNode() }

let tun = open("/dev/net/tun", O_RDWR | O_CLOEXEC)
if tun < 0 { fail("open /dev/net/tun") }
var name = [CChar](repeating: 0, count: Int(FU_IFNAMSIZ))
if fu_tun_set_iff(tun, args[1], Int16(FU_IFF_TUN | FU_IFF_NO_PI | FU_IFF_VNET_HDR), &name) != 0 {
    fail("create tun \(args[1]) (TUNSETIFF)")
}
if fu_tun_set_vnet_hdr_size(tun, Int32(FU_VIRTIO_NET_HDR_LEN)) != 0 { fail("TUNSETVNETHDRSZ on \(args[1])") }
if lane {
    if fu_tun_set_offload(tun, 0) != 0 { fail("TUNSETOFFLOAD none on \(args[1])") }
} else if fu_tun_set_offload(tun, UInt32(FU_TUN_F_CSUM | FU_TUN_F_TSO4)) != 0 {
    fail("TUNSETOFFLOAD csum+tso4 on \(args[1])")
}

let sock = socket(AF_INET, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
if sock < 0 { fail("socket") }
var size: Int32 = 8 << 20
for (option, label) in [(SO_RCVBUFFORCE, "SO_RCVBUFFORCE"), (SO_SNDBUFFORCE, "SO_SNDBUFFORCE")] {
    if setsockopt(sock, SOL_SOCKET, option, &size, socklen_t(MemoryLayout<Int32>.size)) != 0 { fail(label) }
}
func endpoint(_ address: String) -> sockaddr_in {
    var sa = sockaddr_in()
    sa.sin_family = sa_family_t(AF_INET)
    sa.sin_port = port.bigEndian
    sa.sin_addr = ipv4(address)
    return sa
}
var local = endpoint(args[2]), peer = endpoint(args[3])
let len = socklen_t(MemoryLayout<sockaddr_in>.size)
if withUnsafePointer(to: &local, { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(sock, $0, len) } }) != 0 {
    fail("bind \(args[2]):\(port)")
}
if withUnsafePointer(to: &peer, { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(sock, $0, len) } }) != 0 {
    fail("connect \(args[3]):\(port)")
}

/// read(from) -> write(to), one buffer, forever. Transient errors (EINTR; ECONNREFUSED from an ICMP error before the
/// peer is up; ENOBUFS, EAGAIN) drop the packet and go on; anything else ends the process.
@Sendable func relay(from: Int32, to: Int32, _ label: String) -> Never {
    let capacity = 65_536 + 16
    let buffer = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 64)
    while true {
        let n = read(from, buffer, capacity)
        if n < 0 {
            if [EINTR, ECONNREFUSED, EAGAIN].contains(errno) { continue }
            fail("\(label): read")
        }
        if write(to, buffer, n) < 0, ![EINTR, ECONNREFUSED, ENOBUFS, EAGAIN, EMSGSIZE].contains(errno) {
            fail("\(label): write \(n) bytes")
        }
    }
}

if lane {
    laneLoop(tun: tun, sock: sock, spinNanoseconds: UInt64(spinMicroseconds) * 1000, PassPackets())
} else if wire {
    var on: Int32 = 1
    if setsockopt(sock, Int32(FU_SOL_UDP), Int32(FU_UDP_GRO), &on, socklen_t(MemoryLayout<Int32>.size)) != 0 {
        fail("UDP_GRO")
    }
    let tunToUDP = Thread { WireSender(tun: tun, sock: sock).run() }
    tunToUDP.start()
    WireReceiver(tun: tun, sock: sock).run()
} else {
    let tunToUDP = Thread { relay(from: tun, to: sock, "tun->udp") }
    tunToUDP.start()
    relay(from: sock, to: tun, "udp->tun")
}

// ---- --lane ------------------------------------------------------------------------------------------------

/// What the lane loop does with one packet each way; the loop around it (`laneLoop`) is the same for every variant.
protocol LanePackets {
    /// A tun read of `n` bytes at `buffer` (a virtio-net header first, then the packet): send it on `sock`.
    mutating func fromTun(_ buffer: UnsafeMutableRawPointer, _ n: Int, sock: Int32)
    /// Receives one datagram from `sock` into `buffer` after room for a virtio-net header and writes it to `tun`;
    /// returns what the receive returned.
    mutating func fromSocket(_ buffer: UnsafeMutableRawPointer, capacity: Int, sock: Int32, tun: Int32) -> Int
}

enum Lane {
    /// Errors that drop the packet and go on: an interrupted call, nothing to read, ICMP refusals before the peer is
    /// up, full buffers, a packet too big for the path.
    static let transient = [EINTR, EAGAIN, ECONNREFUSED, ENOBUFS, EMSGSIZE]
}

/// Writes the packet after `buffer`'s virtio-net header (`length` bytes) to the tun behind a zeroed header; false
/// when the write failed (a transient error: the packet is dropped).
func writeToTun(_ tun: Int32, _ buffer: UnsafeMutableRawPointer, _ length: Int) -> Bool {
    VirtioNetHeader.none.store(to: buffer)
    if write(tun, buffer, VirtioNetHeader.length + length) < 0 {
        if ![EINTR, EAGAIN, EIO, EINVAL].contains(errno) { fail("udp->tun: write \(length) bytes") }
        return false
    }
    return true
}

/// Each packet as it came: to the connected peer (`send`), or with `sendto` to `destination` on an unconnected
/// socket.
struct PassPackets: LanePackets {
    var destination: sockaddr_in?

    mutating func fromTun(_ buffer: UnsafeMutableRawPointer, _ n: Int, sock: Int32) {
        let header = VirtioNetHeader.length
        let sent: Int
        if let destination {
            sent = destination.withSockaddr { sendto(sock, buffer + header, n - header, 0, $0, $1) }
        } else {
            sent = send(sock, buffer + header, n - header, 0)
        }
        if sent < 0, !Lane.transient.contains(errno) { fail("tun->udp: send") }
    }

    mutating func fromSocket(_ buffer: UnsafeMutableRawPointer, capacity: Int, sock: Int32, tun: Int32) -> Int {
        let r = recv(sock, buffer + VirtioNetHeader.length, capacity - VirtioNetHeader.length, 0)
        if r > 0 { _ = writeToTun(tun, buffer, r) }
        return r
    }
}

/// What flannel-udp does to each packet between the system calls: `PacketDecider` (validation, longest-prefix
/// route lookup and TTL for a tun packet; for a datagram also the overlay and source checks against the sender's
/// address, which the receive asks for) on the route table's current snapshot, then the global and the peer's
/// counters, and the peer's address from the snapshot for the send. A packet the decider refuses is counted and
/// dropped (no ICMP error is written).
struct DecidePackets: LanePackets {
    let table: RouteTable
    let counters: DataPlaneCounters
    var decider: PacketDecider
    let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: 1024, alignment: 64)
    var from = sockaddr_in()

    init(_ table: RouteTable, _ config: ForwardingConfig, _ counters: DataPlaneCounters) {
        self.table = table
        self.counters = counters
        decider = PacketDecider(config: config)
    }

    mutating func fromTun(_ buffer: UnsafeMutableRawPointer, _ n: Int, sock: Int32) {
        let header = VirtioNetHeader.length
        let snapshot = table.snapshot()
        let packet = UnsafeMutableRawBufferPointer(start: buffer + header, count: n - header)
        switch decider.fromTun(packet, snapshot: snapshot, scratch: scratch) {
        case .forward(let p, let length):
            let entry = snapshot.peers[p]
            let sent = entry.sockaddr.withSockaddr { sendto(sock, buffer + header, length, 0, $0, $1) }
            if sent < 0 {
                if !Lane.transient.contains(errno) { fail("tun->udp: sendto") }
                return
            }
            counters.tunToUDPPackets.wrappingIncrement(ordering: .relaxed)
            counters.tunToUDPBytes.wrappingIncrement(by: UInt64(length), ordering: .relaxed)
            entry.counters.countTx(bytes: length)
        case .icmpToTun(_, let reason), .drop(let reason, _):
            counters.countDrop(reason)
        }
    }

    mutating func fromSocket(_ buffer: UnsafeMutableRawPointer, capacity: Int, sock: Int32, tun: Int32) -> Int {
        let header = VirtioNetHeader.length
        var fromLength = socklen_t(MemoryLayout<sockaddr_in>.size)
        let r = withUnsafeMutablePointer(to: &from) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                recvfrom(sock, buffer + header, capacity - header, 0, $0, &fromLength)
            }
        }
        guard r > 0 else { return r }
        let snapshot = table.snapshot()
        let packet = UnsafeMutableRawBufferPointer(start: buffer + header, count: r)
        switch decider.fromUDP(packet, outerSource: IPv4Address(networkOrder: from.sin_addr.s_addr),
                               snapshot: snapshot, scratch: scratch) {
        case .deliver(let p, let length):
            guard writeToTun(tun, buffer, length) else { break }
            counters.udpToTunPackets.wrappingIncrement(ordering: .relaxed)
            counters.udpToTunBytes.wrappingIncrement(by: UInt64(length), ordering: .relaxed)
            snapshot.peers[p].counters.countRx(bytes: length)
        case .icmpToPeer(_, _, let reason), .drop(let reason, _):
            counters.countDrop(reason)
        }
        return r
    }
}

/// One thread, both directions: poll, then read each input in turn until neither has a packet (and, with a spin,
/// until none came for that long), then poll again. Transient errors drop the packet; anything else ends the process.
@Sendable func laneLoop<P: LanePackets>(tun: Int32, sock: Int32, spinNanoseconds: UInt64, _ packets: P) -> Never {
    var packets = packets
    for fd in [tun, sock] where fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) != 0 { fail("O_NONBLOCK") }
    let capacity = 65_536
    let buffer = UnsafeMutableRawPointer.allocate(byteCount: capacity, alignment: 64)
    var fds = [pollfd(fd: tun, events: Int16(POLLIN), revents: 0), pollfd(fd: sock, events: Int16(POLLIN), revents: 0)]
    while true {
        if poll(&fds, 2, -1) < 0 && errno != EINTR { fail("poll") }
        var last = MonotonicClock.nanoseconds()
        while true {
            var moved = false
            let n = read(tun, buffer, capacity)
            if n > VirtioNetHeader.length {
                moved = true
                packets.fromTun(buffer, n, sock: sock)
            } else if n < 0, !Lane.transient.contains(errno) {
                fail("tun->udp: read")
            }
            let r = packets.fromSocket(buffer, capacity: capacity, sock: sock, tun: tun)
            if r > 0 {
                moved = true
            } else if r < 0, !Lane.transient.contains(errno) {
                fail("udp->tun: recv")
            }
            let t = MonotonicClock.nanoseconds()
            if moved {
                last = t
                continue
            }
            if t - last >= spinNanoseconds { break }
            sched_yield()
        }
    }
}

/// --lane --as-node: the same loop on the kernel objects a flannel-udp node with one worker pair and the express
/// lane forwards through (bench/run's `lane-node-sN` row): a two-queue tun with the virtio-net header and the
/// queue-steering program, a reuseport group of two unconnected sockets (`sendto` per packet, as the node sends)
/// with its steering program, SO_TIMESTAMPNS, UDP_GRO and UDP_SEGMENT, all made by FlannelCore's own code. The
/// lane's queue and socket get the loop with the spin, queue 0 and socket 0 (the flow pair's) the loop without.
/// The tun's offloads stay off, as in `--lane`: a ping crosses the same kernel path with them on, and one packet per
/// call could not carry a TSO super-packet over the 1500-byte underlay. Every datagram this program sends is one
/// packet, so a receive never holds a GRO train. With `--decide` (`lane-decide-sN`) each packet also goes through
/// flannel-udp's decisions and counters (`DecidePackets`).
@MainActor func laneAsNode() -> Never {
    let express = ForwarderOptions.defaultExpressLength
    guard let local = IPv4Address(args[2]) else { usage("not an IPv4 address: \(args[2])") }
    let device: TunDevice
    let sockets: [UDPSocket]
    do {
        device = try TunDevice(name: args[1], vnetHeader: true, queues: 2)
        if fu_tun_set_vnet_hdr_size(device.fd, Int32(FU_VIRTIO_NET_HDR_LEN)) != 0 { fail("TUNSETVNETHDRSZ") }
        if fu_tun_set_offload(device.fd, 0) != 0 { fail("TUNSETOFFLOAD none on \(args[1])") }
        try device.steer(workers: 1, express: express)
        sockets = try UDPSocket.group(bind: Endpoint(address: local, port: port), count: 2, express: express)
    } catch {
        FileHandle.standardError.write("tun-bound: \(error)\n".data(using: .utf8)!)
        exit(1)
    }
    var one: Int32 = 1, zero: Int32 = 0
    let size = socklen_t(MemoryLayout<Int32>.size)
    for s in sockets {
        if setsockopt(s.fd, SOL_SOCKET, Int32(FU_SO_TIMESTAMPNS), &one, size) != 0 { fail("SO_TIMESTAMPNS") }
        if setsockopt(s.fd, Int32(FU_SOL_UDP), Int32(FU_UDP_GRO), &one, size) != 0 { fail("UDP_GRO") }
        if setsockopt(s.fd, Int32(FU_SOL_UDP), Int32(FU_UDP_SEGMENT), &zero, size) != 0 { fail("UDP_SEGMENT") }
    }
    let peer = endpoint(args[3])
    let spin = UInt64(spinMicroseconds) * 1000
    let q0 = device.queueFDs[0], q1 = device.queueFDs[1], s0 = sockets[0].fd, s1 = sockets[1].fd
    /// The flow pair's queue and socket on a thread of their own, the lane's (with the spin) on this one.
    func run<P: LanePackets>(_ packets: @escaping @Sendable () -> P) -> Never {
        Thread { laneLoop(tun: q0, sock: s0, spinNanoseconds: 0, packets()) }.start()
        laneLoop(tun: q1, sock: s1, spinNanoseconds: spin, packets())
    }
    guard let decide else { run { PassPackets(destination: peer) } }
    let table = RouteTable([PeerRoute(subnet: decide.peer, endpoint: Endpoint(peer))])
    let config = ForwardingConfig(network: decide.network, subnet: decide.subnet)
    let counters = DataPlaneCounters()
    run { DecidePackets(table, config, counters) }
}

// ---- --wire ------------------------------------------------------------------------------------------------
// Headers, checksums and the virtio-net header through FlannelCore's own helpers (header work only: the payload is
// never read here).

enum Wire {
    static let maxDatagram = 65_507  // the largest UDP payload over IPv4, and so the largest GSO message
    static let maxSegments = 64      // UDP_MAX_SEGMENTS on older kernels; flannel-udp's limit too
    /// Where a UDP header keeps its checksum.
    static let udpChecksum = 6
}

/// (IPv4 header length, IPv4 + TCP header length) of an unfragmented TCP/IPv4 packet whose headers fit, else nil.
func tcpHeaders(_ p: UnsafeRawPointer, _ length: Int) -> (Int, Int)? {
    guard let (headerLength, _) = TCPSegmenter.headers(UnsafeRawBufferPointer(start: p, count: length)) else {
        return nil
    }
    return (IPv4TCPHeaders(p).headerLength, headerLength)
}

/// tun -> UDP: each super-packet as MTU-sized datagrams (header copy + payload in place), sent with one sendmmsg.
final class WireSender {
    let tun: Int32, sock: Int32
    let buffer = UnsafeMutableRawPointer.allocate(byteCount: 65_536 + 64, alignment: 64)
    let headers = UnsafeMutableRawPointer.allocate(byteCount: 128 * 128, alignment: 64)
    let iovs = UnsafeMutablePointer<iovec>.allocate(capacity: 2 * 128)
    let msgs = UnsafeMutablePointer<fu_mmsghdr>.allocate(capacity: 8)
    let controls: UnsafeMutableRawPointer
    let controlSpace = fu_cmsg_space(MemoryLayout<UInt16>.size)

    init(tun: Int32, sock: Int32) {
        self.tun = tun
        self.sock = sock
        controls = .allocate(byteCount: 8 * controlSpace, alignment: 16)
        controls.initializeMemory(as: UInt8.self, repeating: 0, count: 8 * controlSpace)
    }

    func run() -> Never {
        while true {
            let n = read(tun, buffer, 65_536 + 64)
            if n < 0 {
                if errno == EINTR || errno == EAGAIN { continue }
                fail("tun->udp: read")
            }
            let packet = buffer + VirtioNetHeader.length, length = n - VirtioNetHeader.length
            guard length > 0 else { continue }
            let vnet = VirtioNetHeader(from: buffer)
            let mss = Int(vnet.gsoSize)
            if vnet.gsoType & ~VirtioNetHeader.gsoECN == VirtioNetHeader.gsoTCPv4, mss > 0,
               let (_, hl) = tcpHeaders(packet, length), length - hl > mss {
                // At most 128 segments (the header slots; 3 messages): an MSS under ~512 bytes is dropped.
                if (length - hl + mss - 1) / mss <= 128 { sendSegments(packet, length, headerLength: hl, mss: mss) }
            } else if send(sock, packet, length, 0) < 0, ![EINTR, ECONNREFUSED, ENOBUFS, EAGAIN].contains(errno) {
                fail("tun->udp: send \(length) bytes")
            }
        }
    }

    func sendSegments(_ packet: UnsafeMutableRawPointer, _ length: Int, headerLength hl: Int, mss: Int) {
        let h0 = IPv4TCPHeaders(packet)
        let ihl = h0.headerLength
        let seq0 = h0.tcpSequence(at: ihl)
        let flags = h0.tcpFlags(at: ihl)
        let perMessage = min(Wire.maxSegments, Wire.maxDatagram / (hl + mss))
        var offset = hl, k = 0, m = 0, inMessage = 0, firstIov = 0
        while offset < length {
            let size = min(mss, length - offset)
            let h = headers + k * 128
            h.copyMemory(from: packet, byteCount: hl)
            h.storeBytes(of: UInt16(hl + size).bigEndian, toByteOffset: IPv4Header.totalLength, as: UInt16.self)
            h.storeBytes(of: (seq0 &+ UInt32(truncatingIfNeeded: offset - hl)).bigEndian,
                         toByteOffset: ihl + TCPHeader.sequence, as: UInt32.self)
            // FIN and PSH on the last segment only, CWR on the first only (as the kernel's segmentation does).
            var f = flags
            if offset + size < length { f &= ~(TCPHeader.fin | TCPHeader.psh) }
            if offset > hl { f &= ~TCPHeader.cwr }
            h.storeBytes(of: f, toByteOffset: ihl + TCPHeader.flags, as: UInt8.self)
            iovs[2 * k] = iovec(iov_base: h, iov_len: hl)
            iovs[2 * k + 1] = iovec(iov_base: packet + offset, iov_len: size)
            k += 1
            inMessage += 1
            offset += size
            if inMessage == perMessage || offset == length {
                var control: UnsafeMutableRawPointer? = nil
                if inMessage > 1 {
                    control = controls + m * controlSpace
                    let c = control!.assumingMemoryBound(to: cmsghdr.self)
                    c.pointee.cmsg_len = fu_cmsg_len(MemoryLayout<UInt16>.size)
                    c.pointee.cmsg_level = Int32(FU_SOL_UDP)
                    c.pointee.cmsg_type = Int32(FU_UDP_SEGMENT)
                    fu_cmsg_data(c).withMemoryRebound(to: UInt16.self, capacity: 1) { $0.pointee = UInt16(hl + mss) }
                }
                msgs[m] = fu_mmsghdr(msg_hdr: msghdr(msg_name: nil, msg_namelen: 0, msg_iov: iovs + firstIov,
                                                     msg_iovlen: 2 * inMessage, msg_control: control,
                                                     msg_controllen: control == nil ? 0 : controlSpace, msg_flags: 0),
                                     msg_len: 0)
                m += 1
                firstIov = 2 * k
                inMessage = 0
            }
        }
        var sent = 0
        while sent < m {
            let r = fu_sendmmsg(sock, msgs + sent, UInt32(m - sent), 0)
            if r < 0 {
                if [EINTR, ECONNREFUSED, ENOBUFS, EAGAIN].contains(errno) { return }
                fail("tun->udp: sendmmsg \(m - sent) messages")
            }
            sent += Int(r)
        }
    }
}

/// UDP -> tun: UDP GRO buffers, consecutive ones of one TCP flow joined, one writev per run.
final class WireReceiver {
    static let slots = 8
    static let slotSize = 65_536
    let tun: Int32, sock: Int32
    let buffers = UnsafeMutableRawPointer.allocate(byteCount: WireReceiver.slots * WireReceiver.slotSize, alignment: 64)
    let recvIovs = UnsafeMutablePointer<iovec>.allocate(capacity: WireReceiver.slots)
    let msgs = UnsafeMutablePointer<fu_mmsghdr>.allocate(capacity: WireReceiver.slots)
    let controls: UnsafeMutableRawPointer
    let controlSpace = fu_cmsg_space(MemoryLayout<Int32>.size)
    /// The run being built: virtio header + first headers (patched), then payloads.
    let head = UnsafeMutableRawPointer.allocate(byteCount: 128, alignment: 64)
    let out = UnsafeMutablePointer<iovec>.allocate(capacity: 2 + 64 * 2)
    var pieces = 0, segments = 0, total = 0, mss = 0, headerLength = 0, nextSeq: UInt32 = 0, closed = true
    var tailFlags: UInt8 = 0

    init(tun: Int32, sock: Int32) {
        self.tun = tun
        self.sock = sock
        controls = .allocate(byteCount: WireReceiver.slots * controlSpace, alignment: 16)
    }

    func run() -> Never {
        while true {
            for i in 0..<WireReceiver.slots {
                recvIovs[i] = iovec(iov_base: buffers + i * WireReceiver.slotSize, iov_len: WireReceiver.slotSize)
                msgs[i] = fu_mmsghdr(msg_hdr: msghdr(msg_name: nil, msg_namelen: 0, msg_iov: recvIovs + i, msg_iovlen: 1,
                                                     msg_control: controls + i * controlSpace,
                                                     msg_controllen: controlSpace, msg_flags: 0), msg_len: 0)
            }
            let r = fu_recvmmsg(sock, msgs, UInt32(WireReceiver.slots), Int32(MSG_WAITFORONE))
            if r < 0 {
                if [EINTR, ECONNREFUSED, EAGAIN].contains(errno) { continue }
                fail("udp->tun: recvmmsg")
            }
            for i in 0..<Int(r) {
                let p = buffers + i * WireReceiver.slotSize, n = Int(msgs[i].msg_len)
                var size = n
                if let c = fu_cmsg_firsthdr(&msgs[i].msg_hdr), c.pointee.cmsg_level == Int32(FU_SOL_UDP),
                   c.pointee.cmsg_type == Int32(FU_UDP_GRO) {
                    size = Int(UnsafeRawPointer(fu_cmsg_data(c)).loadUnaligned(as: Int32.self))
                }
                take(p, n, size)
            }
            flush()
        }
    }

    /// One GRO buffer of `n` bytes in datagrams of `size` (one sender's GSO message, so one flow and contiguous):
    /// joins the open run when it continues it, or starts one.
    func take(_ p: UnsafeMutableRawPointer, _ n: Int, _ size: Int) {
        guard let (ihl, hl) = tcpHeaders(p, min(n, size)) else { flush(); single(p, n); return }
        let count = (n + size - 1) / size
        guard count <= Wire.maxSegments else { flush(); return }  // (the gather list's room; not from tun-bound)
        let payload = size - hl
        let h = IPv4TCPHeaders(p)
        let seq = h.tcpSequence(at: ihl)
        let flags = h.tcpFlags(at: ihl)
        let first = head + VirtioNetHeader.length
        let t = p + ihl, t0 = first + ihl
        let joins = segments > 0 && !closed && hl == headerLength && payload == mss && seq == nextSeq
            && flags & (TCPHeader.synFinRst | TCPHeader.urg) == 0
            && segments + count <= Wire.maxSegments && total + n - count * hl <= 65_535
            && memcmp(p + IPv4Header.source, first + IPv4Header.source, 8) == 0
            && ihl == IPv4TCPHeaders(first).headerLength
            && memcmp(t, t0, 4) == 0  // ports
            // the acknowledgment, the window and the options (timestamps), as flannel-udp's coalescer asks
            && memcmp(t + TCPHeader.acknowledgment, t0 + TCPHeader.acknowledgment, 4) == 0
            && memcmp(t + TCPHeader.window, t0 + TCPHeader.window, 2) == 0
            && memcmp(t + TCPHeader.minimumLength, t0 + TCPHeader.minimumLength, hl - ihl - TCPHeader.minimumLength) == 0
        if !joins {
            flush()
            first.copyMemory(from: p, byteCount: hl)
            headerLength = hl
            mss = payload
            total = hl
            pieces = 2
            segments = 0
            // Nothing joins a run without payload or with SYN, RST or URG.
            closed = payload == 0 || flags & (TCPHeader.syn | TCPHeader.rst | TCPHeader.urg) != 0
            tailFlags = 0
        }
        var d = 0
        while d < count {
            let length = min(size, n - d * size)
            out[pieces] = iovec(iov_base: p + d * size + hl, iov_len: length - hl)
            pieces += 1
            total += length - hl
            if length - hl < mss { closed = true }
            d += 1
        }
        segments += count
        nextSeq = seq &+ UInt32(truncatingIfNeeded: n - count * hl)
        // The last datagram's FIN and PSH go on the run, and end it.
        tailFlags = IPv4TCPHeaders(p + (count - 1) * size).tcpFlags(at: ihl) & (TCPHeader.fin | TCPHeader.psh)
        if tailFlags != 0 { closed = true }
    }

    /// Writes the open run as one super-packet (NEEDS_CSUM; GSO when it has more than one segment).
    func flush() {
        guard segments > 0 else { return }
        let ip = head + VirtioNetHeader.length
        let ihl = IPv4TCPHeaders(ip).headerLength
        ip.storeBytes(of: UInt16(total).bigEndian, toByteOffset: IPv4Header.totalLength, as: UInt16.self)
        let f = IPv4TCPHeaders(ip).tcpFlags(at: ihl)
        ip.storeBytes(of: f | tailFlags, toByteOffset: ihl + TCPHeader.flags, as: UInt8.self)
        finishHeaders(ip, ihl: ihl, length: total, checksumOffset: TCPHeader.checksum)
        VirtioNetHeader(flags: VirtioNetHeader.flagNeedsChecksum,
                        gsoType: segments > 1 ? VirtioNetHeader.gsoTCPv4 : VirtioNetHeader.gsoNone,
                        headerLength: segments > 1 ? UInt16(headerLength) : 0, gsoSize: segments > 1 ? UInt16(mss) : 0,
                        checksumStart: UInt16(ihl), checksumOffset: UInt16(TCPHeader.checksum)).store(to: head)
        out[0] = iovec(iov_base: head, iov_len: VirtioNetHeader.length)
        out[1] = iovec(iov_base: ip, iov_len: headerLength)
        if writev(tun, out, Int32(pieces)) < 0, ![EINTR, EAGAIN, EIO, EINVAL].contains(errno) {
            fail("udp->tun: writev \(total) bytes")
        }
        segments = 0
    }

    /// A datagram that is not TCP: UDP gets NEEDS_CSUM (its sender's tun left the checksum partial), anything
    /// else (ICMP) goes in as it came.
    func single(_ p: UnsafeMutableRawPointer, _ n: Int) {
        let ihl = IPv4TCPHeaders(p).headerLength
        if n >= 28 && IPv4TCPHeaders(p).proto == IPv4Header.protocolUDP && ihl + 8 <= n {
            finishHeaders(p, ihl: ihl, length: n, checksumOffset: Wire.udpChecksum)
            VirtioNetHeader(flags: VirtioNetHeader.flagNeedsChecksum, gsoType: VirtioNetHeader.gsoNone,
                            headerLength: 0, gsoSize: 0, checksumStart: UInt16(ihl),
                            checksumOffset: UInt16(Wire.udpChecksum)).store(to: head)
        } else {
            VirtioNetHeader.none.store(to: head)
        }
        out[0] = iovec(iov_base: head, iov_len: VirtioNetHeader.length)
        out[1] = iovec(iov_base: p, iov_len: n)
        if writev(tun, out, 2) < 0, ![EINTR, EAGAIN, EIO, EINVAL].contains(errno) { fail("udp->tun: writev \(n) bytes") }
    }

    /// IPv4 header checksum, and the transport checksum field set to the pseudo-header sum (NEEDS_CSUM).
    func finishHeaders(_ ip: UnsafeMutableRawPointer, ihl: Int, length: Int, checksumOffset: Int) {
        ip.storeBytes(of: UInt16(0), toByteOffset: IPv4Header.checksum, as: UInt16.self)
        let ipSum = InternetChecksum.compute(UnsafeRawBufferPointer(start: ip, count: ihl))
        ip.storeBytes(of: ipSum.bigEndian, toByteOffset: IPv4Header.checksum, as: UInt16.self)
        let proto = ip.load(fromByteOffset: IPv4Header.proto, as: UInt8.self)
        let pseudo = InternetChecksum.pseudoHeaderSum(ip, proto: proto, length: length - ihl)
        ip.storeBytes(of: pseudo.bigEndian, toByteOffset: ihl + checksumOffset, as: UInt16.self)
    }
}
