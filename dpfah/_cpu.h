/*
 * dpfah/_cpu.h: the one CPU-feature selection routine of the compiled kernels
 * (_dpfah_hamming from _hamming.c, _dpfah_ranking from _ranking.c).
 *
 * Kernel families, slowest to fastest, named the same in both modules:
 *
 *   portable   plain C (any CPU, any compiler)
 *   popcnt     scalar POPCNT instruction                       (x86: popcnt)
 *   avx2       256-bit vectors                                 (x86: popcnt, avx2)
 *   avx512bw   512-bit vectors with byte/word instructions     (x86: popcnt, avx2, avx512f, avx512bw)
 *   avx512vpopcntdq  the same, with the vector popcount VPOPCNTQ   (x86: the above, avx512vl,
 *                    avx512vpopcntdq: Ice Lake and later Intel, AMD Zen 4 and later)
 *
 * The CPU is asked once per module (GCC/Clang __builtin_cpu_supports on x86); on any other
 * architecture or compiler only "portable" is available. A module passes the set of families
 * it implements (a bit mask of DPFAH_K_*); the selection is the fastest family that is both
 * implemented and supported. The same routine answers set_kernel(name), so a module can never
 * select at import a kernel that set_kernel would refuse, or the other way round.
 */
#ifndef DPFAH_CPU_H
#define DPFAH_CPU_H

#include <string.h>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define DPFAH_CPU_X86 1
#else
#define DPFAH_CPU_X86 0
#endif

enum {
    DPFAH_K_PORTABLE = 0,
    DPFAH_K_POPCNT = 1,
    DPFAH_K_AVX2 = 2,
    DPFAH_K_AVX512BW = 3,
    DPFAH_K_AVX512VPOPCNT = 4,
    DPFAH_K_COUNT = 5
};

#define DPFAH_KBIT(k) (1u << (k))

static const char *const dpfah_kernel_names[DPFAH_K_COUNT] = {"portable", "popcnt", "avx2", "avx512bw",
                                                                   "avx512vpopcntdq"};

/* Bit mask of the kernel families this CPU can run (DPFAH_KBIT(k) set for family k);
 * computed on the first call, then cached (module init runs under the GIL). */
static inline unsigned dpfah_cpu_kernels(void)
{
    static int known = 0;
    static unsigned mask = 0;
    if (!known) {
        mask = DPFAH_KBIT(DPFAH_K_PORTABLE);
#if DPFAH_CPU_X86
        __builtin_cpu_init();
        if (__builtin_cpu_supports("popcnt")) {
            mask |= DPFAH_KBIT(DPFAH_K_POPCNT);
            if (__builtin_cpu_supports("avx2")) {
                mask |= DPFAH_KBIT(DPFAH_K_AVX2);
                if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) {
                    mask |= DPFAH_KBIT(DPFAH_K_AVX512BW);
                    if (__builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vpopcntdq"))
                        mask |= DPFAH_KBIT(DPFAH_K_AVX512VPOPCNT);
                }
            }
        }
#endif
        known = 1;
    }
    return mask;
}

/* Families that are implemented (`built`) and supported by this CPU. */
static inline unsigned dpfah_usable_kernels(unsigned built) { return built & dpfah_cpu_kernels(); }

/* The fastest usable family (portable is always usable). */
static inline int dpfah_select_kernel(unsigned built)
{
    const unsigned usable = dpfah_usable_kernels(built | DPFAH_KBIT(DPFAH_K_PORTABLE));
    for (int k = DPFAH_K_COUNT - 1; k > 0; --k)
        if (usable & DPFAH_KBIT(k)) return k;
    return DPFAH_K_PORTABLE;
}

/* Family index of `name`: >= 0 when usable; -1 unknown name or not implemented here;
 * -2 implemented but not supported by this CPU. */
static inline int dpfah_kernel_by_name(const char *name, unsigned built)
{
    for (int k = 0; k < DPFAH_K_COUNT; ++k)
        if (strcmp(name, dpfah_kernel_names[k]) == 0) {
            if (!((built | DPFAH_KBIT(DPFAH_K_PORTABLE)) & DPFAH_KBIT(k))) return -1;
            return (dpfah_usable_kernels(built | DPFAH_KBIT(DPFAH_K_PORTABLE)) & DPFAH_KBIT(k)) ? k : -2;
        }
    return -1;
}

#endif /* DPFAH_CPU_H */
