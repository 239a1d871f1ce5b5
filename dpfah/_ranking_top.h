/*
 * dpfah/_ranking_top.h (included by _ranking.c): the top-K scan behind _dpfah_ranking.scan_top.
 *
 * mAP@R and the tie-aware mAP@R need only the items of the distances up to dcut, the first
 * distance whose items reach rank K (K = max of cutoffs and points). So per query:
 *
 *   collect (every item, distance first): items with d <= T are candidates; their keys
 *     (2 d + rel, the labels read for candidates only) are stored in index order and counted
 *     per distance. T starts from a guess (guess_t, from a sample of the items) and drops
 *     after each database tile while the candidates below it already reach K, so the counts
 *     stay exact for every d <= T. If T ends with fewer than K items at d <= T (the guess was
 *     too low), the query is collected again from T = bits.
 *   finish (candidates only): dcut from the counts, the histogram of the candidates with
 *     d <= dcut, then the same visits as scan's pass 2 (index order), so ap, nrel and
 *     relcount are bit for bit those of scan. hist is exact for d <= dcut and 0 beyond (all
 *     a tie-aware AP@K needs).
 *
 * The AVX-512 collect tests 64 items per step (nibble-lookup popcount, as keys_avx512_w1)
 * and touches a candidate only where the 64-bit mask has a bit set; the other families run
 * the scalar loop (POPCNT or plain C).
 */

#if defined(__GNUC__) || defined(__clang__)
#define PREFETCH(p) __builtin_prefetch((p), 0, 3)
#else
#define PREFETCH(p) ((void)(p))
#endif

typedef void (*collect_fn)(const uint64_t *q, const uint64_t *ql, const uint64_t *dc, const uint64_t *dl,
                           Py_ssize_t t0, Py_ssize_t n, Py_ssize_t W, Py_ssize_t L, unsigned T, uint16_t *keys,
                           Py_ssize_t *cn, uint32_t *cnt);

/* key = 2 d + rel of candidate i (its labels are read here only) */
FORCE_INLINE uint16_t cand_key(const uint64_t *ql, const uint64_t *dl, Py_ssize_t i, Py_ssize_t L, unsigned d)
{
    uint64_t any = 0;
    for (Py_ssize_t w = 0; w < L; w++) any |= ql[w] & dl[i * L + w];
    return (uint16_t)(2u * d + (any != 0));
}

FORCE_INLINE void collect_scalar(const uint64_t *q, const uint64_t *ql, const uint64_t *dc, const uint64_t *dl,
                                 Py_ssize_t t0, Py_ssize_t n, Py_ssize_t W, Py_ssize_t L, unsigned T, uint16_t *keys,
                                 Py_ssize_t *cnp, uint32_t *cnt)
{
    Py_ssize_t cn = *cnp;
    for (Py_ssize_t i = t0; i < t0 + n; i++) {
        unsigned d = 0;
        for (Py_ssize_t w = 0; w < W; w++) d += POPCOUNT64(q[w] ^ dc[i * W + w]);
        if (d <= T) {
            keys[cn++] = cand_key(ql, dl, i, L, d);
            cnt[d]++;
        }
    }
    *cnp = cn;
}

/* the scalar loop with W = 1 and L = 1, 2 specialised */
FORCE_INLINE void collect_any(const uint64_t *q, const uint64_t *ql, const uint64_t *dc, const uint64_t *dl,
                              Py_ssize_t t0, Py_ssize_t n, Py_ssize_t W, Py_ssize_t L, unsigned T, uint16_t *keys,
                              Py_ssize_t *cn, uint32_t *cnt)
{
    if (W == 1 && L == 1)
        collect_scalar(q, ql, dc, dl, t0, n, 1, 1, T, keys, cn, cnt);
    else if (W == 1 && L == 2)
        collect_scalar(q, ql, dc, dl, t0, n, 1, 2, T, keys, cn, cnt);
    else
        collect_scalar(q, ql, dc, dl, t0, n, W, L, T, keys, cn, cnt);
}

#define DEFINE_COLLECT(SUFFIX, ATTR)                                                                          \
    ATTR static NOINLINE void collect_##SUFFIX(const uint64_t *q, const uint64_t *ql, const uint64_t *dc,       \
                                               const uint64_t *dl, Py_ssize_t t0, Py_ssize_t n, Py_ssize_t W,    \
                                               Py_ssize_t L, unsigned T, uint16_t *keys, Py_ssize_t *cn,         \
                                               uint32_t *cnt)                                                   \
    {                                                                                                         \
        collect_any(q, ql, dc, dl, t0, n, W, L, T, keys, cn, cnt);                                            \
    }

DEFINE_COLLECT(portable, )

#ifdef DPFAH_X86_DISPATCH
DEFINE_COLLECT(popcnt, DPFAH_POPCNT)

/* popcount of each 64-bit lane: nibble lookup (any AVX-512BW CPU) or VPOPCNTQ */
#define DPFAH_AVX512_VPOPCNT __attribute__((target("avx512f,avx512bw,popcnt,avx512vpopcntdq")))
typedef __m512i (*popcnt512_fn)(__m512i);
DPFAH_AVX512 FORCE_INLINE __m512i popcnt512_lut(__m512i x)
{
    const __m512i lut = _mm512_broadcast_i32x4(_mm_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4));
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    const __m512i lo = _mm512_and_si512(x, m4), hi = _mm512_and_si512(_mm512_srli_epi64(x, 4), m4);
    return _mm512_sad_epu8(_mm512_add_epi8(_mm512_shuffle_epi8(lut, lo), _mm512_shuffle_epi8(lut, hi)),
                           _mm512_setzero_si512());
}
DPFAH_AVX512_VPOPCNT FORCE_INLINE __m512i popcnt512_vp(__m512i x) { return _mm512_popcnt_epi64(x); }

/* The AVX-512 collect for 1-word codes: 8 items per step, the candidates' (index << 8 | d)
 * compressed into a tile buffer without a branch, then their keys in a second, predictable loop. */
DPFAH_AVX512 FORCE_INLINE void collect512(const uint64_t *q, const uint64_t *ql, const uint64_t *dc,
                                          const uint64_t *dl, Py_ssize_t t0, Py_ssize_t n, Py_ssize_t W, Py_ssize_t L,
                                          unsigned T, uint16_t *keys, Py_ssize_t *cnp, uint32_t *cnt,
                                          popcnt512_fn popcnt512)
{
    if (W != 1) {
        collect_any(q, ql, dc, dl, t0, n, W, L, T, keys, cnp, cnt);
        return;
    }
    const __m512i qv = _mm512_set1_epi64((long long)q[0]), tv = _mm512_set1_epi64((long long)T);
    uint64_t masks[TILE / 64];
    Py_ssize_t nm = 0, i = t0;
    const Py_ssize_t end = t0 + (n < TILE ? n : TILE);
    for (; i + 64 <= end; i += 64) {
        uint64_t m = 0;
        for (int v = 0; v < 8; v++) {
            const __m512i d = popcnt512(_mm512_xor_si512(qv, _mm512_loadu_si512((const void *)(dc + i + 8 * v))));
            m |= (uint64_t)_mm512_cmple_epu64_mask(d, tv) << (8 * v);
        }
        masks[nm++] = m;
    }
    Py_ssize_t cn = *cnp;
    for (Py_ssize_t g = 0; g < nm; g++) {
        uint64_t m = masks[g];
        while (m) {
            const Py_ssize_t j = t0 + 64 * g + CTZ64(m);
            const unsigned d = POPCOUNT64(q[0] ^ dc[j]);
            keys[cn++] = cand_key(ql, dl, j, L, d);
            cnt[d]++;
            m &= m - 1;
        }
    }
    *cnp = cn;
    if (i < t0 + n) collect_any(q, ql, dc, dl, i, t0 + n - i, W, L, T, keys, cnp, cnt);
}

DPFAH_AVX512 static NOINLINE void collect_avx512(const uint64_t *q, const uint64_t *ql, const uint64_t *dc,
                                                 const uint64_t *dl, Py_ssize_t t0, Py_ssize_t n, Py_ssize_t W,
                                                 Py_ssize_t L, unsigned T, uint16_t *keys, Py_ssize_t *cn,
                                                 uint32_t *cnt)
{
    collect512(q, ql, dc, dl, t0, n, W, L, T, keys, cn, cnt, popcnt512_lut);
}

DPFAH_AVX512_VPOPCNT static NOINLINE void collect_avx512_vpopcnt(const uint64_t *q, const uint64_t *ql,
                                                                 const uint64_t *dc, const uint64_t *dl, Py_ssize_t t0,
                                                                 Py_ssize_t n, Py_ssize_t W, Py_ssize_t L, unsigned T,
                                                                 uint16_t *keys, Py_ssize_t *cn, uint32_t *cnt)
{
    collect512(q, ql, dc, dl, t0, n, W, L, T, keys, cn, cnt, popcnt512_vp);
}

#endif

/* whether the AVX-512 kernel uses VPOPCNTQ (set at import where the CPU has it; set_vpopcnt) */
static int use_vpopcnt = 0;

typedef struct {
    uint16_t *keys; /* QBLOCK x ndb: keys of the candidates, in index order */
    uint32_t *cnt;  /* QBLOCK x nb candidates per distance */
    int64_t *relc;  /* nb: relevant candidates per distance */
} top_scratch;

/* Lower T while the candidates at distances < T already reach kmax. */
FORCE_INLINE unsigned lower_t(const uint32_t *cnt, unsigned T, int64_t kmax)
{
    while (T > 0) {
        int64_t below = 0;
        for (unsigned d = 0; d < T; d++) below += cnt[d];
        if (below < kmax) break;
        T--;
    }
    return T;
}

/* Pass 2 of one query from its candidates (see the top of this file). */
FORCE_INLINE void finish_query(scan_args *a, top_scratch *s, Py_ssize_t qi, uint16_t *keys, Py_ssize_t cn,
                               const uint32_t *cnt, unsigned dcut, int64_t maxcut, int64_t maxpt)
{
    const Py_ssize_t nb = (Py_ssize_t)a->bits + 1, nkeys = 2 * nb;
    const unsigned keycut = 2u * dcut + 1u;
    int64_t *h = a->hist + qi * nkeys;
    int64_t *cur = a->work, *rcur = a->work + nb;
    for (Py_ssize_t d = 0; d < nb; d++) s->relc[d] = 0;
    Py_ssize_t nk = 0; /* keep the keys of d <= dcut, in place and without a branch */
    for (Py_ssize_t c = 0; c < cn; c++) {
        const unsigned key = keys[c], keep = key <= keycut;
        keys[nk] = (uint16_t)key;
        nk += keep;
        s->relc[key >> 1] += key & keep;
    }
    int64_t n_before = 0, r_before = 0;
    for (Py_ssize_t d = 0; d < nb; d++) {
        const int64_t all = d <= (Py_ssize_t)dcut ? (int64_t)cnt[d] : 0, rel = s->relc[d];
        h[2 * d] = all - rel;
        h[2 * d + 1] = rel;
        cur[d] = n_before;
        rcur[d] = r_before;
        n_before += all;
        r_before += rel;
    }
    pass2_state st = pass2_start(a, qi, cur, rcur, maxcut, maxpt);
    if (a->ncut == 1 && a->npts == 0) { /* mAP@R: visit without a branch on relevance */
        double ap = 0.0;
        int64_t nrel = 0;
        for (Py_ssize_t c = 0; c < nk; c++) {
            const unsigned d = keys[c] >> 1, rel = keys[c] & 1u;
            const int64_t rank = ++cur[d];
            const int64_t hits = (rcur[d] += rel);
            const int take = rel & (rank <= maxcut);
            const double prec = (double)hits / (double)rank;
            ap += prec * (double)take; /* prec or +0.0: adding +0.0 leaves ap (>= +0.0) bit for bit */
            nrel += take;
        }
        st.ap[0] = ap;
        st.nrel[0] = nrel;
    } else {
        for (Py_ssize_t c = 0; c < nk; c++) visit(&st, keys[c]);
    }
    rank_points(a, qi);
}

/* collect the queries q0 .. q0 + nqb - 1 over the database, starting at thresholds T */
FORCE_INLINE void collect_block(const scan_args *a, top_scratch *s, collect_fn collect, Py_ssize_t q0,
                                Py_ssize_t nqb, unsigned *T, Py_ssize_t *cn, int64_t kmax)
{
    const Py_ssize_t nb = (Py_ssize_t)a->bits + 1, W = a->W, L = a->L, ndb = a->ndb;
    memset(s->cnt, 0, sizeof(uint32_t) * (size_t)(nqb * nb));
    for (Py_ssize_t qq = 0; qq < nqb; qq++) cn[qq] = 0;
    for (Py_ssize_t t0 = 0; t0 < ndb; t0 += TILE) {
        const Py_ssize_t tn = ndb - t0 < TILE ? ndb - t0 : TILE;
        /* the candidates read labels here and there: bring the next tile's labels closer (the
         * codes are read in order, which the hardware prefetcher sees) */
        if (nqb > 1 && t0 + TILE < ndb) {
            const char *next = (const char *)(a->dl + (t0 + TILE) * L);
            const Py_ssize_t nn = ndb - t0 - TILE < TILE ? ndb - t0 - TILE : TILE;
            for (Py_ssize_t off = 0; off < nn * L * 8; off += 64) PREFETCH(next + off);
        }
        for (Py_ssize_t qq = 0; qq < nqb; qq++) {
            uint32_t *cnt = s->cnt + qq * nb;
            collect(a->qc + (q0 + qq) * W, a->ql + (q0 + qq) * L, a->dc, a->dl, t0, tn, W, L, T[qq],
                    s->keys + qq * ndb, &cn[qq], cnt);
            T[qq] = lower_t(cnt, T[qq], kmax);
        }
    }
}

/* First threshold of query q: one above the distance at which an even sample of SAMPLE items
 * reaches the share kmax / ndb (measured on benchmark codes: few re-collections, few spare
 * candidates). Any value is correct; a low one costs a second collection. */
#define SAMPLE_LOG2 11
#define SAMPLE (1 << SAMPLE_LOG2)
FORCE_INLINE unsigned guess_t(const scan_args *a, const uint64_t *q, uint32_t *h, int64_t kmax)
{
    const Py_ssize_t nb = (Py_ssize_t)a->bits + 1, W = a->W, ndb = a->ndb;
    const Py_ssize_t S = ndb < SAMPLE ? ndb : SAMPLE;
    const int shift = ndb < SAMPLE ? 0 : SAMPLE_LOG2; /* item k * ndb / S, without a division */
    const int64_t mul = ndb < SAMPLE ? 1 : ndb;
    memset(h, 0, sizeof(uint32_t) * (size_t)nb);
    for (Py_ssize_t k = 0; k < S; k++) {
        const Py_ssize_t i = (Py_ssize_t)(((int64_t)k * mul) >> shift);
        unsigned d = 0;
        for (Py_ssize_t w = 0; w < W; w++) d += POPCOUNT64(q[w] ^ a->dc[i * W + w]);
        h[d]++;
    }
    int64_t run = 0;
    for (Py_ssize_t d = 0; d < nb; d++)
        if ((run += h[d]) * (int64_t)ndb >= kmax * (int64_t)S) return (unsigned)(d + 1 < nb ? d + 1 : nb - 1);
    return (unsigned)(nb - 1);
}

FORCE_INLINE void scan_top_impl(scan_args *a, top_scratch *s, collect_fn collect)
{
    const Py_ssize_t nb = (Py_ssize_t)a->bits + 1, ndb = a->ndb;
    const int64_t maxcut = a->ncut ? a->cut[a->ncut - 1] : 0;
    const int64_t maxpt = a->npts ? a->pts[a->npts - 1] : 0;
    const int64_t kmax = maxcut > maxpt ? maxcut : maxpt;
    const unsigned bits = (unsigned)a->bits;
    for (Py_ssize_t q0 = 0; q0 < a->nq; q0 += QBLOCK) {
        const Py_ssize_t nqb = a->nq - q0 < QBLOCK ? a->nq - q0 : QBLOCK;
        unsigned T[QBLOCK];
        Py_ssize_t cn[QBLOCK];
        for (Py_ssize_t qq = 0; qq < nqb; qq++) T[qq] = guess_t(a, a->qc + (q0 + qq) * a->W, s->cnt, kmax);
        collect_block(a, s, collect, q0, nqb, T, cn, kmax);
        for (Py_ssize_t qq = 0; qq < nqb; qq++) {
            const uint32_t *cnt = s->cnt + qq * nb;
            int64_t run = 0;
            unsigned dcut = 0;
            for (; dcut <= T[qq]; dcut++)
                if ((run += cnt[dcut]) >= kmax) break;
            if (dcut > T[qq]) { /* fewer than kmax items at d <= T: the guess was too low */
                unsigned t = bits;
                Py_ssize_t n1;
                collect_block(a, s, collect, q0 + qq, 1, &t, &n1, kmax); /* uses the block's first slots */
                memmove(s->keys + qq * ndb, s->keys, sizeof(uint16_t) * (size_t)n1);
                memmove(s->cnt + qq * nb, s->cnt, sizeof(uint32_t) * (size_t)nb);
                T[qq] = t;
                cn[qq] = n1;
                qq--; /* find dcut again */
                continue;
            }
            finish_query(a, s, q0 + qq, s->keys + qq * ndb, cn[qq], cnt, dcut, maxcut, maxpt);
        }
    }
}
