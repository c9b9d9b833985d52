import Foundation
import XCTest
@testable import FlannelCore
@testable import FlannelUDP

/// The JSON gateway's request and response bodies. Responses are verbatim captures from etcd 3.4.
final class EtcdGatewayTests: XCTestCase {
    private func encode<T: Encodable>(_ value: T) throws -> String {
        String(decoding: try EtcdGateway.encoder.encode(value), as: UTF8.self)
    }

    private func decode<T: Decodable>(_ type: T.Type, _ text: String) throws -> T {
        try JSONDecoder().decode(type, from: Data(text.utf8))
    }

    func testRangeRequestForAPrefixIsBase64WithRangeEnd() throws {
        let request = EtcdGateway.RangeRequest(key: EtcdBytes("/coreos.com/network/subnets/"),
                                           range_end: EtcdBytes(EtcdGateway.prefixRangeEnd("/coreos.com/network/subnets/")))
        XCTAssertEqual(try encode(request),
                       #"{"key":"L2NvcmVvcy5jb20vbmV0d29yay9zdWJuZXRzLw==","range_end":"L2NvcmVvcy5jb20vbmV0d29yay9zdWJuZXRzMA=="}"#)
        // range_end is the prefix with its last byte + 1 ("/" -> "0").
        XCTAssertEqual(String(decoding: EtcdGateway.prefixRangeEnd("/a/"), as: UTF8.self), "/a0")
        XCTAssertEqual(EtcdGateway.prefixRangeEnd("a\u{7f}"), Data([0x61, 0x80]))
        XCTAssertEqual(EtcdGateway.prefixRangeEnd("a\u{ff}"), Data([0x61, 0xc3, 0xc0]), "bytes, not characters")
        XCTAssertEqual(EtcdGateway.prefixRangeEnd(""), Data([0]))
    }

    func testTxnCreateIfAbsentShape() throws {
        let key = "/coreos.com/network/subnets/10.244.1.0-24"
        let request = EtcdGateway.TxnRequest(
            compare: [.init(key: EtcdBytes(key), target: "VERSION", result: "EQUAL", version: 0)],
            success: [.init(request_put: .init(key: EtcdBytes(key), value: EtcdBytes(#"{"PublicIP":"1.2.3.4","PublicIPv6":null}"#),
                                               lease: EtcdInt64(4_111_120_261_178_274_569)))])
        let object = try XCTUnwrap(JSONSerialization.jsonObject(with: EtcdGateway.encoder.encode(request)) as? [String: Any])
        let compare = try XCTUnwrap((object["compare"] as? [[String: Any]])?.first)
        XCTAssertEqual(compare["target"] as? String, "VERSION")
        XCTAssertEqual(compare["result"] as? String, "EQUAL")
        XCTAssertEqual(compare["version"] as? String, "0")
        XCTAssertEqual(compare["key"] as? String, Data(key.utf8).base64EncodedString())
        let put = try XCTUnwrap(((object["success"] as? [[String: Any]])?.first?["request_put"]) as? [String: Any])
        // Lease IDs exceed a double's 53 bits: they travel as strings.
        XCTAssertEqual(put["lease"] as? String, "4111120261178274569")
        XCTAssertEqual(put["value"] as? String, "eyJQdWJsaWNJUCI6IjEuMi4zLjQiLCJQdWJsaWNJUHY2IjpudWxsfQ==")
    }

    func testOtherRequestShapes() throws {
        XCTAssertEqual(try encode(EtcdGateway.LeaseGrantRequest(TTL: 86400)), #"{"TTL":"86400"}"#)
        XCTAssertEqual(try encode(EtcdGateway.LeaseIDRequest(ID: EtcdInt64(-2))), #"{"ID":"-2"}"#)
        XCTAssertEqual(try encode(EtcdGateway.PutRequest(key: EtcdBytes("k"), value: EtcdBytes("v"), lease: nil)),
                       #"{"key":"aw==","value":"dg=="}"#)
        XCTAssertEqual(try encode(EtcdGateway.AuthenticateRequest(name: "root", password: "pw")),
                       #"{"name":"root","password":"pw"}"#)
        XCTAssertEqual(try encode(EtcdGateway.WatchCreateRequest(create_request: .init(
            key: EtcdBytes("/p/"), range_end: EtcdBytes("/p0"), start_revision: 13, progress_notify: true))),
            #"{"create_request":{"key":"L3Av","progress_notify":true,"range_end":"L3Aw","start_revision":"13"}}"#)
    }

    func testRangeResponse() throws {
        let r = try decode(EtcdGateway.RangeResponse.self, """
            {"header":{"cluster_id":"15118495548433857066","member_id":"13668033151171901709","revision":"3","raft_term":"2"},"kvs":[{"key":"L2NvcmVvcy5jb20vbmV0d29yay9zdWJuZXRzLzEwLjI0NC4xLjAtMjQ=","create_revision":"3","mod_revision":"3","version":"1","value":"eyJQdWJsaWNJUCI6IjEuMi4zLjQiLCJQdWJsaWNJUHY2IjpudWxsfQ==","lease":"4111120261178274569"}],"count":"1"}
            """)
        XCTAssertEqual(r.header?.revision?.value, 3)
        let kv = try XCTUnwrap(r.kvs?.first)
        XCTAssertEqual(kv.key.string, "/coreos.com/network/subnets/10.244.1.0-24")
        XCTAssertEqual(kv.value?.string, #"{"PublicIP":"1.2.3.4","PublicIPv6":null}"#)
        XCTAssertEqual(kv.lease?.value, 4_111_120_261_178_274_569)
        XCTAssertEqual(kv.version?.value, 1)
        // An empty range has no "kvs" at all.
        let empty = try decode(EtcdGateway.RangeResponse.self,
                               #"{"header":{"cluster_id":"1","member_id":"2","revision":"2","raft_term":"2"}}"#)
        XCTAssertNil(empty.kvs)
    }

    func testTxnAndLeaseResponses() throws {
        XCTAssertEqual(try decode(EtcdGateway.TxnResponse.self, #"{"header":{"revision":"3"},"succeeded":true,"responses":[{"response_put":{"header":{"revision":"3"}}}]}"#).succeeded, true)
        // A failed compare leaves "succeeded" out.
        XCTAssertNil(try decode(EtcdGateway.TxnResponse.self, #"{"header":{"revision":"3","raft_term":"2"}}"#).succeeded)
        let grant = try decode(EtcdGateway.LeaseResponse.self,
                               #"{"header":{"revision":"2"},"ID":"4111120261178274569","TTL":"60"}"#)
        XCTAssertEqual(grant.ID?.value, 4_111_120_261_178_274_569)
        XCTAssertEqual(grant.TTL?.value, 60)
        // keepalive is a stream; a lease that does not exist comes back without TTL.
        let alive = try decode(EtcdGateway.StreamMessage<EtcdGateway.LeaseResponse>.self,
                               #"{"result":{"header":{"revision":"3"},"ID":"4111120261178274569","TTL":"60"}}"#)
        XCTAssertEqual(alive.result?.TTL?.value, 60)
        let gone = try decode(EtcdGateway.StreamMessage<EtcdGateway.LeaseResponse>.self,
                              #"{"result":{"header":{"revision":"3"},"ID":"123"}}"#)
        XCTAssertNil(gone.result?.TTL)
        XCTAssertEqual(try decode(EtcdGateway.DeleteRangeResponse.self, #"{"header":{"revision":"4"},"deleted":"1"}"#).deleted?.value, 1)
        XCTAssertEqual(try decode(EtcdGateway.AuthenticateResponse.self, #"{"header":{},"token":"abc.12"}"#).token, "abc.12")
    }

    func testWatchResponses() throws {
        typealias Message = EtcdGateway.StreamMessage<EtcdGateway.WatchResponse>
        let created = try decode(Message.self, #"{"result":{"header":{"revision":"3"},"created":true}}"#)
        XCTAssertEqual(created.result?.created, true)
        let put = try decode(Message.self, """
            {"result":{"header":{"revision":"3"},"events":[{"kv":{"key":"L2NvcmVvcy5jb20vbmV0d29yay9zdWJuZXRzLzEwLjI0NC4xLjAtMjQ=","create_revision":"3","mod_revision":"3","version":"1","value":"eyJQdWJsaWNJUCI6IjEuMi4zLjQiLCJQdWJsaWNJUHY2IjpudWxsfQ==","lease":"4111120261178274569"}}]}}
            """)
        XCTAssertNil(put.result?.events?.first?.type, "PUT is the zero value and left out")
        XCTAssertEqual(put.result?.events?.first?.kv.mod_revision?.value, 3)
        let delete = try decode(Message.self, """
            {"result":{"header":{"revision":"4"},"events":[{"type":"DELETE","kv":{"key":"L2NvcmVvcy5jb20vbmV0d29yay9zdWJuZXRzLzEwLjI0NC4xLjAtMjQ=","mod_revision":"4"}}]}}
            """)
        XCTAssertEqual(delete.result?.events?.first?.type, "DELETE")
        XCTAssertNil(delete.result?.events?.first?.kv.value)
        let compacted = try decode(Message.self, #"{"result":{"header":{"raft_term":"2"},"canceled":true,"compact_revision":"4"}}"#)
        XCTAssertEqual(compacted.result?.compact_revision?.value, 4)
        XCTAssertEqual(compacted.result?.canceled, true)
        let error = try decode(Message.self, #"{"error":{"grpc_code":14,"http_code":503,"message":"etcdserver: no leader","http_status":"Service Unavailable"}}"#)
        XCTAssertEqual(error.error?.grpc_code, 14)
    }

    func testUnaryErrorBody() throws {
        let e = EtcdClient.serverError(Data(#"{"error":"illegal base64 data at input byte 0","message":"illegal base64 data at input byte 0","code":3}"#.utf8),
                                       status: .badRequest, endpoint: "http://127.0.0.1:2379", operation: "put x")
        XCTAssertEqual(e, .server(endpoint: "http://127.0.0.1:2379", operation: "put x", code: 3,
                                  message: "illegal base64 data at input byte 0"))
        XCTAssertFalse(e.isTransient)
        let unavailable = EtcdClient.serverError(Data("<html>".utf8), status: .serviceUnavailable,
                                                 endpoint: "http://e", operation: "range k")
        XCTAssertEqual(unavailable.description, "etcd http://e refused range k: HTTP 503 Service Unavailable <html> (code 0)")
    }

    func testBadBase64AndIntegersAreErrors() {
        XCTAssertThrowsError(try decode(EtcdGateway.KeyValue.self, #"{"key":"!!"}"#))
        XCTAssertThrowsError(try decode(EtcdGateway.Header.self, #"{"revision":"12x"}"#))
        XCTAssertEqual(try decode(EtcdGateway.Header.self, #"{"revision":12}"#).revision?.value, 12)
    }

    func testStreamSplitterHandlesAnyChunking() throws {
        let stream = #"{"result":{"created":true}}"# + "\n"
            + #"{"result":{"events":[{"kv":{"key":"e30=","value":"In0ie1wiIg=="}}],"note":"brace } in \"string\" {"}}"# + "\n"
            + #"{"result":{"canceled":true}}"# + "\n"
        let bytes = Array(stream.utf8)
        for chunkSize in [1, 2, 3, 7, 16, 100, bytes.count] {
            var splitter = JSONObjectSplitter()
            var objects: [String] = []
            var i = 0
            while i < bytes.count {
                let end = min(i + chunkSize, bytes.count)
                objects += try splitter.append(bytes[i..<end]).map { String(decoding: $0, as: UTF8.self) }
                i = end
            }
            XCTAssertEqual(objects.count, 3, "chunk size \(chunkSize)")
            XCTAssertEqual(objects.first, #"{"result":{"created":true}}"#)
            XCTAssertTrue(objects[1].hasSuffix(#"{"}}"#), objects[1])
            for o in objects { XCTAssertNoThrow(try JSONSerialization.jsonObject(with: Data(o.utf8))) }
        }
        // Several objects in one chunk, no newlines.
        var splitter = JSONObjectSplitter()
        XCTAssertEqual(try splitter.append(Array("{}{\"a\":{}}{".utf8)).count, 2)
        XCTAssertEqual(try splitter.append(Array("}".utf8)).count, 1)
    }

    func testEndpointsAndPrefix() throws {
        XCTAssertEqual(try EtcdOptions.parseEndpoints("http://10.0.0.1:2379, https://etcd.example:2379/,"),
                       ["http://10.0.0.1:2379", "https://etcd.example:2379"])
        for bad in ["", ",", "10.0.0.1:2379", "ftp://x:1", "http://", "http://h:1/v3"] {
            XCTAssertThrowsError(try EtcdOptions.parseEndpoints(bad), bad) { error in
                XCTAssertTrue("\(error)".contains("'"), "\(error)")
            }
        }
        XCTAssertThrowsError(try EtcdOptions.parseEndpoints("http://flannel:s3cret@10.0.0.1:2379")) { error in
            XCTAssertTrue("\(error)".contains("host '10.0.0.1' carries credentials in the URL"), "\(error)")
            XCTAssertFalse("\(error)".contains("s3cret"), "the refusal repeats the password: \(error)")
        }
        XCTAssertEqual(try EtcdOptions.normalizePrefix("/coreos.com/network/"), "/coreos.com/network")
        XCTAssertEqual(try EtcdOptions.normalizePrefix("flannel"), "/flannel")
        XCTAssertThrowsError(try EtcdOptions.normalizePrefix("//"))
    }

    func testTLSOptionsAreChecked() {
        XCTAssertNil(try EtcdClient.tlsConfiguration(EtcdOptions()))
        XCTAssertThrowsError(try EtcdClient.tlsConfiguration(EtcdOptions(certFile: "/nonexistent/cert.pem"))) {
            XCTAssertEqual("\($0)", "--etcd-certfile and --etcd-keyfile must be given together")
        }
        XCTAssertThrowsError(try EtcdClient.tlsConfiguration(EtcdOptions(caFile: "/nonexistent/ca.pem"))) {
            XCTAssertEqual("\($0)", "etcd TLS file '/nonexistent/ca.pem' cannot be read")
        }
    }
}

/// The watch loop's bookkeeping: own subnet excluded, routes built from PublicIP and Backend.Port, diffs.
final class EtcdPeerTrackerTests: XCTestCase {
    private func net(_ s: String) -> IPv4Network { try! IPv4Network(parsing: s) }
    private let me = IPv4Address(192, 168, 0, 1)

    func testRoutesExcludeOwnSubnetAndUseConfiguredPort() {
        var t = PeerTracker(own: net("10.244.1.0/24"), publicIP: me, port: 9000)
        let changes = t.reset(to: [
            net("10.244.1.0/24"): .udp(publicIP: me),
            net("10.244.3.0/24"): .udp(publicIP: IPv4Address(192, 168, 0, 3)),
            net("10.244.2.0/24"): LeaseAttributes(publicIP: IPv4Address(192, 168, 0, 2), backendType: "vxlan",
                                                  backendData: .object(["VNI": .number(1)])),
        ])
        XCTAssertEqual(changes, ["peer 10.244.2.0/24 via 192.168.0.2:9000 added",
                                 "peer 10.244.3.0/24 via 192.168.0.3:9000 added"])
        XCTAssertFalse(t.ownLeaseMissing)
        XCTAssertNil(t.ownLeaseTakenBy)
        XCTAssertEqual(t.takeChangedRoutes()?.map(\.description),
                       ["10.244.2.0/24 via 192.168.0.2:9000", "10.244.3.0/24 via 192.168.0.3:9000"])
        XCTAssertNil(t.takeChangedRoutes(), "nothing changed since")
    }

    func testFirstPublicationEvenWhenEmptyAndDiffsAfterwards() {
        var t = PeerTracker(own: net("10.244.1.0/24"), publicIP: me, port: 8285)
        _ = t.reset(to: [net("10.244.1.0/24"): .udp(publicIP: me)])
        XCTAssertEqual(t.takeChangedRoutes(), [])
        XCTAssertEqual(t.set(net("10.244.5.0/24"), .udp(publicIP: IPv4Address(10, 0, 0, 5))),
                       "peer 10.244.5.0/24 via 10.0.0.5:8285 added")
        XCTAssertNil(t.set(net("10.244.5.0/24"), .udp(publicIP: IPv4Address(10, 0, 0, 5))), "same value again")
        XCTAssertEqual(t.set(net("10.244.5.0/24"), .udp(publicIP: IPv4Address(10, 0, 0, 6))),
                       "peer 10.244.5.0/24 moved from 10.0.0.5 to 10.0.0.6:8285")
        XCTAssertEqual(t.takeChangedRoutes()?.map(\.description), ["10.244.5.0/24 via 10.0.0.6:8285"])
        XCTAssertNil(t.set(net("10.244.1.0/24"), .udp(publicIP: me)), "own subnet never becomes a peer")
        XCTAssertEqual(t.remove(net("10.244.5.0/24")), "peer 10.244.5.0/24 via 10.0.0.6:8285 removed")
        XCTAssertNil(t.remove(net("10.244.5.0/24")))
        XCTAssertEqual(t.takeChangedRoutes(), [])
    }

    func testResetAfterCompactionAppliesTheDifference() {
        var t = PeerTracker(own: net("10.244.1.0/24"), publicIP: me, port: 8285)
        _ = t.reset(to: [net("10.244.1.0/24"): .udp(publicIP: me),
                         net("10.244.2.0/24"): .udp(publicIP: IPv4Address(10, 0, 0, 2)),
                         net("10.244.3.0/24"): .udp(publicIP: IPv4Address(10, 0, 0, 3))])
        _ = t.takeChangedRoutes()
        let changes = t.reset(to: [net("10.244.1.0/24"): .udp(publicIP: me),
                                   net("10.244.3.0/24"): .udp(publicIP: IPv4Address(10, 0, 0, 3)),
                                   net("10.244.4.0/24"): .udp(publicIP: IPv4Address(10, 0, 0, 4))])
        XCTAssertEqual(changes, ["peer 10.244.2.0/24 via 10.0.0.2:8285 removed",
                                 "peer 10.244.4.0/24 via 10.0.0.4:8285 added"])
        XCTAssertEqual(t.takeChangedRoutes()?.map(\.subnet.description), ["10.244.3.0/24", "10.244.4.0/24"])
    }

    func testOwnLeaseMissingOrTaken() {
        var t = PeerTracker(own: net("10.244.1.0/24"), publicIP: me, port: 8285)
        _ = t.reset(to: [net("10.244.2.0/24"): .udp(publicIP: IPv4Address(10, 0, 0, 2))])
        XCTAssertTrue(t.ownLeaseMissing)
        _ = t.reset(to: [net("10.244.1.0/24"): .udp(publicIP: IPv4Address(10, 0, 0, 9))])
        XCTAssertFalse(t.ownLeaseMissing)
        XCTAssertEqual(t.ownLeaseTakenBy, IPv4Address(10, 0, 0, 9))
    }
}
