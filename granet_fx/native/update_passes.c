/* The passes over memory of granet_fx's mask updates: the selection pass, the re-masking (zeroing
   where a mask is False) and the largest key of each slice (a layer's best entry, kept in pruning).

   The selection pass (criteria._pass) over a float32 tensor. For each entry i in the pool (pool[i]
   set; with COMPLEMENT, pool[i] clear), of key k = score[i] (|score[i]| with MAGNITUDE; negated with
   LARGEST, so that the largest come first):
   - marked[i]: k <= upper (every pool entry with UPPER_INF); with KEEP_REST also every entry outside
                the pool (the marks then join them: grow_largest's new mask in one write); with REMOVE
                the pool entries that are not marked instead (the pool less the marks: drop_smallest's);
   - ties[i]:   k == tie (with HAS_TIE), counted per slice of `chunk` entries in tie_counts;
   - gathered:  marked and k >= lower (every marked entry with LOWER_NINF; the ties with
                LOWER_IS_TIE), the ties left out: its flat index (base + i) and k, in order.
   Comparisons are IEEE (a NaN key compares false), as in torch's eager ops. `marked` may be `pool`
   itself: an entry's pool flag is read before its mark is written.

   Block by block. With AVX2, eight entries at a time as bits (a compare and a movemask each): the
   marks are written from a table of bytes, counted by popcount, and the entries to gather found
   from the bits. Otherwise a loop without branches (which the compiler vectorises) marks a block and
   notes the entries to gather, then a scan gathers them a word of eight notes at a time. Before a
   block that could overflow the gather buffers (`capacity` entries) the pass stops: it returns how
   many entries it went through (n when done), so that the caller can give it room and go on. */

#include <stdint.h>
#include <math.h>
#include <string.h>

enum { MAGNITUDE = 1, LARGEST = 2, UPPER_INF = 4, LOWER_NINF = 8, HAS_TIE = 16, LOWER_IS_TIE = 32, COMPLEMENT = 64,
       KEEP_REST = 128, REMOVE = 256 };
enum { BLOCK = 4096 };

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define WIDEST_VECTORS __attribute__((target_clones("avx2", "default")))   /* chosen when loaded */
#else
#define WIDEST_VECTORS
#endif

/* The key of a score, as bits: |x| with MAGNITUDE, the sign flipped with LARGEST. */
static inline float key_of(float x, uint32_t abs_mask, uint32_t sign)
{
    uint32_t bits;
    memcpy(&bits, &x, 4);
    bits = (bits & abs_mask) ^ sign;
    memcpy(&x, &bits, 4);
    return x;
}

/* The marks of a block (of pool entries only) into `picks`, without counting them: counting in this loop
   widens every lane to 64 bits. */
WIDEST_VECTORS static void mark_block(const float *restrict score, const uint8_t *restrict pool, int64_t n,
                       float lower, float upper, float tie, uint32_t abs_mask, uint32_t sign,
                       uint8_t upper_inf, uint8_t lower_ninf, uint8_t has_tie, uint8_t gather, uint8_t complement,
                       uint8_t *restrict picks, uint8_t *restrict ties, uint8_t *restrict note)
{
    for (int64_t i = 0; i < n; i++) {
        const float k = key_of(score[i], abs_mask, sign);
        const uint8_t p = (pool[i] != 0) ^ complement;
        const uint8_t m = p & ((k <= upper) | upper_inf);
        const uint8_t t = p & (k == tie) & has_tie;
        picks[i] = m;
        ties[i] = t;
        note[i] = ((m & ((k >= lower) | lower_ninf)) ^ t) & gather;
    }
}

/* How many of n bytes, each 0 or 1, are 1: eight at a time (a word's bytes summed by one multiply). */
static int64_t ones(const uint8_t *flags, int64_t n)
{
    int64_t total = 0, j = 0;
    for (; j + 8 <= n; j += 8) {
        uint64_t word;
        memcpy(&word, flags + j, 8);
        total += (int64_t)((word * 0x0101010101010101ull) >> 56);
    }
    for (; j < n; j++)
        total += flags[j];
    return total;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(GRANET_FX_PORTABLE)
#include <immintrin.h>
#define HAVE_AVX2_BLOCK 1

/* spread[b]: the eight bits of b as eight bytes of 0 or 1, lowest bit first. */
static uint64_t spread[256];
static int avx2;                                    /* whether this processor runs block_avx2 */

__attribute__((constructor)) static void set_up(void)
{
    avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("popcnt") && __builtin_cpu_supports("bmi");
    for (int b = 0; b < 256; b++) {
        uint64_t word = 0;
        for (int q = 0; q < 8; q++)
            word |= (uint64_t)((b >> q) & 1) << (8 * q);
        spread[b] = word;
    }
}

/* A block eight entries at a time, the marks of each eight as bits (one compare and movemask each):
   writes marked and ties, counts them, and gathers the noted entries straight from the bits.
   n is a multiple of 8; returns the entries gathered. */
__attribute__((target("avx2,popcnt,bmi")))
static int64_t block_avx2(const float *score, const uint8_t *pool, int64_t n, int64_t base,
                          float lower, float upper, float tie, uint32_t abs_mask, uint32_t sign,
                          uint8_t upper_inf, uint8_t lower_ninf, uint8_t has_tie, uint8_t gather,
                          uint8_t complement, uint8_t keep_rest, uint8_t remove, uint8_t *marked, uint8_t *ties,
                          int64_t *out_index, float *out_key,
                          int64_t *n_marked, int64_t *n_tied)
{
    const __m256 vabs = _mm256_castsi256_ps(_mm256_set1_epi32((int)abs_mask));
    const __m256 vsign = _mm256_castsi256_ps(_mm256_set1_epi32((int)sign));
    const __m256 vlower = _mm256_set1_ps(lower), vupper = _mm256_set1_ps(upper), vtie = _mm256_set1_ps(tie);
    const unsigned all_upper = upper_inf ? 0xffu : 0u, all_lower = lower_ninf ? 0xffu : 0u;
    const unsigned tie_on = has_tie ? 0xffu : 0u, gather_on = gather ? 0xffu : 0u;
    const unsigned flip = complement ? 0u : 0xffu, rest_on = keep_rest ? 0xffu : 0u, removing = remove ? 0xffu : 0u;
    int64_t nm = 0, nt = 0, gathered = 0;
    for (int64_t i = 0; i < n; i += 8) {
        const __m256 k = _mm256_xor_ps(_mm256_and_ps(_mm256_loadu_ps(score + i), vabs), vsign);
        uint64_t p8;
        memcpy(&p8, pool + i, 8);
        const __m128i zero_bytes = _mm_cmpeq_epi8(_mm_cvtsi64_si128((long long)p8), _mm_setzero_si128());
        const unsigned p = ((unsigned)_mm_movemask_epi8(zero_bytes) ^ flip) & 0xffu;
        const unsigned m = p & ((unsigned)_mm256_movemask_ps(_mm256_cmp_ps(k, vupper, _CMP_LE_OQ)) | all_upper);
        const unsigned t = p & (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(k, vtie, _CMP_EQ_OQ)) & tie_on;
        unsigned note = ((m & ((unsigned)_mm256_movemask_ps(_mm256_cmp_ps(k, vlower, _CMP_GE_OQ)) | all_lower))
                         ^ t) & gather_on;
        const unsigned written = ((p & ~m) & removing) | ((m | (~p & rest_on)) & ~removing);
        memcpy(marked + i, &spread[written & 0xffu], 8);
        memcpy(ties + i, &spread[t], 8);
        nm += _mm_popcnt_u32(m);
        nt += _mm_popcnt_u32(t);
        while (note) {
            const int q = __builtin_ctz(note);
            out_index[gathered] = base + i + q;
            out_key[gathered] = key_of(score[i + q], abs_mask, sign);
            gathered++;
            note &= note - 1;
        }
    }
    *n_marked += nm;
    *n_tied += nt;
    return gathered;
}
#endif

int64_t granet_select_pass(const float *score, const uint8_t *pool, int64_t n, int64_t base,
                           float lower, float upper, float tie, int32_t flags,
                           uint8_t *marked, uint8_t *ties, int64_t chunk, int64_t *tie_counts,
                           int64_t *out_index, float *out_key, int64_t capacity, int64_t *totals)
{
    const uint32_t abs_mask = (flags & MAGNITUDE) ? 0x7fffffffu : 0xffffffffu;
    const uint32_t sign = (flags & LARGEST) ? 0x80000000u : 0u;
    const uint8_t upper_inf = (flags & UPPER_INF) != 0, lower_ninf = (flags & LOWER_NINF) != 0,
                  has_tie = (flags & HAS_TIE) != 0, gather = !((flags & LOWER_IS_TIE) && has_tie),
                  complement = (flags & COMPLEMENT) != 0, keep_rest = (flags & KEEP_REST) != 0,
                  remove = (flags & REMOVE) != 0;
    uint8_t note[BLOCK + 8], scratch[BLOCK], picks[BLOCK];
    int64_t n_marked = 0, gathered = totals[1];
    int64_t i = 0;
    while (i < n) {
        if (capacity - gathered < BLOCK) break;     /* the gather buffers could overflow */
        const int64_t slice = (base + i) / chunk;
        int64_t end = (slice + 1) * chunk - base;   /* a block stays inside one slice */
        if (end > n) end = n;
        if (end - i > BLOCK) end = i + BLOCK;
        const int64_t len = end - i;
#ifdef HAVE_AVX2_BLOCK
        if (avx2 && len % 8 == 0) {
            int64_t n_tied = 0;
            gathered += block_avx2(score + i, pool + i, len, base + i, lower, upper, tie, abs_mask, sign,
                                   upper_inf, lower_ninf, has_tie, gather, complement, keep_rest, remove, marked + i,
                                   has_tie ? ties + i : scratch,
                                   out_index + gathered, out_key + gathered, &n_marked, &n_tied);
            tie_counts[slice] += n_tied;
            i = end;
            continue;
        }
#endif
        mark_block(score + i, pool + i, len, lower, upper, tie, abs_mask, sign, upper_inf, lower_ninf,
                   has_tie, gather, complement, picks, has_tie ? ties + i : scratch, note);
        n_marked += ones(picks, len);
        for (int64_t q = 0; q < len; q++) {
            const uint8_t p = (pool[i + q] != 0) ^ complement;
            marked[i + q] = remove ? p & !picks[q] : picks[q] | (keep_rest & !p);
        }
        if (has_tie)
            tie_counts[slice] += ones(ties + i, len);
        memset(note + len, 0, 8);
        for (int64_t j = 0; j < len; j += 8) {
            uint64_t word;
            memcpy(&word, note + j, 8);
            if (!word) continue;
            for (int64_t q = j; q < j + 8 && q < len; q++) {
                out_index[gathered] = base + i + q;     /* written always, kept when noted */
                out_key[gathered] = key_of(score[i + q], abs_mask, sign);
                gathered += note[q];
            }
        }
        i = end;
    }
    totals[0] += n_marked;
    totals[1] = gathered;
    return i;
}


/* Zeroing where a mask is False (the re-masking of weights and optimizer state), for every tensor
   shaped like the mask in one read of it: an entry is kept where keep[i] is set (and also[i], when also
   is given: the masks before and after an update, without writing their AND first). A kept value keeps
   its bits; any other becomes +0.0, as masked_fill_ writes it. tensors[t] holds n values of sizes[t]
   bytes (2, 4 or 8). With dest, the new mask (also, or keep without it) is then written there, in the
   same read of the masks: dest may be keep itself (a block's flags are read before it is written). */

#define ZERO_WHERE_NOT(bits_t, name)                                                                     \
    WIDEST_VECTORS static void name(bits_t *restrict x, const uint8_t *restrict keep, int64_t n)         \
    {                                                                                                    \
        for (int64_t i = 0; i < n; i++)                                                                  \
            x[i] &= (bits_t)0 - (bits_t)keep[i];                                                         \
    }
ZERO_WHERE_NOT(uint16_t, zero_where_not_16)
ZERO_WHERE_NOT(uint32_t, zero_where_not_32)
ZERO_WHERE_NOT(uint64_t, zero_where_not_64)

static void zero_span(const uint8_t *keep, const uint8_t *also, uint8_t *dest, int64_t start, int64_t stop,
                      void *const *tensors, const int32_t *sizes, int32_t count)
{
    uint8_t both[BLOCK];
    for (int64_t i = start; i < stop; i += BLOCK) {
        const int64_t len = stop - i < BLOCK ? stop - i : BLOCK;
        const uint8_t *k = keep + i;
        if (also) {
            for (int64_t j = 0; j < len; j++)
                both[j] = (keep[i + j] != 0) & (also[i + j] != 0);
            k = both;
        }
        for (int32_t t = 0; t < count; t++) {
            if (sizes[t] == 2) zero_where_not_16((uint16_t *)tensors[t] + i, k, len);
            else if (sizes[t] == 4) zero_where_not_32((uint32_t *)tensors[t] + i, k, len);
            else zero_where_not_64((uint64_t *)tensors[t] + i, k, len);
        }
        if (dest)
            memmove(dest + i, (also ? also : keep) + i, len);
    }
}

/* The zeroing in spans of `span` entries, on `threads` threads. */
void granet_zero_where_not(const uint8_t *keep, const uint8_t *also, uint8_t *dest, int64_t n, void *const *tensors,
                           const int32_t *sizes, int32_t count, int64_t span, int32_t threads)
{
    const int64_t spans = (n + span - 1) / span;
    (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t j = 0; j < spans; j++) {
        const int64_t stop = (j + 1) * span < n ? (j + 1) * span : n;
        zero_span(keep, also, dest, j * span, stop, tensors, sizes, count);
    }
}


/* Threads ------------------------------------------------------------------------------------------

   Both passes run their parts on OpenMP threads when the library is built with it: torch's own
   runtime when it uses libgomp (the library loads the one already in the process), so that its
   threads, which spin a while after each op, do not compete with threads of another pool. */

typedef struct {
    const float *score;
    const uint8_t *pool;
    int64_t n, base;            /* entries of this range and the flat index of its first */
    uint8_t *marked, *ties;     /* at the range's first entry */
    int64_t *tie_counts;        /* the whole tensor's */
    int64_t *out_index;
    float *out_key;
    int64_t capacity;
    int64_t totals[2];          /* marked, gathered */
    int64_t done;               /* entries gone through */
} select_job;

void granet_select_jobs(select_job *jobs, int32_t count, float lower, float upper, float tie, int32_t flags,
                        int64_t chunk, int32_t threads)
{
    (void)threads;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int32_t j = 0; j < count; j++) {
        select_job *b = &jobs[j];
        b->done = granet_select_pass(b->score, b->pool, b->n, b->base, lower, upper, tie, flags, b->marked,
                                     b->ties, chunk, b->tie_counts, b->out_index, b->out_key, b->capacity,
                                     b->totals);
    }
}

int32_t granet_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}


/* The largest key among the pool entries of each slice of `chunk` entries, as
   torch.where(pool, key, -inf).amax() gives it: NaN when one of them is NaN, -inf when there are none.
   (Which zero a top of zero carries may differ: the tops are only compared.) Eight lanes of maxima,
   so that the loop vectorises without reassociating anything. */
WIDEST_VECTORS static float slice_top(const float *restrict score, const uint8_t *restrict pool, int64_t n,
                                      uint32_t abs_mask)
{
    float lane[8];
    uint8_t nan = 0;
    for (int q = 0; q < 8; q++)
        lane[q] = -INFINITY;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int q = 0; q < 8; q++) {
            const float v = pool[i + q] ? key_of(score[i + q], abs_mask, 0) : -INFINITY;
            nan |= v != v;
            lane[q] = v > lane[q] ? v : lane[q];
        }
    float top = -INFINITY;
    for (; i < n; i++) {
        const float v = pool[i] ? key_of(score[i], abs_mask, 0) : -INFINITY;
        nan |= v != v;
        top = v > top ? v : top;
    }
    for (int q = 0; q < 8; q++)
        top = lane[q] > top ? lane[q] : top;
    return nan ? NAN : top;
}

#ifdef HAVE_AVX2_BLOCK
/* slice_top eight entries at a time: the pool's bytes as a lane mask, a NaN noted apart (max_ps drops it). */
__attribute__((target("avx2")))
static float slice_top_avx2(const float *score, const uint8_t *pool, int64_t n, uint32_t abs_mask)
{
    const __m256 vabs = _mm256_castsi256_ps(_mm256_set1_epi32((int)abs_mask));
    const __m256 none = _mm256_set1_ps(-INFINITY);
    __m256 top8 = none, nan8 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 k = _mm256_and_ps(_mm256_loadu_ps(score + i), vabs);
        uint64_t p8;
        memcpy(&p8, pool + i, 8);
        const __m256i in = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)p8));
        const __m256 v = _mm256_blendv_ps(none, k, _mm256_castsi256_ps(_mm256_cmpgt_epi32(in, _mm256_setzero_si256())));
        nan8 = _mm256_or_ps(nan8, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        top8 = _mm256_max_ps(v, top8);
    }
    float lanes[8], top = -INFINITY;
    _mm256_storeu_ps(lanes, top8);
    for (int q = 0; q < 8; q++)
        top = lanes[q] > top ? lanes[q] : top;
    const float rest = slice_top(score + i, pool + i, n - i, abs_mask);
    top = rest > top ? rest : top;
    return (_mm256_movemask_ps(nan8) || rest != rest) ? NAN : top;
}
#endif

void granet_slice_tops(const float *score, const uint8_t *pool, int64_t n, int64_t chunk, int32_t flags,
                       float *tops, int32_t threads)
{
    const uint32_t abs_mask = (flags & MAGNITUDE) ? 0x7fffffffu : 0xffffffffu;
    const int64_t slices = (n + chunk - 1) / chunk;
    (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t s = 0; s < slices; s++) {
        const int64_t start = s * chunk, stop = start + chunk < n ? start + chunk : n;
#ifdef HAVE_AVX2_BLOCK
        if (avx2) {
            tops[s] = slice_top_avx2(score + start, pool + start, stop - start, abs_mask);
            continue;
        }
#endif
        tops[s] = slice_top(score + start, pool + start, stop - start, abs_mask);
    }
}

/* The last pool entry whose key equals `top` (-1: none), from the end: the position of a slice's
   largest pool key, the last one among equals. */
int64_t granet_last_equal(const float *score, const uint8_t *pool, int64_t n, float top, int32_t flags)
{
    const uint32_t abs_mask = (flags & MAGNITUDE) ? 0x7fffffffu : 0xffffffffu;
    for (int64_t i = n - 1; i >= 0; i--)
        if (pool[i] && key_of(score[i], abs_mask, 0) == top)
            return i;
    return -1;
}

/* Whether the selection pass runs its AVX2 blocks on this processor. */
int32_t granet_avx2(void)
{
#ifdef HAVE_AVX2_BLOCK
    return avx2;
#else
    return 0;
#endif
}
