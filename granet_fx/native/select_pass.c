/* One pass of granet_fx's exact selection (criteria._pass) over a float32 tensor.

   For each entry i with pool[i] set, of key k = score[i] (|score[i]| with MAGNITUDE; negated with
   LARGEST, so that the largest come first):
   - marked[i]: k <= upper (every pool entry with UPPER_INF);
   - ties[i]:   k == tie (with HAS_TIE), counted per slice of `chunk` entries in tie_counts;
   - gathered:  marked and k >= lower (every marked entry with LOWER_NINF; the ties with
                LOWER_IS_TIE), the ties left out: its flat index (base + i) and k, in order.
   Comparisons are IEEE (a NaN key compares false), as in torch's eager ops.

   Block by block: a loop without branches (which the compiler vectorises) marks a block and notes
   the entries to gather, then a scan gathers them a word of eight notes at a time. Before a block
   that could overflow the gather buffers (`capacity` entries) the pass stops: it returns how many
   entries it went through (n when done), so that the caller can give it room and go on from there. */

#include <stdint.h>
#include <string.h>

enum { MAGNITUDE = 1, LARGEST = 2, UPPER_INF = 4, LOWER_NINF = 8, HAS_TIE = 16, LOWER_IS_TIE = 32 };
enum { BLOCK = 4096 };

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define WIDEST_VECTORS __attribute__((target_clones("avx2", "default")))   /* chosen when loaded */
#else
#define WIDEST_VECTORS
#endif

WIDEST_VECTORS static void mark_block(const float *restrict score, const uint8_t *restrict pool, int64_t n,
                       float lower, float upper, float tie, uint32_t abs_mask, uint32_t sign,
                       uint8_t upper_inf, uint8_t lower_ninf, uint8_t has_tie, uint8_t gather,
                       uint8_t *restrict marked, uint8_t *restrict ties, uint8_t *restrict note,
                       float *restrict keys, int64_t *n_marked, int64_t *n_tied)
{
    int64_t nm = 0, nt = 0;
    for (int64_t i = 0; i < n; i++) {
        uint32_t bits;
        memcpy(&bits, &score[i], 4);
        bits = (bits & abs_mask) ^ sign;
        float k;
        memcpy(&k, &bits, 4);
        const uint8_t p = pool[i] != 0;
        const uint8_t m = p & ((k <= upper) | upper_inf);
        const uint8_t t = p & (k == tie) & has_tie;
        marked[i] = m;
        ties[i] = t;
        note[i] = ((m & ((k >= lower) | lower_ninf)) ^ t) & gather;
        keys[i] = k;
        nm += m;
        nt += t;
    }
    *n_marked += nm;
    *n_tied += nt;
}

int64_t granet_select_pass(const float *score, const uint8_t *pool, int64_t n, int64_t base,
                           float lower, float upper, float tie, int32_t flags,
                           uint8_t *marked, uint8_t *ties, int64_t chunk, int64_t *tie_counts,
                           int64_t *out_index, float *out_key, int64_t capacity, int64_t *totals)
{
    const uint32_t abs_mask = (flags & MAGNITUDE) ? 0x7fffffffu : 0xffffffffu;
    const uint32_t sign = (flags & LARGEST) ? 0x80000000u : 0u;
    const uint8_t upper_inf = (flags & UPPER_INF) != 0, lower_ninf = (flags & LOWER_NINF) != 0,
                  has_tie = (flags & HAS_TIE) != 0, gather = !((flags & LOWER_IS_TIE) && has_tie);
    uint8_t note[BLOCK + 8], scratch[BLOCK];
    float keys[BLOCK];
    int64_t n_marked = 0, gathered = totals[1];
    int64_t i = 0;
    while (i < n) {
        if (capacity - gathered < BLOCK) break;     /* the gather buffers could overflow */
        const int64_t slice = (base + i) / chunk;
        int64_t end = (slice + 1) * chunk - base;   /* a block stays inside one slice */
        if (end > n) end = n;
        if (end - i > BLOCK) end = i + BLOCK;
        const int64_t len = end - i;
        int64_t n_tied = 0;
        mark_block(score + i, pool + i, len, lower, upper, tie, abs_mask, sign, upper_inf, lower_ninf,
                   has_tie, gather, marked + i, has_tie ? ties + i : scratch, note, keys, &n_marked, &n_tied);
        tie_counts[slice] += n_tied;
        memset(note + len, 0, 8);
        for (int64_t j = 0; j < len; j += 8) {
            uint64_t word;
            memcpy(&word, note + j, 8);
            if (!word) continue;
            for (int64_t q = j; q < j + 8 && q < len; q++) {
                out_index[gathered] = base + i + q;     /* written always, kept when noted */
                out_key[gathered] = keys[q];
                gathered += note[q];
            }
        }
        i = end;
    }
    totals[0] += n_marked;
    totals[1] = gathered;
    return i;
}
