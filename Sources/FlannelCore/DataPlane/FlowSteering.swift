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
///
/// The express lane (`express`: a length in bytes, nil: none): an IPv4 packet of at most that many bytes goes to
/// one more worker pair, index `workers`, on both sides, whatever its flow: pings, handshakes, closes, short
/// requests, but not a bare TCP acknowledgement (`takesExpressLane`). Its workers are idle most of the time, so
/// such a packet neither waits behind a bulk flow's megabytes in a tun queue or a socket buffer nor for a busy
/// worker's turn on the CPU (fq_codel's new-flow queue, decided by size because neither program keeps state). The
/// price: a bulk flow's own short segment (the tail of a write) can overtake its full-size ones; TCP takes that as
/// reordering (SACK, RACK), not as loss.
/// - UDP -> tun: the reuseport program reads the inner IPv4 total length (a datagram that claims a small length
///   and is not is dropped as malformed on the express lane, as on any other).
/// - tun -> UDP: an eBPF program on the tun (TUNSETSTEERINGEBPF, `tunProgram`) picks the queue by the packet's
///   length (a TSO super-packet is never short) and otherwise by the same key and hash as the socket program.
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

    /// The worker (socket index) of a packet among `workers` (plus the express lane at index `workers` when
    /// `express` is set), as the reuseport program decides it: the lane by the total length the inner header
    /// claims.
    public static func worker(_ packet: UnsafeRawBufferPointer, workers: Int, express: Int? = nil) -> Int {
        let claimed = packet.count >= IPv4Header.totalLength + 2
            ? Int(packet.loadUnaligned(fromByteOffset: IPv4Header.totalLength, as: UInt16.self).bigEndian) : nil
        return pick(packet, length: claimed, workers: workers, express: express)
    }

    /// The tun queue of a packet the kernel routes into the device, as `tunProgram` decides it: the lane by the
    /// packet's own length, else as the reuseport program.
    public static func queue(_ packet: UnsafeRawBufferPointer, workers: Int, express: Int? = nil) -> Int {
        pick(packet, length: packet.count, workers: workers, express: express)
    }

    /// Both programs' choice once the lane's length is read (`length` nil: a load beyond the packet, so 0).
    private static func pick(_ packet: UnsafeRawBufferPointer, length: Int?, workers: Int, express: Int?) -> Int {
        if let express {
            guard let length else { return 0 }
            switch takesExpressLane(packet, length: length, limit: express) {
            case true?: return workers
            case nil: return 0
            case false?: break
            }
        }
        guard let key = key(packet) else { return 0 }
        return worker(key: key, workers: workers)
    }

    /// Whether a packet of `length` bytes takes the express lane, as both programs decide it (nil: they would
    /// load beyond the packet, which ends them with 0). Short packets do, except a TCP segment that carries
    /// nothing but an acknowledgement: a bulk flow sends those back at the rate of its data, and on the express
    /// lane they would keep its workers as busy as a flow's (the lane is fast because it is idle). SYN, FIN, RST,
    /// any payload and a fragment (which has no TCP header to read) do take it.
    static func takesExpressLane(_ p: UnsafeRawBufferPointer, length: Int, limit: Int) -> Bool? {
        guard length <= limit else { return false }
        guard p.count > IPv4Header.proto else { return nil }
        guard p[IPv4Header.proto] == IPv4Header.protocolTCP else { return true }
        guard p.count >= IPv4Header.flagsFragment + 2 else { return nil }
        let fragment = UInt16(p[IPv4Header.flagsFragment]) << 8 | UInt16(p[IPv4Header.flagsFragment + 1])
        if fragment & IPv4Header.fragmentBits != 0 { return true }
        let x = Int(p[IPv4Header.versionIHL] & 0xF) * 4
        guard x + TCPHeader.flags < p.count else { return nil }
        if p[x + TCPHeader.flags] & TCPHeader.synFinRst != 0 { return true }
        let headers = x + Int(p[x + TCPHeader.dataOffset] >> 4) * 4
        return length > headers
    }

    /// The multiplicative hash's factor (2^32 / the golden ratio, odd), in the program and in `worker(key:)`.
    static let multiplier: UInt32 = 0x9E37_79B1

    @inline(__always)
    public static func worker(key: UInt32, workers: Int) -> Int {
        Int(((((key ^ (key >> 16)) &* multiplier) >> 16) &* UInt32(workers)) >> 16)
    }

    /// The classic BPF program for `workers` sockets, and the express lane's socket after them (see above;
    /// `workers` >= 1).
    public static func program(workers: Int, express: Int? = nil) -> [fu_sock_filter] {
        precondition(workers >= 1 && workers <= 65536)
        func op(_ code: UInt16, _ k: UInt32 = 0, jt: UInt8 = 0, jf: UInt8 = 0) -> fu_sock_filter {
            fu_sock_filter(code: code, jt: jt, jf: jf, k: k)
        }
        // Operands that are header offsets and values, named as the Swift side above reads them.
        func at(_ offset: Int) -> UInt32 { UInt32(offset) }
        // The express lane (`takesExpressLane`); `bulk` jumps to the flow's worker (the program after it).
        let lane: [fu_sock_filter] = express.map { limit in [
            op(BPF.ldAbsH, at(IPv4Header.totalLength)),                  // e0  A = inner total length
            op(BPF.jgtK, UInt32(limit), jt: 15, jf: 0),                  // e1  longer: bulk
            op(BPF.ldAbsB, at(IPv4Header.proto)),                        // e2
            op(BPF.jeqK, UInt32(IPv4Header.protocolTCP), jt: 0, jf: 12), // e3  not TCP: express (e16)
            op(BPF.ldAbsH, at(IPv4Header.flagsFragment)),                // e4
            op(BPF.jsetK, UInt32(IPv4Header.fragmentBits), jt: 10, jf: 0), // e5  a fragment: express
            op(BPF.ldxMSH, at(IPv4Header.versionIHL)),                   // e6  X = 4 * IHL
            op(BPF.ldIndB, at(TCPHeader.flags)),                         // e7  A = TCP flags
            op(BPF.jsetK, UInt32(TCPHeader.synFinRst), jt: 7, jf: 0),    // e8  SYN, FIN, RST: express
            op(BPF.ldIndB, at(TCPHeader.dataOffset)),                    // e9
            op(BPF.rshK, 4),                                             // e10
            op(BPF.lshK, 2),                                             // e11 A = TCP header length
            op(BPF.addX),                                                // e12 A += X, both headers
            op(BPF.tax),                                                 // e13
            op(BPF.ldAbsH, at(IPv4Header.totalLength)),                  // e14
            op(BPF.jgtX, jt: 0, jf: 1),                                  // e15 a payload: express; else bulk
            op(BPF.retK, UInt32(workers)),                               // e16 the express lane's socket
        ] } ?? []
        return lane + [
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
    public static let retK: UInt16 = 0x06     // BPF_RET | BPF_K
    public static let jgtK: UInt16 = 0x25     // BPF_JMP | BPF_JGT | BPF_K
    public static let jgtX: UInt16 = 0x2D     // BPF_JMP | BPF_JGT | BPF_X
    public static let ldIndB: UInt16 = 0x50   // BPF_LD | BPF_B | BPF_IND
    public static let lshK: UInt16 = 0x64     // BPF_ALU | BPF_LSH | BPF_K
    public static let addX: UInt16 = 0x0C     // BPF_ALU | BPF_ADD | BPF_X
}

extension FlowSteering {
    /// The eBPF program for the tun's queues (TUNSETSTEERINGEBPF; the kernel takes its return value as a u16,
    /// modulo the number of queues): `queue(_:workers:express:)` in eBPF, with the packet at the inner IPv4 header (a tun has
    /// no link-layer header). The key and hash are the reuseport program's; legacy packet loads (LD_ABS/LD_IND)
    /// do the bounds checks and, as in classic BPF, end the program with 0 on a load beyond the packet.
    public static func tunProgram(workers: Int, express: Int? = nil) -> [fu_bpf_insn] {
        precondition(workers >= 1 && workers <= 65536)
        typealias E = EBPF
        func op(_ code: UInt8, dst: UInt8 = 0, src: UInt8 = 0, off: Int16 = 0, imm: Int32 = 0) -> fu_bpf_insn {
            fu_bpf_insn(code: code, regs: dst | src << 4, off: off, imm: imm)
        }
        func at(_ offset: Int) -> Int32 { Int32(offset) }
        // The express lane (`takesExpressLane`); `bulk` jumps to the flow's queue (the program after it).
        let lane: [fu_bpf_insn] = express.map { limit in [
            op(E.ldxMemW, dst: 0, src: 6, off: E.skbLength),             // e0  r0 = skb->len
            op(E.jgtK, dst: 0, off: 19, imm: Int32(limit)),              // e1  longer: bulk
            op(E.mov64X, dst: 9, src: 0),                                // e2  r9 = the length
            op(E.ldAbsB, imm: at(IPv4Header.proto)),                     // e3
            op(E.jneK, dst: 0, off: 14, imm: Int32(IPv4Header.protocolTCP)), // e4  not TCP: express (e19)
            op(E.ldAbsH, imm: at(IPv4Header.flagsFragment)),             // e5
            op(E.jsetK, dst: 0, off: 12, imm: Int32(IPv4Header.fragmentBits)), // e6  a fragment: express
            op(E.ldAbsB, imm: at(IPv4Header.versionIHL)),                // e7
            op(E.andK, dst: 0, imm: 0xF),                                // e8
            op(E.lshK, dst: 0, imm: 2),                                  // e9
            op(E.movX, dst: 8, src: 0),                                  // e10 r8 = 4 * IHL
            op(E.ldIndB, src: 8, imm: at(TCPHeader.flags)),              // e11 r0 = TCP flags
            op(E.jsetK, dst: 0, off: 6, imm: Int32(TCPHeader.synFinRst)), // e12 SYN, FIN, RST: express
            op(E.ldIndB, src: 8, imm: at(TCPHeader.dataOffset)),         // e13
            op(E.rshK, dst: 0, imm: 4),                                  // e14
            op(E.lshK, dst: 0, imm: 2),                                  // e15 r0 = TCP header length
            op(E.addX, dst: 0, src: 8),                                  // e16 r0 = both headers
            op(E.jgtX, dst: 9, src: 0, off: 1),                          // e17 a payload: express
            op(E.ja, off: 2),                                            // e18 else bulk
            op(E.movK, dst: 0, imm: Int32(workers)),                     // e19 the express lane's queue
            op(E.exit),                                                  // e20
        ] } ?? []
        return [op(E.mov64X, dst: 6, src: 1)] + lane + [                 //     r6 = the skb (LD_ABS needs it there)
            op(E.ldAbsW, imm: at(IPv4Header.destination)),               //  0  r0 = destination
            op(E.movX, dst: 7, src: 0),                                  //  1  r7 = r0
            op(E.ldAbsW, imm: at(IPv4Header.source)),                    //  2  r0 = source
            op(E.xorX, dst: 7, src: 0),                                  //  3  r7 ^= r0
            op(E.ldAbsB, imm: at(IPv4Header.proto)),                     //  4  r0 = protocol
            op(E.jeqK, dst: 0, off: 1, imm: Int32(IPv4Header.protocolTCP)),  //  5  TCP: ports (7)
            op(E.jneK, dst: 0, off: 8, imm: Int32(IPv4Header.protocolUDP)),  //  6  not UDP: the hash (15)
            op(E.ldAbsH, imm: at(IPv4Header.flagsFragment)),             //  7  r0 = flags and fragment offset
            op(E.jsetK, dst: 0, off: 6, imm: Int32(IPv4Header.fragmentBits)), //  8  a fragment: the hash (15)
            op(E.ldAbsB, imm: at(IPv4Header.versionIHL)),                //  9  r0 = version and IHL
            op(E.andK, dst: 0, imm: 0xF),                                // 10
            op(E.lshK, dst: 0, imm: 2),                                  // 11  r0 = 4 * IHL
            op(E.movX, dst: 8, src: 0),                                  // 12  r8 = r0
            op(E.ldIndW, src: 8, imm: 0),                                // 13  r0 = the port word after the header
            op(E.xorX, dst: 7, src: 0),                                  // 14  r7 ^= r0
            op(E.movX, dst: 0, src: 7),                                  // 15  r0 = r7, the key
            op(E.rshK, dst: 0, imm: 16),                                 // 16
            op(E.xorX, dst: 0, src: 7),                                  // 17  r0 = key ^ (key >> 16)
            op(E.mulK, dst: 0, imm: Int32(bitPattern: multiplier)),      // 18
            op(E.rshK, dst: 0, imm: 16),                                 // 19  the product's top 16 bits
            op(E.mulK, dst: 0, imm: Int32(workers)),                     // 20
            op(E.rshK, dst: 0, imm: 16),                                 // 21  scaled to 0..<workers
            op(E.exit),                                                  // 22  the queue's index
        ]
    }
}

/// The eBPF opcodes `FlowSteering.tunProgram` uses (<linux/bpf.h>, <linux/bpf_common.h>): 32-bit ALU operations
/// (BPF_ALU) on the key, as the classic program computes it, and the legacy packet loads.
public enum EBPF {
    public static let ldAbsW: UInt8 = 0x20    // BPF_LD | BPF_W | BPF_ABS: r0 = ntohl(packet[imm])
    public static let ldAbsH: UInt8 = 0x28    // BPF_LD | BPF_H | BPF_ABS
    public static let ldAbsB: UInt8 = 0x30    // BPF_LD | BPF_B | BPF_ABS
    public static let ldIndW: UInt8 = 0x40    // BPF_LD | BPF_W | BPF_IND: r0 = ntohl(packet[src + imm])
    public static let ldIndB: UInt8 = 0x50    // BPF_LD | BPF_B | BPF_IND
    public static let addX: UInt8 = 0x0C      // BPF_ALU | BPF_ADD | BPF_X
    public static let jgtX: UInt8 = 0x2D      // BPF_JMP | BPF_JGT | BPF_X (unsigned)
    public static let ja: UInt8 = 0x05        // BPF_JMP | BPF_JA
    public static let ldxMemW: UInt8 = 0x61   // BPF_LDX | BPF_W | BPF_MEM: dst = *(u32 *)(src + off)
    public static let mov64X: UInt8 = 0xBF    // BPF_ALU64 | BPF_MOV | BPF_X
    public static let movX: UInt8 = 0xBC      // BPF_ALU | BPF_MOV | BPF_X
    public static let movK: UInt8 = 0xB4      // BPF_ALU | BPF_MOV | BPF_K
    public static let xorX: UInt8 = 0xAC      // BPF_ALU | BPF_XOR | BPF_X
    public static let andK: UInt8 = 0x54      // BPF_ALU | BPF_AND | BPF_K
    public static let lshK: UInt8 = 0x64      // BPF_ALU | BPF_LSH | BPF_K
    public static let mulK: UInt8 = 0x24      // BPF_ALU | BPF_MUL | BPF_K
    public static let rshK: UInt8 = 0x74      // BPF_ALU | BPF_RSH | BPF_K
    public static let jeqK: UInt8 = 0x15      // BPF_JMP | BPF_JEQ | BPF_K
    public static let jneK: UInt8 = 0x55      // BPF_JMP | BPF_JNE | BPF_K
    public static let jgtK: UInt8 = 0x25      // BPF_JMP | BPF_JGT | BPF_K (unsigned)
    public static let jsetK: UInt8 = 0x45     // BPF_JMP | BPF_JSET | BPF_K
    public static let exit: UInt8 = 0x95      // BPF_JMP | BPF_EXIT
    /// offsetof(struct __sk_buff, len)
    public static let skbLength: Int16 = 0
}
