/* The passes over memory of granet_fx's mask updates: the selection pass, a whole selection on one
   process around it (granet_select, at the end), the re-masking (zeroing where a mask is False) and the
   largest key of each slice (a layer's best entry, kept in pruning).

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

   Block by block. With AVX2, thirty-two entries at a time as bits (a compare and a movemask for each
   eight keys, one for the pool's bytes, a compare skipped where a flag makes it moot): the marks are
   written as bytes made from the bits, counted by popcount, and the entries to gather found from the
   bits; the last few of a block eight at a time, the marks from a table of bytes. Otherwise a loop
   without branches (which the compiler vectorises) marks a block and notes the entries to gather,
   then a scan gathers them a word of eight notes at a time. Before a
   block that could overflow the gather buffers (`capacity` entries) the pass stops: it returns how
   many entries it went through (n when done), so that the caller can give it room and go on. */

#include <stdint.h>
#include <math.h>
#include <string.h>

enum { MAGNITUDE = 1, LARGEST = 2, UPPER_INF = 4, LOWER_NINF = 8, HAS_TIE = 16, LOWER_IS_TIE = 32, COMPLEMENT = 64,
       KEEP_REST = 128, REMOVE = 256, MISSED = 512 /* granet_select: take the bracket as missed (tests) */ };
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

/* Slices of `chunk` entries that n entries make, the last one short. */
static inline int64_t slices_of(int64_t n, int64_t chunk)
{
    return (n + chunk - 1) / chunk;
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

/* The entries of the bits of `note` (bit q: entry q after score) into the gather buffers; returns how
   many the buffers then hold. */
static inline int64_t gather_noted(uint32_t note, const float *score, int64_t base, uint32_t abs_mask,
                                   uint32_t sign, int64_t *out_index, float *out_key, int64_t gathered)
{
    while (note) {
        const int q = __builtin_ctz(note);
        out_index[gathered] = base + q;
        out_key[gathered] = key_of(score[q], abs_mask, sign);
        gathered++;
        note &= note - 1;
    }
    return gathered;
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
    int64_t nm = 0, nt = 0, gathered = 0, i = 0;
    /* Thirty-two at a time: one compare of the pool's bytes, the marks written as bytes from the bits
       (each byte picks its bit), each compare skipped where a flag makes it moot. */
    const __m256i zero = _mm256_setzero_si256(), one = _mm256_set1_epi8(1);
    const __m256i bit_of_byte = _mm256_set1_epi64x((long long)0x8040201008040201ull);
    const __m256i byte_of_bits = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                                  2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const uint32_t flip32 = complement ? 0u : 0xffffffffu, rest32 = keep_rest ? 0xffffffffu : 0u;
#define KEYS(q) _mm256_xor_ps(_mm256_and_ps(_mm256_loadu_ps(score + i + 8 * (q)), vabs), vsign)
#define BITS(c, v) ((uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(k0, v, c))                 \
                    | (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(k1, v, c)) << 8          \
                    | (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(k2, v, c)) << 16         \
                    | (uint32_t)_mm256_movemask_ps(_mm256_cmp_ps(k3, v, c)) << 24)
#define BYTES(bits) _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(                  \
                        _mm256_set1_epi32((int)(bits)), byte_of_bits), bit_of_byte), bit_of_byte), one)
    for (; i + 32 <= n; i += 32) {
        const __m256 k0 = KEYS(0), k1 = KEYS(1), k2 = KEYS(2), k3 = KEYS(3);
        const __m256i bytes = _mm256_loadu_si256((const __m256i *)(pool + i));
        const uint32_t p = (uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(bytes, zero)) ^ flip32;
        const uint32_t m = upper_inf ? p : p & BITS(_CMP_LE_OQ, vupper);
        const uint32_t t = has_tie ? p & BITS(_CMP_EQ_OQ, vtie) : 0u;
        const uint32_t note = gather ? (lower_ninf ? m : m & BITS(_CMP_GE_OQ, vlower)) ^ t : 0u;
        const uint32_t written = remove ? p & ~m : m | (~p & rest32);
        _mm256_storeu_si256((__m256i *)(marked + i), BYTES(written));
        if (has_tie)
            _mm256_storeu_si256((__m256i *)(ties + i), BYTES(t));
        nm += _mm_popcnt_u32(m);
        nt += _mm_popcnt_u32(t);
        gathered = gather_noted(note, score + i, base + i, abs_mask, sign, out_index, out_key, gathered);
    }
#undef KEYS
#undef BITS
#undef BYTES
    for (; i < n; i += 8) {
        const __m256 k = _mm256_xor_ps(_mm256_and_ps(_mm256_loadu_ps(score + i), vabs), vsign);
        uint64_t p8;
        memcpy(&p8, pool + i, 8);
        const __m128i zero_bytes = _mm_cmpeq_epi8(_mm_cvtsi64_si128((long long)p8), _mm_setzero_si128());
        const unsigned p = ((unsigned)_mm_movemask_epi8(zero_bytes) ^ flip) & 0xffu;
        const unsigned m = p & ((unsigned)_mm256_movemask_ps(_mm256_cmp_ps(k, vupper, _CMP_LE_OQ)) | all_upper);
        const unsigned t = p & (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(k, vtie, _CMP_EQ_OQ)) & tie_on;
        const unsigned note = ((m & ((unsigned)_mm256_movemask_ps(_mm256_cmp_ps(k, vlower, _CMP_GE_OQ)) | all_lower))
                         ^ t) & gather_on;
        const unsigned written = ((p & ~m) & removing) | ((m | (~p & rest_on)) & ~removing);
        memcpy(marked + i, &spread[written & 0xffu], 8);
        memcpy(ties + i, &spread[t], 8);
        nm += _mm_popcnt_u32(m);
        nt += _mm_popcnt_u32(t);
        gathered = gather_noted(note, score + i, base + i, abs_mask, sign, out_index, out_key, gathered);
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
    const int64_t spans = slices_of(n, span);
    (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t j = 0; j < spans; j++) {
        const int64_t stop = (j + 1) * span < n ? (j + 1) * span : n;
        zero_span(keep, also, dest, j * span, stop, tensors, sizes, count);
    }
}


/* How many of n flags (bytes 0 or 1: a bool mask) are set, in spans of `span` on `threads` threads. A
   span's bytes are summed in 32-bit lanes (a span is at most 2^24 long), which the compiler vectorises. */
WIDEST_VECTORS static uint32_t flags_set(const uint8_t *restrict flags, int64_t n)
{
    uint32_t total = 0;
    for (int64_t i = 0; i < n; i++)
        total += flags[i];
    return total;
}

int64_t granet_count(const uint8_t *flags, int64_t n, int64_t span, int32_t threads)
{
    const int64_t spans = slices_of(n, span);
    int64_t total = 0;
    (void)threads;
#pragma omp parallel for schedule(static) reduction(+ : total) num_threads(threads)
    for (int64_t j = 0; j < spans; j++) {
        const int64_t stop = (j + 1) * span < n ? (j + 1) * span : n;
        total += flags_set(flags + j * span, stop - j * span);
    }
    return total;
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
    const int64_t slices = slices_of(n, chunk);
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
WIDEST_VECTORS static int64_t last_equal(const float *restrict score, const uint8_t *restrict pool, int64_t n,
                                         float top, uint32_t abs_mask)
{
    int64_t i = n;
    for (; i >= 64; i -= 64) {          /* a block without a match is passed over without a branch an entry */
        uint8_t any = 0;
        for (int64_t j = i - 64; j < i; j++)
            any |= (pool[j] != 0) & (key_of(score[j], abs_mask, 0) == top);
        if (any) break;
    }
    for (int64_t j = i - 1; j >= 0; j--)
        if (pool[j] && key_of(score[j], abs_mask, 0) == top)
            return j;
    return -1;
}

int64_t granet_last_equal(const float *score, const uint8_t *pool, int64_t n, float top, int32_t flags)
{
    return last_equal(score, pool, n, top, (flags & MAGNITUDE) ? 0x7fffffffu : 0xffffffffu);
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


/* A whole selection on one process (criteria._pick with world 1) ------------------------------------

   The k smallest keys (LARGEST: the largest; MAGNITUDE: of |score|) among the pool entries of all
   tensors together, the earliest (tensor by tensor, then flat index) first among equals, written into
   each tensor's `out` as _pick writes its marks (KEEP_REST, REMOVE, COMPLEMENT as in the pass), with
   how many each picks. The same steps as _pick, without a trip through Python between them: with
   `bracketed`, a seeded stratified sample (sized by sample_positions) brackets the k-th key
   (else every pool entry is gathered); the pass marks and gathers on the threads, in ranges of whole
   `chunk` slices; a radix select finds the k-th among those gathered; the marks of the gathered
   entries past it are undone. Returns 0, or 1 where _pick should run instead (a k-th key that is NaN,
   no memory): the outputs are then to be written again. */

#include <stdlib.h>

typedef struct {
    const float *score;
    const uint8_t *pool;
    uint8_t *out;
    int64_t n;
    int64_t picked;             /* set: the entries picked */
} select_tensor;

typedef struct {                /* a range's share of the k-th's steps */
    int64_t at, below, equal, later, cleared;
} range_counts;

typedef struct {                /* one range's gathered entries, in up to two buffers (the second: an overflow) */
    int64_t tensor, count[2];
    int64_t *index[2];
    float *key[2];
} gathered_part;

/* Memory kept between calls (fresh memory costs a page fault every 4 KiB), a set a thread: selections on
   different threads (granet_regrow's layers, or callers' own threads) never share it. */
static __thread void *arena;
static __thread size_t arena_bytes;

static void *arena_of(size_t bytes)
{
    if (bytes > arena_bytes) {
        free(arena);
        arena = malloc(bytes);
        arena_bytes = arena ? bytes : 0;
    }
    return arena;
}

static __thread uint8_t *ties_kept;     /* the tie flags */
static __thread size_t ties_bytes;

static uint8_t *tie_room(int64_t n)
{
    if ((size_t)n > ties_bytes) {
        free(ties_kept);
        ties_kept = malloc((size_t)n + 8);       /* + 8: after_flag reads whole words */
        ties_bytes = ties_kept ? (size_t)n : 0;
    }
    return ties_kept;
}

/* The position just after the r-th set flag (r >= 1, and there are that many), eight flags a step. */
static int64_t after_flag(const uint8_t *flags, int64_t r)
{
    int64_t i = 0, seen = 0;
    for (;; i += 8) {
        uint64_t word;
        memcpy(&word, flags + i, 8);
        const int64_t here = (int64_t)((word * 0x0101010101010101ull) >> 56);
        if (seen + here >= r) break;
        seen += here;
    }
    for (;; i++)
        if (flags[i] && ++seen == r)
            return i + 1;
}

/* out[i] = value where flags[i] is set, without a branch (so that it vectorises). */
WIDEST_VECTORS static void set_where(uint8_t *restrict out, const uint8_t *restrict flags, int64_t n, uint8_t value)
{
    for (int64_t i = 0; i < n; i++) {
        const uint8_t f = flags[i];
        out[i] = (uint8_t)((out[i] & (uint8_t)(f - 1)) | (value & f));
    }
}

static uint64_t splitmix(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* A key as an unsigned integer in the order of torch.kthvalue: numbers ascending (-0.0 just before
   0.0, which compare equal), every NaN last. */
static inline uint32_t order_of(float k)
{
    uint32_t b;
    memcpy(&b, &k, 4);
    if (k != k) return 0xffffffffu;
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

static inline float float_of(uint32_t u)
{
    uint32_t b = (u & 0x80000000u) ? (u & 0x7fffffffu) : ~u;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

/* The r-th smallest (from 0) of a[0..n), overwriting a: a radix select. Each round bins the keys by
   eleven bits, the highest in which the smallest and the largest differ, keeps the bin that holds the
   r-th (moved to the front) and goes on inside it; a few keys are sorted. Three plain passes a round,
   without a branch on the keys. */
static uint32_t rank_of(uint32_t *a, int64_t n, int64_t r)
{
    enum { BITS = 11, BINS = 1 << BITS };
    int64_t count[BINS];
    while (n > 32) {
        uint32_t lo = a[0], hi = a[0];
        for (int64_t i = 1; i < n; i++) {
            lo = a[i] < lo ? a[i] : lo;
            hi = a[i] > hi ? a[i] : hi;
        }
        if (lo == hi) return lo;
        const int top = 31 - __builtin_clz(lo ^ hi);
        const int shift = top >= BITS - 1 ? top - (BITS - 1) : 0;
        const uint32_t base = lo >> shift;
        memset(count, 0, sizeof count);
        for (int64_t i = 0; i < n; i++) count[(a[i] >> shift) - base]++;
        int64_t bin = 0, before = 0;
        while (before + count[bin] <= r) before += count[bin++];
        int64_t w = 0;
        for (int64_t i = 0; i < n; i++) {
            const uint32_t v = a[i];
            a[w] = v;
            w += ((v >> shift) - base) == (uint32_t)bin;
        }
        n = w;
        r -= before;
    }
    for (int64_t i = 1; i < n; i++) {             /* insertion sort of what is left */
        const uint32_t v = a[i];
        int64_t j = i - 1;
        for (; j >= 0 && a[j] > v; j--) a[j + 1] = a[j];
        a[j + 1] = v;
    }
    return a[r];
}

static int by_value(const void *a, const void *b)
{
    const uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

/* _bracket: two keys around the k-th from the sampled keys (criteria._enclose's ranks), and the key
   the sample shows most often between them (has_tie 0: none twice). `scratch`: room for n keys. */
static void bracket(uint32_t *sample, int64_t n, double q, uint32_t *scratch, float *lower, float *upper,
                    int32_t *ends, float *tie, int32_t *has_tie)
{
    const double rank = q * (double)n, margin = 4.0 * sqrt((double)n * q * (1.0 - q)) + 3.0;
    const int64_t low = (int64_t)floor(rank - margin), high = (int64_t)ceil(rank + margin);
    *ends = 0;
    *lower = *upper = 0.0f;
    if (low >= 0) {
        memcpy(scratch, sample, sizeof(uint32_t) * (size_t)n);      /* rank_of overwrites what it reads */
        *lower = float_of(rank_of(scratch, n, low));
    } else {
        *ends |= LOWER_NINF;
    }
    if (high < n) {
        memcpy(scratch, sample, sizeof(uint32_t) * (size_t)n);
        *upper = float_of(rank_of(scratch, n, high));
    } else {
        *ends |= UPPER_INF;
    }
    int64_t w = 0;
    for (int64_t i = 0; i < n; i++) {
        const float v = float_of(sample[i]);
        if (((*ends & LOWER_NINF) || v >= *lower) && ((*ends & UPPER_INF) || v <= *upper) && v == v)
            sample[w++] = sample[i];
    }
    qsort(sample, (size_t)w, sizeof(uint32_t), by_value);
    int64_t best = 1;
    *has_tie = 0;
    for (int64_t i = 0; i < w;) {
        int64_t j = i + 1;
        while (j < w && sample[j] == sample[i]) j++;
        if (j - i > best) { best = j - i; *tie = float_of(sample[i]); *has_tie = 1; }
        i = j;
    }
}

/* One pass over every tensor (granet_select_pass on the threads, a range a job), the gathered entries
   in `parts` (the arena's buffers of `capacity` entries a range, then overflows), marks and ties per
   tensor in `marked` and `tied`. Returns 1 if out of memory. */
static int pass_all(select_tensor *t, int32_t count, float lower, float upper, float tie, int32_t flags,
                    int64_t chunk, int32_t threads, select_job *jobs, gathered_part *parts, int32_t n_jobs,
                    uint8_t **ties, int64_t **tie_counts, int64_t *marked, int64_t *tied)
{
    (void)threads;
    for (int32_t j = 0; j < n_jobs; j++) {
        jobs[j].totals[0] = jobs[j].totals[1] = 0;
        parts[j].count[0] = parts[j].count[1] = 0;
        jobs[j].ties = (flags & HAS_TIE) ? ties[parts[j].tensor] + (jobs[j].base) : NULL;
        jobs[j].tie_counts = tie_counts[parts[j].tensor];
        jobs[j].out_index = parts[j].index[0];
        jobs[j].out_key = parts[j].key[0];
    }
    for (int32_t u = 0; u < count; u++) {
        memset(tie_counts[u], 0, sizeof(int64_t) * (size_t)slices_of(t[u].n, chunk));
        marked[u] = tied[u] = 0;
    }
    for (int round = 0; round < 2; round++) {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
        for (int32_t j = 0; j < n_jobs; j++) {
            select_job *b = &jobs[j];
            if (b->n == 0) { b->done = 0; continue; }
            b->done = granet_select_pass(b->score, b->pool, b->n, b->base, lower, upper, tie, flags, b->marked,
                                         b->ties, chunk, b->tie_counts, b->out_index, b->out_key, b->capacity,
                                         b->totals);
        }
        int left = 0;
        for (int32_t j = 0; j < n_jobs; j++) {
            select_job *b = &jobs[j];
            if (round == 0 || parts[j].index[1])       /* ran this round */
                parts[j].count[round] = b->totals[1];
            if (b->done < b->n) {       /* out of room: the rest goes on in a buffer that holds it all */
                const int64_t rest = b->n - b->done, room = rest + BLOCK;
                parts[j].index[1] = malloc(sizeof(int64_t) * (size_t)room);
                parts[j].key[1] = malloc(sizeof(float) * (size_t)room);
                if (!parts[j].index[1] || !parts[j].key[1]) return 1;
                b->score += b->done; b->pool += b->done; b->marked += b->done;
                if (b->ties) b->ties += b->done;
                b->base += b->done; b->n = rest;
                b->out_index = parts[j].index[1]; b->out_key = parts[j].key[1];
                b->capacity = room; b->totals[1] = 0;
                left = 1;
            } else {
                b->n = 0;               /* done: skipped in the next round */
            }
        }
        if (!left) break;
    }
    for (int32_t j = 0; j < n_jobs; j++)
        marked[parts[j].tensor] += jobs[j].totals[0];
    for (int32_t u = 0; u < count && (flags & HAS_TIE); u++)
        for (int64_t q = 0; q < slices_of(t[u].n, chunk); q++)
            tied[u] += tie_counts[u][q];
    return 0;
}

enum { ROOM_NONE, ROOM_BRACKET, ROOM_ALL, LEAST_KEYS = 128, AHEAD = 16 };
enum { PARALLEL_FIXUPS = 1 << 14 };     /* gathered entries from which the k-th's steps use the threads */

/* How many positions the bracket samples. A position costs a random read, about three times what a key
   left inside the bracket costs (the pass gathers it, the radix select and the fix-ups go over it), and
   for the k-th at the quantile q of a pool of P of the T entries, m pool keys drawn (m T / P positions)
   leave about 8 P sqrt(q (1 - q) / m) inside: the sum, with a position at 3.2 keys, is least at
   m = (5 P^2 sqrt(q (1 - q)) / (4 T))^(2/3).
   None (every pool entry gathered) where gathering them all costs no more than the sample: a sparse pool,
   such as the drop's few active entries of a layer pruned almost empty. */
static int64_t sample_positions(int64_t k, int64_t pool, int64_t total)
{
    if (pool <= 0 || total <= 0) return 0;
    const double q = k < pool ? (double)k / (double)pool : 1.0, p = (double)pool;
    double m = pow(5.0 * p * p * sqrt(q * (1.0 - q)) / (4.0 * (double)total), 2.0 / 3.0);
    if (m < LEAST_KEYS) m = LEAST_KEYS;
    double positions = m * (double)total / p;
    if (positions > total / 4.0) positions = total / 4.0;
    return 4.0 * positions >= p ? 0 : (int64_t)positions;
}

/* The ranges of the pass (whole slices, about one a thread per tensor) and the room of their first
   buffers: none, a bracket's (a twentieth of the range and a margin; all of a short range) or the
   whole range. */
static int64_t set_ranges(select_tensor *t, int32_t count, int64_t chunk, int64_t per_tensor, int room_kind,
                          select_job *jobs, gathered_part *parts, int64_t *room)
{
    int64_t n_jobs = 0;
    *room = 0;
    for (int32_t u = 0; u < count; u++) {
        const int64_t n = t[u].n, s = slices_of(n, chunk);
        const int64_t per = s ? (s + per_tensor - 1) / per_tensor : 1;
        for (int64_t first = 0; first < s; first += per) {
            const int64_t start = first * chunk, stop = (first + per) * chunk < n ? (first + per) * chunk : n;
            select_job *b = &jobs[n_jobs];
            b->score = t[u].score + start; b->pool = t[u].pool + start; b->marked = t[u].out + start;
            b->n = stop - start; b->base = start;
            b->capacity = room_kind == ROOM_ALL || (room_kind == ROOM_BRACKET && b->n < (1 << 16)) ? b->n + BLOCK
                          : room_kind == ROOM_BRACKET ? b->n / 20 + 4096 : 0;
            parts[n_jobs].tensor = u;
            *room += b->capacity;
            n_jobs++;
        }
    }
    return n_jobs;
}

int32_t granet_select(select_tensor *t, int32_t count, int64_t k, int64_t pool_count, int32_t flags,
                      int32_t bracketed, int64_t chunk, int32_t threads)
{
    const uint32_t abs_mask = (flags & MAGNITUDE) ? 0x7fffffffu : 0xffffffffu;
    const uint32_t sign = (flags & LARGEST) ? 0x80000000u : 0u;
    const uint8_t complement = (flags & COMPLEMENT) != 0, remove = (flags & REMOVE) != 0;
    const int32_t modes = flags & (MAGNITUDE | LARGEST | COMPLEMENT | KEEP_REST | REMOVE);
    uint64_t state = (uint64_t)k * 0x2545f4914f6cdd1dull + 1;
    int64_t total = 0, slices = 0, n_jobs = 0;
    for (int32_t u = 0; u < count; u++) {
        total += t[u].n;
        slices += slices_of(t[u].n, chunk);
    }
    const int64_t per_tensor_jobs = threads > 0 ? threads : 1;
    int32_t result = 1;
    int64_t room = 0, max_jobs = 0;
    for (int32_t u = 0; u < count; u++)
        max_jobs += per_tensor_jobs < slices_of(t[u].n, chunk) ? per_tensor_jobs : slices_of(t[u].n, chunk);
    select_job *jobs = calloc((size_t)(max_jobs ? max_jobs : 1), sizeof(select_job));
    gathered_part *parts = calloc((size_t)(max_jobs ? max_jobs : 1), sizeof(gathered_part));
    uint8_t **ties = calloc((size_t)(count ? count : 1), sizeof(uint8_t *));
    int64_t **tie_counts = calloc((size_t)(count ? count : 1), sizeof(int64_t *));
    int64_t *marked = calloc((size_t)(count ? count : 1), sizeof(int64_t));
    int64_t *tied = calloc((size_t)(count ? count : 1), sizeof(int64_t));
    int64_t *equal = calloc((size_t)(count ? count : 1), sizeof(int64_t));
    range_counts *per = calloc((size_t)(max_jobs ? max_jobs : 1), sizeof(range_counts));
    if (!jobs || !parts || !ties || !tie_counts || !marked || !tied || !equal || !per) goto done;
    n_jobs = set_ranges(t, count, chunk, per_tensor_jobs, bracketed ? ROOM_BRACKET : ROOM_ALL, jobs, parts, &room);
    /* The arena: each range's first buffers, each tensor's tie counts, the sample and a copy of the keys
       gathered (as ordered integers) for the radix select. */
    const int64_t positions = bracketed ? sample_positions(k, pool_count, total) : 0;
    /* the sample, a scratch copy, the positions read (and AHEAD more) */
    const size_t sample_room = (size_t)(positions + count) * 16 + 8 * AHEAD;
    char *a = arena_of((size_t)room * 16 + (size_t)slices * 8 + sample_room + 64);
    if (!a) goto done;
    {
        char *at = a;
        for (int64_t j = 0; j < n_jobs; j++) {
            parts[j].index[0] = (int64_t *)at; at += 8 * jobs[j].capacity;
        }
        for (int32_t u = 0; u < count; u++) {
            tie_counts[u] = (int64_t *)at; at += 8 * slices_of(t[u].n, chunk);
        }
        for (int64_t j = 0; j < n_jobs; j++) {
            parts[j].key[0] = (float *)at; at += 4 * jobs[j].capacity;
        }
        at = (char *)(((uintptr_t)at + 7) & ~(uintptr_t)7);        /* the positions are int64 */
        uint32_t *sample = (uint32_t *)at;
        uint32_t *ordered = (uint32_t *)(at + sample_room);     /* room for 4 B a first-buffer entry */

        float lower = 0.0f, upper = 0.0f, tie = 0.0f;
        int32_t ends = LOWER_NINF | UPPER_INF, has_tie = 0;
        if (positions) {
            int64_t m = 0;
            int64_t *where = (int64_t *)(sample + 2 * (positions + count));
            for (int32_t u = 0; u < count; u++) {
                if (!t[u].n) continue;
                /* One position at random in each of `draws` equal strata: in increasing order, never one
                   twice. (Runs of neighbours would cost fewer cache misses, but neighbours are alike,
                   a gradient's row all scaled by one factor: the brackets would miss.) */
                int64_t draws = positions * t[u].n / total;
                if (draws < 1) draws = 1;
                const double stride = (double)t[u].n / (double)draws;
                for (int64_t d = 0; d < draws; d++) {
                    const double u01 = (double)(splitmix(&state) >> 11) * 0x1.0p-53;
                    const int64_t i = (int64_t)(((double)d + u01) * stride);
                    where[d] = i < t[u].n ? i : t[u].n - 1;
                }
                for (int64_t d = draws; d < draws + AHEAD; d++)
                    where[d] = where[draws - 1];
                for (int64_t d = 0; d < draws; d++) {     /* each read a cache miss: asked for ahead */
                    __builtin_prefetch(t[u].score + where[d + AHEAD]);
                    __builtin_prefetch(t[u].pool + where[d + AHEAD]);
                    const int64_t i = where[d];
                    sample[m] = order_of(key_of(t[u].score[i], abs_mask, sign));    /* kept if in the pool */
                    m += (t[u].pool[i] != 0) != complement;
                }
            }
            bracket(sample, m, pool_count ? (k < pool_count ? (double)k / (double)pool_count : 1.0) : 1.0,
                    sample + positions + count, &lower, &upper, &ends, &tie, &has_tie);
        }
        if (has_tie) {                              /* a flag an entry, in memory kept between calls */
            uint8_t *flags_at = tie_room(total);
            if (!flags_at) goto done;
            for (int32_t u = 0; u < count; u++) {
                ties[u] = flags_at;
                flags_at += t[u].n;
            }
        }
        int64_t sure = 0, inside = 0, n_ties = 0, gathered = 0;
        for (int attempt = 0; attempt < 2; attempt++) {
            int32_t pass_flags = modes | ends | (has_tie ? HAS_TIE : 0)
                                 | (has_tie && !(ends & (LOWER_NINF | UPPER_INF)) && lower == upper ? LOWER_IS_TIE : 0);
            if (pass_all(t, count, lower, upper, tie, pass_flags, chunk, threads, jobs, parts, (int32_t)n_jobs,
                         ties, tie_counts, marked, tied))
                goto done;
            int64_t all_marked = 0;
            gathered = n_ties = 0;
            for (int32_t u = 0; u < count; u++) {
                all_marked += marked[u];
                n_ties += tied[u];
            }
            for (int64_t j = 0; j < n_jobs; j++) gathered += parts[j].count[0] + parts[j].count[1];
            inside = gathered + n_ties;
            sure = all_marked - inside;
            if (sure < k && k <= sure + inside && !(attempt == 0 && (flags & MISSED))) break;
            if (attempt == 1) goto done;
            /* The sample missed: every pool entry, in buffers that hold them. */
            for (int64_t j = 0; j < n_jobs; j++) {
                free(parts[j].index[1]); free(parts[j].key[1]);
                parts[j].index[1] = NULL; parts[j].key[1] = NULL;
            }
            int64_t unused;         /* the ranges from their starts, all in overflow buffers */
            n_jobs = set_ranges(t, count, chunk, per_tensor_jobs, ROOM_NONE, jobs, parts, &unused);
            ends = LOWER_NINF | UPPER_INF;
            has_tie = 0;
        }
        /* The k-th is the j-th smallest of those gathered and the ties. Each range's entries are gone
           over by one thread (`per[p]`: an offset, then counts of that range). */
        const int64_t j = k - sure;
        uint32_t *keys = ordered;
        uint32_t *owned = NULL;
        if (gathered > room) {
            owned = keys = malloc((size_t)gathered * 4 + 4);
            if (!owned) goto done;
        }
        const int many = gathered >= PARALLEL_FIXUPS;
        int64_t m = 0, before = 0;
        for (int64_t p = 0; p < n_jobs; p++) {
            per[p].at = m;
            m += parts[p].count[0] + parts[p].count[1];
        }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (many)
        for (int64_t p = 0; p < n_jobs; p++) {
            int64_t w = per[p].at, under = 0;
            for (int b = 0; b < 2; b++)
                for (int64_t q = 0; q < parts[p].count[b]; q++) {
                    const float v = parts[p].key[b][q];
                    keys[w++] = order_of(v);
                    under += has_tie && v < tie;
                }
            per[p].below = under;
        }
        for (int64_t p = 0; p < n_jobs; p++) before += per[p].below;
        float value;
        if (has_tie && before < j && j <= before + n_ties) {
            value = tie;
        } else {
            const int64_t r = j > before ? j - n_ties : j;
            if (r < 1 || r > m) { free(owned); goto done; }
            value = float_of(rank_of(keys, m, r - 1));
        }
        free(owned);
        if (value != value) goto done;              /* NaN: _pick's own rules */
        /* Of the entries equal to the k-th, the first in the global order are picked: `left` are not. */
        int64_t left;
        const int value_is_tie = has_tie && value == tie;
        if (value_is_tie) {
            for (int32_t u = 0; u < count; u++) equal[u] = tied[u];
            left = n_ties - (j - before);
        } else {
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (many)
            for (int64_t p = 0; p < n_jobs; p++) {
                int64_t under = 0, same = 0;
                for (int b = 0; b < 2; b++)
                    for (int64_t q = 0; q < parts[p].count[b]; q++) {
                        const float v = parts[p].key[b][q];
                        under += v < value;
                        same += v == value;
                    }
                per[p].below = under;
                per[p].equal = same;
            }
            int64_t below = (has_tie && tie < value) ? n_ties : 0, same = 0;
            for (int32_t u = 0; u < count; u++) equal[u] = 0;
            for (int64_t p = 0; p < n_jobs; p++) {
                below += per[p].below;
                equal[parts[p].tensor] += per[p].equal;
            }
            for (int32_t u = 0; u < count; u++) same += equal[u];
            left = same - (j - below);
        }
        for (int32_t u = count - 1; u >= 0; u--) {      /* the last `left` in the global order: per tensor */
            const int64_t take = equal[u] < left ? equal[u] : left;
            left -= take > 0 ? take : 0;
            equal[u] = take > 0 ? take : 0;             /* now: this tensor's `later` */
        }
        /* and each range's, the last first, using `equal` up (read again only where the k-th is the tie,
           which leaves every range's at 0) */
        for (int64_t p = n_jobs - 1; p >= 0 && !value_is_tie; p--) {
            int64_t *rest = &equal[parts[p].tensor];
            per[p].later = per[p].equal < *rest ? per[p].equal : *rest;
            *rest -= per[p].later;
        }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (many)
        for (int64_t p = 0; p < n_jobs; p++) {          /* backwards: the last equal ones first */
            uint8_t *out = t[parts[p].tensor].out;
            int64_t rest = per[p].later, cleared = 0;
            for (int b = 1; b >= 0; b--)
                for (int64_t q = parts[p].count[b] - 1; q >= 0; q--) {
                    const float v = parts[p].key[b][q];
                    if (v > value || (v == value && rest > 0)) {
                        rest -= v == value;
                        out[parts[p].index[b][q]] = remove;
                        cleared++;
                    }
                }
            per[p].cleared = cleared;
        }
        for (int32_t u = 0; u < count; u++) t[u].picked = marked[u];
        for (int64_t p = 0; p < n_jobs; p++) t[parts[p].tensor].picked -= per[p].cleared;
        if (has_tie && value <= tie) {              /* ties past the k-th, or the last of those equal to it */
            for (int32_t u = 0; u < count; u++) {
                const int64_t s_count = slices_of(t[u].n, chunk);
                const int64_t drop = value_is_tie ? equal[u] : tied[u];
                if (!drop) continue;
                const int64_t first = tied[u] - drop;
                int64_t start = 0, seen = 0;
                for (int64_t s = 0; first && s < s_count; s++) {
                    if (seen + tie_counts[u][s] >= first) {
                        start = after_flag(ties[u] + s * chunk, first - seen) + s * chunk;
                        break;
                    }
                    seen += tie_counts[u][s];
                }
                set_where(t[u].out + start, ties[u] + start, t[u].n - start, remove);
                t[u].picked -= drop;
            }
        }
        result = 0;
    }
done:
    if (parts)
        for (int64_t j = 0; j < n_jobs; j++) { free(parts[j].index[1]); free(parts[j].key[1]); }
    free(jobs); free(parts); free(ties); free(tie_counts); free(marked); free(tied); free(equal); free(per);
    return result;
}


/* A mask update's drop, growth and re-masking, layer by layer (the controller's _regrown and _zero on one
   process) ----------------------------------------------------------------------------------------------

   For each layer, as granet_select and granet_zero_where_not do them: the drop (the k smallest keys of
   `weight` among the `active` entries of `mask`, with `drop_flags`: its REMOVE marks into `dropped`),
   the growth (the k largest keys of `grad` outside the drop's mask, with `grow_flags`: its KEEP_REST marks
   into `grown`), then the `tensors` zeroed where `mask` and the growth are not both set and the growth
   copied into `dest` (with k = 0: zeroed where `mask` is clear, `mask` copied into `dest`). A NULL
   `dropped` or `grown` is a buffer of the thread's own, kept between calls.

   A layer is done whole by one thread: the selections' steps that one thread takes (the sample's random
   reads, the radix select, the calls) then run beside another layer's instead of holding the other threads
   back. Layers of at least 1/threads of all the entries come first, each on all the threads; then the rest,
   taken in the order given (the largest first: the caller sorts them). `failed` is set where a selection
   must run in _pick's own steps (a k-th key that is NaN, no memory): that layer's `mask`, `tensors` and
   `dest` are as they were (`dropped` and `grown` may have been written). */

typedef struct {
    const float *weight, *grad;
    const uint8_t *mask;
    uint8_t *dropped, *grown, *dest;
    void *const *tensors;
    const int32_t *sizes;
    int32_t n_tensors, failed;
    int64_t n, k, active;
} regrow_layer;

static __thread uint8_t *spare_kept;
static __thread size_t spare_bytes;

static uint8_t *spare_room(int64_t n)
{
    if ((size_t)n > spare_bytes) {
        free(spare_kept);
        spare_kept = malloc((size_t)n);
        spare_bytes = spare_kept ? (size_t)n : 0;
    }
    return spare_kept;
}

static int32_t regrow_one(regrow_layer *l, int32_t drop_flags, int32_t grow_flags, int64_t sample_above,
                          int64_t chunk, int64_t span, int32_t threads)
{
    const uint8_t *keep = l->mask;
    uint8_t *grown = NULL;
    if (l->k > 0) {
        uint8_t *dropped = l->dropped ? l->dropped : spare_room(l->n);
        grown = l->grown ? l->grown : spare_room(l->n);
        if (!dropped || !grown || dropped == grown) return 1;
        select_tensor drop = {l->weight, l->mask, dropped, l->n, 0};
        if (granet_select(&drop, 1, l->k, l->active, drop_flags, l->n > sample_above, chunk, threads)) return 1;
        select_tensor grow = {l->grad, dropped, grown, l->n, 0};
        if (granet_select(&grow, 1, l->k, l->n - l->active + l->k, grow_flags, l->n > sample_above, chunk,
                          threads))
            return 1;
    }
    granet_zero_where_not(keep, grown, l->dest, l->n, l->tensors, l->sizes, l->n_tensors, span, threads);
    return 0;
}

void granet_regrow(regrow_layer *layers, int32_t count, int32_t drop_flags, int32_t grow_flags,
                   int64_t sample_above, int64_t chunk, int64_t span, int32_t threads)
{
    int64_t total = 0;
    for (int32_t u = 0; u < count; u++) total += layers[u].n;
    /* the entries from which a layer runs on all the threads: 1/threads of them all */
    const int64_t on_all = threads > 1 ? slices_of(total, threads) : INT64_MAX;
    for (int32_t u = 0; u < count; u++)
        if (layers[u].n >= on_all)
            layers[u].failed = regrow_one(&layers[u], drop_flags, grow_flags, sample_above, chunk, span, threads);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int32_t u = 0; u < count; u++)
        if (layers[u].n < on_all)
            layers[u].failed = regrow_one(&layers[u], drop_flags, grow_flags, sample_above, chunk, span, 1);
}
