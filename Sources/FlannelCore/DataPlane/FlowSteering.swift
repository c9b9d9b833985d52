import CShims

/// Which worker gets a packet of an inner flow, the same on both sides of a node:
///
/// - tun -> UDP: the kernel spreads packets over the tun's queues by flow hash (IFF_MULTI_QUEUE), one worker per
///   queue, so one flow's packets are read by one worker, in order.
/// - UDP -> tun: every datagram between two nodes has the same outer 4-tuple, so the kernel's reuseport hash would
///   put them all on one socket. A classic BPF program on the reuseport group (SO_ATTACH_REUSEPORT_CBPF) picks the
///   socket instead. For UDP the kernel runs it with the packet data starting at the UDP payload (it pulls the UDP
///   header first; verified on Linux 6.18 by ReusePortSteeringTests), so it reads flannel's inner IPv4 header:
///   the key is source ^ destination, ^ the port word for unfragmented TCP and UDP, and the socket is
///   `((((key ^ key >> 16) * 0x9E3779B1) >> 16) * workers) >> 16`: the port word's halves folded together, so
///   that the source port reaches the low bits, then multiplicative hashing, whose top bits depend on every low
///   bit, scaled to the workers from the top down. (`((key * 0x9E3779B1) >> 16) % workers`, used before, read
///   the product's bit 16 for two workers, which only the source port's lowest bit moves; Linux gives connect()
///   even ports, so every TCP flow of a client landed on one worker of two.) A load beyond the datagram makes
///   the kernel's interpreter return 0: such datagrams (malformed anyway) go to the first socket.
///
/// A UDP GSO message or a GRO-merged buffer is steered as one, by its first datagram: the sender therefore puts
/// only datagrams of one flow key into a GSO message (`SendQueue`), which covers nodes joined by veths or any path
/// that keeps GSO packets whole. Known limit: a receiving NIC whose UDP GRO merges datagrams of several flows from
/// one peer (the kernel merges by outer 4-tuple, blind to the payload) hands over a buffer steered by its first
/// flow, so the others' datagrams in it may be handled by another worker than the rest of their flow, and be
/// reordered against it. `--workers 1` (or `--no-offload`, which turns UDP GRO off) avoids that.
public enum FlowSteering {
    /// The flow key of an inner IPv4 packet (what the program computes before the multiplication), or nil when
    /// the program would stop on a load beyond the packet.
    public static func key(_ packet: UnsafeRawBufferPointer) -> UInt32? {
        guard packet.count >= IPv4Header.minimumLength else { return nil }
        let h = IPv4TCPHeaders(packet)
        var key = h.source ^ h.destination
        let proto = h.proto
        if (proto == IPv4Header.protocolTCP || proto == IPv4Header.protocolUDP) && !h.isFragment {
            let x = h.headerLength
            guard x &+ 4 <= packet.count else { return nil }
            key ^= h.portWord(at: x)
        }
        return key
    }

    /// The worker (socket index) of a packet among `workers`, as the program decides it.
    public static func worker(_ packet: UnsafeRawBufferPointer, workers: Int) -> Int {
        guard let key = key(packet) else { return 0 }
        return worker(key: key, workers: workers)
    }

    /// The multiplicative hash's factor (2^32 / the golden ratio, odd), in the program and in `worker(key:)`.
    static let multiplier: UInt32 = 0x9E37_79B1

    @inline(__always)
    public static func worker(key: UInt32, workers: Int) -> Int {
        Int(((((key ^ (key >> 16)) &* multiplier) >> 16) &* UInt32(workers)) >> 16)
    }

    /// The classic BPF program for `workers` sockets (see above; `workers` >= 1).
    public static func program(workers: Int) -> [fu_sock_filter] {
        precondition(workers >= 1 && workers <= 65536)
        func op(_ code: UInt16, _ k: UInt32 = 0, jt: UInt8 = 0, jf: UInt8 = 0) -> fu_sock_filter {
            fu_sock_filter(code: code, jt: jt, jf: jf, k: k)
        }
        // Operands that are header offsets and values, named as the Swift side above reads them.
        func at(_ offset: Int) -> UInt32 { UInt32(offset) }
        return [
            op(BPF.ldAbsW, at(IPv4Header.destination)),                  //  0  A = inner destination
            op(BPF.tax),                                                 //  1  X = A
            op(BPF.ldAbsW, at(IPv4Header.source)),                       //  2  A = inner source
            op(BPF.xorX),                                                //  3  A ^= X
            op(BPF.st, 0),                                               //  4  M[0] = A
            op(BPF.ldAbsB, at(IPv4Header.proto)),                        //  5  A = protocol
            op(BPF.jeqK, UInt32(IPv4Header.protocolTCP), jt: 1, jf: 0),  //  6  TCP: ports (8)
            op(BPF.jeqK, UInt32(IPv4Header.protocolUDP), jt: 0, jf: 7),  //  7  UDP: ports (8), else the hash (15)
            op(BPF.ldAbsH, at(IPv4Header.flagsFragment)),                //  8  A = flags and fragment offset
            op(BPF.jsetK, UInt32(IPv4Header.fragmentBits), jt: 5, jf: 0), //  9  a fragment: no ports, the hash (15)
            op(BPF.ldxMSH, at(IPv4Header.versionIHL)),                   // 10  X = 4 * IHL
            op(BPF.ldIndW, 0),                      // 11  A = the port word after the IPv4 header
            op(BPF.ldxMem, 0),                      // 12  X = M[0]
            op(BPF.xorX),                           // 13  A ^= X
            op(BPF.st, 0),                          // 14  M[0] = A
            op(BPF.ldMem, 0),                       // 15  A = M[0], the key
            op(BPF.tax),                            // 16  X = A
            op(BPF.rshK, 16),                       // 17
            op(BPF.xorX),                           // 18  A = key ^ (key >> 16)
            op(BPF.mulK, multiplier),               // 19
            op(BPF.rshK, 16),                       // 20  the product's top 16 bits
            op(BPF.mulK, UInt32(workers)),          // 21
            op(BPF.rshK, 16),                       // 22  scaled to 0..<workers
            op(BPF.retA),                           // 23  the socket's index
        ]
    }
}

/// The classic BPF opcodes the steering program uses (<linux/filter.h>, <linux/bpf_common.h>).
public enum BPF {
    public static let ldAbsW: UInt16 = 0x20   // BPF_LD | BPF_W | BPF_ABS
    public static let ldAbsH: UInt16 = 0x28   // BPF_LD | BPF_H | BPF_ABS
    public static let ldAbsB: UInt16 = 0x30   // BPF_LD | BPF_B | BPF_ABS
    public static let ldIndW: UInt16 = 0x40   // BPF_LD | BPF_W | BPF_IND
    public static let ldMem: UInt16 = 0x60    // BPF_LD | BPF_MEM
    public static let ldxMem: UInt16 = 0x61   // BPF_LDX | BPF_MEM
    public static let ldxMSH: UInt16 = 0xB1   // BPF_LDX | BPF_B | BPF_MSH: X = 4 * (P[k] & 0xf)
    public static let st: UInt16 = 0x02       // BPF_ST
    public static let tax: UInt16 = 0x07      // BPF_MISC | BPF_TAX
    public static let xorX: UInt16 = 0xAC     // BPF_ALU | BPF_XOR | BPF_X
    public static let mulK: UInt16 = 0x24     // BPF_ALU | BPF_MUL | BPF_K
    public static let rshK: UInt16 = 0x74     // BPF_ALU | BPF_RSH | BPF_K
    public static let jeqK: UInt16 = 0x15     // BPF_JMP | BPF_JEQ | BPF_K
    public static let jsetK: UInt16 = 0x45    // BPF_JMP | BPF_JSET | BPF_K
    public static let retA: UInt16 = 0x16     // BPF_RET | BPF_A
}
