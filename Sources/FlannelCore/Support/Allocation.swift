extension UnsafeMutablePointer {
    /// `count` elements, each initialized to `value`: how the data plane allocates its per-worker arrays, once,
    /// before the first packet (released with `deallocate()`; the element types are all trivial).
    package static func allocate(count: Int, initializedTo value: Pointee) -> UnsafeMutablePointer<Pointee> {
        let p = allocate(capacity: count)
        p.initialize(repeating: value, count: count)
        return p
    }
}
