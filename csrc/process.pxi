# Process-wide calls into the C library that the programs make once or rarely (cli/malloc.py):
# here rather than through ctypes, which would stay loaded in every program.


cdef extern from "kf_malloc.h":
    int kf_mallopt(int param, int value)
    int kf_malloc_trim(size_t pad)


def mallopt(int param, int value):
    """glibc's ``mallopt(param, value)``: 1 if applied, 0 if refused, -1 where the C
    library has no ``mallopt``."""
    return kf_mallopt(param, value)


def malloc_trim(size_t pad):
    """glibc's ``malloc_trim(pad)``: 1 if memory was given back to the kernel, 0 if none
    was, -1 where the C library has no ``malloc_trim``."""
    return kf_malloc_trim(pad)
