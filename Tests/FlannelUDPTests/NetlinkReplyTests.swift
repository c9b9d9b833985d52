import XCTest
@testable import FlannelCore
@testable import FlannelUDP

/// The reply side of one exchange, fed hand-built datagrams as the kernel would send them to port id 4242 for a
/// request with sequence number 77.
final class NetlinkReplyTests: XCTestCase {
    private let seq: UInt32 = 77
    private let port: UInt32 = 4242

    private func collector(into routes: Box<[Route]>) -> ReplyCollector {
        ReplyCollector(sequence: seq, portID: port, replyType: 24) { bytes in
            guard let parsed = NetlinkMessages.parseRoute(bytes) else { return false }
            routes.value.append(parsed.route)
            return true
        }
    }

    /// A dump entry for 10.<n>.0.0/16 dev <n>.
    private func routeEntry(_ n: UInt8, flags: UInt16 = 2, sequence: UInt32? = nil, portID: UInt32? = nil) -> [UInt8] {
        var body = Wire()
        body.u8(2); body.u8(16); body.u8(0); body.u8(0); body.u8(254); body.u8(3); body.u8(253); body.u8(1)
        body.u32(0)
        body.attr(15, le32(254)); body.attr(1, [10, n, 0, 0]); body.attr(4, le32(UInt32(n)))
        return Wire.message(type: 24, flags: flags, sequence: sequence ?? seq, portID: portID ?? port, body: body).bytes
    }

    private func done(flags: UInt16 = 2, error: Int32 = 0) -> [UInt8] {
        var body = Wire()
        body.i32(error)
        return Wire.message(type: 3, flags: flags, sequence: seq, portID: port, body: body).bytes
    }

    private func ack(error: Int32 = 0, text: String? = nil) -> [UInt8] {
        var body = Wire()
        body.i32(error)
        body.append([UInt8](repeating: 0, count: 16))  // the request's header (NETLINK_CAP_ACK)
        var flags: UInt16 = 0x100
        if let text {
            body.attr(1, Array(text.utf8) + [0])
            flags |= 0x200
        }
        return Wire.message(type: 2, flags: flags, sequence: seq, portID: port, body: body).bytes
    }

    private func feed(_ c: ReplyCollector, _ datagram: [UInt8]) -> ReplyCollector.Progress {
        datagram.withUnsafeBytes { c.feed($0) }
    }

    func testAckEndsTheExchange() {
        let routes = Box<[Route]>([])
        let c = collector(into: routes)
        XCTAssertEqual(feed(c, ack()), .finished)
        XCTAssertEqual(c.status, .init(errno: 0, message: nil))
        XCTAssertFalse(c.malformed)
        XCTAssertFalse(c.interrupted)
    }

    func testErrorWithExtendedAck() {
        let c = collector(into: Box([]))
        XCTAssertEqual(feed(c, ack(error: -19, text: "Nexthop device is not up")), .finished)
        XCTAssertEqual(c.status, .init(errno: ENODEV, message: "Nexthop device is not up"))
    }

    func testMultipartDumpAcrossDatagrams() {
        let routes = Box<[Route]>([])
        let c = collector(into: routes)
        XCTAssertEqual(feed(c, routeEntry(1) + routeEntry(2)), .more)
        XCTAssertEqual(feed(c, routeEntry(3)), .more)
        XCTAssertEqual(feed(c, routeEntry(4) + done()), .finished)
        XCTAssertEqual(routes.value.map(\.outputInterface), [1, 2, 3, 4])
        XCTAssertEqual(c.status.errno, 0)
        XCTAssertFalse(c.interrupted)
    }

    func testDumpErrorInDone() {
        let c = collector(into: Box([]))
        XCTAssertEqual(feed(c, done(flags: 2, error: -EOPNOTSUPP)), .finished)
        XCTAssertEqual(c.status.errno, EOPNOTSUPP)
    }

    func testInterruptedDumpIsReadToItsEndAndFlagged() {
        let routes = Box<[Route]>([])
        let c = collector(into: routes)
        XCTAssertEqual(feed(c, routeEntry(1)), .more)
        // The kernel saw the table change: this entry and all after it carry NLM_F_DUMP_INTR (0x10).
        XCTAssertEqual(feed(c, routeEntry(2, flags: 0x12) + routeEntry(3, flags: 0x12)), .more)
        XCTAssertTrue(c.interrupted)
        XCTAssertEqual(feed(c, routeEntry(4, flags: 0x12)), .more)
        XCTAssertEqual(feed(c, done(flags: 0x12)), .finished)
        XCTAssertTrue(c.interrupted)
        XCTAssertEqual(routes.value.count, 1, "nothing is collected from an inconsistent part of a dump")
    }

    func testInterruptedDumpEndingInTheSameDatagram() {
        let c = collector(into: Box([]))
        XCTAssertEqual(feed(c, routeEntry(1, flags: 0x12) + routeEntry(2, flags: 0x12) + done(flags: 0x12)), .finished)
        XCTAssertTrue(c.interrupted)
    }

    func testMalformedEntryIsRememberedAndTheDumpStillRunsToItsEnd() {
        let routes = Box<[Route]>([])
        let c = collector(into: routes)
        var broken = routeEntry(9)
        broken[16] = 10  // AF_INET6 in an IPv4 route dump
        XCTAssertEqual(feed(c, routeEntry(1) + broken), .more)
        XCTAssertEqual(feed(c, routeEntry(2) + done()), .finished)
        XCTAssertTrue(c.malformed)
        XCTAssertEqual(routes.value.count, 2)
    }

    func testOtherDataMessagesAreIgnored() {
        let routes = Box<[Route]>([])
        let c = collector(into: routes)
        var link = NetlinkParserTests.vethLink()
        link.setU32(at: 8, seq)
        link.setU32(at: 12, port)
        XCTAssertEqual(feed(c, link.bytes + routeEntry(1) + done()), .finished)
        XCTAssertFalse(c.malformed)
        XCTAssertEqual(routes.value.count, 1)
    }

    func testRepliesToAnotherRequestOrSocketAreRefused() {
        XCTAssertEqual(feed(collector(into: Box([])), routeEntry(1, sequence: 76)), .outOfStep(EPROTO))
        XCTAssertEqual(feed(collector(into: Box([])), routeEntry(1, portID: 999)), .outOfStep(ESRCH))
    }

    func testDatagramsThatAreNotNetlink() {
        // Shorter than a header, or a header claiming more than was received: nothing is processed.
        let c = collector(into: Box([]))
        XCTAssertEqual(feed(c, []), .outOfStep(EBADMSG))
        XCTAssertEqual(feed(c, [1, 2, 3]), .more)
        XCTAssertEqual(feed(c, Array(routeEntry(1).prefix(30))), .more)
        XCTAssertEqual(feed(c, ack()), .finished)
    }

    /// Regression (fuzz target `netlink`): libmnl takes a message length of 2 GiB or more for a negative int that
    /// fits any datagram, then reads and jumps gigabytes past it (SIGSEGV). Such a datagram is refused instead,
    /// in a dump, in an interrupted dump, and as the first message.
    func testMessageClaimingTwoGigabytesIsRefusedNotFollowed() {
        var huge = routeEntry(2)
        huge.replaceSubrange(0..<4, with: [0xf7, 0xff, 0xff, 0xff])  // nlmsg_len 0xfffffff7
        XCTAssertEqual(feed(collector(into: Box([])), routeEntry(1) + huge), .outOfStep(EBADMSG))
        XCTAssertEqual(feed(collector(into: Box([])), huge), .outOfStep(EBADMSG))
        var exactly = routeEntry(2)
        exactly.replaceSubrange(0..<4, with: [0x00, 0x00, 0x00, 0x80])  // 0x80000000
        XCTAssertEqual(feed(collector(into: Box([])), routeEntry(1) + exactly), .outOfStep(EBADMSG))
        let interrupted = collector(into: Box([]))
        XCTAssertEqual(feed(interrupted, routeEntry(1, flags: 0x12)), .more)
        XCTAssertTrue(interrupted.interrupted)
        XCTAssertEqual(feed(interrupted, routeEntry(3, flags: 0x12) + huge), .outOfStep(EBADMSG))
        // A length that merely overruns the datagram is still what it was: nothing processed, receive again.
        var long = routeEntry(2)
        long.replaceSubrange(0..<4, with: [0x00, 0x10, 0x00, 0x00])
        XCTAssertEqual(feed(collector(into: Box([])), long), .more)
    }

    func testTruncatedErrorMessage() {
        // An NLMSG_ERROR too short to hold the error code ends the exchange as EBADMSG rather than an ack.
        let c = collector(into: Box([]))
        XCTAssertEqual(feed(c, Wire.message(type: 2, flags: 0, sequence: seq, portID: port, body: Wire(bytes: [0, 0]))
            .bytes), .finished)
        XCTAssertEqual(c.status.errno, EBADMSG)
    }
}

/// A reference cell so the parse callback can collect into something the test reads afterwards.
final class Box<T> {
    var value: T
    init(_ value: T) { self.value = value }
}
