/*
 * _dpfah_ranking: one scan of a chunk of queries against a Hamming-code database, producing
 * everything the retrieval metrics of dpfah.metrics need.
 *
 * For each query q of the chunk:
 *
 *   pass 1 (every database item i):
 *       d   = popcount(q_code xor db_code[i])            (Hamming distance)
 *       rel = any(q_labels & db_labels[i]) != 0           (share at least one label)
 *       key = 2 d + rel;  keys[i] = key;  hist[q, key] += 1
 *     so hist[q, 2d] counts irrelevant and hist[q, 2d + 1] relevant items at distance d.
 *     Queries are processed in blocks of QBLOCK over database tiles of TILE items, so each
 *     tile is read from memory once per block; keys are kept (1 byte each up to 127 bits,
 *     else 2): reading them back is cheaper than recomputing distances and relevance.
 *
 *   pass 2 (index order, over the stored keys, only items that can rank <= K where
 *   K = max(cutoffs, points)): the ranking is (distance, database index), so the rank of
 *   item i is (#items at a smaller distance) + (#items at its distance with index <= i), and
 *   the number of relevant items at ranks <= rank(i) follows the same way. For each cutoff R:
 *   ap[q, c] = sum of precision@rank over relevant items of rank <= R, nrel[q, c] = their
 *   count. For each point p: relcount[q, j] = #relevant items in the top p.
 *
 * scan_top (dpfah/_ranking_top.h) is the variant for mAP@R with R small beside the database:
 * distances first, only the items up to the distance that reaches rank R are kept, then the
 * same pass 2 over them (the same values, bit for bit; the histogram stops at that distance).
 *
 * Buffers come through the buffer protocol (C-contiguous; uint64 codes and labels, int64
 * histogram/cutoffs/points/counts, float64 ap), all outputs are allocated by the caller,
 * and the scan runs without the GIL so Python threads over query chunks use every core.
 * Portable C11. With GCC/Clang on x86 the kernel is compiled three times (portable,
 * POPCNT, AVX-512BW) and the best one the CPU supports is chosen at import time by the
 * selection routine shared with _hamming.c (_cpu.h, which also names the kernels); nothing
 * is built with -march=native. A top-level module (not dpfah._ranking), so that no copy of
 * the dpfah/ sources, such as the working directory of a `ray job submit` job, shadows it. The AVX-512 variant computes the keys of 8 items at once
 * (popcount by nibble lookup, so VPOPCNTQ is not needed) for 1-word codes and 1-2 label
 * words, and filters pass 2 by 64 keys at a time.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_cpu.h"

#if defined(__GNUC__) || defined(__clang__)
#define FORCE_INLINE static inline __attribute__((always_inline))
#define NOINLINE __attribute__((noinline))
#define POPCOUNT64(x) ((unsigned)__builtin_popcountll(x))
#define CTZ64(x) ((unsigned)__builtin_ctzll(x))
#if defined(__x86_64__) || defined(__i386__)
#define DPFAH_X86_DISPATCH 1
#endif
#elif defined(_MSC_VER)
#define FORCE_INLINE static __forceinline
#define NOINLINE __declspec(noinline)
#endif

#ifndef FORCE_INLINE
#define FORCE_INLINE static inline
#endif
#ifndef NOINLINE
#define NOINLINE
#endif
#ifndef POPCOUNT64
static inline unsigned popcount64_portable(uint64_t x)
{
    x = x - ((x >> 1) & 0x5555555555555555ULL);
    x = (x & 0x3333333333333333ULL) + ((x >> 2) & 0x3333333333333333ULL);
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0FULL;
    return (unsigned)((x * 0x0101010101010101ULL) >> 56);
}
#define POPCOUNT64(x) popcount64_portable(x)
#endif
#ifndef CTZ64
static inline unsigned ctz64_portable(uint64_t x) /* x != 0 */
{
    unsigned n = 0;
    while (!(x & 1u)) {
        x >>= 1;
        n++;
    }
    return n;
}
#define CTZ64(x) ctz64_portable(x)
#endif

#define NSUB 4    /* sub-histograms: runs of equal keys do not serialise on one counter */
#define MAXW 4    /* query words copied to locals in pass 1 */
#define QBLOCK 16 /* queries sharing one read of a database tile in pass 1 */
#define TILE 1024 /* database items per tile (multiple of 8) */

typedef struct {
    const uint64_t *qc, *dc, *ql, *dl;
    Py_ssize_t nq, ndb, W, L;
    int bits;
    int64_t *hist; /* nq x 2 (bits + 1) */
    const int64_t *cut;
    Py_ssize_t ncut;
    double *ap;    /* nq x ncut */
    int64_t *nrel; /* nq x ncut */
    const int64_t *pts;
    Py_ssize_t npts;
    int64_t *relcnt; /* nq x npts */
    /* scratch */
    void *keys;       /* QBLOCK x (ndb + 8) keys of kb bytes */
    int kb;           /* 1 when 2 bits + 1 <= 255, else 2 */
    uint8_t *relrank; /* max point */
    uint32_t *sub;    /* QBLOCK x NSUB x nkeys */
    int64_t *work;    /* 2 x (bits + 1) */
} scan_args;

/* ---------------------------------------------------------------------------------------- */
/* pass 1                                                                                    */

/* key = 2 d + rel of item i; W and L are compile-time constants in the specialised calls */
FORCE_INLINE unsigned item_key(const uint64_t *q, const uint64_t *ql, const uint64_t *dc, const uint64_t *dl,
                               Py_ssize_t i, Py_ssize_t W, Py_ssize_t L)
{
    const uint64_t *c = dc + i * W;
    const uint64_t *l = dl + i * L;
    unsigned d = 0;
    uint64_t any = 0;
    for (Py_ssize_t w = 0; w < W; w++) d += POPCOUNT64(q[w] ^ c[w]);
    for (Py_ssize_t w = 0; w < L; w++) any |= ql[w] & l[w];
    return 2u * d + (any != 0);
}

/* Pass 1 of one query over n items: keys (kb bytes each, stored 8 at a time) and NSUB
 * sub-histograms, fused. */
FORCE_INLINE void pass1(const uint64_t *qp, const uint64_t *qlp, const uint64_t *dc, const uint64_t *dl,
                        Py_ssize_t n, Py_ssize_t W, Py_ssize_t L, int kb, void *keys, uint32_t *sub,
                        Py_ssize_t nkeys)
{
    /* the query words live in locals: the stores below could otherwise alias them */
    uint64_t qbuf[MAXW], qlbuf[MAXW];
    const uint64_t *q = qp, *ql = qlp;
    if (W <= MAXW) {
        for (Py_ssize_t w = 0; w < W; w++) qbuf[w] = qp[w];
        q = qbuf;
    }
    if (L <= MAXW) {
        for (Py_ssize_t w = 0; w < L; w++) qlbuf[w] = qlp[w];
        ql = qlbuf;
    }
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t lo = 0, hi = 0;
        for (int s = 0; s < 8; s++) {
            const unsigned key = item_key(q, ql, dc, dl, i + s, W, L);
            if (kb == 1)
                lo |= (uint64_t)key << (8 * s);
            else if (s < 4)
                lo |= (uint64_t)key << (16 * s);
            else
                hi |= (uint64_t)key << (16 * (s - 4));
            sub[(s & (NSUB - 1)) * nkeys + key]++;
        }
        if (kb == 1) {
            memcpy((uint8_t *)keys + i, &lo, 8);
        } else {
            memcpy((uint16_t *)keys + i, &lo, 8);
            memcpy((uint16_t *)keys + i + 4, &hi, 8);
        }
    }
    for (; i < n; i++) {
        const unsigned key = item_key(q, ql, dc, dl, i, W, L);
        if (kb == 1)
            ((uint8_t *)keys)[i] = (uint8_t)key;
        else
            ((uint16_t *)keys)[i] = (uint16_t)key;
        sub[key]++;
    }
}

/* pass 1 with the common word counts specialised */
FORCE_INLINE void pass1_any(const uint64_t *q, const uint64_t *ql, const uint64_t *dc, const uint64_t *dl,
                            Py_ssize_t n, Py_ssize_t W, Py_ssize_t L, int kb, void *keys, uint32_t *sub,
                            Py_ssize_t nkeys)
{
#define PASS1(WW, LL)                                                                                        \
    do {                                                                                                     \
        if (kb == 1)                                                                                         \
            pass1(q, ql, dc, dl, n, WW, LL, 1, keys, sub, nkeys);                                            \
        else                                                                                                 \
            pass1(q, ql, dc, dl, n, WW, LL, 2, keys, sub, nkeys);                                            \
    } while (0)
    if (W == 1 && L == 1)
        PASS1(1, 1);
    else if (W == 1 && L == 2)
        PASS1(1, 2);
    else if (W == 2 && L == 1)
        PASS1(2, 1);
    else if (W == 2 && L == 2)
        PASS1(2, 2);
    else
        PASS1(W, L);
#undef PASS1
}

/* histogram of n 1-byte keys into NSUB sub-histograms */
FORCE_INLINE void hist_keys8(const uint8_t *keys, Py_ssize_t n, uint32_t *sub, Py_ssize_t nkeys)
{
    Py_ssize_t i = 0;
    for (; i + 4 <= n; i += 4) {
        sub[keys[i]]++;
        sub[nkeys + keys[i + 1]]++;
        sub[2 * nkeys + keys[i + 2]]++;
        sub[3 * nkeys + keys[i + 3]]++;
    }
    for (; i < n; i++) sub[keys[i]]++;
}

/* ---------------------------------------------------------------------------------------- */
/* pass 2                                                                                    */

typedef struct {
    int64_t *cur;  /* per distance: items at smaller distances + items of this distance visited */
    int64_t *rcur; /* the same, counting relevant items only */
    int64_t maxpt, maxcut;
    uint8_t *relrank; /* relevance of ranks 1..maxpt */
    const int64_t *cut;
    Py_ssize_t ncut;
    double *ap;
    int64_t *nrel;
} pass2_state;

/* the item with key `key` is the next one, in index order, among the items of its distance */
FORCE_INLINE void visit(pass2_state *st, unsigned key)
{
    const unsigned d = key >> 1, rel = key & 1u;
    const int64_t rank = ++st->cur[d]; /* 1-based */
    if (rank <= st->maxpt) st->relrank[rank - 1] = (uint8_t)rel;
    if (rel) {
        const int64_t cnt = ++st->rcur[d]; /* relevant items at ranks <= rank */
        if (rank <= st->maxcut) {
            const double prec = (double)cnt / (double)rank;
            for (Py_ssize_t c = st->ncut - 1; c >= 0 && rank <= st->cut[c]; c--) {
                st->ap[c] += prec;
                st->nrel[c]++;
            }
        }
    }
}

/* pass 2 when most items qualify: a plain sequential loop beats a filtered one */
#define DENSE(remaining, ndb) ((remaining)*8 >= (ndb))

FORCE_INLINE void visit_all(pass2_state *st, unsigned key, const int with_points)
{
    const unsigned d = key >> 1;
    const int64_t rank = ++st->cur[d];
    if (with_points && rank <= st->maxpt) st->relrank[rank - 1] = (uint8_t)(key & 1u);
    if (key & 1u) {
        const int64_t cnt = ++st->rcur[d];
        if (rank <= st->maxcut) {
            const double prec = (double)cnt / (double)rank;
            for (Py_ssize_t c = st->ncut - 1; c >= 0 && rank <= st->cut[c]; c--) {
                st->ap[c] += prec;
                st->nrel[c]++;
            }
        }
    }
}

FORCE_INLINE void pass2_dense(pass2_state *st, const void *keys, int kb, Py_ssize_t ndb, unsigned keycut,
                              int64_t remaining)
{
    if (kb == 1 && remaining == ndb) { /* every item is visited: no filter, no count */
        const uint8_t *k8 = (const uint8_t *)keys;
        if (st->maxpt)
            for (Py_ssize_t i = 0; i < ndb; i++) visit_all(st, k8[i], 1);
        else
            for (Py_ssize_t i = 0; i < ndb; i++) visit_all(st, k8[i], 0);
    } else if (kb == 1) {
        const uint8_t *k8 = (const uint8_t *)keys;
        for (Py_ssize_t i = 0; i < ndb && remaining > 0; i++) {
            const unsigned key = k8[i];
            if (key <= keycut) {
                visit(st, key);
                remaining--;
            }
        }
    } else {
        const uint16_t *k16 = (const uint16_t *)keys;
        for (Py_ssize_t i = 0; i < ndb && remaining > 0; i++) {
            const unsigned key = k16[i];
            if (key <= keycut) {
                visit(st, key);
                remaining--;
            }
        }
    }
}

/* Pass 2: visit, in index order, the `remaining` items with key <= keycut. Sparse case: keys
 * are filtered 8 bytes at a time with a SWAR compare: for lanes of b bits and keycut <
 * 2^(b-1) - 1, lane x <= keycut iff the top bit of x is clear and the top bit of
 * ((x | top) - (keycut + 1)) is clear. */
FORCE_INLINE void pass2(const pass2_state *stp, const void *keys, int kb, Py_ssize_t ndb, unsigned keycut,
                        int64_t remaining)
{
    /* a private copy: stores through cur/rcur cannot alias it, so its fields stay in registers */
    pass2_state local = *stp, *st = &local;
    Py_ssize_t i = 0;
    if (DENSE(remaining, ndb)) {
        pass2_dense(st, keys, kb, ndb, keycut, remaining);
        return;
    }
    if (kb == 1 && keycut < 0x7Fu) {
        const uint64_t H = 0x8080808080808080ULL, B = 0x0101010101010101ULL * (keycut + 1u);
        const uint8_t *k8 = (const uint8_t *)keys;
        for (; i + 8 <= ndb && remaining > 0; i += 8) {
            uint64_t x;
            memcpy(&x, k8 + i, 8);
            uint64_t m = ~((x | H) - B) & ~x & H;
            while (m) {
                visit(st, k8[i + (CTZ64(m) >> 3)]);
                remaining--;
                m &= m - 1;
            }
        }
    } else if (kb == 2 && keycut < 0x7FFFu) {
        const uint64_t H = 0x8000800080008000ULL, B = 0x0001000100010001ULL * (keycut + 1u);
        const uint16_t *k16 = (const uint16_t *)keys;
        for (; i + 4 <= ndb && remaining > 0; i += 4) {
            uint64_t x;
            memcpy(&x, k16 + i, 8);
            uint64_t m = ~((x | H) - B) & ~x & H;
            while (m) {
                visit(st, k16[i + (CTZ64(m) >> 4)]);
                remaining--;
                m &= m - 1;
            }
        }
    }
    for (; i < ndb && remaining > 0; i++) {
        const unsigned key = kb == 1 ? ((const uint8_t *)keys)[i] : ((const uint16_t *)keys)[i];
        if (key <= keycut) {
            visit(st, key);
            remaining--;
        }
    }
}

/* ---------------------------------------------------------------------------------------- */
/* per-target entry points (not inlined into the driver: they keep their registers)         */

typedef void (*tile_fn)(const uint64_t *, const uint64_t *, const uint64_t *, const uint64_t *, Py_ssize_t,
                        Py_ssize_t, Py_ssize_t, int, void *, uint32_t *, Py_ssize_t);
typedef void (*query_fn)(const pass2_state *, const void *, int, Py_ssize_t, unsigned, int64_t);

#define DEFINE_PASSES(SUFFIX, ATTR)                                                                          \
    ATTR static NOINLINE void tile_##SUFFIX(const uint64_t *q, const uint64_t *ql, const uint64_t *dc,          \
                                            const uint64_t *dl, Py_ssize_t n, Py_ssize_t W, Py_ssize_t L,      \
                                            int kb, void *keys, uint32_t *sub, Py_ssize_t nkeys)               \
    {                                                                                                        \
        pass1_any(q, ql, dc, dl, n, W, L, kb, keys, sub, nkeys);                                             \
    }                                                                                                        \
    ATTR static NOINLINE void query_##SUFFIX(const pass2_state *st, const void *keys, int kb, Py_ssize_t ndb,  \
                                             unsigned keycut, int64_t remaining)                             \
    {                                                                                                        \
        pass2(st, keys, kb, ndb, keycut, remaining);                                                         \
    }

DEFINE_PASSES(portable, )

#ifdef DPFAH_X86_DISPATCH
#include <immintrin.h>
#define DPFAH_POPCNT __attribute__((target("popcnt")))
#define DPFAH_AVX512 __attribute__((target("avx512f,avx512bw,popcnt")))

DEFINE_PASSES(popcnt, DPFAH_POPCNT)

/* Keys (1 byte each) of n items for 1-word codes and 1 or 2 label words, 8 items per step:
 * popcount by nibble lookup (vpshufb) and byte sums (vpsadbw); no VPOPCNTQ needed. */
DPFAH_AVX512 static void keys_avx512_w1(uint64_t qw, const uint64_t *ql, Py_ssize_t L, const uint64_t *dc,
                                        const uint64_t *dl, Py_ssize_t n, uint8_t *keys)
{
    const __m512i q = _mm512_set1_epi64((long long)qw);
    const __m512i a0 = _mm512_set1_epi64((long long)ql[0]);
    const __m512i a1 = _mm512_set1_epi64((long long)(L == 2 ? ql[1] : 0));
    /* popcount of each nibble, in every 128-bit lane */
    const __m512i lut = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4));
    const __m512i m4 = _mm512_set1_epi8(0x0f), one = _mm512_set1_epi64(1), zero = _mm512_setzero_si512();
    const __m512i even = _mm512_set_epi64(14, 12, 10, 8, 6, 4, 2, 0), odd = _mm512_set_epi64(15, 13, 11, 9, 7, 5, 3, 1);
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m512i x = _mm512_xor_si512(q, _mm512_loadu_si512((const void *)(dc + i)));
        const __m512i lo = _mm512_and_si512(x, m4), hi = _mm512_and_si512(_mm512_srli_epi64(x, 4), m4);
        const __m512i d = _mm512_sad_epu8(_mm512_add_epi8(_mm512_shuffle_epi8(lut, lo), _mm512_shuffle_epi8(lut, hi)), zero);
        __mmask8 rel;
        if (L == 1) {
            rel = _mm512_test_epi64_mask(_mm512_loadu_si512((const void *)(dl + i)), a0);
        } else {
            const __m512i l0 = _mm512_loadu_si512((const void *)(dl + 2 * i));
            const __m512i l1 = _mm512_loadu_si512((const void *)(dl + 2 * i + 8));
            rel = _mm512_test_epi64_mask(_mm512_permutex2var_epi64(l0, even, l1), a0) |
                  _mm512_test_epi64_mask(_mm512_permutex2var_epi64(l0, odd, l1), a1);
        }
        const __m512i d2 = _mm512_add_epi64(d, d);
        const __m512i key = _mm512_mask_add_epi64(d2, rel, d2, one);
        _mm_storel_epi64((__m128i *)(keys + i), _mm512_cvtepi64_epi8(key));
    }
    for (; i < n; i++) {
        uint64_t any = ql[0] & dl[i * L];
        if (L == 2) any |= ql[1] & dl[i * L + 1];
        keys[i] = (uint8_t)(2u * POPCOUNT64(qw ^ dc[i]) + (any != 0));
    }
}

DPFAH_AVX512 static NOINLINE void tile_avx512(const uint64_t *q, const uint64_t *ql, const uint64_t *dc,
                                              const uint64_t *dl, Py_ssize_t n, Py_ssize_t W, Py_ssize_t L, int kb,
                                              void *keys, uint32_t *sub, Py_ssize_t nkeys)
{
    if (W == 1 && L <= 2 && kb == 1) {
        keys_avx512_w1(q[0], ql, L, dc, dl, n, (uint8_t *)keys);
        hist_keys8((const uint8_t *)keys, n, sub, nkeys);
    } else {
        pass1_any(q, ql, dc, dl, n, W, L, kb, keys, sub, nkeys);
    }
}

/* pass 2 over 1-byte keys, filtered 64 at a time by a byte compare into a 64-bit mask */
DPFAH_AVX512 static NOINLINE void query_avx512(const pass2_state *stp, const void *keys, int kb, Py_ssize_t ndb,
                                               unsigned keycut, int64_t remaining)
{
    if (kb != 1 || DENSE(remaining, ndb)) {
        pass2(stp, keys, kb, ndb, keycut, remaining);
        return;
    }
    pass2_state local = *stp, *st = &local; /* see pass2 */
    const uint8_t *k8 = (const uint8_t *)keys;
    const __m512i c = _mm512_set1_epi8((char)(keycut > 255u ? 255u : keycut));
    Py_ssize_t i = 0;
    for (; i + 64 <= ndb && remaining > 0; i += 64) {
        uint64_t m = _mm512_cmple_epu8_mask(_mm512_loadu_si512((const void *)(k8 + i)), c);
        while (m) {
            visit(st, k8[i + CTZ64(m)]);
            remaining--;
            m &= m - 1;
        }
    }
    for (; i < ndb && remaining > 0; i++) {
        if (k8[i] <= keycut) {
            visit(st, k8[i]);
            remaining--;
        }
    }
}
#endif /* DPFAH_X86_DISPATCH */

/* ---------------------------------------------------------------------------------------- */
/* driver                                                                                    */

/* pass 2 state of query qi, its ap and nrel zeroed (cur, rcur: set by the caller) */
FORCE_INLINE pass2_state pass2_start(scan_args *a, Py_ssize_t qi, int64_t *cur, int64_t *rcur, int64_t maxcut,
                                     int64_t maxpt)
{
    pass2_state st;
    st.cur = cur;
    st.rcur = rcur;
    st.maxpt = maxpt;
    st.maxcut = maxcut;
    st.relrank = a->relrank;
    st.cut = a->cut;
    st.ncut = a->ncut;
    st.ap = a->ap + qi * a->ncut;
    st.nrel = a->nrel + qi * a->ncut;
    for (Py_ssize_t c = 0; c < a->ncut; c++) {
        st.ap[c] = 0.0;
        st.nrel[c] = 0;
    }
    return st;
}

/* relcount of query qi at the rank points, from the relevance of ranks 1..maxpt */
FORCE_INLINE void rank_points(scan_args *a, Py_ssize_t qi)
{
    if (!a->npts) return;
    int64_t *rc = a->relcnt + qi * a->npts;
    int64_t run = 0, r = 0;
    for (Py_ssize_t j = 0; j < a->npts; j++) {
        for (; r < a->pts[j]; r++) run += a->relrank[r];
        rc[j] = run;
    }
}

FORCE_INLINE void scan_impl(scan_args *a, tile_fn tile, query_fn query)
{
    const Py_ssize_t nb = (Py_ssize_t)a->bits + 1, nkeys = 2 * nb;
    const Py_ssize_t W = a->W, L = a->L, ndb = a->ndb;
    const int kb = a->kb;
    const int64_t maxcut = a->ncut ? a->cut[a->ncut - 1] : 0;
    const int64_t maxpt = a->npts ? a->pts[a->npts - 1] : 0;
    const int64_t kmax = maxcut > maxpt ? maxcut : maxpt;
    int64_t *cur = a->work, *rcur = a->work + nb;
    const Py_ssize_t kstride = (ndb + 8) * kb; /* bytes of one query's keys */

    for (Py_ssize_t q0 = 0; q0 < a->nq; q0 += QBLOCK) {
        const Py_ssize_t nqb = a->nq - q0 < QBLOCK ? a->nq - q0 : QBLOCK;
        memset(a->sub, 0, sizeof(uint32_t) * NSUB * (size_t)nkeys * (size_t)nqb);
        /* pass 1, query-blocked: each database tile is read from memory once per block */
        for (Py_ssize_t t0 = 0; t0 < ndb; t0 += TILE) {
            const Py_ssize_t tn = ndb - t0 < TILE ? ndb - t0 : TILE;
            for (Py_ssize_t qq = 0; qq < nqb; qq++)
                tile(a->qc + (q0 + qq) * W, a->ql + (q0 + qq) * L, a->dc + t0 * W, a->dl + t0 * L, tn, W, L, kb,
                     (uint8_t *)a->keys + qq * kstride + t0 * kb, a->sub + qq * NSUB * nkeys, nkeys);
        }
        for (Py_ssize_t qq = 0; qq < nqb; qq++) {
            const Py_ssize_t qi = q0 + qq;
            const uint32_t *sub = a->sub + qq * NSUB * nkeys;
            int64_t *h = a->hist + qi * nkeys;
            for (Py_ssize_t k = 0; k < nkeys; k++) {
                int64_t s = 0;
                for (int t = 0; t < NSUB; t++) s += sub[t * nkeys + k];
                h[k] = s;
            }
            if (kmax == 0) continue;

            /* pass 2: only distances d <= dcut, the first distance whose items reach rank kmax */
            int64_t n_before = 0, r_before = 0, need = 0;
            Py_ssize_t dcut = -1;
            for (Py_ssize_t d = 0; d < nb; d++) {
                cur[d] = n_before;
                rcur[d] = r_before;
                n_before += h[2 * d] + h[2 * d + 1];
                r_before += h[2 * d + 1];
                if (dcut < 0 && n_before >= kmax) {
                    dcut = d;
                    need = n_before; /* items at distance <= dcut */
                }
            }
            pass2_state st = pass2_start(a, qi, cur, rcur, maxcut, maxpt);
            query(&st, (const uint8_t *)a->keys + qq * kstride, kb, ndb, 2u * (unsigned)dcut + 1u, need);
            rank_points(a, qi);
        }
    }
}

static void scan_portable(scan_args *a) { scan_impl(a, tile_portable, query_portable); }
#ifdef DPFAH_X86_DISPATCH
static void scan_popcnt(scan_args *a) { scan_impl(a, tile_popcnt, query_popcnt); }
static void scan_avx512(scan_args *a) { scan_impl(a, tile_avx512, query_avx512); }
#endif

/* Kernels by family (_cpu.h); NULL: not implemented here (no AVX2 variant). */
typedef void (*scan_fn)(scan_args *);
#ifdef DPFAH_X86_DISPATCH
static const scan_fn scan_fns[DPFAH_K_COUNT] = {scan_portable, scan_popcnt, NULL, scan_avx512};
#define RANK_BUILT (DPFAH_KBIT(DPFAH_K_PORTABLE) | DPFAH_KBIT(DPFAH_K_POPCNT) | DPFAH_KBIT(DPFAH_K_AVX512BW))
#else
static const scan_fn scan_fns[DPFAH_K_COUNT] = {scan_portable, NULL, NULL, NULL};
#define RANK_BUILT DPFAH_KBIT(DPFAH_K_PORTABLE)
#endif
static int current_kernel = DPFAH_K_PORTABLE;

#include "_ranking_top.h"

typedef void (*scan_top_fn)(scan_args *, top_scratch *);
static void scan_top_portable(scan_args *a, top_scratch *s) { scan_top_impl(a, s, collect_portable); }
#ifdef DPFAH_X86_DISPATCH
DPFAH_POPCNT static void scan_top_popcnt(scan_args *a, top_scratch *s) { scan_top_impl(a, s, collect_popcnt); }
DPFAH_AVX512 static void scan_top_avx512(scan_args *a, top_scratch *s)
{
    scan_top_impl(a, s, use_vpopcnt ? collect_avx512_vpopcnt : collect_avx512);
}
static const scan_top_fn scan_top_fns[DPFAH_K_COUNT] = {scan_top_portable, scan_top_popcnt, NULL, scan_top_avx512};
#else
static const scan_top_fn scan_top_fns[DPFAH_K_COUNT] = {scan_top_portable, NULL, NULL, NULL};
#endif

/* ------------------------------------------------------------------------------------------ */

static int get_buf(PyObject *obj, Py_buffer *view, int writable, Py_ssize_t itemsize, const char *kinds,
                   int ndim, const char *name)
{
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0) {
        PyErr_Format(PyExc_ValueError, "%s: expected a C-contiguous%s buffer", name, writable ? " writable" : "");
        return -1;
    }
    const char *f = view->format ? view->format : "B";
    if (*f == '=' || *f == '@' || *f == '<') f++;
    if (view->itemsize != itemsize || f[0] == '\0' || f[1] != '\0' || strchr(kinds, f[0]) == NULL ||
        view->ndim != ndim) {
        PyErr_Format(PyExc_ValueError, "%s: expected a %d-D array of %zd-byte items of kind '%s', got format '%s' ndim %d",
                     name, ndim, itemsize, kinds, view->format ? view->format : "B", view->ndim);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

#define NBUF 11

static PyObject *scan_common(PyObject *args, int top)
{
    PyObject *o[NBUF - 1];
    int bits;
    if (!PyArg_ParseTuple(args, "OOOOiOOOOOO:scan", &o[0], &o[1], &o[2], &o[3], &bits, &o[4], &o[5], &o[6], &o[7],
                          &o[8], &o[9]))
        return NULL;
    static const char *names[NBUF - 1] = {"query_codes", "db_codes", "query_labels", "db_labels", "hist",
                                          "cutoffs",     "ap",       "nrel",         "points",    "relcount"};
    static const int writable[NBUF - 1] = {0, 0, 0, 0, 1, 0, 1, 1, 0, 1};
    static const Py_ssize_t isz[NBUF - 1] = {8, 8, 8, 8, 8, 8, 8, 8, 8, 8};
    static const char *kinds[NBUF - 1] = {"QL", "QL", "QL", "QL", "ql", "ql", "d", "ql", "ql", "ql"};
    static const int ndims[NBUF - 1] = {2, 2, 2, 2, 2, 1, 2, 2, 1, 2};
    Py_buffer v[NBUF - 1];
    int got = 0;
    PyObject *result = NULL;
    scan_args a;
    top_scratch ts;
    memset(&a, 0, sizeof(a));
    memset(&ts, 0, sizeof(ts));

    for (; got < NBUF - 1; got++)
        if (get_buf(o[got], &v[got], writable[got], isz[got], kinds[got], ndims[got], names[got]) < 0) goto done;

    Py_ssize_t nq = v[0].shape[0], W = v[0].shape[1], ndb = v[1].shape[0], L = v[2].shape[1];
    Py_ssize_t ncut = v[5].shape[0], npts = v[8].shape[0];
    if (W < 1 || v[1].shape[1] != W) {
        PyErr_SetString(PyExc_ValueError, "query_codes and db_codes must have the same number (>= 1) of words");
        goto done;
    }
    if (L < 1 || v[3].shape[1] != L || v[2].shape[0] != nq || v[3].shape[0] != ndb) {
        PyErr_SetString(PyExc_ValueError, "labels must be (n_query, L) and (n_db, L) with L >= 1 words");
        goto done;
    }
    if (bits < 1 || (Py_ssize_t)bits > 64 * W || bits > 32766) {
        PyErr_Format(PyExc_ValueError, "bits=%d does not fit %zd words (and must be <= 32766)", bits, W);
        goto done;
    }
    if (ndb < 1 || ndb > (Py_ssize_t)UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "the database must hold between 1 and 2**32 - 1 items");
        goto done;
    }
    if (v[4].shape[0] != nq || v[4].shape[1] != 2 * ((Py_ssize_t)bits + 1)) {
        PyErr_SetString(PyExc_ValueError, "hist must have shape (n_query, 2 * (bits + 1))");
        goto done;
    }
    if (v[6].shape[0] != nq || v[6].shape[1] != ncut || v[7].shape[0] != nq || v[7].shape[1] != ncut) {
        PyErr_SetString(PyExc_ValueError, "ap and nrel must have shape (n_query, len(cutoffs))");
        goto done;
    }
    if (v[9].shape[0] != nq || v[9].shape[1] != npts) {
        PyErr_SetString(PyExc_ValueError, "relcount must have shape (n_query, len(points))");
        goto done;
    }
    if (top && ncut == 0 && npts == 0) {
        PyErr_SetString(PyExc_ValueError, "scan_top needs at least one cutoff or point");
        goto done;
    }
    const int64_t *cut = (const int64_t *)v[5].buf, *pts = (const int64_t *)v[8].buf;
    for (Py_ssize_t j = 0; j < ncut; j++)
        if (cut[j] < 1 || cut[j] > ndb || (j && cut[j] <= cut[j - 1])) {
            PyErr_SetString(PyExc_ValueError, "cutoffs must be strictly increasing, in 1..n_db");
            goto done;
        }
    for (Py_ssize_t j = 0; j < npts; j++)
        if (pts[j] < 1 || pts[j] > ndb || (j && pts[j] <= pts[j - 1])) {
            PyErr_SetString(PyExc_ValueError, "points must be strictly increasing, in 1..n_db");
            goto done;
        }

    a.qc = (const uint64_t *)v[0].buf;
    a.dc = (const uint64_t *)v[1].buf;
    a.ql = (const uint64_t *)v[2].buf;
    a.dl = (const uint64_t *)v[3].buf;
    a.nq = nq;
    a.ndb = ndb;
    a.W = W;
    a.L = L;
    a.bits = bits;
    a.hist = (int64_t *)v[4].buf;
    a.cut = cut;
    a.ncut = ncut;
    a.ap = (double *)v[6].buf;
    a.nrel = (int64_t *)v[7].buf;
    a.pts = pts;
    a.npts = npts;
    a.relcnt = (int64_t *)v[9].buf;
    {
        const size_t nb = (size_t)bits + 1;
        a.kb = 2 * bits + 1 <= 255 ? 1 : 2;
        if (top) {
            ts.keys = (uint16_t *)malloc(sizeof(uint16_t) * QBLOCK * (size_t)ndb);
            ts.cnt = (uint32_t *)malloc(sizeof(uint32_t) * QBLOCK * nb);
            ts.relc = (int64_t *)malloc(sizeof(int64_t) * nb);
        } else {
            a.keys = malloc((size_t)QBLOCK * (size_t)a.kb * ((size_t)ndb + 8));
            a.sub = (uint32_t *)malloc(sizeof(uint32_t) * QBLOCK * NSUB * 2 * nb);
        }
        a.relrank = (uint8_t *)malloc(npts ? (size_t)pts[npts - 1] : 1);
        a.work = (int64_t *)malloc(sizeof(int64_t) * 2 * nb);
        if ((top ? (!ts.keys || !ts.cnt || !ts.relc) : (!a.keys || !a.sub)) || !a.relrank || !a.work) {
            PyErr_NoMemory();
            goto done;
        }
    }
    if (nq > 0) {
        if (top) {
            const scan_top_fn fn = scan_top_fns[current_kernel];
            Py_BEGIN_ALLOW_THREADS fn(&a, &ts);
            Py_END_ALLOW_THREADS
        } else {
            const scan_fn fn = scan_fns[current_kernel];
            Py_BEGIN_ALLOW_THREADS fn(&a);
            Py_END_ALLOW_THREADS
        }
    }
    Py_INCREF(Py_None);
    result = Py_None;

done:
    free(ts.keys);
    free(ts.cnt);
    free(ts.relc);
    free(a.keys);
    free(a.relrank);
    free(a.sub);
    free(a.work);
    for (int k = 0; k < got; k++) PyBuffer_Release(&v[k]);
    return result;
}

static PyObject *scan(PyObject *self, PyObject *args)
{
    (void)self;
    return scan_common(args, 0);
}

static PyObject *scan_top(PyObject *self, PyObject *args)
{
    (void)self;
    return scan_common(args, 1);
}

static PyObject *set_vpopcnt(PyObject *self, PyObject *args)
{
    (void)self;
    int on;
    if (!PyArg_ParseTuple(args, "p:set_vpopcnt", &on)) return NULL;
    const int prev = use_vpopcnt;
#ifdef DPFAH_X86_DISPATCH
    if (on && !__builtin_cpu_supports("avx512vpopcntdq")) {
        PyErr_SetString(PyExc_ValueError, "this CPU has no VPOPCNTQ (avx512vpopcntdq)");
        return NULL;
    }
    use_vpopcnt = on;
#else
    if (on) {
        PyErr_SetString(PyExc_ValueError, "VPOPCNTQ is an x86 instruction");
        return NULL;
    }
#endif
    return PyBool_FromLong(prev);
}

static PyObject *set_kernel(PyObject *self, PyObject *args)
{
    (void)self;
    const char *name;
    if (!PyArg_ParseTuple(args, "s:set_kernel", &name)) return NULL;
    const int k = dpfah_kernel_by_name(name, RANK_BUILT);
    if (k == -2) {
        PyErr_Format(PyExc_ValueError, "kernel %s is not supported on this CPU", name);
        return NULL;
    }
    if (k < 0) {
        PyErr_Format(PyExc_ValueError, "unknown kernel '%s' (choose from kernels())", name);
        return NULL;
    }
    PyObject *prev = PyUnicode_FromString(dpfah_kernel_names[current_kernel]);
    if (prev == NULL) return NULL;
    current_kernel = k;
    return prev;
}

static PyObject *get_kernel(PyObject *self, PyObject *noargs)
{
    (void)self;
    (void)noargs;
    return PyUnicode_FromString(dpfah_kernel_names[current_kernel]);
}

static PyObject *kernels(PyObject *self, PyObject *noargs)
{
    (void)self;
    (void)noargs;
    const unsigned usable = dpfah_usable_kernels(RANK_BUILT);
    PyObject *t = PyList_New(0);
    for (int k = DPFAH_K_COUNT - 1; k >= 0 && t; --k) {
        if (!(usable & DPFAH_KBIT(k))) continue;
        PyObject *s = PyUnicode_FromString(dpfah_kernel_names[k]);
        if (!s || PyList_Append(t, s) < 0) Py_CLEAR(t);
        Py_XDECREF(s);
    }
    if (!t) return NULL;
    PyObject *tup = PyList_AsTuple(t);
    Py_DECREF(t);
    return tup;
}

static PyMethodDef methods[] = {
    {"kernels", kernels, METH_NOARGS, "kernels() -> tuple of kernel names this CPU supports, fastest first."},
    {"set_kernel", set_kernel, METH_VARARGS,
     "set_kernel(name) -> previous name. 'portable' (plain C), 'popcnt' or 'avx512bw' (x86, where the\n"
     "CPU supports them). The best one is chosen at import; this is for tests and benchmarks."},
    {"get_kernel", get_kernel, METH_NOARGS, "Name of the kernel in use."},
    {"set_vpopcnt", set_vpopcnt, METH_VARARGS,
     "set_vpopcnt(on) -> previous setting. Whether the avx512bw scan_top counts bits with VPOPCNTQ (chosen at\n"
     "import where the CPU has it) or by nibble lookup; for tests and benchmarks."},
    {"scan", scan, METH_VARARGS,
     "scan(query_codes, db_codes, query_labels, db_labels, bits, hist, cutoffs, ap, nrel, points, relcount)\n\n"
     "One pass of a query chunk over the database (see dpfah/_ranking.c). Inputs: uint64 packed\n"
     "codes (n, W) and packed labels (n, L); int64 cutoffs and points, strictly increasing in\n"
     "1..n_db. Outputs (caller-allocated, overwritten): hist int64 (n_q, 2 (bits+1)), index\n"
     "2 d + rel; ap float64 and nrel int64 (n_q, len(cutoffs)); relcount int64 (n_q, len(points)).\n"
     "Releases the GIL."},
    {"scan_top", scan_top, METH_VARARGS,
     "scan_top(...): the arguments and outputs of scan, for top-K metrics (K = the largest cutoff or point,\n"
     "at least one given): ap, nrel and relcount are those of scan, bit for bit; hist is exact for the\n"
     "distances up to the one that reaches rank K, 0 beyond (dpfah/_ranking_top.h). Releases the GIL."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "_dpfah_ranking",
                                       "Compiled ranking kernel for dpfah.metrics.", -1, methods};

/* Version of the Python-visible interface; dpfah.kernels refuses a module with another one
 * (a job's dpfah/ sources may be newer or older than the installed kernels). */
#define RANK_API_VERSION 2

PyMODINIT_FUNC PyInit__dpfah_ranking(void)
{
    current_kernel = dpfah_select_kernel(RANK_BUILT);
#ifdef DPFAH_X86_DISPATCH
    use_vpopcnt = __builtin_cpu_supports("avx512vpopcntdq") ? 1 : 0;
#endif
    PyObject *m = PyModule_Create(&moduledef);
    if (m && PyModule_AddIntConstant(m, "API_VERSION", RANK_API_VERSION) < 0) Py_CLEAR(m);
    return m;
}
