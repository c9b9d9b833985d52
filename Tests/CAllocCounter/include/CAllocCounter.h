// CAllocCounter: a test-only counting allocator.
//
// Linked into the test executable, it defines malloc, calloc, realloc, free, posix_memalign, aligned_alloc and
// memalign. Symbols defined in an executable take precedence over libc's for every shared library (Swift's
// runtime and Foundation included), so every allocation in the process goes through it. Each call is counted in
// a per-thread counter and handed to glibc's own implementation (__libc_malloc and friends: exported by glibc,
// and unlike dlsym(RTLD_NEXT, "malloc") they need no bootstrap buffer, because dlsym itself may allocate).
//
// Used by the data plane's allocation tests: count on the thread that runs the per-packet path, before and after.
#ifndef FU_ALLOC_COUNTER_H
#define FU_ALLOC_COUNTER_H

#include <stdint.h>

/// Allocations (malloc, calloc, realloc, posix_memalign, aligned_alloc, memalign) made by the calling thread.
uint64_t fu_alloc_count_this_thread(void);

/// Frees made by the calling thread.
uint64_t fu_free_count_this_thread(void);

#endif
