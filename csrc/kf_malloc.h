/* glibc's allocator controls, for cli/malloc.py without loading ctypes into every program
 * (about 0.6 MiB of resident memory for two calls).
 *
 * The symbols are weak: against a C library without them (musl has no malloc_trim) the
 * module still loads, and the calls answer -1, "not available".
 */
#ifndef KF_MALLOC_H
#define KF_MALLOC_H

#include <stddef.h>

int mallopt(int param, int value) __attribute__((weak));
int malloc_trim(size_t pad) __attribute__((weak));

static inline int kf_mallopt(int param, int value)
{
    return mallopt == NULL ? -1 : mallopt(param, value);
}

static inline int kf_malloc_trim(size_t pad)
{
    return malloc_trim == NULL ? -1 : malloc_trim(pad);
}

#endif
