// CShims: the few pieces of C that Swift cannot import by itself.
//
// Everything here exists for one of three reasons, noted on each symbol:
//   - it is a function-like macro (_IOW ioctl numbers, CMSG_*),
//   - it needs _GNU_SOURCE, which Swift's Glibc module does not define (mmsghdr, recvmmsg, struct ucred),
//   - it is a union-heavy struct Swift handles badly (struct ifreq).
// Every symbol is prefixed fu_ (flannel-udp). Functions return what the syscall returns and leave errno set;
// the Swift side turns that into a typed error naming the operation.
#ifndef FU_CSHIMS_H
#define FU_CSHIMS_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <linux/virtio_net.h>

#ifdef __cplusplus
extern "C" {
#endif

// ---- tun device -------------------------------------------------------------------------------------------

/// IFNAMSIZ from <net/if.h> (16, including the terminating NUL).
enum { FU_IFNAMSIZ = 16 };

/// Flags for fu_tun_set_iff (values of IFF_TUN, IFF_NO_PI, IFF_VNET_HDR, IFF_MULTI_QUEUE in <linux/if_tun.h>).
enum {
    FU_IFF_TUN = 0x0001,
    FU_IFF_NO_PI = 0x1000,
    FU_IFF_VNET_HDR = 0x4000,
    FU_IFF_MULTI_QUEUE = 0x0100,
};

/// TUNSETOFFLOAD flags (<linux/if_tun.h>).
enum {
    FU_TUN_F_CSUM = 0x01,
    FU_TUN_F_TSO4 = 0x02,
};

/// struct virtio_net_hdr (<linux/virtio_net.h>): what a tun with IFF_VNET_HDR puts before every packet it hands
/// out and expects before every packet written to it. 10 bytes, little-endian fields on a little-endian host
/// (the legacy header uses the host's byte order unless TUNSETVNETLE says otherwise). The Swift side reads and
/// writes it with byte offsets; these constants and the static assertions in CShims.c pin the layout.
enum {
    FU_VIRTIO_NET_HDR_LEN = 10,
    FU_VIRTIO_NET_HDR_F_NEEDS_CSUM = 1,   // csum_start/csum_offset say where the checksum is to be completed
    FU_VIRTIO_NET_HDR_GSO_NONE = 0,
    FU_VIRTIO_NET_HDR_GSO_TCPV4 = 1,
    FU_VIRTIO_NET_HDR_GSO_ECN = 0x80,
};

/// ioctl(fd, TUNSETIFF, &ifr) with ifr_name = name and ifr_flags = flags; on success copies the name the kernel
/// chose into out_name (FU_IFNAMSIZ bytes). Exists because TUNSETIFF is an _IOW macro and struct ifreq is a union.
int fu_tun_set_iff(int fd, const char *name, short flags, char *out_name);

/// ioctl(fd, TUNSETOFFLOAD, flags). _IOW macro.
int fu_tun_set_offload(int fd, unsigned int flags);

/// ioctl(fd, TUNSETVNETHDRSZ, &size). _IOW macro.
int fu_tun_set_vnet_hdr_size(int fd, int size);

// ---- batched socket I/O -----------------------------------------------------------------------------------

/// Mirror of glibc's struct mmsghdr (hidden behind _GNU_SOURCE). A static assertion in CShims.c checks that
/// its layout matches the real one.
typedef struct fu_mmsghdr {
    struct msghdr msg_hdr;
    unsigned int msg_len;
} fu_mmsghdr;

/// recvmmsg(2) / sendmmsg(2); need _GNU_SOURCE.
int fu_recvmmsg(int fd, fu_mmsghdr *vec, unsigned int vlen, int flags);
int fu_sendmmsg(int fd, fu_mmsghdr *vec, unsigned int vlen, int flags);

// ---- control messages (CMSG_* are macros) -----------------------------------------------------------------

size_t fu_cmsg_space(size_t len);
size_t fu_cmsg_len(size_t len);
struct cmsghdr *fu_cmsg_firsthdr(struct msghdr *msg);
struct cmsghdr *fu_cmsg_nxthdr(struct msghdr *msg, struct cmsghdr *cmsg);
unsigned char *fu_cmsg_data(struct cmsghdr *cmsg);

/// UDP socket options from <linux/udp.h> (not in every libc header).
enum {
    FU_SOL_UDP = 17,
    FU_UDP_SEGMENT = 103,
    FU_UDP_GRO = 104,
};

/// Buffer options from <asm-generic/socket.h>.
enum {
    FU_SO_RCVBUFFORCE = 33,
    FU_SO_SNDBUFFORCE = 32,
};

/// SO_TIMESTAMPNS (<asm-generic/socket.h>): each received datagram carries its arrival time (CLOCK_REALTIME) as an
/// SCM_TIMESTAMPNS control message (same value) with a struct timespec, for the receive side's CoDel.
enum {
    FU_SO_TIMESTAMPNS = 35,
};

// ---- worker per core ------------------------------------------------------------------------------------

/// SO_REUSEPORT (<asm-generic/socket.h>): N sockets, one per worker, bound to the same address and port. Also
/// what lets a second daemon bind the port while the first still runs (`up --replace`).
enum { FU_SO_REUSEPORT = 15 };

/// One classic BPF instruction: a mirror of struct sock_filter (<linux/filter.h>, not importable beside Glibc),
/// checked by a _Static_assert in CShims.c. Swift builds the reuseport steering program from these.
struct fu_sock_filter {
    uint16_t code;
    uint8_t jt;
    uint8_t jf;
    uint32_t k;
};

/// setsockopt(fd, SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, &(struct sock_fprog){count, program}): the classic BPF
/// program that picks, for each datagram arriving on the port, which socket of the reuseport group gets it (its
/// return value is the socket's index in the order they were bound). struct sock_fprog holds a pointer, so the
/// call is built here.
int fu_attach_reuseport_cbpf(int fd, const struct fu_sock_filter *program, unsigned short count);

/// One eBPF instruction: a mirror of struct bpf_insn (<linux/bpf.h>) without its two 4-bit register fields, which
/// are `regs` here (destination in the low nibble, source in the high one, as the kernel lays them out on a
/// little-endian machine); checked by _Static_asserts in CShims.c.
struct fu_bpf_insn {
    uint8_t code;
    uint8_t regs;
    int16_t off;
    int32_t imm;
};

/// bpf(BPF_PROG_LOAD) of a BPF_PROG_TYPE_SOCKET_FILTER program (glibc has no bpf() wrapper, and union bpf_attr is
/// easier to fill in C): the program's descriptor, or -1 with errno set. The verifier's complaint, if any, is
/// written into `log` (`log_size` bytes, NUL-terminated).
int fu_bpf_load_socket_filter(const struct fu_bpf_insn *program, unsigned int count, char *log, unsigned int log_size);

/// ioctl(fd, TUNSETSTEERINGEBPF, &prog_fd): the program that picks the queue of each packet the kernel routes into
/// the tun (its return value modulo the number of queues), for the whole device, set through any queue. -1
/// detaches it (the kernel's flow hash picks again).
int fu_tun_set_steering_ebpf(int fd, int prog_fd);

/// The number of CPUs this process may run on (sched_getaffinity + CPU_COUNT, both _GNU_SOURCE and macros), or
/// -1 with errno set.
int fu_available_cpus(void);

// ---- data plane threads ----------------------------------------------------------------------------------

/// pthread_setname_np(pthread_self(), name), so `top -H` shows which forwarding thread is busy. Needs _GNU_SOURCE.
/// The name is cut to 15 bytes.
int fu_set_thread_name(const char *name);

/// SCHED_RESET_ON_FORK from <sched.h> (hidden without _GNU_SOURCE): or'ed into the express lane's scheduling
/// policy (`ExpressPriority`) so that nothing it might fork inherits a realtime priority.
enum { FU_SCHED_RESET_ON_FORK = 0x40000000 };

/// The signal that wakes a forwarding thread blocked in read()/recvmmsg(): SIGURG, whose default action is to
/// ignore it. `fu_install_wake_signal` gives it a handler that does nothing, installed without SA_RESTART, so the
/// blocked call returns EINTR (Swift cannot build a sigaction's handler union); idempotent, 0 or -1 with errno.
int fu_wake_signal(void);
int fu_install_wake_signal(void);

/// Unblocks the wake signal in the calling thread (a daemon may have blocked signals before it started the
/// thread), then creates a CLOCK_MONOTONIC timer that sends it to the calling thread every `interval_ms`: a thread
/// blocked with nothing to do wakes that often (its heartbeat), and a wake that raced with the start of a blocking
/// call is repeated by it. 0 and the timer in `*timer`, or -1 with errno. SIGEV_THREAD_ID needs a union field
/// Swift cannot reach.
int fu_wake_timer_create(int interval_ms, void **timer);
int fu_wake_timer_delete(void *timer);

/// One read of at most `count` bytes that never blocks, whatever the descriptor's O_NONBLOCK
/// (preadv2(RWF_NOWAIT) at the current position; a tun and a socket honour it): -1 with EAGAIN when empty.
ssize_t fu_read_nowait(int fd, void *buf, size_t count);

/// writev that never blocks, whatever the descriptor's O_NONBLOCK (pwritev2(RWF_NOWAIT)).
ssize_t fu_writev_nowait(int fd, const struct iovec *iov, int iovcnt);

/// open(directory, O_TMPFILE | O_WRONLY | O_CLOEXEC, mode): an unnamed regular file in `directory` that is gone
/// if the process dies before it is linked to a name. O_TMPFILE needs _GNU_SOURCE. Fails with EOPNOTSUPP where the
/// filesystem has no O_TMPFILE (EISDIR on kernels that do not know the flag).
int fu_open_tmpfile(const char *directory, mode_t mode);

/// setns(fd, CLONE_NEWNET): moves the calling thread into the network namespace `fd` refers to (a tun device
/// and a socket belong to the namespace of the thread that creates them). setns needs _GNU_SOURCE.
int fu_setns_net(int fd);

// ---- credentials ------------------------------------------------------------------------------------------

/// getsockopt(fd, SOL_SOCKET, SO_PEERCRED): the peer's pid and uid. struct ucred needs _GNU_SOURCE.
int fu_peer_credentials(int fd, pid_t *pid, uid_t *uid);

/// accept4(fd, NULL, NULL, SOCK_CLOEXEC): accept4 needs _GNU_SOURCE.
int fu_accept_cloexec(int fd);

/// Handing descriptors to another process over a unix socket (SCM_RIGHTS, `up --replace`): the cmsg macros are
/// not importable. At most FU_MAX_PASSED_FDS descriptors.
enum { FU_MAX_PASSED_FDS = 200 };

/// sendmsg(sock) of `len` bytes from `buf` with `count` descriptors attached; MSG_NOSIGNAL. Returns bytes sent.
long fu_send_with_fds(int sock, const void *buf, unsigned long len, const int *fds, int count);

/// recvmsg(sock) into `buf` with MSG_CMSG_CLOEXEC; descriptors that came along are stored in `fds` (room for
/// FU_MAX_PASSED_FDS) and counted in `*count`. Returns bytes received. A truncated control message (MSG_CTRUNC:
/// more descriptors than room) is EMSGSIZE, the descriptors that did arrive closed.
long fu_recv_with_fds(int sock, void *buf, unsigned long len, int *fds, int *count);

// ---- pidfd ------------------------------------------------------------------------------------------------

/// pidfd_open(pid, 0) with PIDFD_NONBLOCK unset: a descriptor that names one process for as long as it is open,
/// so a signal sent through it can never reach a process that later reuses the pid. glibc 2.36 declares it in
/// <sys/pidfd.h>, which this system's headers lack, so this goes through syscall(2) (variadic: not callable from
/// Swift). The descriptor is close-on-exec (the kernel always sets O_CLOEXEC on pidfds).
int fu_pidfd_open(pid_t pid);

/// pipe2(fds, flags) from <unistd.h>, declared only with _GNU_SOURCE: a pipe whose ends are close-on-exec (and
/// non-blocking) from the start, where pipe() + fcntl leaves a moment in which a child spawned by another thread
/// inherits them.
int fu_pipe2(int fds[2], int flags);

/// pidfd_send_signal(pidfd, sig, NULL, 0). Same reason as fu_pidfd_open.
int fu_pidfd_send_signal(int pidfd, int sig);

// ---- process spawning -------------------------------------------------------------------------------------

/// POSIX_SPAWN_SETSID from <spawn.h> (a glibc extension, hidden without _GNU_SOURCE): the detached daemon
/// starts in a session of its own so that it outlives the shell that ran `up --detach`.
enum { FU_POSIX_SPAWN_SETSID = 0x80 };

/// posix_spawn_file_actions_addclosefrom_np (glibc 2.34, a GNU extension): the spawned daemon must not inherit
/// any descriptor of its parent beyond 0-2 and the readiness pipe; an inherited pipe would keep whoever waits on
/// the parent's output (a shell's $(...), a test harness) waiting forever. `actions` is a posix_spawn_file_actions_t*.
int fu_spawn_file_actions_addclosefrom(void *actions, int from);

#ifdef __cplusplus
}
#endif
#endif
