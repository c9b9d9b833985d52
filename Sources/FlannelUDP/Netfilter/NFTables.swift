import CNFTables
import Foundation
import Synchronization

/// One libnftables context: runs nft command text (the language of `nft -f`) as a single transaction and returns
/// what nft would have printed. A context is not thread-safe; callers serialise their use of it.
///
/// Everything passed to `run` in one call is one batch for the kernel: either all of it takes effect or none does.
/// That is what lets the masquerade chain be flushed and refilled without a moment in which it is empty.
public final class NFTables: Sendable {
    /// The nft_ctx, used by one caller at a time.
    private let context: Mutex<OpaquePointer>

    /// - Throws: `NetfilterError` when libnftables cannot make a context (out of memory, no netlink).
    public init() throws(NetfilterError) {
        guard let ctx = nft_ctx_new(UInt32(NFT_CTX_DEFAULT)) else {
            throw NetfilterError("nftables: create context", "", "nft_ctx_new failed")
        }
        // Capture output and errors instead of letting libnftables print them on our stdout/stderr.
        guard nft_ctx_buffer_output(ctx) == 0, nft_ctx_buffer_error(ctx) == 0 else {
            nft_ctx_free(ctx)
            throw NetfilterError("nftables: buffer output", "", "nft_ctx_buffer_output/error failed")
        }
        context = Mutex(ctx)
    }

    deinit { context.withLock { nft_ctx_free($0) } }

    /// Runs `commands` as one nftables transaction and returns nft's output (empty for changes).
    /// - Parameters:
    ///   - operation: what this does in words, for the error ("install", "list").
    ///   - object: what it does it to ("table ip flannel-ipv4").
    /// - Throws: `NetfilterError` carrying nft's own error text.
    @discardableResult
    public func run(_ commands: String, operation: String, object: String) throws(NetfilterError) -> String {
        try context.withLock { (context) throws(NetfilterError) -> String in
            let rc = nft_run_cmd_from_buffer(context, commands)
            // Reading a buffer also resets it for the next command.
            let output = nft_ctx_get_output_buffer(context).map { String(cString: $0) } ?? ""
            let errors = nft_ctx_get_error_buffer(context).map { String(cString: $0) } ?? ""
            guard rc == 0 else {
                throw NetfilterError("nftables: \(operation)", object,
                                     errors.isEmpty ? "nft_run_cmd_from_buffer returned \(rc)" : errors)
            }
            return output
        }
    }
}
