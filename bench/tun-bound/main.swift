// tun-bound: the cheapest forwarder a tun device and a UDP socket allow, for bench/run's `tun-bound` row.
//
// It is not flannel's wire format and not a product: it exists to measure the ceiling of the design. Each TCP
// super-packet the tun hands out (TSO, with its virtio-net header) goes to the peer as one UDP datagram of up to
// 64 KB, and each datagram is written back to the peer's tun as it came. That is the four kernel copies every
// tun/UDP forwarder pays (tun read, UDP send, UDP receive, tun write) and one system call per ~64 KB each way, with
// no user-space work: no segmentation, no checksums, no route lookup, no coalescing. The underlay needs an MTU that
// carries a whole super-packet (bench/run sets 65535 on its veth and a smaller gso_max_size on the pods).
//
// usage: tun-bound TUN_NAME LOCAL_IPV4 PEER_IPV4 [PORT]   (runs until killed; one thread per direction)
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

let args = CommandLine.arguments
guard args.count == 4 || args.count == 5, args[1].utf8.count < Int(FU_IFNAMSIZ) else {
    usage("usage: TUN_NAME LOCAL_IPV4 PEER_IPV4 [PORT]")
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

let tunToUDP = Thread { relay(from: tun, to: sock, "tun->udp") }
tunToUDP.start()
relay(from: sock, to: tun, "udp->tun")
