import CShims
import XCTest
@testable import FlannelCore
@testable import FlannelUDP

/// The reuseport steering program, without privileges: an interpreter of the classic BPF it is made of (with the
/// kernel's rules: big-endian loads, a load beyond the packet returns 0) runs it over many inner packets and must
/// pick the same worker as `FlowSteering.worker`, which the rest of the code (and these tests) reason with.
final class FlowSteeringTests: XCTestCase {
    /// Classic BPF as the kernel's interpreter runs it, for the opcodes `FlowSteering.program` uses.
    static func run(_ program: [fu_sock_filter], on packet: [UInt8]) -> UInt32 {
        var a: UInt32 = 0, x: UInt32 = 0
        var m = [UInt32](repeating: 0, count: 16)
        var pc = 0
        func load(_ offset: Int, _ size: Int) -> UInt32? {
            guard offset >= 0, offset + size <= packet.count else { return nil }
            return packet[offset..<offset + size].reduce(0) { $0 << 8 | UInt32($1) }
        }
        while pc < program.count {
            let i = program[pc]
            pc += 1
            switch i.code {
            case BPF.ldAbsW: guard let v = load(Int(i.k), 4) else { return 0 }; a = v
            case BPF.ldAbsH: guard let v = load(Int(i.k), 2) else { return 0 }; a = v
            case BPF.ldAbsB: guard let v = load(Int(i.k), 1) else { return 0 }; a = v
            case BPF.ldIndW: guard let v = load(Int(x) + Int(i.k), 4) else { return 0 }; a = v
            case BPF.ldIndB: guard let v = load(Int(x) + Int(i.k), 1) else { return 0 }; a = v
            case BPF.lshK: a <<= i.k
            case BPF.addX: a &+= x
            case BPF.jgtX: pc += Int(a > x ? i.jt : i.jf)
            case BPF.ldMem: a = m[Int(i.k)]
            case BPF.ldxMem: x = m[Int(i.k)]
            case BPF.ldxMSH: guard let v = load(Int(i.k), 1) else { return 0 }; x = (v & 0xF) * 4
            case BPF.st: m[Int(i.k)] = a
            case BPF.tax: x = a
            case BPF.xorX: a ^= x
            case BPF.mulK: a = a &* i.k
            case BPF.rshK: a >>= i.k
            case BPF.jeqK: pc += Int(a == i.k ? i.jt : i.jf)
            case BPF.jsetK: pc += Int(a & i.k != 0 ? i.jt : i.jf)
            case BPF.jgtK: pc += Int(a > i.k ? i.jt : i.jf)
            case BPF.retA: return a
            case BPF.retK: return i.k
            default: XCTFail("opcode \(i.code) not interpreted"); return 0
            }
        }
        XCTFail("the program fell off its end")
        return 0
    }

    func packets() -> [[UInt8]] {
        var rng = SystemRandomNumberGenerator()
        var out: [[UInt8]] = []
        for k in 0..<400 {
            let proto: UInt8 = [6, 17, 1, 47][k % 4]
            var p = makeIPv4(source: IPv4Address(0x0AF4_0000 | UInt32.random(in: 0...0xFFFF, using: &rng)),
                             destination: IPv4Address(0x0AF4_0000 | UInt32.random(in: 0...0xFFFF, using: &rng)),
                             proto: proto, payload: (0..<UInt8.random(in: 0...40)).map { _ in UInt8.random(in: 0...255) })
            if k % 7 == 0 { p[6] = 0x20 }              // more fragments: the ports are not used
            if k % 11 == 0 { p[0] = 0x46; p += [0, 0, 0, 0] }  // options: the ports come later
            if k % 13 == 0 { p = Array(p.prefix(Int.random(in: 0...24))) }  // cut short
            out.append(p)
        }
        return out
    }

    func testProgramPicksTheWorkerTheReferencePicks() {
        for workers in [1, 2, 3, 4, 8, 64] {
            for express in [nil, 128] as [Int?] {
                let program = FlowSteering.program(workers: workers, express: express)
                for p in packets() {
                    let expected = p.withUnsafeBytes { FlowSteering.worker($0, workers: workers, express: express) }
                    XCTAssertEqual(Int(Self.run(program, on: p)), expected, "\(workers) workers, packet \(p)")
                    XCTAssertLessThan(expected, workers + (express == nil ? 0 : 1))
                }
            }
        }
    }

    /// The express lane takes every short packet whose header claims at most its length, whatever the flow, but a
    /// bare TCP acknowledgement, and no other: the reference and the program agree at the boundary, and a bulk
    /// flow's full-size segments and its acknowledgements stay on its worker.
    func testExpressLaneTakesShortPacketsButBareAcknowledgements() {
        func tcp(_ sport: UInt16, payload: Int, flags: UInt8 = TCPHeader.ack, options: Int = 0) -> [UInt8] {
            var spec = TCPPacketSpec()
            spec.sourcePort = sport
            spec.flags = flags
            spec.tcpOptions = [UInt8](repeating: 1, count: options)  // NOPs
            spec.payload = filled(7, payload)
            return spec.bytes()
        }
        for workers in [1, 2, 4] {
            let program = FlowSteering.program(workers: workers, express: 128)
            for sport in UInt16(40000)..<40032 {
                func flowWorker(_ p: [UInt8]) -> UInt32 {
                    UInt32(p.withUnsafeBytes { FlowSteering.worker($0, workers: workers) })
                }
                let bulk = tcp(sport, payload: 1400)
                XCTAssertEqual(Self.run(program, on: bulk), flowWorker(bulk))
                for ack in [tcp(sport, payload: 0), tcp(sport, payload: 0, options: 32)] {
                    XCTAssertEqual(Self.run(program, on: ack), flowWorker(ack), "a bare acknowledgement")
                }
                XCTAssertEqual(Self.run(program, on: tcp(sport, payload: 0, flags: TCPHeader.syn)), UInt32(workers))
                XCTAssertEqual(Self.run(program, on: tcp(sport, payload: 0, flags: TCPHeader.fin | TCPHeader.ack)),
                               UInt32(workers))
                XCTAssertEqual(Self.run(program, on: tcp(sport, payload: 1)), UInt32(workers), "a 1-byte payload")
                XCTAssertEqual(Self.run(program, on: tcp(sport, payload: 128 - 40)), UInt32(workers), "128 bytes")
                let longer = tcp(sport, payload: 129 - 40)
                XCTAssertEqual(Self.run(program, on: longer), flowWorker(longer), "129 bytes")
            }
            let ping = makeIPv4(source: ip("10.244.1.2"), destination: ip("10.244.2.2"), proto: 1,
                                payload: [UInt8](repeating: 0, count: 64))
            XCTAssertEqual(Self.run(program, on: ping), UInt32(workers))
            XCTAssertEqual(ping.withUnsafeBytes { FlowSteering.queue($0, workers: workers, express: 128) }, workers)
        }
    }

    /// Linux gives connect() even ephemeral ports, so a client's TCP flows differ in the source port's upper bits
    /// only: they must still spread. (With the product's low bits, `% 2` read the port's parity, and every one of
    /// them went to the same worker.)
    func testFlowsWithEvenSourcePortsSpread() {
        for workers in [2, 3, 4] {
            var seen = Set<Int>()
            for sport in stride(from: UInt16(40000), to: 40016, by: 2) {
                var spec = TCPPacketSpec()
                spec.sourcePort = sport
                let p = spec.bytes()
                seen.insert(Int(Self.run(FlowSteering.program(workers: workers), on: p)))
            }
            XCTAssertEqual(seen.count, workers, "8 flows with even source ports over \(workers) workers: \(seen)")
        }
    }

    /// One flow (same addresses and ports) is always one worker, whatever else is in the packet; flows that differ
    /// only in the source port (iperf3's parallel streams) spread over the workers.
    func testOneFlowOneWorkerAndPortsSpread() {
        func tcp(_ sport: UInt16, payload: [UInt8]) -> [UInt8] {
            var spec = TCPPacketSpec()
            spec.sourcePort = sport
            spec.payload = payload
            return spec.bytes()
        }
        for workers in [2, 4] {
            let program = FlowSteering.program(workers: workers)
            let first = Self.run(program, on: tcp(40000, payload: filled(1, 100)))
            for n in [0, 1, 1400] {
                XCTAssertEqual(Self.run(program, on: tcp(40000, payload: filled(UInt8(n & 0xFF), n))), first)
            }
            var seen = Set<UInt32>()
            for sport in UInt16(40000)..<40016 { seen.insert(Self.run(program, on: tcp(sport, payload: []))) }
            XCTAssertEqual(seen.count, workers, "16 flows over \(workers) workers: \(seen)")
        }
    }

    func testTooShortGoesToTheFirstWorker() {
        XCTAssertEqual(Self.run(FlowSteering.program(workers: 4), on: [0x45, 0, 0]), 0)
        XCTAssertNil([UInt8](repeating: 0, count: 19).withUnsafeBytes { FlowSteering.key($0) })
    }
}

/// The sender's seam for steering: a UDP GSO message is steered as one by the receiving node, so the send queue
/// never puts datagrams of two flow keys into one message, while one flow's run still becomes one message.
final class SendQueueFlowTests: XCTestCase {
    func testGSOMessagesHoldOneFlowKey() {
        let queue = SendQueue(capacity: 16, gso: true)
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: 1400, alignment: 16)
        defer { buffer.deallocate() }
        let name = sockaddr_in()
        for flow: UInt32 in [7, 7, 7, 9, 9, 7] {
            queue.append(peer: 0, name: name, first: buffer, firstLength: 1400, flow: flow)
        }
        XCTAssertEqual(queue.messageCount, 3)
        XCTAssertEqual((0..<3).map { queue.messageSegments[$0] }, [3, 2, 1])
        XCTAssertEqual((0..<3).map { queue.messageFlow[$0] }, [7, 9, 7])
        queue.splitMessages(from: 1)
        XCTAssertEqual((1..<queue.messageCount).map { queue.messageFlow[$0] }, [9, 9, 7], "the split keeps the keys")
    }

    /// A packet read from the tun carries its flow key into the queue.
    func testTunPacketIsQueuedUnderItsFlowKey() {
        var spec = TCPPacketSpec()
        spec.payload = filled(1, 3000)
        var bytes = spec.bytes(partialChecksum: true)
        let queue = SendQueue(capacity: 16, gso: true)
        bytes.withUnsafeMutableBytes { raw in
            let packet = TunPacket(bytes: raw, gsoSize: 1000)
            XCTAssertEqual(packet.datagrams, 3)
            XCTAssertEqual(packet.cut(into: queue, peer: 0, name: sockaddr_in()), .segmented(3))
            XCTAssertEqual(queue.messageCount, 1)
            XCTAssertEqual(queue.messageFlow[0], FlowSteering.key(UnsafeRawBufferPointer(raw)))
        }
    }
}

/// `up --workers`: the range it accepts and the default it takes from the CPUs this process may use.
final class WorkerCountTests: XCTestCase {
    func testRangeAndDefault() {
        XCTAssertNil(Workers.validate(1))
        XCTAssertNil(Workers.validate(64))
        XCTAssertEqual(Workers.validate(0), "--workers must be between 1 and 64, not 0")
        XCTAssertEqual(Workers.validate(65), "--workers must be between 1 and 64, not 65")
        let cpus = Int(fu_available_cpus())
        XCTAssertGreaterThanOrEqual(cpus, 1)
        XCTAssertEqual(Workers.defaultCount(), min(cpus, Workers.defaultCap))
    }
}
