/*
 * _dpfah_hamming: exact Hamming-distance search over packed binary codes (used by dpfah.codes
 * through dpfah.kernels; a top-level module so that no copy of the dpfah/ sources, such as the
 * working directory of a `ray job submit` job, can shadow it).
 *
 * Codes are rows of `words` little-endian uint64 words (dpfah.codes.pack_codes); padding
 * bits are 0 in every code, so they never add to a distance.
 *
 * Plain CPython C API: inputs arrive through the buffer protocol, results are written into
 * buffers the caller allocates, and the GIL is released while the kernels run, so Python
 * threads can split the queries across cores (no OpenMP: torch ships its own runtime).
 *
 * Search is two steps, so that threads share one copy of the prepared database:
 *
 *   prepare(db, words, out)          lay the database out for the kernel (once per database)
 *   topk(prepared, queries, k, out_idx, out_dist)
 *   distances(prepared, queries, out_u16)
 *   count_within(prepared, queries, radius, out_counts)
 *
 * Kernels, chosen at import from what the CPU supports by the selection routine shared with
 * _ranking.c (_cpu.h); set_kernel() overrides, for tests:
 *
 *   avx512vpopcntdq  packed layout, VPOPCNTQ on 8 codes per 512-bit vector (Ice Lake and
 *              later Intel, Zen 4 and later AMD; see "AVX-512 VPOPCNTQ" below)
 *   avx512bw   nibble-sliced layout, 64 codes per 512-bit vector (see below)
 *   avx2       the same layout, 32 codes per 256-bit vector
 *   popcnt     packed layout, scalar POPCNT instruction
 *   portable   packed layout, SWAR popcount in plain C (any CPU, any compiler)
 *
 * Why the nibble-sliced layout. This CPU class (Skylake/Cascade Lake server) has AVX-512 but
 * no VPOPCNTQ. The usual emulation (xor, split nibbles, 2 x VPSHUFB table look-ups, add,
 * VPSADBW) costs about 6 vector instructions per 8 code pairs. Instead we store the
 * database "nibble-sliced": for each block of 64 codes, row r (r = 16 * word + j) is 64
 * bytes holding nibble j of that word of each of the 64 codes. For a fixed query nibble qn,
 * popcount(qn ^ x) over x = 0..15 is a 16-entry table, so ONE VPSHUFB with the query's table
 * for row r turns 64 database nibbles into 64 partial distances, and one VPADDB
 * accumulates them: 2 instructions per 64 codes per nibble, i.e. 0.5 instructions per code
 * pair at 64 bits, with the distances landing as bytes, ready for one VPCMPUB against the
 * current top-k threshold. The price is a prepared copy twice the size of the packed codes.
 *
 * Throughput comes from register tiling (QT queries x CT blocks of 64 codes per tile, so
 * each database load and each table load is used several times) and from cache blocking
 * (a block of the database that fits in L2 is scanned by a batch of queries before moving
 * on; otherwise memory bandwidth would cap the scan at 1-2 G comparisons/s).
 *
 * Top-k selection (exact; order: distance, then database index, both ascending). Each query
 * keeps its candidates per distance, appended in database order, and a threshold `thr`:
 * the smallest distance D such that at least k candidates are at distance <= D (maxd + 1,
 * maxd = 64 * words, while fewer than k are kept). A code is accepted only if its distance
 * is < thr: one at distance == thr has a larger index than the k candidates already at
 * <= thr, so it can never enter the top k. Distances take only maxd + 1 values, so the
 * per-distance lists are the sorted result: no comparison sort anywhere. The SIMD kernels
 * start thr from an estimate read off a sample of the database (see run_simd), which
 * cuts the candidates a scan accepts about fourfold, and rescan a query without it in the
 * rare case the estimate proves too low.
 *
 * Measured on a 2-core Cascade Lake VM (AVX-512 BW, no VPOPCNTQ), 1M 64-bit codes, one
 * thread, other processes sharing the CPUs: the distance pass alone 5-7 G comparisons/s,
 * exact top-1000 4.5-5 G/s (bench/search.py); faiss IndexBinaryFlat 0.4 G/s per thread in
 * the same runs (about 1 G/s on both cores of an idle machine, by the project notes).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_cpu.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAM_X86 1
#include <immintrin.h>
#else
#define HAM_X86 0
#endif

#if defined(__GNUC__) || defined(__clang__)
#define HAM_INLINE static inline __attribute__((always_inline))
#define HAM_NOINLINE static __attribute__((noinline))
#else
#define HAM_INLINE static inline
#define HAM_NOINLINE static
#endif

/* ------------------------------------------------------------------------------------ */
/* Kernels and the prepared-database format                                              */
/* ------------------------------------------------------------------------------------ */

/* Kernel families and their names come from _cpu.h (shared with _ranking.c). */
enum {
    K_PORTABLE = DPFAH_K_PORTABLE,
    K_POPCNT = DPFAH_K_POPCNT,
    K_AVX2 = DPFAH_K_AVX2,
    K_AVX512 = DPFAH_K_AVX512BW,
    K_VPOP = DPFAH_K_AVX512VPOPCNT,
    K_COUNT = DPFAH_K_COUNT
};
#define kernel_names dpfah_kernel_names
/* The families this file implements. */
#if HAM_X86
#define HAM_BUILT                                                                                            \
    (DPFAH_KBIT(K_PORTABLE) | DPFAH_KBIT(K_POPCNT) | DPFAH_KBIT(K_AVX2) | DPFAH_KBIT(K_AVX512) | DPFAH_KBIT(K_VPOP))
#else
#define HAM_BUILT DPFAH_KBIT(K_PORTABLE)
#endif
static int kernel_available[K_COUNT]; /* implemented and supported by this CPU */
static int current_kernel = K_PORTABLE;

static int kernel_is_sliced(int kernel) { return kernel == K_AVX2 || kernel == K_AVX512; }

/* Largest code length: distances are kept as uint16. */
#define MAX_WORDS 1023u

/* Register tile of the AVX-512 kernel: QT queries x CT blocks of 64 codes (QT*CT byte
 * accumulators + CT database vectors + 1 table must fit in 32 zmm registers: 4 x 5 gives
 * 26; 4 x 4, 6 x 4 and 6 x 5 measured the same or slower, and so did packing two queries
 * into one table, so the VPSHUFB port is not what limits this loop here). */
#ifndef HAM_QT512
#define HAM_QT512 4
#endif
#ifndef HAM_CT512
#define HAM_CT512 5
#endif
/* AVX2: 16 ymm registers, each block of 64 codes takes 2. */
#define HAM_QT256 2
#define HAM_CT256 2

/* Cache blocking: bytes of prepared database scanned by a batch of queries before moving
 * on (kept well inside a 1 MiB L2, leaving room for tables and candidate buffers). */
#ifndef HAM_BLOCK_BYTES
#define HAM_BLOCK_BYTES (160u * 1024u)
#endif
/* Queries per batch: each batch streams the whole database from memory once. */
#ifndef HAM_QUERY_BATCH
#define HAM_QUERY_BATCH 96u
#endif
/* Top-k for k >= n_db / HAM_DENSE_FACTOR sorts all distances (run_dense) rather than
 * selecting with a running threshold (measured crossover: k about n_db / 5). */
#ifndef HAM_DENSE_FACTOR
#define HAM_DENSE_FACTOR 5u
#endif
/* Memory allowed for the candidate buffers of one batch (a large k shrinks the batch). */
#define HAM_STATE_BUDGET ((size_t)64u << 20)

/* A prepared database: a small header, then the data at the first 64-byte boundary at
 * or after byte PREP_HEADER of the buffer (the caller's buffer need not be aligned). */
#define PREP_MAGIC 0x314d4148u /* "HAM1" */
#define PREP_HEADER 64u

typedef struct {
    uint32_t magic;
    uint32_t kernel;
    uint64_t n_db;
    uint32_t words;
    uint32_t offset; /* data - buffer start: a copy of the buffer may align differently */
} prep_header;

static uint64_t n_blocks64(uint64_t n) { return (n + 63u) / 64u; }

static uint64_t data_bytes(int kernel, uint64_t n_db, uint32_t words)
{
    if (kernel_is_sliced(kernel)) return n_blocks64(n_db) * 16u * words * 64u;
    if (kernel == K_VPOP) return n_blocks64(n_db) * 64u * words * 8u; /* whole blocks of 64 codes */
    return n_db * words * 8u;
}

static uint8_t *prep_data(uint8_t *buf)
{
    uintptr_t p = (uintptr_t)(buf + PREP_HEADER);
    return (uint8_t *)((p + 63u) & ~(uintptr_t)63u);
}

/* ------------------------------------------------------------------------------------ */
/* Per-query top-k state (portable C, shared by all kernels)                             */
/* ------------------------------------------------------------------------------------ */

/* Candidates are kept per distance: bucket d holds, in database order, the indices of the
 * accepted codes at distance d, as a chain of SEG-entry segments drawn from a per-query
 * pool. Appending is O(1), and when thr drops from T to T - 1 bucket T is returned to the
 * pool whole (at least k candidates are now at distance <= T - 1, so none of bucket T can
 * be in the top k). The result is read off buckets 0, 1, ... in order: already sorted by
 * (distance, index), with no compaction or sort.
 *
 * Pool size: fewer than k candidates are ever at distance < thr (else thr would drop), and
 * bucket thr holds at most k (when thr took its value T, exactly k candidates were at
 * distance <= T, and bucket T gets no more); buckets above thr are empty. So fewer than 2k
 * entries are live: full segments plus at most one partial segment per bucket. */
#define SEG 16u
#define NIL 0xFFFFFFFFu

typedef struct {
    uint32_t *ent;   /* nseg x SEG database indices */
    uint32_t *next;  /* next segment of a bucket's chain, or of the free list */
    uint32_t *head;  /* per bucket d = 0..maxd+1: first segment */
    uint32_t *tail;  /* last segment */
    uint32_t *size;  /* entries */
    uint32_t free_seg, bump; /* free list of returned segments; next never-used segment */
    uint32_t thr;    /* accept only distance < thr */
    uint32_t n_le;   /* candidates at distance <= thr */
} qstate;

typedef struct {
    qstate *st;
    uint32_t *mem;
    size_t per_query; /* uint32 words of pool and bucket arrays per query */
    uint32_t nseg, k, maxd, n;
} qstates;

/* uint32 words one query's state takes; nseg: segments in its pool. */
static size_t state_words(uint32_t k, uint32_t maxd, uint32_t *nseg)
{
    uint64_t ns = (2ull * k + SEG - 1u) / SEG + maxd + 3u;
    if (nseg) *nseg = (uint32_t)ns;
    return (size_t)(ns * (SEG + 1u) + 3ull * (maxd + 2u));
}

static void states_free(qstates *S)
{
    free(S->st);
    free(S->mem);
    memset(S, 0, sizeof(*S));
}

static int states_alloc(qstates *S, uint32_t n, uint32_t k, uint32_t maxd)
{
    memset(S, 0, sizeof(*S));
    S->k = k;
    S->maxd = maxd;
    S->n = n;
    S->per_query = state_words(k, maxd, &S->nseg);
    S->st = (qstate *)calloc(n, sizeof(qstate));
    S->mem = (uint32_t *)malloc((size_t)n * S->per_query * sizeof(uint32_t));
    if (!S->st || !S->mem) {
        states_free(S);
        return -1;
    }
    return 0;
}

static void states_reset(qstates *S, uint32_t n)
{
    const size_t nb = S->maxd + 2u;
    for (uint32_t i = 0; i < n; ++i) {
        qstate *s = &S->st[i];
        uint32_t *m = S->mem + (size_t)i * S->per_query;
        s->ent = m;
        s->next = s->ent + (size_t)S->nseg * SEG;
        s->head = s->next + S->nseg;
        s->tail = s->head + nb;
        s->size = s->tail + nb;
        memset(s->size, 0, nb * sizeof(uint32_t));
        s->free_seg = NIL;
        s->bump = 0;
        s->thr = S->maxd + 1u; /* an always-empty sentinel bucket: accept all until k */
        s->n_le = 0;
    }
}

/* Return bucket t's segments to the free list (walked by count, chains are not ended). */
static void drop_bucket(qstate *s, uint32_t t)
{
    uint32_t seg = s->head[t];
    for (uint32_t left = s->size[t]; left > 0; left -= (left < SEG ? left : SEG)) {
        uint32_t nxt = s->next[seg];
        s->next[seg] = s->free_seg;
        s->free_seg = seg;
        seg = nxt;
    }
    s->size[t] = 0;
}

/* Called only with d < s->thr. */
HAM_INLINE void accept(qstate *s, uint32_t index, uint32_t d, const qstates *S)
{
    uint32_t sz = s->size[d];
    uint32_t seg;
    if ((sz & (SEG - 1u)) == 0) { /* bucket empty or its last segment full */
        if (s->free_seg != NIL) {
            seg = s->free_seg;
            s->free_seg = s->next[seg];
        } else {
            seg = s->bump++;
        }
        if (sz == 0) s->head[d] = seg;
        else s->next[s->tail[d]] = seg;
        s->tail[d] = seg;
    } else {
        seg = s->tail[d];
    }
    s->ent[(size_t)seg * SEG + (sz & (SEG - 1u))] = index;
    s->size[d] = sz + 1u;
    s->n_le++;
    /* Lower thr while at least k candidates are at distance <= thr - 1. */
    while (s->n_le - s->size[s->thr] >= S->k) {
        s->n_le -= s->size[s->thr];
        drop_bucket(s, s->thr);
        s->thr--;
    }
}

/* Write the k best, sorted by (distance, index): buckets 0..thr in order (the scan saw
 * at least k codes, so they hold at least k candidates). */
static void finish(const qstate *s, const qstates *S, int64_t *out_idx, int32_t *out_dist)
{
    uint32_t out = 0;
    for (uint32_t d = 0; d <= s->thr && out < S->k; ++d) {
        uint32_t take = S->k - out < s->size[d] ? S->k - out : s->size[d];
        uint32_t seg = s->head[d];
        for (uint32_t i = 0; i < take; ++i) {
            if (i > 0 && (i & (SEG - 1u)) == 0) seg = s->next[seg];
            out_idx[out] = (int64_t)s->ent[(size_t)seg * SEG + (i & (SEG - 1u))];
            out_dist[out] = (int32_t)d;
            ++out;
        }
    }
}

/* ------------------------------------------------------------------------------------ */
/* A job: what one call asks for                                                         */
/* ------------------------------------------------------------------------------------ */

enum { MODE_TOPK = 0, MODE_DIST = 1, MODE_COUNT = 2 };

typedef struct {
    int mode;
    const uint8_t *data; /* prepared database (aligned) */
    uint64_t n_db;
    uint32_t words, maxd;
    const uint64_t *queries; /* n_q x words, 8-byte aligned copy */
    uint64_t n_q;
    uint32_t k;          /* MODE_TOPK */
    uint32_t radius;     /* MODE_COUNT: count distances <= radius (radius <= maxd) */
    int64_t *out_idx;    /* MODE_TOPK: n_q x k */
    int32_t *out_dist;   /* MODE_TOPK: n_q x k */
    uint16_t *out_u16;   /* MODE_DIST: n_q x n_db */
    int64_t *out_count;  /* MODE_COUNT: n_q */
} job;

/* Queries per batch for top-k, bounded by the memory their candidate buffers take
 * (`budget` bytes), at least `min_batch`. */
static uint32_t topk_batch(const job *J, uint32_t cap_batch, size_t budget, uint32_t min_batch)
{
    size_t per_query = state_words(J->k, J->maxd, NULL) * sizeof(uint32_t);
    size_t qb = budget / per_query;
    if (qb < min_batch) qb = min_batch;
    if (qb < 1) qb = 1;
    if (qb > cap_batch) qb = cap_batch;
    return (uint32_t)qb;
}


/* ------------------------------------------------------------------------------------ */
/* Packed-layout kernels: portable C and scalar POPCNT                                   */
/* ------------------------------------------------------------------------------------ */

HAM_INLINE uint32_t popcount_swar(uint64_t x)
{
    x = x - ((x >> 1) & 0x5555555555555555ULL);
    x = (x & 0x3333333333333333ULL) + ((x >> 2) & 0x3333333333333333ULL);
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0FULL;
    return (uint32_t)((x * 0x0101010101010101ULL) >> 56);
}

/* `hw` is a compile-time constant after inlining: __builtin_popcountll becomes the POPCNT
 * instruction inside the target("popcnt") wrapper below, and is never used elsewhere (the
 * baseline x86-64 build would turn it into a libgcc call). */
HAM_INLINE uint32_t dist_packed(const uint64_t *a, const uint64_t *b, uint32_t words, const int hw)
{
    uint32_t d = 0;
    for (uint32_t w = 0; w < words; ++w) {
        uint64_t x = a[w] ^ b[w];
        d += hw ? (uint32_t)__builtin_popcountll(x) : popcount_swar(x);
    }
    return d;
}

HAM_INLINE int run_packed_body(const job *J, const int hw)
{
    const uint64_t *db = (const uint64_t *)J->data;
    const uint32_t W = J->words;
    const uint64_t n_db = J->n_db;
    /* Database rows per cache block. */
    uint64_t blk = HAM_BLOCK_BYTES / (8u * W);
    if (blk < 64) blk = 64;

    if (J->mode == MODE_DIST) {
        for (uint64_t q = 0; q < J->n_q; ++q) {
            const uint64_t *qq = J->queries + q * W;
            uint16_t *out = J->out_u16 + q * n_db;
            if (W == 1) {
                for (uint64_t i = 0; i < n_db; ++i) out[i] = (uint16_t)dist_packed(qq, db + i, 1, hw);
            } else {
                for (uint64_t i = 0; i < n_db; ++i) out[i] = (uint16_t)dist_packed(qq, db + i * W, W, hw);
            }
        }
        return 0;
    }
    if (J->mode == MODE_COUNT) {
        for (uint64_t q = 0; q < J->n_q; ++q) {
            const uint64_t *qq = J->queries + q * W;
            int64_t c = 0;
            for (uint64_t i = 0; i < n_db; ++i) c += dist_packed(qq, db + i * W, W, hw) <= J->radius;
            J->out_count[q] = c;
        }
        return 0;
    }

    uint32_t qb_max = topk_batch(J, HAM_QUERY_BATCH, HAM_STATE_BUDGET, 1);
    qstates S;
    if (states_alloc(&S, qb_max, J->k, J->maxd) < 0) return -1;
    for (uint64_t q0 = 0; q0 < J->n_q; q0 += qb_max) {
        uint32_t nqb = (uint32_t)((J->n_q - q0) < qb_max ? (J->n_q - q0) : qb_max);
        states_reset(&S, nqb);
        for (uint64_t b0 = 0; b0 < n_db; b0 += blk) {
            uint64_t b1 = b0 + blk < n_db ? b0 + blk : n_db;
            for (uint32_t q = 0; q < nqb; ++q) {
                qstate *s = &S.st[q];
                const uint64_t *qq = J->queries + (q0 + q) * W;
                if (W == 1) { /* the common case: one word, no inner loop */
                    const uint64_t qw = qq[0];
                    for (uint64_t i = b0; i < b1; ++i) {
                        uint32_t d = hw ? (uint32_t)__builtin_popcountll(qw ^ db[i]) : popcount_swar(qw ^ db[i]);
                        if (d < s->thr) accept(s, (uint32_t)i, d, &S);
                    }
                } else {
                    for (uint64_t i = b0; i < b1; ++i) {
                        uint32_t d = dist_packed(qq, db + i * W, W, hw);
                        if (d < s->thr) accept(s, (uint32_t)i, d, &S);
                    }
                }
            }
        }
        for (uint32_t q = 0; q < nqb; ++q)
            finish(&S.st[q], &S, J->out_idx + (q0 + q) * J->k, J->out_dist + (q0 + q) * J->k);
    }
    states_free(&S);
    return 0;
}

static int run_portable(const job *J) { return run_packed_body(J, 0); }

#if HAM_X86
__attribute__((target("popcnt"))) static int run_popcnt(const job *J) { return run_packed_body(J, 1); }
#endif

/* Packed layout: a plain copy of the packed codes (aligned). */
static void prepare_packed(const uint8_t *db, uint64_t n_db, uint32_t words, uint8_t *out)
{
    memcpy(out, db, (size_t)(n_db * words * 8u));
}

/* ------------------------------------------------------------------------------------ */
/* Nibble-sliced layout                                                                  */
/* ------------------------------------------------------------------------------------ */

/* Block b of 64 codes occupies 16 * words rows of 64 bytes, at data + b * 16 * words * 64;
 * byte i of row 16 * w + j is nibble j (bits 4j..4j+3) of word w of code 64 * b + i.
 * Codes past n_db are all-zero (their distances are masked off by the kernels). */

/* Word w of the 64 codes of block b, zero past n_db. */
static void gather_words(const uint8_t *db, uint64_t n_db, uint32_t words, uint64_t b, uint32_t w, uint64_t tmp[64])
{
    uint64_t n_here = n_db - b * 64u < 64u ? n_db - b * 64u : 64u;
    for (uint64_t i = 0; i < 64; ++i) {
        if (i < n_here) memcpy(&tmp[i], db + ((b * 64u + i) * words + w) * 8u, 8);
        else tmp[i] = 0;
    }
}

/* Portable: an 8 x 8 byte transpose in 64-bit registers (3 rounds of block swaps) turns 8
 * codes into byte b of each of them, then nibble masks split each byte into two rows. */
static void prepare_sliced(const uint8_t *db, uint64_t n_db, uint32_t words, uint8_t *out)
{
    const uint64_t nb = n_blocks64(n_db);
    uint64_t tmp[64];
    for (uint64_t b = 0; b < nb; ++b) {
        uint8_t *blk = out + b * 16u * words * 64u;
        for (uint32_t w = 0; w < words; ++w) {
            gather_words(db, n_db, words, b, w, tmp);
            for (int g = 0; g < 8; ++g) {
                uint64_t x[8];
                memcpy(x, tmp + 8 * g, sizeof(x));
                for (int i = 0; i < 4; ++i) { /* swap 4x4 blocks */
                    uint64_t t = ((x[i] >> 32) ^ x[i + 4]) & 0x00000000FFFFFFFFULL;
                    x[i] ^= t << 32;
                    x[i + 4] ^= t;
                }
                for (int i = 0; i < 8; i += (i & 1) ? 3 : 1) { /* i = 0, 1, 4, 5: 2x2 blocks */
                    uint64_t t = ((x[i] >> 16) ^ x[i + 2]) & 0x0000FFFF0000FFFFULL;
                    x[i] ^= t << 16;
                    x[i + 2] ^= t;
                }
                for (int i = 0; i < 8; i += 2) { /* single bytes */
                    uint64_t t = ((x[i] >> 8) ^ x[i + 1]) & 0x00FF00FF00FF00FFULL;
                    x[i] ^= t << 8;
                    x[i + 1] ^= t;
                }
                /* x[k]: byte i = byte k of code 8g + i; nibbles 2k and 2k + 1 of the codes */
                for (int k = 0; k < 8; ++k) {
                    uint64_t lo = x[k] & 0x0F0F0F0F0F0F0F0FULL, hi = (x[k] >> 4) & 0x0F0F0F0F0F0F0F0FULL;
                    memcpy(blk + (16u * w + 2u * k) * 64u + 8u * g, &lo, 8);
                    memcpy(blk + (16u * w + 2u * k + 1u) * 64u + 8u * g, &hi, 8);
                }
            }
        }
    }
}

/* Byte accumulators hold at most 4 * 16 * 3 = 192 per group of 3 words; codes of more
 * than 3 words ("wide") add each group into 16-bit accumulators. */
#define WORDS_PER_GROUP 3u

/* What a tile's caller passes down: the queries of one group (at most QT). */
typedef struct {
    const uint8_t *tabs[8]; /* per query of the group: its tables (QT <= 8) */
    int nq;                 /* real queries in the group (a partial group repeats its last) */
    const uint32_t *qids;   /* their row numbers in the caller's query array */
    qstate *st;             /* MODE_TOPK: their states */
    qstates *S;
} group;

#if HAM_X86 /* the SIMD kernels and their driver */

/* Query tables: 16 bytes per row r = 16 * w + j, entry x = popcount(nibble_j(q_w) ^ x). */
static void build_tables(const uint64_t *queries, const uint32_t *qids, uint32_t n, uint32_t words, uint8_t *tab)
{
    static const uint8_t pc4[16] = {0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4};
    for (uint32_t q = 0; q < n; ++q) {
        for (uint32_t w = 0; w < words; ++w) {
            uint64_t x = queries[(size_t)qids[q] * words + w];
            for (uint32_t j = 0; j < 16; ++j) {
                uint32_t nib = (uint32_t)((x >> (4u * j)) & 15u);
                uint8_t *t = tab + (((size_t)q * words + w) * 16u + j) * 16u;
                for (uint32_t v = 0; v < 16; ++v) t[v] = pc4[nib ^ v];
            }
        }
    }
}

/* Candidates of one block of 64 codes: bit i of m set means code base + i may qualify
 * (its distance d[i] is checked again here, against the threshold as it is now). */
HAM_NOINLINE void push8(qstate *s, const uint8_t *d, uint64_t m, uint32_t base, const qstates *S)
{
    do {
        int i = __builtin_ctzll(m);
        m &= m - 1u;
        if (d[i] < s->thr) accept(s, base + (uint32_t)i, d[i], S);
    } while (m);
}

HAM_NOINLINE void push16(qstate *s, const uint16_t *d, uint64_t m, uint32_t base, const qstates *S)
{
    do {
        int i = __builtin_ctzll(m);
        m &= m - 1u;
        if (d[i] < s->thr) accept(s, base + (uint32_t)i, d[i], S);
    } while (m);
}

/* Bit i set where code 64 * block + i exists. */
static uint64_t valid_mask(uint64_t n_db, uint64_t block)
{
    uint64_t rem = n_db - block * 64u;
    return rem >= 64u ? ~(uint64_t)0 : (((uint64_t)1 << rem) - 1u);
}

/* MODE_TOPK: the candidates of one query in one block of 64 codes, given the block's
 * distances as bytes (d8) or uint16 (d16) and the candidate mask m (!= 0). */
HAM_NOINLINE void push_block(const group *G, int q, uint64_t blk, const uint8_t *d8, const uint16_t *d16, uint64_t m)
{
    if (d8) push8(&G->st[q], d8, m, (uint32_t)(blk * 64u), G->S);
    else push16(&G->st[q], d16, m, (uint32_t)(blk * 64u), G->S);
}

#define T512 "avx512f,avx512bw,avx2,popcnt"

/* One tile: the group's queries x NC (<= CT) blocks of 64 codes, starting at block b. */
HAM_INLINE __attribute__((target(T512))) void tile512(const job *J, const group *G, uint64_t b, const int NC,
                                                      const int wide)
{
    const uint32_t W = J->words;
    const size_t block_bytes = (size_t)16u * W * 64u;
    const uint8_t *base = J->data + b * block_bytes;
    __m512i acc[HAM_QT512][HAM_CT512];
    __m512i lo16[HAM_QT512][HAM_CT512], hi16[HAM_QT512][HAM_CT512]; /* wide only */

    if (wide) {
#pragma GCC unroll 8
        for (int q = 0; q < HAM_QT512; ++q)
#pragma GCC unroll 8
            for (int c = 0; c < NC; ++c) lo16[q][c] = hi16[q][c] = _mm512_setzero_si512();
    }
    uint32_t w0 = 0;
    do { /* words >= 1: at least one group */
        const uint32_t r0 = 16u * w0;
        const uint32_t r1 = 16u * (w0 + WORDS_PER_GROUP < W ? w0 + WORDS_PER_GROUP : W);
#pragma GCC unroll 8
        for (int q = 0; q < HAM_QT512; ++q)
#pragma GCC unroll 8
            for (int c = 0; c < NC; ++c) acc[q][c] = _mm512_setzero_si512();
        /* The hot loop: per row, NC database loads, QT table loads, and QT*NC pairs of
         * VPSHUFB (look up 64 partial distances) + VPADDB (accumulate). */
        for (uint32_t r = r0; r < r1; ++r) {
            const uint8_t *row = base + (size_t)r * 64u;
            __m512i dv[HAM_CT512];
#pragma GCC unroll 8
            for (int c = 0; c < NC; ++c) dv[c] = _mm512_load_si512((const void *)(row + c * block_bytes));
#pragma GCC unroll 8
            for (int q = 0; q < HAM_QT512; ++q) {
                const __m512i t = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(G->tabs[q] + (size_t)r * 16u)));
#pragma GCC unroll 8
                for (int c = 0; c < NC; ++c) acc[q][c] = _mm512_add_epi8(acc[q][c], _mm512_shuffle_epi8(t, dv[c]));
            }
        }
        if (wide) {
#pragma GCC unroll 8
            for (int q = 0; q < HAM_QT512; ++q)
#pragma GCC unroll 8
                for (int c = 0; c < NC; ++c) {
                    lo16[q][c] = _mm512_add_epi16(lo16[q][c], _mm512_cvtepu8_epi16(_mm512_castsi512_si256(acc[q][c])));
                    hi16[q][c] = _mm512_add_epi16(hi16[q][c], _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(acc[q][c], 1)));
                }
        }
        w0 += WORDS_PER_GROUP;
    } while (w0 < W);

    /* Consume the tile: one compare per query and block finds the candidates. Blocks with
     * candidates are recorded without a branch (a branch per block mispredicts often: at
     * steady state about one block in ten has a candidate) and handled after the tile, in
     * database order per query. The thresholds used here may be stale by the pushes of
     * this tile; push8/push16 check each candidate again against the current one. */
    __m512i lim8[HAM_QT512], lim16[HAM_QT512];
    uint64_t count[HAM_QT512];
#pragma GCC unroll 8
    for (int q = 0; q < HAM_QT512; ++q) {
        uint32_t limit; /* candidates: distance < limit (limit <= maxd + 1 fits the lanes) */
        if (J->mode == MODE_TOPK) limit = G->st[q < G->nq ? q : 0].thr;
        else if (J->mode == MODE_COUNT) limit = J->radius + 1u;
        else limit = J->maxd + 1u; /* MODE_DIST: every code */
        if (!wide) lim8[q] = _mm512_set1_epi8((char)limit);
        else lim16[q] = _mm512_set1_epi16((short)limit);
        count[q] = 0;
    }
    union { uint8_t b[HAM_QT512 * HAM_CT512][64]; uint16_t w[HAM_QT512 * HAM_CT512][64]; } cand;
    uint64_t cmask[HAM_QT512 * HAM_CT512];
    uint8_t cq[HAM_QT512 * HAM_CT512], cc[HAM_QT512 * HAM_CT512];
    int n = 0;
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) {
        const uint64_t valid = valid_mask(J->n_db, b + (uint64_t)c);
#pragma GCC unroll 8
        for (int q = 0; q < HAM_QT512; ++q) {
            if (q >= G->nq) break;
            uint64_t m;
            if (!wide) {
                m = _mm512_cmplt_epu8_mask(acc[q][c], lim8[q]) & valid;
            } else {
                m = ((uint64_t)_mm512_cmplt_epu16_mask(lo16[q][c], lim16[q]) |
                     ((uint64_t)_mm512_cmplt_epu16_mask(hi16[q][c], lim16[q]) << 32)) & valid;
            }
            if (J->mode == MODE_COUNT) {
                count[q] += (uint64_t)__builtin_popcountll(m);
            } else if (J->mode == MODE_DIST) { /* m == valid: store the 64 distances */
                uint16_t *out = J->out_u16 + (uint64_t)G->qids[q] * J->n_db + (b + (uint64_t)c) * 64u;
                const __m512i l = wide ? lo16[q][c] : _mm512_cvtepu8_epi16(_mm512_castsi512_si256(acc[q][c]));
                const __m512i h = wide ? hi16[q][c] : _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(acc[q][c], 1));
                _mm512_mask_storeu_epi16((void *)out, (__mmask32)m, l); /* masked: no write past n_db */
                _mm512_mask_storeu_epi16((void *)(out + 32), (__mmask32)(m >> 32), h);
            } else {
                if (!wide) {
                    _mm512_storeu_si512((void *)cand.b[n], acc[q][c]);
                } else {
                    _mm512_storeu_si512((void *)cand.w[n], lo16[q][c]);
                    _mm512_storeu_si512((void *)(cand.w[n] + 32), hi16[q][c]);
                }
                cmask[n] = m;
                cq[n] = (uint8_t)q;
                cc[n] = (uint8_t)c;
                n += m != 0;
            }
        }
    }
    if (J->mode == MODE_COUNT) {
        for (int q = 0; q < G->nq; ++q) J->out_count[G->qids[q]] += (int64_t)count[q];
    }
    for (int i = 0; i < n; ++i)
        push_block(G, cq[i], b + cc[i], wide ? NULL : cand.b[i], wide ? cand.w[i] : NULL, cmask[i]);
}

HAM_INLINE __attribute__((target(T512))) void scan512_body(const job *J, const group *G, uint64_t b0, uint64_t b1,
                                                           const int wide)
{
    uint64_t b = b0;
    for (; b + HAM_CT512 <= b1; b += HAM_CT512) tile512(J, G, b, HAM_CT512, wide);
    for (; b < b1; ++b) tile512(J, G, b, 1, wide);
}

/* Scan blocks [b0, b1) of 64 codes for one group of queries. */
__attribute__((target(T512))) static void scan512(const job *J, const group *G, uint64_t b0, uint64_t b1)
{
    if (J->words <= WORDS_PER_GROUP) scan512_body(J, G, b0, b1, 0);
    else scan512_body(J, G, b0, b1, 1);
}

/* AVX-512: VPMOVQB narrows 8 words to their low bytes, so nibble row j of 8 codes is one
 * shift, one mask and one VPMOVQB. */
__attribute__((target(T512))) static void prepare_sliced512(const uint8_t *db, uint64_t n_db, uint32_t words,
                                                            uint8_t *out)
{
    const uint64_t nb = n_blocks64(n_db);
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    uint64_t tmp[64];
    for (uint64_t b = 0; b < nb; ++b) {
        uint8_t *blk = out + b * 16u * words * 64u;
        const int direct = words == 1 && (b + 1u) * 64u <= n_db; /* 64 contiguous codes */
        for (uint32_t w = 0; w < words; ++w) {
            const uint8_t *src = (const uint8_t *)tmp;
            if (direct) src = db + b * 64u * 8u;
            else gather_words(db, n_db, words, b, w, tmp);
            for (int g = 0; g < 8; ++g) {
                const __m512i x = _mm512_loadu_si512((const void *)(src + 64 * g));
                const __m512i lo = _mm512_and_si512(x, m4), hi = _mm512_and_si512(_mm512_srli_epi64(x, 4), m4);
                for (int k = 0; k < 8; ++k) {
                    _mm_storel_epi64((__m128i *)(blk + (16u * w + 2u * k) * 64u + 8u * g),
                                     _mm512_cvtepi64_epi8(_mm512_srli_epi64(lo, 8 * k)));
                    _mm_storel_epi64((__m128i *)(blk + (16u * w + 2u * k + 1u) * 64u + 8u * g),
                                     _mm512_cvtepi64_epi8(_mm512_srli_epi64(hi, 8 * k)));
                }
            }
        }
    }
}

/* ---- AVX2: the same algorithm on 256-bit vectors; a block of 64 codes is 2 vectors. ---- */

#define T256 "avx2,popcnt"

/* Bit i set where byte i of a (unsigned) is <= t: min(a, t) == a. */
HAM_INLINE __attribute__((target(T256))) uint32_t le_mask8(__m256i a, __m256i t)
{
    return (uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(_mm256_min_epu8(a, t), a));
}

/* Same for 2 x 16 uint16 lanes (codes 0..15 in a, 16..31 in b): 32 mask bits in order. */
HAM_INLINE __attribute__((target(T256))) uint32_t le_mask16(__m256i a, __m256i b, __m256i t)
{
    __m256i ca = _mm256_cmpeq_epi16(_mm256_min_epu16(a, t), a);
    __m256i cb = _mm256_cmpeq_epi16(_mm256_min_epu16(b, t), b);
    /* packs interleaves 128-bit lanes: [a0-7 b0-7 | a8-15 b8-15]; the permute restores order */
    __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi16(ca, cb), 0xD8);
    return (uint32_t)_mm256_movemask_epi8(p);
}

HAM_INLINE __attribute__((target(T256))) void tile256(const job *J, const group *G, uint64_t b, const int NC,
                                                      const int wide)
{
    const uint32_t W = J->words;
    const size_t block_bytes = (size_t)16u * W * 64u;
    const uint8_t *base = J->data + b * block_bytes;
    __m256i acc[HAM_QT256][HAM_CT256][2];
    __m256i a16[HAM_QT256][HAM_CT256][4]; /* wide only: 4 x 16 uint16 per block of 64 codes */

    if (wide) {
#pragma GCC unroll 8
        for (int q = 0; q < HAM_QT256; ++q)
#pragma GCC unroll 8
            for (int c = 0; c < NC; ++c)
#pragma GCC unroll 4
                for (int h = 0; h < 4; ++h) a16[q][c][h] = _mm256_setzero_si256();
    }
    uint32_t w0 = 0;
    do { /* words >= 1: at least one group */
        const uint32_t r0 = 16u * w0;
        const uint32_t r1 = 16u * (w0 + WORDS_PER_GROUP < W ? w0 + WORDS_PER_GROUP : W);
#pragma GCC unroll 8
        for (int q = 0; q < HAM_QT256; ++q)
#pragma GCC unroll 8
            for (int c = 0; c < NC; ++c) acc[q][c][0] = acc[q][c][1] = _mm256_setzero_si256();
        for (uint32_t r = r0; r < r1; ++r) {
            const uint8_t *row = base + (size_t)r * 64u;
            __m256i dv[HAM_CT256][2];
#pragma GCC unroll 8
            for (int c = 0; c < NC; ++c) {
                dv[c][0] = _mm256_load_si256((const __m256i *)(row + c * block_bytes));
                dv[c][1] = _mm256_load_si256((const __m256i *)(row + c * block_bytes + 32));
            }
#pragma GCC unroll 8
            for (int q = 0; q < HAM_QT256; ++q) {
                const __m256i t = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(G->tabs[q] + (size_t)r * 16u)));
#pragma GCC unroll 8
                for (int c = 0; c < NC; ++c) {
                    acc[q][c][0] = _mm256_add_epi8(acc[q][c][0], _mm256_shuffle_epi8(t, dv[c][0]));
                    acc[q][c][1] = _mm256_add_epi8(acc[q][c][1], _mm256_shuffle_epi8(t, dv[c][1]));
                }
            }
        }
        if (wide) {
#pragma GCC unroll 8
            for (int q = 0; q < HAM_QT256; ++q)
#pragma GCC unroll 8
                for (int c = 0; c < NC; ++c)
#pragma GCC unroll 2
                    for (int h = 0; h < 2; ++h) {
                        a16[q][c][2 * h] = _mm256_add_epi16(a16[q][c][2 * h], _mm256_cvtepu8_epi16(_mm256_castsi256_si128(acc[q][c][h])));
                        a16[q][c][2 * h + 1] = _mm256_add_epi16(a16[q][c][2 * h + 1], _mm256_cvtepu8_epi16(_mm256_extracti128_si256(acc[q][c][h], 1)));
                    }
        }
        w0 += WORDS_PER_GROUP;
    } while (w0 < W);

    /* Consume: as in tile512. AVX2 has no unsigned compare: d < limit is min(d, limit - 1)
     * == d, so limit 0 (top-k with k codes at distance 0) is handled apart. */
    __m256i lim8[HAM_QT256], lim16[HAM_QT256];
    int none[HAM_QT256];
    uint64_t count[HAM_QT256];
#pragma GCC unroll 8
    for (int q = 0; q < HAM_QT256; ++q) {
        uint32_t limit;
        if (J->mode == MODE_TOPK) limit = G->st[q < G->nq ? q : 0].thr;
        else if (J->mode == MODE_COUNT) limit = J->radius + 1u;
        else limit = J->maxd + 1u;
        none[q] = limit == 0;
        if (!wide) lim8[q] = _mm256_set1_epi8((char)(limit - 1u));
        else lim16[q] = _mm256_set1_epi16((short)(limit - 1u));
        count[q] = 0;
    }
    union { uint8_t b[HAM_QT256 * HAM_CT256][64]; uint16_t w[HAM_QT256 * HAM_CT256][64]; } cand;
    uint64_t cmask[HAM_QT256 * HAM_CT256];
    uint8_t cq[HAM_QT256 * HAM_CT256], cc[HAM_QT256 * HAM_CT256];
    int n = 0;
#pragma GCC unroll 8
    for (int c = 0; c < NC; ++c) {
        const uint64_t valid = valid_mask(J->n_db, b + (uint64_t)c);
#pragma GCC unroll 8
        for (int q = 0; q < HAM_QT256; ++q) {
            if (q >= G->nq) break;
            uint64_t m;
            if (!wide) {
                m = (uint64_t)le_mask8(acc[q][c][0], lim8[q]) | ((uint64_t)le_mask8(acc[q][c][1], lim8[q]) << 32);
            } else {
                m = (uint64_t)le_mask16(a16[q][c][0], a16[q][c][1], lim16[q]) |
                    ((uint64_t)le_mask16(a16[q][c][2], a16[q][c][3], lim16[q]) << 32);
            }
            m &= none[q] ? 0u : valid;
            if (J->mode == MODE_COUNT) {
                count[q] += (uint64_t)__builtin_popcountll(m);
            } else if (J->mode == MODE_DIST) {
                uint16_t *out = J->out_u16 + (uint64_t)G->qids[q] * J->n_db + (b + (uint64_t)c) * 64u;
                uint16_t tmp[64];
                uint16_t *dst = m == ~(uint64_t)0 ? out : tmp; /* a partial last block goes via tmp */
                for (int h = 0; h < 4; ++h) {
                    __m256i v;
                    if (!wide) {
                        const __m256i a = acc[q][c][h >> 1];
                        v = _mm256_cvtepu8_epi16((h & 1) ? _mm256_extracti128_si256(a, 1) : _mm256_castsi256_si128(a));
                    } else {
                        v = a16[q][c][h];
                    }
                    _mm256_storeu_si256((__m256i *)(dst + 16 * h), v);
                }
                if (dst == tmp) memcpy(out, tmp, (size_t)__builtin_popcountll(m) * sizeof(uint16_t));
            } else {
                if (!wide) {
                    _mm256_storeu_si256((__m256i *)cand.b[n], acc[q][c][0]);
                    _mm256_storeu_si256((__m256i *)(cand.b[n] + 32), acc[q][c][1]);
                } else {
                    for (int h = 0; h < 4; ++h) _mm256_storeu_si256((__m256i *)(cand.w[n] + 16 * h), a16[q][c][h]);
                }
                cmask[n] = m;
                cq[n] = (uint8_t)q;
                cc[n] = (uint8_t)c;
                n += m != 0;
            }
        }
    }
    if (J->mode == MODE_COUNT) {
        for (int q = 0; q < G->nq; ++q) J->out_count[G->qids[q]] += (int64_t)count[q];
    }
    for (int i = 0; i < n; ++i)
        push_block(G, cq[i], b + cc[i], wide ? NULL : cand.b[i], wide ? cand.w[i] : NULL, cmask[i]);
}

HAM_INLINE __attribute__((target(T256))) void scan256_body(const job *J, const group *G, uint64_t b0, uint64_t b1,
                                                           const int wide)
{
    uint64_t b = b0;
    for (; b + HAM_CT256 <= b1; b += HAM_CT256) tile256(J, G, b, HAM_CT256, wide);
    for (; b < b1; ++b) tile256(J, G, b, 1, wide);
}

__attribute__((target(T256))) static void scan256(const job *J, const group *G, uint64_t b0, uint64_t b1)
{
    if (J->words <= WORDS_PER_GROUP) scan256_body(J, G, b0, b1, 0);
    else scan256_body(J, G, b0, b1, 1);
}


/* ---- AVX-512 VPOPCNTQ: packed codes, one vector popcount per 8 code pairs. ----
 *
 * Layout: block b of 64 codes is 8 groups of 8 codes; group g holds `words` rows of 64 bytes,
 * row w = word w of its 8 codes (for 1-word codes: the packed codes as they are). A code's
 * distance is one VPXORQ + VPOPCNTQ per word, in a 64-bit lane.
 *
 * Top-k: per query and block, the 8 distance vectors are folded with VPMINUQ and compared
 * once with the query's threshold, and the 4 queries' compare masks of the block are stored
 * as one word, without a branch (at steady state about one block in ten has a candidate for
 * a given query, too often to predict). After a chunk of blocks, each query's flagged blocks
 * are found with a few vector tests, their distances computed again (the codes are still in
 * L1/L2) and the codes under the threshold pushed in database order. Count and distance
 * modes compare or store every distance vector.
 *
 * Measured (bench/search.py, 1M random 64-bit codes, top 1,000, 2-core AMD EPYC Zen 4 class):
 * the distance pass 10.5-10.8 G comparisons/s per core against the nibble-sliced kernel's
 * 8.9, top-k 9.3 against 6.7. */

#define TVP "avx512f,avx512bw,avx512vl,avx512vpopcntdq,avx2,popcnt"
#define HAM_QTVP 4 /* fixed: the top-k scan packs the 4 queries' masks of a block in one word */
/* Blocks per chunk, at most 64 (a query's flagged blocks of a chunk are one 64-bit mask):
 * the candidates of a chunk are pushed before the next chunk starts, so a threshold is at
 * most this many blocks stale (16, 32 and 64 measured the same). */
#define VP_CHUNK 64u
/* Top-k batches of this kernel keep their candidate state within a share of L2 (24 queries
 * at k = 1,000): with the sliced kernels' 96 queries the pushes waited on L2 misses (1 thread,
 * 1M codes, k = 1,000: top-k at 81 % of the distance pass with 96 queries a batch, 86-89 %
 * with 16-32). The packed layout streams half the bytes of the sliced one, so the extra
 * database passes of smaller batches cost it little; the sliced kernel lost with them. */
#ifndef HAM_VP_STATE_BUDGET
#define HAM_VP_STATE_BUDGET ((size_t)384u << 10)
#endif

/* Distances of the 8 codes of group c of the block at `blk` to query q (its words qw). */
HAM_INLINE __attribute__((target(TVP))) __m512i vp_dist(const uint8_t *blk, int c, const uint64_t *qw, uint32_t W,
                                                        const int one)
{
    if (one) return _mm512_popcnt_epi64(_mm512_xor_si512(_mm512_load_si512((const void *)(blk + 64 * c)),
                                                         _mm512_set1_epi64((long long)qw[0])));
    const uint8_t *g = blk + (size_t)c * W * 64u;
    __m512i d = _mm512_setzero_si512();
    for (uint32_t w = 0; w < W; ++w)
        d = _mm512_add_epi64(d, _mm512_popcnt_epi64(_mm512_xor_si512(_mm512_load_si512((const void *)(g + 64u * w)),
                                                                     _mm512_set1_epi64((long long)qw[w]))));
    return d;
}

/* Push the codes of block blk with distance < thr for query state s, in database order. */
HAM_INLINE __attribute__((target(TVP))) void vp_push_block(const job *J, qstate *s, const qstates *S,
                                                          const uint64_t *qw, uint64_t blk, const int one)
{
    const uint32_t W = J->words;
    const uint8_t *base = J->data + blk * 512u * W;
    const __m512i lim = _mm512_set1_epi64((long long)s->thr);
    __mmask8 k[8];
#pragma GCC unroll 8
    for (int c = 0; c < 8; ++c) k[c] = _mm512_cmplt_epu64_mask(vp_dist(base, c, qw, W, one), lim);
    const __mmask64 m64 = _mm512_kunpackd(
        _mm512_kunpackw(_mm512_kunpackb(k[7], k[6]), _mm512_kunpackb(k[5], k[4])),
        _mm512_kunpackw(_mm512_kunpackb(k[3], k[2]), _mm512_kunpackb(k[1], k[0])));
    uint64_t m = _cvtmask64_u64(m64) & valid_mask(J->n_db, blk);
    while (m) {
        const int i = __builtin_ctzll(m);
        m &= m - 1u;
        /* the code's distance again, from L1: word w of lane i % 8 of group i / 8 */
        const uint64_t *code = (const uint64_t *)(base + (size_t)(i >> 3) * W * 64u) + (i & 7);
        uint32_t d = 0;
        if (one) d = (uint32_t)__builtin_popcountll(code[0] ^ qw[0]);
        else
            for (uint32_t w = 0; w < W; ++w) d += (uint32_t)__builtin_popcountll(code[8u * w] ^ qw[w]);
        if (d < s->thr) accept(s, (uint32_t)(blk * 64u) + (uint32_t)i, d, S);
    }
}

HAM_INLINE __attribute__((target(TVP))) void scanvp_body(const job *J, const group *G, uint64_t b0, uint64_t b1,
                                                         const int one)
{
    const uint32_t W = J->words;
    const size_t block_bytes = (size_t)512u * W;
    const uint64_t *qw[HAM_QTVP];
#pragma GCC unroll 8
    for (int q = 0; q < HAM_QTVP; ++q) qw[q] = J->queries + (size_t)G->qids[q < G->nq ? q : G->nq - 1] * W;

    if (J->mode == MODE_COUNT || J->mode == MODE_DIST) {
        const __m512i r = _mm512_set1_epi64((long long)J->radius), ones = _mm512_set1_epi64(1);
        __m512i cnt[HAM_QTVP];
#pragma GCC unroll 8
        for (int q = 0; q < HAM_QTVP; ++q) cnt[q] = _mm512_setzero_si512();
        for (uint64_t b = b0; b < b1; ++b) {
            const uint8_t *base = J->data + b * block_bytes;
            const uint64_t valid = valid_mask(J->n_db, b);
#pragma GCC unroll 8
            for (int c = 0; c < 8; ++c) {
                const __mmask8 v = (__mmask8)(valid >> (8 * c));
#pragma GCC unroll 8
                for (int q = 0; q < HAM_QTVP; ++q) {
                    const __m512i d = vp_dist(base, c, qw[q], W, one);
                    if (J->mode == MODE_COUNT) {
                        cnt[q] = _mm512_mask_add_epi64(cnt[q], _mm512_mask_cmple_epu64_mask(v, d, r), cnt[q], ones);
                    } else if (q < G->nq) {
                        uint16_t *out = J->out_u16 + (uint64_t)G->qids[q] * J->n_db + b * 64u + 8u * (unsigned)c;
                        _mm_mask_storeu_epi16((void *)out, v, _mm512_cvtepi64_epi16(d));
                    }
                }
            }
        }
        if (J->mode == MODE_COUNT)
            for (int q = 0; q < G->nq; ++q) J->out_count[G->qids[q]] += (int64_t)_mm512_reduce_add_epi64(cnt[q]);
        return;
    }

    /* MODE_TOPK */
    uint32_t cm[VP_CHUNK] __attribute__((aligned(64))); /* per block: byte q = query q's lanes under limit */

    for (uint64_t c0 = b0; c0 < b1; c0 += VP_CHUNK) {
        const uint64_t c1 = c0 + VP_CHUNK < b1 ? c0 + VP_CHUNK : b1;
        __m512i lim[HAM_QTVP];
#pragma GCC unroll 8
        for (int q = 0; q < HAM_QTVP; ++q) lim[q] = _mm512_set1_epi64((long long)G->st[q < G->nq ? q : 0].thr);
        for (uint64_t b = c0; b < c1; ++b) {
            const uint8_t *base = J->data + b * block_bytes;
            __m512i m[HAM_QTVP];
#pragma GCC unroll 8
            for (int c = 0; c < 8; ++c) {
#pragma GCC unroll 8
                for (int q = 0; q < HAM_QTVP; ++q) {
                    const __m512i d = vp_dist(base, c, qw[q], W, one);
                    m[q] = c == 0 ? d : _mm512_min_epu64(m[q], d);
                }
            }
            /* the 4 queries' masks in one word, stored without a branch (a mask per query
             * moved to a general register and counted cost more) */
            const __mmask16 k01 = _mm512_kunpackb(_mm512_cmplt_epu64_mask(m[1], lim[1]),
                                                  _mm512_cmplt_epu64_mask(m[0], lim[0]));
            const __mmask16 k23 = _mm512_kunpackb(_mm512_cmplt_epu64_mask(m[3], lim[3]),
                                                  _mm512_cmplt_epu64_mask(m[2], lim[2]));
            cm[b - c0] = _cvtmask32_u32(_mm512_kunpackw(k23, k01));
        }
        /* Per query: the blocks of the chunk with a candidate, in order (16 words a test). */
        const uint32_t nb = (uint32_t)(c1 - c0);
        for (int q = 0; q < G->nq; ++q) {
            const __m512i sel = _mm512_set1_epi32((int)(0xFFu << (8 * q)));
            uint64_t bm = 0;
            for (uint32_t j = 0; j < nb; j += 16) {
                const __mmask16 in = nb - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (nb - j)) - 1u);
                bm |= (uint64_t)_mm512_test_epi32_mask(_mm512_maskz_loadu_epi32(in, (const void *)(cm + j)), sel) << j;
            }
            while (bm) {
                const int i = __builtin_ctzll(bm);
                bm &= bm - 1u;
                vp_push_block(J, &G->st[q], G->S, qw[q], c0 + (uint64_t)i, one);
            }
        }
    }
}

__attribute__((target(TVP))) static void scanvp(const job *J, const group *G, uint64_t b0, uint64_t b1)
{
    if (J->words == 1) scanvp_body(J, G, b0, b1, 1);
    else scanvp_body(J, G, b0, b1, 0);
}

/* Layout above: word w of code i at group i / 8, row w, lane i % 8; padding codes are 0. */
static void prepare_vpop(const uint8_t *db, uint64_t n_db, uint32_t W, uint8_t *out)
{
    const uint64_t padded = n_blocks64(n_db) * 64u;
    if (W == 1) {
        memcpy(out, db, (size_t)(n_db * 8u));
        memset(out + n_db * 8u, 0, (size_t)((padded - n_db) * 8u));
        return;
    }
    memset(out, 0, (size_t)(padded * W * 8u));
    uint64_t *o = (uint64_t *)out;
    for (uint64_t i = 0; i < n_db; ++i) {
        for (uint32_t w = 0; w < W; ++w) {
            uint64_t x;
            memcpy(&x, db + (i * W + w) * 8u, 8u);
            o[((i / 8u) * W + w) * 8u + (i % 8u)] = x;
        }
    }
}

/* ---- Driver of the SIMD kernels (portable C; the ISA lives in `scan`). ---- */

typedef void (*scan_fn)(const job *J, const group *G, uint64_t b0, uint64_t b1);

/* What the driver needs to know of a SIMD kernel. */
typedef struct {
    scan_fn scan;
    int QT;                /* queries per group */
    size_t bytes_per_word; /* prepared bytes per word of a block of 64 codes */
    int tables;            /* the scan reads nibble tables (the sliced kernels) */
    size_t state_budget;   /* top-k: bytes of candidate state per batch of queries */
    int prefetch;          /* prefetch the next range of the database into L2 while scanning */
} kdesc;

/* Threshold estimate. Starting a query's scan at thr = T + 1 instead of maxd + 1 gives the
 * same result whenever at least k codes are at distance <= T, and accepts far fewer
 * candidates on the way: with a running threshold, a scan of n codes in random order
 * accepts about k * (1 + ln(n / k)) of them (6,300 for k = 1,000 of 1M random 64-bit
 * codes; with a good T about 1,500), and each costs tens of cycles. T is the `need`-th
 * smallest distance in a sample of the database (evenly spaced blocks of 64 codes, 1/16 of
 * it, at most SAMPLE_MAX_BLOCKS blocks), found by the same top-k scan with k = need, where
 * `need` is the expected count of sample codes among the k nearest plus 2.5 standard
 * deviations. A query whose scan then finds fewer than k codes at distance <= T (rare:
 * an unlucky sample, or a database in adversarial order) is scanned again without an
 * estimate: exactness never depends on the sample. */
#define SAMPLE_MAX_BLOCKS 256u
#define SAMPLE_MIN_BLOCKS 16u

static uint64_t sample_blocks(const job *J)
{
    uint64_t sb = J->n_db / 64u / 16u;
    return sb > SAMPLE_MAX_BLOCKS ? SAMPLE_MAX_BLOCKS : sb;
}

/* 0: no useful estimate (sample too small, or k too large a share of the database). */
static uint32_t sample_need(const job *J, uint64_t sb)
{
    if (sb < SAMPLE_MIN_BLOCKS) return 0;
    double codes = (double)(sb * 64u);
    double mean = codes * (double)J->k / (double)J->n_db;
    double need = mean + 2.5 * __builtin_sqrt(mean) + 2.0;
    return need > codes / 4.0 ? 0u : (uint32_t)need + 1u;
}

typedef struct {
    uint8_t *tab;       /* qb x rows x 16 query tables */
    qstates S;          /* top-k states of a batch */
    qstates Ssmp;       /* states of the sample scan (k = need) */
    job smp;            /* the sample as a job of its own */
    uint8_t *smp_data;  /* its blocks, copied (aligned) */
    uint32_t *redo;     /* queries to scan again without an estimate */
    uint64_t n_redo;
} workspace;

static void process_batch(const job *J, const kdesc *K, workspace *ws, const uint32_t *qids, uint32_t nqb,
                          int estimate)
{
    const uint32_t W = J->words;
    const size_t rows = 16u * W;
    const uint64_t nb = n_blocks64(J->n_db);
    const size_t block_bytes = K->bytes_per_word * W;
    const scan_fn scan = K->scan;
    const int QT = K->QT;
    uint64_t blk = HAM_BLOCK_BYTES / block_bytes;
    if (blk < 8) blk = 8;
    group G;
    memset(&G, 0, sizeof(G));

    if (K->tables) build_tables(J->queries, qids, nqb, W, ws->tab);
    if (J->mode == MODE_TOPK) states_reset(&ws->S, nqb);
    if (J->mode == MODE_COUNT)
        for (uint32_t q = 0; q < nqb; ++q) J->out_count[qids[q]] = 0;

#define FOR_GROUPS(SS, BODY)                                                                 \
    for (uint32_t qg = 0; qg < nqb; qg += (uint32_t)QT) {                                    \
        G.nq = (int)(nqb - qg < (uint32_t)QT ? nqb - qg : (uint32_t)QT);                     \
        for (int q = 0; q < QT && K->tables; ++q) /* a partial group repeats its last query */ \
            G.tabs[q] = ws->tab + (size_t)(qg + (uint32_t)(q < G.nq ? q : G.nq - 1)) * rows * 16u; \
        G.qids = qids + qg;                                                                  \
        G.S = (SS);                                                                          \
        G.st = (SS)->st ? (SS)->st + qg : NULL;                                              \
        BODY;                                                                                \
    }

    if (J->mode == MODE_TOPK && estimate) {
        const uint64_t sb = n_blocks64(ws->smp.n_db);
        states_reset(&ws->Ssmp, nqb);
        FOR_GROUPS(&ws->Ssmp, scan(&ws->smp, &G, 0, sb))
        for (uint32_t q = 0; q < nqb; ++q) {
            /* the sample scan saw more than need codes, so its thr is the need-th distance */
            uint32_t t = ws->Ssmp.st[q].thr + 1u;
            if (t < ws->S.st[q].thr) ws->S.st[q].thr = t;
        }
    }

    /* While the groups scan one range of blocks (from L2), each also prefetches its share
     * of the next range into L2: streaming a range from L3 or memory costs about three L2
     * passes, which the prefetches hide behind the computation. The VPOPCNTQ kernel does
     * not: its packed layout streams half the bytes, and the hardware prefetcher kept up
     * (without the prefetches its top-k ran 5 % faster at 1M codes and 14 % at 10M, its
     * count pass 1-5 %; 2-core AMD EPYC, Zen 4 class). */
    const uint32_t ngroups = (nqb + (uint32_t)QT - 1u) / (uint32_t)QT;
    for (uint64_t b0 = 0; b0 < nb; b0 += blk) {
        const uint64_t b1 = b0 + blk < nb ? b0 + blk : nb;
        const uint64_t b2 = b1 + blk < nb ? b1 + blk : nb;
        const size_t next_bytes = (size_t)(b2 - b1) * block_bytes;
        const size_t share = (next_bytes / ngroups + 63u) & ~(size_t)63u;
        const uint8_t *next = J->data + b1 * block_bytes;
        FOR_GROUPS(&ws->S, {
            scan(J, &G, b0, b1);
            const size_t from = (size_t)(qg / (uint32_t)QT) * share;
            if (K->prefetch) for (size_t o = from; o < from + share && o < next_bytes; o += 64u) __builtin_prefetch(next + o, 0, 2);
        })
    }
#undef FOR_GROUPS

    if (J->mode == MODE_TOPK) {
        for (uint32_t q = 0; q < nqb; ++q) {
            const qstate *s = &ws->S.st[q];
            if (s->n_le < J->k) ws->redo[ws->n_redo++] = qids[q]; /* the estimate was too low */
            else finish(s, &ws->S, J->out_idx + (uint64_t)qids[q] * J->k, J->out_dist + (uint64_t)qids[q] * J->k);
        }
    }
}

static int run_simd(const job *J, const kdesc *K)
{
    const size_t rows = 16u * J->words;
    const size_t block_bytes = K->bytes_per_word * J->words;
    uint32_t qb = J->mode == MODE_TOPK ? topk_batch(J, HAM_QUERY_BATCH, K->state_budget, (uint32_t)K->QT) : HAM_QUERY_BATCH;
    int rc = -1;
    workspace ws;
    memset(&ws, 0, sizeof(ws));
    void *smp_mem = NULL;
    uint32_t *qids = (uint32_t *)malloc((size_t)qb * sizeof(uint32_t));
    ws.tab = K->tables ? (uint8_t *)malloc((size_t)qb * rows * 16u) : NULL;
    if (!qids || (K->tables && !ws.tab)) goto out;
    const uint64_t sb = J->mode == MODE_TOPK ? sample_blocks(J) : 0;
    const uint32_t need = sb ? sample_need(J, sb) : 0;
    const int estimate = need > 0;
    if (J->mode == MODE_TOPK) {
        if (states_alloc(&ws.S, qb, J->k, J->maxd) < 0) goto out;
        ws.redo = (uint32_t *)malloc((size_t)(J->n_q > 0 ? J->n_q : 1) * sizeof(uint32_t));
        if (!ws.redo) goto out;
    }
    if (estimate) {
        const uint64_t full = J->n_db / 64u;
        smp_mem = malloc((size_t)(sb * block_bytes + 64u));
        if (!smp_mem || states_alloc(&ws.Ssmp, qb, need, J->maxd) < 0) goto out;
        ws.smp_data = (uint8_t *)(((uintptr_t)smp_mem + 63u) & ~(uintptr_t)63u);
        for (uint64_t i = 0; i < sb; ++i)
            memcpy(ws.smp_data + i * block_bytes, J->data + (i * full / sb) * block_bytes, block_bytes);
        ws.smp = *J;
        ws.smp.data = ws.smp_data;
        ws.smp.n_db = sb * 64u;
        ws.smp.k = need;
    }
    /* Batches of equal size, in whole groups where they can be (a partial group scans as
     * many queries as a full one). */
    if (qb > (uint32_t)K->QT) qb -= qb % (uint32_t)K->QT;
    const uint64_t n_batches = (J->n_q + qb - 1u) / qb;
    uint32_t per = n_batches ? (uint32_t)((J->n_q + n_batches - 1u) / n_batches) : qb;
    per = (per + (uint32_t)K->QT - 1u) / (uint32_t)K->QT * (uint32_t)K->QT;
    if (per > qb) per = qb;
    for (uint64_t q0 = 0; q0 < J->n_q; q0 += per) {
        uint32_t nqb = (uint32_t)(J->n_q - q0 < per ? J->n_q - q0 : per);
        for (uint32_t q = 0; q < nqb; ++q) qids[q] = (uint32_t)(q0 + q);
        process_batch(J, K, &ws, qids, nqb, estimate);
    }
    /* Queries whose estimate failed: again, with no estimate (this adds none to redo). */
    for (uint64_t r0 = 0, n_redo = ws.n_redo; r0 < n_redo; r0 += qb) {
        uint32_t nqb = (uint32_t)(n_redo - r0 < qb ? n_redo - r0 : qb);
        memcpy(qids, ws.redo + r0, (size_t)nqb * sizeof(uint32_t));
        process_batch(J, K, &ws, qids, nqb, 0);
    }
    rc = 0;
#ifdef HAM_DEBUG
    fprintf(stderr, "run_simd: n_q=%llu estimate=%d need=%u sample_blocks=%llu redo=%llu\n", (unsigned long long)J->n_q,
            estimate, need, (unsigned long long)sb, (unsigned long long)ws.n_redo);
#endif
out:
    states_free(&ws.S);
    states_free(&ws.Ssmp);
    free(smp_mem);
    free(ws.redo);
    free(ws.tab);
    free(qids);
    return rc;
}

#endif /* HAM_X86 */

static int run_kernel(int kernel, const job *J)
{
    switch (kernel) {
#if HAM_X86
    case K_VPOP: {
        static const kdesc K = {scanvp, HAM_QTVP, 512u, 0, HAM_VP_STATE_BUDGET, 0};
        return run_simd(J, &K);
    }
    case K_AVX512: {
        static const kdesc K = {scan512, HAM_QT512, 1024u, 1, HAM_STATE_BUDGET, 1};
        return run_simd(J, &K);
    }
    case K_AVX2: {
        static const kdesc K = {scan256, HAM_QT256, 1024u, 1, HAM_STATE_BUDGET, 1};
        return run_simd(J, &K);
    }
    case K_POPCNT: return run_popcnt(J);
#endif
    default: return run_portable(J);
    }
}


/* Stable counting sort of one query's distances d[0..n) (values <= maxd), keeping the first
 * k: out in (distance, index) order. h: scratch for 4 * (maxd + 1) counters (four partial
 * histograms, so that runs of equal distances do not serialise on one counter). */
static void dense_select(const uint16_t *d, uint64_t n, uint32_t maxd, uint32_t k, uint32_t *h, int64_t *out_idx,
                         int32_t *out_dist)
{
    const uint32_t nb = maxd + 1u;
    memset(h, 0, 4u * nb * sizeof(uint32_t));
    uint64_t i = 0;
    for (; i + 4u <= n; i += 4u) {
        h[d[i]]++;
        h[nb + d[i + 1u]]++;
        h[2u * nb + d[i + 2u]]++;
        h[3u * nb + d[i + 3u]]++;
    }
    for (; i < n; ++i) h[d[i]]++;
    uint32_t pos = 0;
    for (uint32_t v = 0; v < nb; ++v) {
        const uint32_t c = h[v] + h[nb + v] + h[2u * nb + v] + h[3u * nb + v];
        h[v] = pos; /* first output slot of distance v */
        pos += c;
    }
    int64_t sink_i;
    int32_t sink_d;
    for (i = 0; i < n; ++i) { /* branch-free: codes past the k-th go to a sink */
        const uint32_t v = d[i], p = h[v], keep = p < k;
        *(keep ? &out_idx[p] : &sink_i) = (int64_t)i;
        *(keep ? &out_dist[p] : &sink_d) = (int32_t)v;
        h[v] = p + keep;
    }
}

/* Dense top-k, for k a large share of the database (5 k >= n_db): there a running
 * threshold would accept most codes one at a time. Instead, a batch of queries gets all
 * its distances (the kernel's MODE_DIST scan), then each query a counting sort: a few
 * cycles per code, whatever k. */
static int run_dense(int kernel, const job *J)
{
    const uint64_t n = J->n_db;
    uint64_t qb = HAM_STATE_BUDGET / (n * sizeof(uint16_t));
    qb = qb < 1 ? 1 : (qb > HAM_QUERY_BATCH ? HAM_QUERY_BATCH : qb);
    uint16_t *dist = (uint16_t *)malloc((size_t)(qb * n) * sizeof(uint16_t));
    uint32_t *h = (uint32_t *)malloc(4u * (J->maxd + 1u) * sizeof(uint32_t));
    int rc = -1;
    if (!dist || !h) goto out;
    for (uint64_t q0 = 0; q0 < J->n_q; q0 += qb) {
        job D = *J;
        D.mode = MODE_DIST;
        D.queries = J->queries + q0 * J->words;
        D.n_q = J->n_q - q0 < qb ? J->n_q - q0 : qb;
        D.out_u16 = dist;
        if (run_kernel(kernel, &D) < 0) goto out;
        for (uint64_t q = 0; q < D.n_q; ++q)
            dense_select(dist + q * n, n, J->maxd, J->k, h, J->out_idx + (q0 + q) * J->k, J->out_dist + (q0 + q) * J->k);
    }
    rc = 0;
out:
    free(dist);
    free(h);
    return rc;
}

static int run_job(int kernel, const job *J)
{
    if (J->mode == MODE_TOPK && HAM_DENSE_FACTOR * (uint64_t)J->k >= J->n_db) return run_dense(kernel, J);
    return run_kernel(kernel, J);
}

/* ------------------------------------------------------------------------------------ */
/* Python bindings                                                                       */
/* ------------------------------------------------------------------------------------ */

static int parse_kernel(PyObject *name)
{
    const char *s = PyUnicode_AsUTF8(name);
    if (!s) return -1;
    int k = dpfah_kernel_by_name(s, HAM_BUILT);
    if (k == -2) PyErr_Format(PyExc_ValueError, "kernel %s is not supported on this CPU", s);
    else if (k < 0) PyErr_Format(PyExc_ValueError, "unknown kernel %R (choose from kernels())", name);
    return k < 0 ? -1 : k;
}

static PyObject *py_kernels(PyObject *self, PyObject *noargs)
{
    (void)self;
    (void)noargs;
    PyObject *t = PyTuple_New(0);
    for (int k = K_COUNT - 1; k >= 0 && t; --k) {
        if (!kernel_available[k]) continue;
        PyObject *s = PyUnicode_FromString(kernel_names[k]);
        if (!s || _PyTuple_Resize(&t, PyTuple_GET_SIZE(t) + 1) < 0) {
            Py_XDECREF(s);
            Py_XDECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, PyTuple_GET_SIZE(t) - 1, s);
    }
    return t;
}

static PyObject *py_get_kernel(PyObject *self, PyObject *noargs)
{
    (void)self;
    (void)noargs;
    return PyUnicode_FromString(kernel_names[current_kernel]);
}

static PyObject *py_set_kernel(PyObject *self, PyObject *arg)
{
    (void)self;
    if (!PyUnicode_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "set_kernel() expects a kernel name (str)");
        return NULL;
    }
    int k = parse_kernel(arg);
    if (k < 0) return NULL;
    PyObject *prev = PyUnicode_FromString(kernel_names[current_kernel]);
    if (!prev) return NULL;
    current_kernel = k;
    return prev;
}

static int check_words(long long words)
{
    if (words < 1 || (unsigned long long)words > MAX_WORDS) {
        PyErr_Format(PyExc_ValueError, "words must be in 1..%u, got %lld", MAX_WORDS, words);
        return -1;
    }
    return 0;
}

static PyObject *py_prepared_size(PyObject *self, PyObject *args)
{
    (void)self;
    long long n_db, words;
    if (!PyArg_ParseTuple(args, "LL:prepared_size", &n_db, &words)) return NULL;
    if (check_words(words) < 0) return NULL;
    if (n_db < 0 || (unsigned long long)n_db > 0xFFFFFFFFull) {
        PyErr_Format(PyExc_ValueError, "n_db must be in 0..2**32-1, got %lld", n_db);
        return NULL;
    }
    uint64_t size = PREP_HEADER + 64u + data_bytes(current_kernel, (uint64_t)n_db, (uint32_t)words);
    return PyLong_FromUnsignedLongLong(size);
}

static PyObject *py_prepare(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer db, out;
    long long words;
    if (!PyArg_ParseTuple(args, "y*Lw*:prepare", &db, &words, &out)) return NULL;
    PyObject *ret = NULL;
    if (check_words(words) < 0) goto done;
    if (db.len % (8 * words) != 0) {
        PyErr_Format(PyExc_ValueError, "database buffer of %zd bytes is not a whole number of %lld-word codes", db.len, words);
        goto done;
    }
    {
        uint64_t n_db = (uint64_t)db.len / (8u * (uint64_t)words);
        if (n_db > 0xFFFFFFFFull) {
            PyErr_SetString(PyExc_ValueError, "at most 2**32-1 database codes are supported");
            goto done;
        }
        int kernel = current_kernel;
        uint64_t need = PREP_HEADER + 64u + data_bytes(kernel, n_db, (uint32_t)words);
        if ((uint64_t)out.len < need) {
            PyErr_Format(PyExc_ValueError, "output buffer too small: %zd bytes, need %llu (prepared_size)", out.len,
                         (unsigned long long)need);
            goto done;
        }
        uint8_t *buf = (uint8_t *)out.buf;
        uint8_t *data = prep_data(buf);
        prep_header h = {PREP_MAGIC, (uint32_t)kernel, n_db, (uint32_t)words, (uint32_t)(data - buf)};
        const uint8_t *src = (const uint8_t *)db.buf;
        Py_BEGIN_ALLOW_THREADS
#if HAM_X86
        if (kernel == K_AVX512) prepare_sliced512(src, n_db, (uint32_t)words, data);
        else if (kernel == K_VPOP) prepare_vpop(src, n_db, (uint32_t)words, data);
        else
#endif
        if (kernel_is_sliced(kernel)) prepare_sliced(src, n_db, (uint32_t)words, data);
        else prepare_packed(src, n_db, (uint32_t)words, data);
        Py_END_ALLOW_THREADS
        memcpy(buf, &h, sizeof(h));
    }
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&db);
    PyBuffer_Release(&out);
    return ret;
}

/* Validate a prepared buffer and a query buffer; fill the common part of a job and
 * return a malloc'd aligned copy of the queries (or NULL with an exception set). */
static uint64_t *setup_job(job *J, int *kernel, const Py_buffer *prep, const Py_buffer *queries)
{
    prep_header h;
    memset(J, 0, sizeof(*J));
    if ((size_t)prep->len < PREP_HEADER + 64u) {
        PyErr_SetString(PyExc_ValueError, "prepared buffer too small: not made by prepare()");
        return NULL;
    }
    memcpy(&h, prep->buf, sizeof(h));
    if (h.magic != PREP_MAGIC || h.kernel >= K_COUNT || !kernel_available[h.kernel] || h.words < 1 ||
        h.words > MAX_WORDS) {
        PyErr_SetString(PyExc_ValueError, "prepared buffer not made by prepare()");
        return NULL;
    }
    uint8_t *data = prep_data((uint8_t *)prep->buf);
    if ((uint32_t)(data - (uint8_t *)prep->buf) != h.offset) {
        PyErr_SetString(PyExc_ValueError, "prepared buffer was copied to a differently aligned address: prepare again");
        return NULL;
    }
    if ((uint64_t)h.offset + data_bytes((int)h.kernel, h.n_db, h.words) > (uint64_t)prep->len) {
        PyErr_SetString(PyExc_ValueError, "prepared buffer truncated");
        return NULL;
    }
    if (queries->len % (8 * (Py_ssize_t)h.words) != 0) {
        PyErr_Format(PyExc_ValueError, "query buffer of %zd bytes is not a whole number of %u-word codes "
                     "(the database was prepared with %u words per code)", queries->len, h.words, h.words);
        return NULL;
    }
    if ((uint64_t)queries->len / (8u * h.words) > 0xFFFFFFFFull) {
        PyErr_SetString(PyExc_ValueError, "at most 2**32-1 queries per call");
        return NULL;
    }
    *kernel = (int)h.kernel;
    J->data = data;
    J->n_db = h.n_db;
    J->words = h.words;
    J->maxd = 64u * h.words;
    J->n_q = (uint64_t)queries->len / (8u * h.words);
    uint64_t *q = (uint64_t *)malloc(queries->len > 0 ? (size_t)queries->len : 8u);
    if (!q) {
        PyErr_NoMemory();
        return NULL;
    }
    memcpy(q, queries->buf, (size_t)queries->len);
    J->queries = q;
    return q;
}

static int check_out(const Py_buffer *b, uint64_t need_bytes, size_t align, const char *what)
{
    if ((uint64_t)b->len != need_bytes) {
        PyErr_Format(PyExc_ValueError, "%s buffer has %zd bytes, expected %llu", what, b->len, (unsigned long long)need_bytes);
        return -1;
    }
    if (((uintptr_t)b->buf) % align != 0) {
        PyErr_Format(PyExc_ValueError, "%s buffer is not %zu-byte aligned", what, align);
        return -1;
    }
    return 0;
}

static PyObject *finish_job(job *J, int kernel, uint64_t *qcopy)
{
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = run_job(kernel, J);
    Py_END_ALLOW_THREADS
    free(qcopy);
    if (rc < 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_topk(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer prep, queries, oi, od;
    long long k;
    if (!PyArg_ParseTuple(args, "y*y*Lw*w*:topk", &prep, &queries, &k, &oi, &od)) return NULL;
    PyObject *ret = NULL;
    job J;
    int kernel;
    uint64_t *qcopy = setup_job(&J, &kernel, &prep, &queries);
    if (!qcopy) goto done;
    if (k < 1 || (uint64_t)k > J.n_db) {
        PyErr_Format(PyExc_ValueError, "k must be in 1..n_db=%llu, got %lld", (unsigned long long)J.n_db, k);
        free(qcopy);
        goto done;
    }
    if (check_out(&oi, J.n_q * (uint64_t)k * 8u, 8, "out_idx (int64, n_q x k)") < 0 ||
        check_out(&od, J.n_q * (uint64_t)k * 4u, 4, "out_dist (int32, n_q x k)") < 0) {
        free(qcopy);
        goto done;
    }
    J.mode = MODE_TOPK;
    J.k = (uint32_t)k;
    J.out_idx = (int64_t *)oi.buf;
    J.out_dist = (int32_t *)od.buf;
    ret = finish_job(&J, kernel, qcopy);
done:
    PyBuffer_Release(&prep);
    PyBuffer_Release(&queries);
    PyBuffer_Release(&oi);
    PyBuffer_Release(&od);
    return ret;
}

static PyObject *py_distances(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer prep, queries, out;
    if (!PyArg_ParseTuple(args, "y*y*w*:distances", &prep, &queries, &out)) return NULL;
    PyObject *ret = NULL;
    job J;
    int kernel;
    uint64_t *qcopy = setup_job(&J, &kernel, &prep, &queries);
    if (!qcopy) goto done;
    if (check_out(&out, J.n_q * J.n_db * 2u, 2, "out (uint16, n_q x n_db)") < 0) {
        free(qcopy);
        goto done;
    }
    J.mode = MODE_DIST;
    J.out_u16 = (uint16_t *)out.buf;
    ret = finish_job(&J, kernel, qcopy);
done:
    PyBuffer_Release(&prep);
    PyBuffer_Release(&queries);
    PyBuffer_Release(&out);
    return ret;
}

static PyObject *py_count_within(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer prep, queries, out;
    long long radius;
    if (!PyArg_ParseTuple(args, "y*y*Lw*:count_within", &prep, &queries, &radius, &out)) return NULL;
    PyObject *ret = NULL;
    job J;
    int kernel;
    uint64_t *qcopy = setup_job(&J, &kernel, &prep, &queries);
    if (!qcopy) goto done;
    if (radius < 0) {
        PyErr_Format(PyExc_ValueError, "radius must be >= 0, got %lld", radius);
        free(qcopy);
        goto done;
    }
    if (check_out(&out, J.n_q * 8u, 8, "out_counts (int64, n_q)") < 0) {
        free(qcopy);
        goto done;
    }
    J.mode = MODE_COUNT;
    J.radius = radius > (long long)J.maxd ? J.maxd : (uint32_t)radius;
    J.out_count = (int64_t *)out.buf;
    ret = finish_job(&J, kernel, qcopy);
done:
    PyBuffer_Release(&prep);
    PyBuffer_Release(&queries);
    PyBuffer_Release(&out);
    return ret;
}

static PyMethodDef methods[] = {
    {"kernels", py_kernels, METH_NOARGS, "kernels() -> tuple of kernel names this CPU supports, fastest first."},
    {"get_kernel", py_get_kernel, METH_NOARGS, "get_kernel() -> name of the kernel prepare() uses."},
    {"set_kernel", py_set_kernel, METH_O,
     "set_kernel(name) -> previous name: use this kernel for later prepare() calls (tests, benchmarks)."},
    {"prepared_size", py_prepared_size, METH_VARARGS,
     "prepared_size(n_db, words) -> bytes prepare() needs for the current kernel."},
    {"prepare", py_prepare, METH_VARARGS,
     "prepare(db, words, out): lay out packed codes (n_db x words uint64, any bytes-like) for the current kernel "
     "into the writable buffer out (>= prepared_size bytes). GIL released."},
    {"topk", py_topk, METH_VARARGS,
     "topk(prepared, queries, k, out_idx, out_dist): exact k nearest codes of each query, sorted by (distance, "
     "database index); out_idx int64 and out_dist int32, both n_q x k, C order. GIL released."},
    {"distances", py_distances, METH_VARARGS,
     "distances(prepared, queries, out): all distances into out (uint16, n_q x n_db). GIL released."},
    {"count_within", py_count_within, METH_VARARGS,
     "count_within(prepared, queries, radius, out): out[q] = number of codes at distance <= radius (int64). "
     "GIL released."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_dpfah_hamming",
    "Exact Hamming-distance search kernels over packed binary codes (see dpfah.codes).", -1, methods,
    NULL, NULL, NULL, NULL,
};

/* Version of the Python-visible interface; dpfah.kernels refuses a module with another one
 * (a job's dpfah/ sources may be newer or older than the installed kernels). */
#define HAM_API_VERSION 1

PyMODINIT_FUNC PyInit__dpfah_hamming(void)
{
    const unsigned usable = dpfah_usable_kernels(HAM_BUILT);
    for (int k = 0; k < K_COUNT; ++k) kernel_available[k] = (usable & DPFAH_KBIT(k)) != 0;
    current_kernel = dpfah_select_kernel(HAM_BUILT);
    PyObject *m = PyModule_Create(&moduledef);
    if (m && PyModule_AddIntConstant(m, "API_VERSION", HAM_API_VERSION) < 0) Py_CLEAR(m);
    return m;
}
