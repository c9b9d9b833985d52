// swift-tools-version:6.1
//
// flannel-udp: flannel's UDP overlay backend as one Swift system tool for Linux.
// Targets:
//   CNetlink     libmnl (Debian: libmnl-dev) as a system library
//   CNFTables    libnftables (Debian: libnftables-dev) as a system library, for the masquerade rules
//   CShims       the few C helpers Swift cannot import (macros, mmsghdr, ifreq/TUNSETIFF, virtio-net header)
//   FlannelCore  no NIO: the data plane (tun device, forwarder and its workers, offloads, per-packet decisions,
//                route table, counters) and the parsers (peers file, subnet file, etcd JSON, control protocol,
//                netlink replies), SystemError. The hot path stays inside one module, so the optimiser sees all of
//                it; scripts/fuzz.sh compiles this whole directory, never a list of files.
//   FlannelUDP   the library: netlink, control socket, peer sources, the daemon; re-exports FlannelCore
//   flannel-udp  the command-line tool, one file per subcommand
//   tun-bound    bench/run's ceiling: the cheapest tun/UDP forwarder (bench/tun-bound), not part of the product
import PackageDescription

// The library products the targets share, named once.
let atomics: Target.Dependency = .product(name: "Atomics", package: "swift-atomics")
let logging: Target.Dependency = .product(name: "Logging", package: "swift-log")
let nio: [Target.Dependency] = ["NIOCore", "NIOHTTP1", "NIOPosix"].map { .product(name: $0, package: "swift-nio") }

let package = Package(
    name: "flannel-udp",
    platforms: [.macOS(.v13)],
    products: [
        .executable(name: "flannel-udp", targets: ["flannel-udp"]),
        .executable(name: "tun-bound", targets: ["tun-bound"]),
        .library(name: "FlannelUDP", targets: ["FlannelUDP"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-atomics", from: "1.3.0"),
        .package(url: "https://github.com/swift-server/async-http-client", from: "1.37.0"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-nio-ssl", from: "2.37.6"),
    ],
    targets: [
        .systemLibrary(
            name: "CNetlink",
            pkgConfig: "libmnl",
            providers: [.apt(["libmnl-dev"])]
        ),
        .systemLibrary(
            name: "CNFTables",
            pkgConfig: "libnftables",
            providers: [.apt(["libnftables-dev"])]
        ),
        .target(name: "CShims"),
        .target(
            name: "FlannelCore",
            dependencies: ["CNetlink", "CShims", atomics, logging]
        ),
        .target(
            name: "FlannelUDP",
            dependencies: ["FlannelCore", "CNetlink", "CNFTables", "CShims", logging, atomics,
                           .product(name: "AsyncHTTPClient", package: "async-http-client"),
                           .product(name: "NIOSSL", package: "swift-nio-ssl")] + nio
        ),
        .executableTarget(
            name: "flannel-udp",
            dependencies: ["FlannelUDP", .product(name: "ArgumentParser", package: "swift-argument-parser"), logging]
        ),
        // bench/run's ceiling for any tun/UDP forwarder; not flannel's wire format (see its header).
        .executableTarget(name: "tun-bound", dependencies: ["CShims", "FlannelCore"], path: "bench/tun-bound"),
        // Test-only counting allocator (interposes malloc & co.) for the data plane's zero-allocation tests.
        .target(name: "CAllocCounter", path: "Tests/CAllocCounter"),
        // What both test targets use: a seeded generator, one datagram sent to an endpoint.
        .target(name: "TestSupport", dependencies: ["FlannelCore"], path: "Tests/TestSupport"),
        .testTarget(
            name: "FlannelUDPTests",
            dependencies: ["FlannelCore", "FlannelUDP", "CShims", "CAllocCounter", "TestSupport"]
        ),
        .testTarget(
            name: "IntegrationTests",
            dependencies: ["FlannelCore", "FlannelUDP", "flannel-udp", "TestSupport", logging]
        ),
    ]
)
