// See include/CShims.h for why each of these exists.
#define _GNU_SOURCE
#include "CShims.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/ioctl.h>
#include <net/if.h>
#include <linux/if_tun.h>
#include <linux/udp.h>
#include <netinet/in.h>
#include <spawn.h>
#include <sys/socket.h>
#include <unistd.h>
#include <pthread.h>
#include <signal.h>
#include <time.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/filter.h>
#include <linux/bpf.h>

_Static_assert(sizeof(fu_mmsghdr) == sizeof(struct mmsghdr), "fu_mmsghdr must mirror struct mmsghdr");
_Static_assert(offsetof(fu_mmsghdr, msg_len) == offsetof(struct mmsghdr, msg_len), "msg_len offset");
_Static_assert(FU_IFNAMSIZ == IFNAMSIZ, "IFNAMSIZ");
_Static_assert(FU_IFF_TUN == IFF_TUN && FU_IFF_NO_PI == IFF_NO_PI && FU_IFF_VNET_HDR == IFF_VNET_HDR &&
               FU_IFF_MULTI_QUEUE == IFF_MULTI_QUEUE, "tun flags");
_Static_assert(FU_POSIX_SPAWN_SETSID == POSIX_SPAWN_SETSID, "spawn flag");
_Static_assert(FU_SCHED_RESET_ON_FORK == SCHED_RESET_ON_FORK, "scheduling flag");
_Static_assert(FU_TUN_F_CSUM == TUN_F_CSUM && FU_TUN_F_TSO4 == TUN_F_TSO4, "offload flags");

_Static_assert(sizeof(struct virtio_net_hdr) == FU_VIRTIO_NET_HDR_LEN, "virtio_net_hdr size");
_Static_assert(offsetof(struct virtio_net_hdr, gso_type) == 1 && offsetof(struct virtio_net_hdr, hdr_len) == 2 &&
               offsetof(struct virtio_net_hdr, gso_size) == 4 && offsetof(struct virtio_net_hdr, csum_start) == 6 &&
               offsetof(struct virtio_net_hdr, csum_offset) == 8, "virtio_net_hdr layout");
_Static_assert(FU_VIRTIO_NET_HDR_F_NEEDS_CSUM == VIRTIO_NET_HDR_F_NEEDS_CSUM &&
               FU_VIRTIO_NET_HDR_GSO_NONE == VIRTIO_NET_HDR_GSO_NONE &&
               FU_VIRTIO_NET_HDR_GSO_TCPV4 == VIRTIO_NET_HDR_GSO_TCPV4 &&
               FU_VIRTIO_NET_HDR_GSO_ECN == VIRTIO_NET_HDR_GSO_ECN, "virtio_net_hdr constants");
_Static_assert(FU_UDP_SEGMENT == UDP_SEGMENT && FU_UDP_GRO == UDP_GRO && FU_SOL_UDP == IPPROTO_UDP,
               "UDP GSO/GRO options");

int fu_tun_set_iff(int fd, const char *name, short flags, char *out_name) {
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    if (name != NULL) {
        if (strlen(name) >= IFNAMSIZ) {
            errno = ENAMETOOLONG;
            return -1;
        }
        strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    }
    ifr.ifr_flags = flags;
    int rc = ioctl(fd, TUNSETIFF, &ifr);
    if (rc == 0 && out_name != NULL) {
        memcpy(out_name, ifr.ifr_name, IFNAMSIZ);
        out_name[IFNAMSIZ - 1] = '\0';
    }
    return rc;
}

int fu_tun_set_offload(int fd, unsigned int flags) {
    return ioctl(fd, TUNSETOFFLOAD, (unsigned long)flags);
}

int fu_tun_set_vnet_hdr_size(int fd, int size) {
    return ioctl(fd, TUNSETVNETHDRSZ, &size);
}

int fu_recvmmsg(int fd, fu_mmsghdr *vec, unsigned int vlen, int flags) {
    return recvmmsg(fd, (struct mmsghdr *)vec, vlen, flags, NULL);
}

int fu_sendmmsg(int fd, fu_mmsghdr *vec, unsigned int vlen, int flags) {
    return sendmmsg(fd, (struct mmsghdr *)vec, vlen, flags);
}

size_t fu_cmsg_space(size_t len) { return CMSG_SPACE(len); }
size_t fu_cmsg_len(size_t len) { return CMSG_LEN(len); }
struct cmsghdr *fu_cmsg_firsthdr(struct msghdr *msg) { return CMSG_FIRSTHDR(msg); }
struct cmsghdr *fu_cmsg_nxthdr(struct msghdr *msg, struct cmsghdr *cmsg) { return CMSG_NXTHDR(msg, cmsg); }
unsigned char *fu_cmsg_data(struct cmsghdr *cmsg) { return CMSG_DATA(cmsg); }

int fu_peer_credentials(int fd, pid_t *pid, uid_t *uid) {
    struct ucred cred;
    socklen_t len = sizeof(cred);
    int rc = getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len);
    if (rc == 0) {
        *pid = cred.pid;
        *uid = cred.uid;
    }
    return rc;
}

int fu_accept_cloexec(int fd) { return accept4(fd, NULL, NULL, SOCK_CLOEXEC); }

int fu_pidfd_open(pid_t pid) { return (int)syscall(SYS_pidfd_open, pid, 0); }

int fu_pipe2(int fds[2], int flags) { return pipe2(fds, flags); }

int fu_pidfd_send_signal(int pidfd, int sig) { return (int)syscall(SYS_pidfd_send_signal, pidfd, sig, NULL, 0); }

int fu_spawn_file_actions_addclosefrom(void *actions, int from) {
    return posix_spawn_file_actions_addclosefrom_np((posix_spawn_file_actions_t *)actions, from);
}

int fu_set_thread_name(const char *name) {
    char buf[16];
    strncpy(buf, name, sizeof(buf) - 1);
    buf[sizeof(buf) - 1] = '\0';
    return pthread_setname_np(pthread_self(), buf);
}

int fu_setns_net(int fd) { return setns(fd, CLONE_NEWNET); }

int fu_wake_signal(void) { return SIGURG; }

static void fu_wake_handler(int signo) { (void)signo; }

int fu_install_wake_signal(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = fu_wake_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;  // no SA_RESTART: the blocked call returns EINTR
    return sigaction(SIGURG, &sa, NULL);
}

int fu_wake_timer_create(int interval_ms, void **timer) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGURG);
    int rc = pthread_sigmask(SIG_UNBLOCK, &set, NULL);
    if (rc != 0) { errno = rc; return -1; }
    struct sigevent sev;
    memset(&sev, 0, sizeof(sev));
    sev.sigev_notify = SIGEV_THREAD_ID;
    sev.sigev_signo = SIGURG;
    sev._sigev_un._tid = (pid_t)syscall(SYS_gettid);  // sigev_notify_thread_id, named only by glibc >= 2.41
    timer_t t;
    if (timer_create(CLOCK_MONOTONIC, &sev, &t) != 0) return -1;
    struct itimerspec its;
    its.it_interval.tv_sec = interval_ms / 1000;
    its.it_interval.tv_nsec = (long)(interval_ms % 1000) * 1000000L;
    its.it_value = its.it_interval;
    if (timer_settime(t, 0, &its, NULL) != 0) {
        int e = errno;
        timer_delete(t);
        errno = e;
        return -1;
    }
    *timer = (void *)t;
    return 0;
}

int fu_wake_timer_delete(void *timer) { return timer_delete((timer_t)timer); }

ssize_t fu_read_nowait(int fd, void *buf, size_t count) {
    struct iovec iov = { .iov_base = buf, .iov_len = count };
    return preadv2(fd, &iov, 1, -1, RWF_NOWAIT);
}

ssize_t fu_writev_nowait(int fd, const struct iovec *iov, int iovcnt) {
    return pwritev2(fd, iov, iovcnt, -1, RWF_NOWAIT);
}

_Static_assert(sizeof(struct fu_sock_filter) == sizeof(struct sock_filter) &&
               offsetof(struct fu_sock_filter, k) == offsetof(struct sock_filter, k), "fu_sock_filter layout");
_Static_assert(FU_SO_REUSEPORT == SO_REUSEPORT, "SO_REUSEPORT");

int fu_attach_reuseport_cbpf(int fd, const struct fu_sock_filter *program, unsigned short count) {
    struct sock_fprog prog = { .len = count, .filter = (struct sock_filter *)program };
    return setsockopt(fd, SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, &prog, sizeof(prog));
}

_Static_assert(sizeof(struct fu_bpf_insn) == sizeof(struct bpf_insn) &&
               offsetof(struct fu_bpf_insn, off) == offsetof(struct bpf_insn, off) &&
               offsetof(struct fu_bpf_insn, imm) == offsetof(struct bpf_insn, imm), "fu_bpf_insn layout");
#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "fu_bpf_insn.regs packs dst_reg:4, src_reg:4 as a little-endian compiler lays them out"
#endif

int fu_bpf_load_socket_filter(const struct fu_bpf_insn *program, unsigned int count, char *log, unsigned int log_size) {
    union bpf_attr attr;
    memset(&attr, 0, sizeof(attr));
    attr.prog_type = BPF_PROG_TYPE_SOCKET_FILTER;
    attr.insns = (uint64_t)(uintptr_t)program;
    attr.insn_cnt = count;
    attr.license = (uint64_t)(uintptr_t)"GPL";
    if (log && log_size > 0) log[0] = 0;
    int fd = (int)syscall(SYS_bpf, BPF_PROG_LOAD, &attr, sizeof(attr));
    if (fd < 0 && log && log_size > 1) {
        // Refused: load once more with the verifier's log (a log too small for it fails with ENOSPC, which is
        // why the first try goes without), and keep the first errno.
        int saved = errno;
        attr.log_buf = (uint64_t)(uintptr_t)log;
        attr.log_size = log_size;
        attr.log_level = 1;
        int again = (int)syscall(SYS_bpf, BPF_PROG_LOAD, &attr, sizeof(attr));
        if (again >= 0) close(again);
        log[log_size - 1] = 0;
        errno = saved;
    }
    return fd;
}

int fu_tun_set_steering_ebpf(int fd, int prog_fd) { return ioctl(fd, TUNSETSTEERINGEBPF, &prog_fd); }

int fu_available_cpus(void) {
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof(set), &set) != 0) return -1;
    return CPU_COUNT(&set);
}

long fu_send_with_fds(int sock, const void *buf, unsigned long len, const int *fds, int count) {
    if (count < 0 || count > FU_MAX_PASSED_FDS) {
        errno = EINVAL;
        return -1;
    }
    union {
        char bytes[CMSG_SPACE(sizeof(int) * FU_MAX_PASSED_FDS)];
        struct cmsghdr align;
    } control;
    memset(&control, 0, sizeof(control));
    struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
    if (count > 0) {
        msg.msg_control = control.bytes;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * count);
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * count);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * count);
    }
    return sendmsg(sock, &msg, MSG_NOSIGNAL);
}

long fu_recv_with_fds(int sock, void *buf, unsigned long len, int *fds, int *count) {
    union {
        char bytes[CMSG_SPACE(sizeof(int) * FU_MAX_PASSED_FDS)];
        struct cmsghdr align;
    } control;
    struct iovec iov = { .iov_base = buf, .iov_len = len };
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.bytes,
                          .msg_controllen = sizeof(control.bytes) };
    *count = 0;
    long n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    if (n < 0) return n;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c != NULL; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        int k = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        for (int i = 0; i < k; i++) {
            int fd;
            memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
            if (*count < FU_MAX_PASSED_FDS) fds[(*count)++] = fd; else close(fd);
        }
    }
    if (msg.msg_flags & MSG_CTRUNC) {
        for (int i = 0; i < *count; i++) close(fds[i]);
        *count = 0;
        errno = EMSGSIZE;
        return -1;
    }
    return n;
}

int fu_open_tmpfile(const char *directory, mode_t mode) {
    return open(directory, O_TMPFILE | O_WRONLY | O_CLOEXEC, mode);
}
