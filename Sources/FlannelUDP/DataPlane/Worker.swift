import Atomics
import Logging
#if canImport(Glibc)
import Glibc
#endif

/// What every forwarding worker has: a thread name, the descriptor it waits on, the stop eventfd, and a
/// heartbeat. The two directions (`TunToUDPWorker`, `UDPToTunWorker`) only read, decide and hand over; the I/O
/// and the offloads live in their stages (`TunReader`, `UDPSender`, `UDPReceiver`, `TunWriter`).
protocol ForwardingWorker: AnyObject {
    var threadName: String { get }
    var inputFD: Int32 { get }
    var stopFD: Int32 { get }
    var options: ForwarderOptions { get }
    /// Bumped (relaxed, no lock) on every pass of the poll loop; see `Forwarder.heartbeats`.
    var heartbeat: ManagedAtomic<UInt64> { get }
    /// Processes input until it would block or `options.batchesPerWakeup` batches are done; returns the number
    /// of packets taken in. Throws only fatal errors.
    func drain() throws(SystemError) -> Int
}

extension ForwardingWorker {
    /// poll(input, stop) -> drain, until the stop eventfd is readable or a fatal error. The poll times out after
    /// `options.heartbeatMilliseconds`, so the heartbeat moves while the input is idle.
    func run() throws(SystemError) {
        var fds = [pollfd(fd: inputFD, events: Int16(POLLIN), revents: 0),
                   pollfd(fd: stopFD, events: Int16(POLLIN), revents: 0)]
        let timeout = options.heartbeatMilliseconds
        while true {
            heartbeat.wrappingIncrement(ordering: .relaxed)
            let n = fds.withUnsafeMutableBufferPointer { poll($0.baseAddress, 2, timeout) }
            if n < 0 {
                let e = errno
                if e == EINTR { continue }
                throw SystemError("poll", threadName, errno: e)
            }
            if fds[1].revents != 0 { return }
            let revents = Int32(fds[0].revents)
            if revents & Int32(POLLNVAL) != 0 { throw SystemError("poll", threadName, errno: EBADF) }
            if revents & Int32(POLLIN) != 0 || revents & Int32(POLLERR) != 0 {
                _ = try drain()
            } else if revents & Int32(POLLHUP) != 0 {
                // The other end of a test socketpair went away (a tun never hangs up): nothing more will come.
                return
            }
        }
    }
}

/// `count` packet buffers of `size` bytes each, allocated once per stage, and the length of what each holds.
final class PacketBuffers {
    let count: Int
    let size: Int
    let memory: UnsafeMutableRawBufferPointer
    let lengths: UnsafeMutablePointer<Int>

    init(count: Int, size: Int) {
        self.count = count
        self.size = size
        memory = .allocate(byteCount: count * size, alignment: 64)
        lengths = .allocate(count: count, initializedTo: 0)
    }

    @inline(__always)
    func packet(_ i: Int) -> UnsafeMutableRawPointer { memory.baseAddress! + i &* size }

    deinit {
        memory.deallocate()
        lengths.deallocate()
    }
}

/// Where a worker builds the ICMP errors `PacketDecider` asks for (576 bytes is the most they need).
func allocateScratch() -> UnsafeMutableRawBufferPointer { .allocate(byteCount: 2048, alignment: 64) }
