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
}
