/* Counts OpenMP parallel regions (libgomp's GOMP_parallel calls) in a process, for
 * benchmarks/contention.py --regions. Build and preload:
 *   gcc -O2 -shared -fPIC benchmarks/gomp_regions.c -o /tmp/libgomp_regions.so -ldl
 *   LD_PRELOAD=/tmp/libgomp_regions.so python benchmarks/contention.py --regions
 * PyTorch's CPU parallel_for and MKL's threaded BLAS both open their regions through it.
 * gomp_regions() counts the regions that may run on more than one thread (a team to wait
 * for at the end); gomp_regions_all() also those asked for one thread, which cost nothing. */
#define _GNU_SOURCE
#include <dlfcn.h>

typedef void (*parallel_fn)(void (*)(void *), void *, unsigned, unsigned);
static long regions = 0, regions_all = 0;

long gomp_regions(void) { return __atomic_load_n(&regions, __ATOMIC_RELAXED); }
long gomp_regions_all(void) { return __atomic_load_n(&regions_all, __ATOMIC_RELAXED); }

void GOMP_parallel(void (*fn)(void *), void *data, unsigned nthreads, unsigned flags) {
    static parallel_fn real = 0;
    if (!real) real = (parallel_fn)dlsym(RTLD_NEXT, "GOMP_parallel");
    __atomic_fetch_add(&regions_all, 1, __ATOMIC_RELAXED);
    if (nthreads != 1) __atomic_fetch_add(&regions, 1, __ATOMIC_RELAXED);
    real(fn, data, nthreads, flags);
}
