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
// super-packet goes out as UDP GSO messages of MTU-sized datagrams, each a copy of the headers (total length and
// sequence number patched) followed by its payload slice where the tun read put it, the same pieces flannel-udp
// hands the kernel; the receiving side takes each UDP GRO buffer, joins consecutive buffers of one flow, and
// writes one super-packet per run with a gather list (the first headers, then every payload in place). What it
// leaves out is what no kernel does for it: the segments' TCP checksums (the receiving side writes with
// NEEDS_CSUM and lets its kernel complete them, which only works because both ends are tun-bound), route lookup,
// flow checks beyond the 4-tuple and sequence, and counters.
//
// usage: tun-bound [--wire] TUN_NAME LOCAL_IPV4 PEER_IPV4 [PORT]   (runs until killed; one thread per direction)
import CShims
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
guard args.count == 4 || args.count == 5, args[1].utf8.count < Int(FU_IFNAMSIZ) else {
    usage("usage: [--wire] TUN_NAME LOCAL_IPV4 PEER_IPV4 [PORT]")
}
let port = args.count == 5 ? UInt16(args[4]) : 8285
guard let port, port != 0 else { usage("not a UDP port: \(args[4])") }

let tun = open("/dev/net/tun", O_RDWR | O_CLOEXEC)
if tun < 0 { fail("open /dev/net/tun") }
var name = [CChar](repeating: 0, count: Int(FU_IFNAMSIZ))
if fu_tun_set_iff(tun, args[1], Int16(FU_IFF_TUN | FU_IFF_NO_PI | FU_IFF_VNET_HDR), &name) != 0 {
    fail("create tun \(args[1]) (TUNSETIFF)")
}
if fu_tun_set_vnet_hdr_size(tun, Int32(FU_VIRTIO_NET_HDR_LEN)) != 0 { fail("TUNSETVNETHDRSZ on \(args[1])") }
if fu_tun_set_offload(tun, UInt32(FU_TUN_F_CSUM | FU_TUN_F_TSO4)) != 0 { fail("TUNSETOFFLOAD csum+tso4 on \(args[1])") }

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

if wire {
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

// ---- --wire ------------------------------------------------------------------------------------------------

// (Constants of the wire mode are static: a top-level `let` of main.swift below the code that runs is still zero
// when that code reads it.)
enum Wire {
    static let vnetLength = Int(FU_VIRTIO_NET_HDR_LEN)
    static let maxDatagram = 65_507  // the largest UDP payload over IPv4, and so the largest GSO message
    static let maxSegments = 64      // UDP_MAX_SEGMENTS on older kernels; flannel-udp's limit too
}

func be16(_ p: UnsafeRawPointer, _ at: Int) -> Int { Int(UInt16(bigEndian: p.loadUnaligned(fromByteOffset: at, as: UInt16.self))) }
func setBE16(_ p: UnsafeMutableRawPointer, _ at: Int, _ v: Int) {
    p.storeBytes(of: UInt16(truncatingIfNeeded: v).bigEndian, toByteOffset: at, as: UInt16.self)
}
func be32(_ p: UnsafeRawPointer, _ at: Int) -> UInt32 { UInt32(bigEndian: p.loadUnaligned(fromByteOffset: at, as: UInt32.self)) }

/// One's complement sum of big-endian 16-bit words, folded (headers only: at most 60 bytes).
func headerSum(_ p: UnsafeRawPointer, _ count: Int, _ initial: UInt32 = 0) -> UInt32 {
    var s = initial
    var i = 0
    while i + 1 < count { s &+= UInt32(be16(p, i)); i += 2 }
    while s >> 16 != 0 { s = (s & 0xFFFF) &+ (s >> 16) }
    return s
}

/// (IPv4 header length, IPv4 + TCP header length) of a TCP/IPv4 packet whose headers fit in `length`, else nil.
func tcpHeaders(_ p: UnsafeRawPointer, _ length: Int) -> (Int, Int)? {
    guard length >= 40, p.load(as: UInt8.self) >> 4 == 4, p.load(fromByteOffset: 9, as: UInt8.self) == 6 else { return nil }
    let ihl = Int(p.load(as: UInt8.self) & 0xF) * 4
    guard ihl >= 20, ihl + 20 <= length else { return nil }
    let all = ihl + Int(p.load(fromByteOffset: ihl + 12, as: UInt8.self) >> 4) * 4
    return all >= ihl + 20 && all <= length ? (ihl, all) : nil
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
            let packet = buffer + Wire.vnetLength, length = n - Wire.vnetLength
            guard length > 0 else { continue }
            let gso = buffer.load(fromByteOffset: 1, as: UInt8.self) & 0x7F
            let mss = Int(buffer.loadUnaligned(fromByteOffset: 4, as: UInt16.self))
            if gso == UInt8(FU_VIRTIO_NET_HDR_GSO_TCPV4), mss > 0, let (_, hl) = tcpHeaders(packet, length),
               length - hl > mss {
                // At most 128 segments (the header slots; 3 messages): an MSS under ~512 bytes is dropped.
                if (length - hl + mss - 1) / mss <= 128 { sendSegments(packet, length, headerLength: hl, mss: mss) }
            } else if send(sock, packet, length, 0) < 0, ![EINTR, ECONNREFUSED, ENOBUFS, EAGAIN].contains(errno) {
                fail("tun->udp: send \(length) bytes")
            }
        }
    }

    func sendSegments(_ packet: UnsafeMutableRawPointer, _ length: Int, headerLength hl: Int, mss: Int) {
        let ihl = Int(packet.load(as: UInt8.self) & 0xF) * 4
        let seq0 = be32(packet, ihl + 4)
        let flags = packet.load(fromByteOffset: ihl + 13, as: UInt8.self)
        let perMessage = min(Wire.maxSegments, Wire.maxDatagram / (hl + mss))
        var offset = hl, k = 0, m = 0, inMessage = 0, firstIov = 0
        while offset < length {
            let size = min(mss, length - offset)
            let h = headers + k * 128
            h.copyMemory(from: packet, byteCount: hl)
            setBE16(h, 2, hl + size)
            h.storeBytes(of: (seq0 &+ UInt32(truncatingIfNeeded: offset - hl)).bigEndian, toByteOffset: ihl + 4,
                         as: UInt32.self)
            // FIN and PSH on the last segment only, CWR on the first only (as the kernel's segmentation does).
            var f = flags
            if offset + size < length { f &= ~0x09 }
            if offset > hl { f &= ~0x80 }
            h.storeBytes(of: f, toByteOffset: ihl + 13, as: UInt8.self)
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
        let seq = be32(p, ihl + 4)
        let flags = p.load(fromByteOffset: ihl + 13, as: UInt8.self)
        let first = head + Wire.vnetLength
        let joins = segments > 0 && !closed && hl == headerLength && payload == mss && seq == nextSeq
            && flags & 0x27 == 0  // no FIN, SYN, RST, URG
            && segments + count <= Wire.maxSegments && total + n - count * hl <= 65_535
            && memcmp(p + 12, first + 12, 8) == 0 && ihl == Int(first.load(as: UInt8.self) & 0xF) * 4
            && memcmp(p + ihl, first + ihl, 4) == 0  // ports
            // the acknowledgment, the window and the options (timestamps), as flannel-udp's coalescer asks
            && memcmp(p + ihl + 8, first + ihl + 8, 4) == 0 && memcmp(p + ihl + 14, first + ihl + 14, 2) == 0
            && memcmp(p + ihl + 20, first + ihl + 20, hl - ihl - 20) == 0
        if !joins {
            flush()
            first.copyMemory(from: p, byteCount: hl)
            headerLength = hl
            mss = payload
            total = hl
            pieces = 2
            segments = 0
            // Nothing joins a run without payload or with SYN, RST or URG.
            closed = payload == 0 || flags & 0x26 != 0
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
        let last = p + (count - 1) * size
        tailFlags = last.load(fromByteOffset: ihl + 13, as: UInt8.self) & 0x09
        if tailFlags != 0 { closed = true }
    }

    /// Writes the open run as one super-packet (NEEDS_CSUM; GSO when it has more than one segment).
    func flush() {
        guard segments > 0 else { return }
        let ip = head + Wire.vnetLength
        let ihl = Int(ip.load(as: UInt8.self) & 0xF) * 4
        setBE16(ip, 2, total)
        let f = ip.load(fromByteOffset: ihl + 13, as: UInt8.self)
        ip.storeBytes(of: f | tailFlags, toByteOffset: ihl + 13, as: UInt8.self)
        finishHeaders(ip, ihl: ihl, length: total, checksumOffset: 16)
        writeVnet(gso: segments > 1, headerLength: headerLength, mss: mss, start: ihl, offset: 16)
        out[0] = iovec(iov_base: head, iov_len: Wire.vnetLength)
        out[1] = iovec(iov_base: ip, iov_len: headerLength)
        if writev(tun, out, Int32(pieces)) < 0, ![EINTR, EAGAIN, EIO, EINVAL].contains(errno) {
            fail("udp->tun: writev \(total) bytes")
        }
        segments = 0
    }

    /// A datagram that is not TCP: UDP gets NEEDS_CSUM (its sender's tun left the checksum partial), anything
    /// else (ICMP) goes in as it came.
    func single(_ p: UnsafeMutableRawPointer, _ n: Int) {
        let ihl = Int(p.load(as: UInt8.self) & 0xF) * 4
        let udp = n >= 28 && p.load(fromByteOffset: 9, as: UInt8.self) == 17 && ihl + 8 <= n
        if udp {
            finishHeaders(p, ihl: ihl, length: n, checksumOffset: 6)
            writeVnet(gso: false, headerLength: 0, mss: 0, start: ihl, offset: 6)
        } else {
            head.initializeMemory(as: UInt8.self, repeating: 0, count: Wire.vnetLength)
        }
        out[0] = iovec(iov_base: head, iov_len: Wire.vnetLength)
        out[1] = iovec(iov_base: p, iov_len: n)
        if writev(tun, out, 2) < 0, ![EINTR, EAGAIN, EIO, EINVAL].contains(errno) { fail("udp->tun: writev \(n) bytes") }
    }

    /// IPv4 header checksum, and the transport checksum field set to the pseudo-header sum (NEEDS_CSUM).
    func finishHeaders(_ ip: UnsafeMutableRawPointer, ihl: Int, length: Int, checksumOffset: Int) {
        setBE16(ip, 10, 0)
        setBE16(ip, 10, Int(~UInt16(truncatingIfNeeded: headerSum(ip, ihl))))
        var pseudo = headerSum(ip + 12, 8, UInt32(ip.load(fromByteOffset: 9, as: UInt8.self)) &+ UInt32(length - ihl))
        while pseudo >> 16 != 0 { pseudo = (pseudo & 0xFFFF) &+ (pseudo >> 16) }
        setBE16(ip, ihl + checksumOffset, Int(pseudo))
    }

    func writeVnet(gso: Bool, headerLength: Int, mss: Int, start: Int, offset: Int) {
        head.storeBytes(of: UInt8(FU_VIRTIO_NET_HDR_F_NEEDS_CSUM), as: UInt8.self)
        head.storeBytes(of: gso ? UInt8(FU_VIRTIO_NET_HDR_GSO_TCPV4) : 0, toByteOffset: 1, as: UInt8.self)
        head.storeBytes(of: UInt16(gso ? headerLength : 0), toByteOffset: 2, as: UInt16.self)
        head.storeBytes(of: UInt16(gso ? mss : 0), toByteOffset: 4, as: UInt16.self)
        head.storeBytes(of: UInt16(start), toByteOffset: 6, as: UInt16.self)
        head.storeBytes(of: UInt16(offset), toByteOffset: 8, as: UInt16.self)
    }
}
