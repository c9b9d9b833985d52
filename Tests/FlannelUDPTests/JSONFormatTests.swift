import FlannelUDP
import Foundation
import XCTest

/// The one JSON set-up (`JSONFormat`): what `--json`, the control protocol and the state file share.
final class JSONFormatTests: XCTestCase {
    func testSlashesAreWrittenAsTheyAre() throws {
        let lease = LeaseInfo(subnet: "10.244.1.0/24", expires: Date(timeIntervalSince1970: 0),
                              endpoints: ["http://127.0.0.1:2379/"])
        let pretty = try JSONFormat.text(lease)
        XCTAssertFalse(pretty.contains("\\/"), pretty)
        XCTAssertTrue(pretty.contains("\"10.244.1.0/24\""), pretty)
        XCTAssertTrue(pretty.contains("\"1970-01-01T00:00:00Z\""), pretty)
        let line = String(decoding: ControlProtocol.encodeLine(ControlResponse.routes([])), as: UTF8.self)
        XCTAssertFalse(line.dropLast().contains("\n"), "one line: \(line)")
        let wire = String(decoding: try JSONFormat.encoder().encode(lease), as: UTF8.self)
        XCTAssertFalse(wire.contains("\\/"), wire)
        XCTAssertEqual(try JSONFormat.decoder().decode(LeaseInfo.self, from: Data(wire.utf8)), lease)
    }

    /// `status --json`, scripts and older clients read the daemon's phase as these strings.
    func testDaemonPhaseIsWrittenAsTheStringsStatusAlwaysCarried() throws {
        let strings: [(DaemonPhase, String)] = [(.starting, "starting"), (.running, "running"),
                                                (.handingOver, "handing over"), (.handedOver, "handed over")]
        for (phase, text) in strings {
            let wire = String(decoding: try JSONFormat.encoder().encode([phase]), as: UTF8.self)
            XCTAssertEqual(wire, "[\"\(text)\"]")
            XCTAssertEqual(try JSONFormat.decoder().decode([DaemonPhase].self, from: Data(wire.utf8)), [phase])
        }
    }

    /// A phase from a later daemon (here "draining") does not fail the status it comes in: it decodes as itself,
    /// is written back unchanged, and the rest of the status is read as usual.
    func testAPhaseThisVersionDoesNotKnowKeepsTheStatusReadable() throws {
        let wire = Data(#"["draining", "running"]"#.utf8)
        let phases = try JSONFormat.decoder().decode([DaemonPhase].self, from: wire)
        XCTAssertEqual(phases, [.other("draining"), .running])
        XCTAssertEqual(String(decoding: try JSONFormat.encoder().encode(phases), as: UTF8.self),
                       #"["draining","running"]"#)

        var status = DaemonStatus(pid: 42, version: "1.0", startedAt: Date(timeIntervalSince1970: 0), uptimeSeconds: 1,
                                device: "flannel0", network: "10.244.0.0/16", subnet: "10.244.1.0/24", mtu: 1472,
                                listen: "0.0.0.0:8285", publicIP: "192.168.1.1", underlay: "eth0", subnetFile: nil,
                                peersFile: nil, peerCheck: "on", routes: [], counters: DataPlaneCountersSnapshot(tunToUDP: DirectionCounts(), udpToTun: DirectionCounts(),
                                                                    icmpSent: 0, icmpRateLimited: 0, drops: [:]),
                                offloads: [], lease: nil)
        status.phase = .handedOver
        let text = String(decoding: try JSONFormat.encoder().encode(status), as: UTF8.self)
        XCTAssertTrue(text.contains(#""phase":"handed over""#), text)
        let later = text.replacingOccurrences(of: #""phase":"handed over""#, with: #""phase":"draining""#)
        let read = try JSONFormat.decoder().decode(DaemonStatus.self, from: Data(later.utf8))
        XCTAssertEqual(read.phase, .other("draining"))
        XCTAssertEqual(read.pid, 42)
    }
}
