// The pure code (packets, decisions, route table, counters, parsers) lives in FlannelCore, which the fuzz build
// compiles whole; the library's users see it through this one re-export.
@_exported import FlannelCore
