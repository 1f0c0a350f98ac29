/* bf16 kernels for a decode step of a few rows on an AVX-512 CPU. Built and loaded by
 * layers/cpu_kernels.py; called through layers/cpu_gemv.py (products), layers/cpu_decode.py
 * (whole Qwen3 decoder layers) and layers/cpu_select.py.
 *
 * Products, y = x @ W.T for W (n, k), x (m, k), y (m, n), row-major: four rows of W at a time are
 * read once for all m rows of x. bf16 values widen to fp32 exactly (a 16-bit shift), the products
 * are summed in fp32 by FMAs, and each sum is rounded once to bf16 (nearest, ties to even), as
 * torch does. FMAs rather than AVX512-BF16 dot products: on the Xeon measured the dot product
 * instruction made a product of two or more rows compute-bound, and the FMAs were faster at every
 * row count (docs/performance.md).
 *
 * Each row's argmax and top k of fp32 logits (layers/cpu_select.py): a decode step's greedy choice,
 * its draw and its top-k filter.
 *
 * Decoder layers: the whole of a Qwen3 layer (norms, projections, q/k norms, rotary, cache write,
 * attention, SwiGLU, residuals) for a decode step's rows or a prefill piece's (rows of one slot at
 * consecutive positions attend to each other), every layer of a backbone in one call and one
 * OpenMP parallel region, where torch spends about sixty small ops per layer. Every value torch's bf16 layer
 * rounds to bf16 is rounded here at the same point; sums (norms, attention) run in fp32 in their
 * own order. Work is split between `threads` OpenMP threads: built with -fopenmp, this runs on the
 * libgomp torch loaded, so the calling thread keeps the one pool it has (mossserve/openmp.py). */
#include <cpuid.h>
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define MAX_ROWS 4
#define AMX_MIN_ROWS 5 /* from this many rows a product runs on AMX tiles, where the CPU has them */
#define MAX_HEAD_DIM 512
#define SHARED_HEADS 4 /* query heads of one key/value head attended together */
#define MAX_TOP_K 128

static uint16_t round_to_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((bits >> 16) | 0x40u); /* NaN stays a quiet NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

static inline float widen(uint16_t value) {
    uint32_t bits = (uint32_t)value << 16;
    float out;
    memcpy(&out, &bits, sizeof out);
    return out;
}

/* value as the nearest bf16, kept in fp32: what a torch bf16 op stores and the next op reads */
static inline float rounded(float value) { return widen(round_to_bf16(value)); }

/* The 16 bf16 values at p under `mask` (zeros elsewhere), widened to fp32. */
static inline __m512 load16(const uint16_t *p, __mmask16 mask) {
    __m256i half = _mm256_maskz_loadu_epi16(mask, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

/* Each lane rounded to the nearest bf16 (ties to even; a NaN stays a quiet NaN) and kept as fp32:
 * round_to_bf16 for 16 values at once. */
static inline __m512 rounded16(__m512 value) {
    __m512i bits = _mm512_castps_si512(value);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i up = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd));
    __mmask16 nan = _mm512_cmp_ps_mask(value, value, _CMP_UNORD_Q);
    up = _mm512_mask_or_epi32(up, nan, bits, _mm512_set1_epi32(0x400000));
    return _mm512_castsi512_ps(_mm512_and_si512(up, _mm512_set1_epi32((int)0xffff0000u)));
}

/* 0, 1, ..., 15: each lane's own index. */
static inline __m512i lane_indices(void) { return _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }

/* Each lane as bf16 (round_to_bf16's bits), the 16 packed. */
static inline __m256i bf16_bits16(__m512 value) {
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(rounded16(value)), 16));
}

/* e^x in each lane: x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor polynomial to degree 7
 * (relative error below 1e-8, under fp32's own step), times 2^n by scalef (0 below fp32's range,
 * inf above). A NaN stays NaN: max and min return their second operand when either is NaN. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_set1_ps(89.0f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x); /* ln 2 in two parts */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    static const float taylor[] = {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
    for (int i = 0; i < 7; i++)
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(taylor[i]));
    return _mm512_scalef_ps(p, n);
}

/* y = e^x for n values by exp16: the decoder layers' exponential, exported for its test. */
void mossserve_exp_f32(const float *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 mask = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
        _mm512_mask_storeu_ps(y + i, mask, exp16(_mm512_maskz_loadu_ps(mask, x + i)));
    }
}

/* Lanes of the 16-value block that starts at i of a row of n values. */
static inline __mmask16 block_mask(int64_t n, int64_t i) {
    return n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
}

/* The index of a row's largest value as torch's argmax gives it: the first of equal largest values,
 * the first NaN where there is one. Each lane keeps its largest value so far and where it was (a
 * strictly larger one replaces it, so the lane keeps its first); the row's answer is the first
 * index among the lanes that hold the largest. */
static int64_t argmax_row(const float *x, int64_t n) {
    const __m512i lanes = lane_indices();
    __m512 best = _mm512_set1_ps(-INFINITY);
    __m512i at = lanes;
    __mmask16 nan = 0;
    for (int64_t i = 0; i < n; i += 16) {
        __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), block_mask(n, i), x + i);
        __mmask16 larger = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        best = _mm512_mask_mov_ps(best, larger, v);
        at = _mm512_mask_mov_epi32(at, larger, _mm512_add_epi32(lanes, _mm512_set1_epi32((int)i)));
    }
    if (nan) {
        for (int64_t i = 0; i < n; i++)
            if (isnan(x[i]))
                return i;
    }
    __mmask16 largest = _mm512_cmp_ps_mask(best, _mm512_set1_ps(_mm512_reduce_max_ps(best)), _CMP_EQ_OQ);
    return _mm512_mask_reduce_min_epi32(largest, at);
}

/* out[r] = argmax of row r of x (rows, n) fp32, n below 2^31; rows split between `threads`. */
void mossserve_argmax_f32(const float *x, int64_t rows, int64_t n, int64_t *out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (rows * n >= 65536)
    for (int64_t r = 0; r < rows; r++)
        out[r] = argmax_row(x + r * n, n);
}

/* A row's k largest values and their indices, largest first (k < n, k <= MAX_TOP_K), as torch's
 * topk gives them when no two of the k + 1 largest are equal; 0 then, 1 where two are equal, the row
 * holds a NaN, or too many values tie near the top (torch's order among equal values is its own:
 * the caller asks torch). First the largest value of each of 16 * a interleaved slices of the row:
 * they are values at distinct places, so the (k + 1)-th largest of them bounds the row's (k + 1)-th
 * largest from below. Then every value at least that bound is gathered (a few dozen, by compressed
 * stores) and only those are sorted. */
static int top_k_row(const float *x, int64_t n, int k, float *values, int64_t *indices) {
    enum { MAX_SLICES = (MAX_TOP_K + 1 + 15) / 16, ROOM = 4 * (MAX_TOP_K + 1) };
    const int keep = k + 1, a = (keep + 15) / 16;
    __m512 top[MAX_SLICES];
    for (int s = 0; s < a; s++)
        top[s] = _mm512_set1_ps(-INFINITY);
    __mmask16 nan = 0;
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 lanes = block_mask(n, i);
        __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), lanes, x + i);
        nan |= _mm512_mask_cmp_ps_mask(lanes, v, v, _CMP_UNORD_Q);
        int s = (int)((i / 16) % a);
        top[s] = _mm512_max_ps(top[s], v);
    }
    if (nan)
        return 1;
    float maxima[MAX_SLICES * 16];
    for (int s = 0; s < a; s++)
        _mm512_storeu_ps(maxima + 16 * s, top[s]);
    for (int j = 1; j < 16 * a; j++) { /* largest first */
        float value = maxima[j];
        int place = j;
        for (; place > 0 && maxima[place - 1] < value; place--)
            maxima[place] = maxima[place - 1];
        maxima[place] = value;
    }
    const __m512 bound = _mm512_set1_ps(maxima[keep - 1]);
    float kept[ROOM + 16];
    int64_t at[ROOM + 16];
    int count = 0;
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 large = _mm512_mask_cmp_ps_mask(block_mask(n, i), _mm512_loadu_ps(x + i), bound, _CMP_GE_OQ);
        if (!large)
            continue;
        if (count + 16 > ROOM)
            return 1;
        __m512i where = _mm512_add_epi32(lane_indices(), _mm512_set1_epi32((int)i));
        _mm512_mask_compressstoreu_ps(kept + count, large, _mm512_maskz_loadu_ps(large, x + i));
        int32_t places[16];
        _mm512_mask_compressstoreu_epi32(places, large, where);
        int got = __builtin_popcount(large);
        for (int j = 0; j < got; j++)
            at[count + j] = places[j];
        count += got;
    }
    for (int j = 1; j < count; j++) { /* largest first; equal values keep their order */
        float value = kept[j];
        int64_t index = at[j];
        int place = j;
        for (; place > 0 && kept[place - 1] < value; place--) {
            kept[place] = kept[place - 1];
            at[place] = at[place - 1];
        }
        kept[place] = value;
        at[place] = index;
    }
    for (int j = 0; j + 1 < keep; j++)
        if (kept[j] == kept[j + 1])
            return 1;
    for (int j = 0; j < k; j++) {
        values[j] = kept[j];
        indices[j] = at[j];
    }
    return 0;
}

/* Each row's top_k_row into values / indices (rows, k); returns how many rows it declined. */
int64_t mossserve_top_k_f32(const float *x, int64_t rows, int64_t n, int k, float *values, int64_t *indices,
                            int threads) {
    int64_t declined = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : declined) if (rows * n >= 65536)
    for (int64_t r = 0; r < rows; r++)
        declined += top_k_row(x + r * n, n, k, values + r * k, indices + r * k);
    return declined;
}

/* Where a product's sums go: rounded once to bf16, as torch's bf16 product stores them, or kept in
 * fp32 (`wide`: output heads, whose logits the caller widens anyway; rounding them to bf16 made
 * most of a sampled row's top-k candidates tie, and ties keep a whole-vector sort, layers/sampler.py). */
typedef struct {
    void *data;
    int wide;
} Out;

static inline void put(Out y, int64_t i, float sum) {
    if (y.wide)
        ((float *)y.data)[i] = sum;
    else
        ((uint16_t *)y.data)[i] = round_to_bf16(sum);
}

static inline Out bf16_out(uint16_t *y) { return (Out){y, 0}; }

/* y[c][r] = x[c] . w[r] for `rows` rows of w and m rows of x, x already widened to fp32 (its values
 * are bf16's, so the products are the same; the widening is done once per product, not once per
 * group of w, which at 16 rows halved the instructions competing with the FMAs). Called with
 * constant rows and m, and every loop over them unrolled, so the sums live in registers. */
static inline __attribute__((always_inline)) void dot_rows(const uint16_t *w, const float *x, Out y, int64_t at,
                                                           int64_t n, int64_t k, int rows, int m) {
    __m512 sums[4][MAX_ROWS];
#pragma GCC unroll 4
    for (int r = 0; r < rows; r++)
#pragma GCC unroll 4
        for (int c = 0; c < m; c++)
            sums[r][c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < k; j += 16) {
        /* all 16 lanes but in the last block of a k that is not a multiple of 16 */
        __mmask16 mask = k - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (k - j)) - 1);
        __m512 xs[MAX_ROWS];
#pragma GCC unroll 4
        for (int c = 0; c < m; c++)
            xs[c] = _mm512_maskz_loadu_ps(mask, x + c * k + j);
#pragma GCC unroll 4
        for (int r = 0; r < rows; r++) {
            /* the next group's rows, one block ahead: the hardware's prefetcher alone left the reads
             * of these short rows at about three quarters of the rate (docs/performance.md) */
            _mm_prefetch((const char *)(w + (r + 4) * k + j), _MM_HINT_T0);
            __m512 ws = load16(w + r * k + j, mask);
#pragma GCC unroll 4
            for (int c = 0; c < m; c++)
                sums[r][c] = _mm512_fmadd_ps(ws, xs[c], sums[r][c]);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < rows; r++)
#pragma GCC unroll 4
        for (int c = 0; c < m; c++)
            put(y, at + c * n + r, _mm512_reduce_add_ps(sums[r][c]));
}

/* y = x @ W.T for W's rows first..first+3 (fewer at its end) and every row of x, MAX_ROWS rows of x
 * at a time while those rows of W are in cache, so W is still read from memory once. */
static void dot_group(const uint16_t *w, const float *x, Out y, int64_t n, int64_t k, int m, int64_t first) {
    const uint16_t *block = w + first * k;
    for (int c = 0; c < m; c += MAX_ROWS) {
        const float *xs = x + c * k;
        int64_t ys = c * n + first;
        int rows = m - c < MAX_ROWS ? m - c : MAX_ROWS;
        if (n - first < 4)
            dot_rows(block, xs, y, ys, n, k, (int)(n - first), rows);
        else if (rows == 1)
            dot_rows(block, xs, y, ys, n, k, 4, 1);
        else if (rows == 2)
            dot_rows(block, xs, y, ys, n, k, 4, 2);
        else if (rows == 3)
            dot_rows(block, xs, y, ys, n, k, 4, 3);
        else
            dot_rows(block, xs, y, ys, n, k, 4, 4);
    }
}

/* This thread's share of y = x @ W.T: inside a parallel region W's row groups are split between
 * the team (the loop's implicit barrier ends it); outside one, all of it. */
static void gemm_team(const uint16_t *w, const float *x, Out y, int64_t n, int64_t k, int m) {
#pragma omp for schedule(static)
    for (int64_t g = 0; g < (n + 3) / 4; g++)
        dot_group(w, x, y, n, k, m, 4 * g);
}

/* ---- AMX tiles, for products of five to sixteen rows ------------------------------------------ */

/* Whether this process may use AMX bf16 tiles: the CPU has them and Linux grants their state
 * (asked once; torch asks the same for its own AMX kernels). */
static int amx_available(void) {
    static int ready = -1;
    if (ready < 0) {
        unsigned a, b, c, d;
        int cpu = __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d >> 22 & 1) && (d >> 24 & 1);
        ready = cpu && syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    }
    return ready;
}

/* amx_available, for the Python side (layers/cpu_kernels.py) */
int mossserve_amx_available(void) { return amx_available(); }

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t columns_bytes[16];
    uint8_t rows[16];
} TileConfig;

/* The rows of x laid out for the tiles: all m up to 16; past 16, blocks of 16 rows, x's rows padded
 * to a multiple of 16 (the padding's pairs are zeros, their sums never stored). */
static inline int padded_rows(int m) { return m <= 16 ? m : (m + 15) / 16 * 16; }

/* This thread's tiles for m rows of x. Up to 16 rows: 0 and 3 sums (16 weight rows x m, fp32), 1 and
 * 4 weights (16 rows x 32 bf16), 2 x (16 pairs of k x m columns): two blocks of weight rows against
 * x. Past 16 rows: 0-3 sums of two blocks of weight rows (4, 5) against two blocks of 16 rows of x
 * (6, 7), every tile 16 x 64 bytes. */
static void configure_tiles(int m) {
    TileConfig config = {.palette = 1};
    for (int t = 0; t < (m <= 16 ? 5 : 8); t++) {
        config.rows[t] = 16;
        config.columns_bytes[t] = (uint16_t)(m > 16 || t == 1 || t == 4 ? 64 : 4 * m);
    }
    _tile_loadconfig(&config);
}

/* x (m, k) fp32 holding bf16 values, laid out as the tiles read it: pairs of consecutive k, row after
 * row of x ((k / 2, padded_rows(m), 2) bf16), 32 values of a row at a time, split in the team (k a
 * multiple of 32). The padding rows are left as they are (zeros: the buffer is allocated zeroed). */
static void lay_out_pairs(const float *x, uint16_t *pairs, int64_t k, int m) {
    const int width = padded_rows(m);
    const __m512i stride = _mm512_mullo_epi32(lane_indices(), _mm512_set1_epi32(width));
#pragma omp for schedule(static)
    for (int64_t item = 0; item < m * (k / 32); item++) {
        int64_t c = item % m, j = item / m * 32;
        __m256i low = bf16_bits16(_mm512_loadu_ps(x + c * k + j));
        __m256i high = bf16_bits16(_mm512_loadu_ps(x + c * k + j + 16));
        _mm512_i32scatter_epi32((int *)pairs + j / 2 * width + c, stride,
                                _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1), 4);
    }
}

/* The sums of a block of 16 weight rows against rows first..first+count-1 of x (sums: 16 x width,
 * fp32) into those rows' columns at..at+15 of y. */
static void put_block(Out y, const float *sums, int64_t at, int64_t n, int first, int count, int width) {
    const __m512i column = _mm512_mullo_epi32(lane_indices(), _mm512_set1_epi32(width));
    for (int c = 0; c < count; c++) {
        __m512 v = _mm512_i32gather_ps(column, sums + c, 4);
        int64_t row = first + c;
        if (y.wide)
            _mm512_storeu_ps((float *)y.data + row * n + at, v);
        else
            _mm256_storeu_si256((__m256i *)((uint16_t *)y.data + row * n + at), bf16_bits16(v));
    }
}

/* The next pair of weight blocks into L2, the 32 lines of its k step j..j+31 (`end`: W's last full
 * block's end): the tiles read each weight row 64 bytes at a time, 32 rows apart, which the hardware's
 * prefetcher left at 9-13 GB/s at 16 rows (docs/performance.md). */
static inline void prefetch_pair(const char *next, const char *end, int64_t j) {
    for (int line = 0; line < 32; line++) {
        const char *p = next + (j + line) * 64;
        if (p < end)
            _mm_prefetch(p, _MM_HINT_T1);
    }
}

/* amx_team's pairs of weight blocks against up to 16 rows of x: two sums in flight, one load of x's
 * tile for both; the next pair prefetched while this one is summed. */
static void amx_pairs_few(const uint16_t *w, const uint16_t *pairs, Out y, int64_t n, int64_t k, int m,
                          int64_t blocks) {
    const char *end = (const char *)(w + blocks * 16 * k);
    float sums[2][16 * 16];
#pragma omp for schedule(static) nowait
    for (int64_t b = 0; b < blocks; b += 2) {
        const uint16_t *rows = w + b * 16 * k;
        const int two = b + 1 < blocks;
        _tile_zero(0);
        _tile_zero(3);
        for (int64_t j = 0; j < k; j += 32) {
            prefetch_pair((const char *)(rows + 32 * k), end, j);
            _tile_loadd(2, pairs + j * m, m * 4);
            _tile_loadd(1, rows + j, k * 2);
            _tile_dpbf16ps(0, 1, 2);
            if (two) {
                _tile_loadd(4, rows + 16 * k + j, k * 2);
                _tile_dpbf16ps(3, 4, 2);
            }
        }
        _tile_stored(0, sums[0], m * 4);
        put_block(y, sums[0], b * 16, n, 0, m, m);
        if (two) {
            _tile_stored(3, sums[1], m * 4);
            put_block(y, sums[1], (b + 1) * 16, n, 0, m, m);
        }
    }
}

/* amx_team's pairs of weight blocks against more than 16 rows of x: two blocks of weights by two
 * blocks of 16 rows of x, four sums in flight (each tile loaded once for two of them), every pair of
 * x's blocks in turn while the weights are in cache; the next pair of weight blocks prefetched during
 * the first. A sum gets the same terms in the same order as amx_pairs_few gives it. (The tiles then
 * read x from L2 at about its bandwidth: a prefill piece's products run at a third of AMX's speed.
 * Weights in L2 and x in L1 instead, each thread's share of weight pairs passing each pair of x's
 * blocks, was slower: 368 rows' gate_up 8-9 -> 17 ms.) */
static void amx_pairs_many(const uint16_t *w, const uint16_t *pairs, Out y, int64_t n, int64_t k, int m,
                           int64_t blocks) {
    const int width = padded_rows(m);
    const char *end = (const char *)(w + blocks * 16 * k);
    float sums[16 * 16];
#pragma omp for schedule(static) nowait
    for (int64_t b = 0; b < blocks; b += 2) {
        const uint16_t *rows = w + b * 16 * k;
        const int two = b + 1 < blocks;
        for (int first = 0; first < m; first += 32) {
            const int second = first + 16 < m;
            const int count = m - first < 16 ? m - first : 16, rest = m - first - 16 < 16 ? m - first - 16 : 16;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t j = 0; j < k; j += 32) {
                if (first == 0)
                    prefetch_pair((const char *)(rows + 32 * k), end, j);
                _tile_loadd(6, pairs + j * width + 2 * first, width * 4);
                _tile_loadd(4, rows + j, k * 2);
                _tile_dpbf16ps(0, 4, 6);
                if (two) {
                    _tile_loadd(5, rows + 16 * k + j, k * 2);
                    _tile_dpbf16ps(1, 5, 6);
                }
                if (second) {
                    _tile_loadd(7, pairs + j * width + 2 * (first + 16), width * 4);
                    _tile_dpbf16ps(2, 4, 7);
                    if (two)
                        _tile_dpbf16ps(3, 5, 7);
                }
            }
            _tile_stored(0, sums, 64);
            put_block(y, sums, b * 16, n, first, count, 16);
            if (two) {
                _tile_stored(1, sums, 64);
                put_block(y, sums, (b + 1) * 16, n, first, count, 16);
            }
            if (second) {
                _tile_stored(2, sums, 64);
                put_block(y, sums, b * 16, n, first + 16, rest, 16);
                if (two) {
                    _tile_stored(3, sums, 64);
                    put_block(y, sums, (b + 1) * 16, n, first + 16, rest, 16);
                }
            }
        }
    }
}

/* y = x @ W.T inside the team on AMX tiles (k a multiple of 32): pairs of blocks of 16 weight rows
 * against x's rows, the sums in fp32 and each rounded once; W's rows past its last full block by
 * FMAs. */
static void amx_team(const uint16_t *w, const float *x, uint16_t *pairs, Out y, int64_t n, int64_t k, int m) {
    lay_out_pairs(x, pairs, k, m);
    const int64_t blocks = n / 16;
    if (m <= 16)
        amx_pairs_few(w, pairs, y, n, k, m, blocks);
    else
        amx_pairs_many(w, pairs, y, n, k, m, blocks);
#pragma omp for schedule(static)
    for (int64_t first = 16 * blocks; first < n; first += 4)
        dot_group(w, x, y, n, k, m, first);
}

/* The team's product by AMX where it is set up (`pairs` given) and k allows, else by FMAs. */
static void product_team(const uint16_t *w, const float *x, uint16_t *pairs, Out y, int64_t n, int64_t k, int m) {
    if (pairs != NULL && k % 32 == 0)
        amx_team(w, x, pairs, y, n, k, m);
    else
        gemm_team(w, x, y, n, k, m);
}

/* y = x @ W.T for m bf16 rows of x (at most 16 from layers/cpu_gemv.py): FMAs for up to four rows,
 * AMX tiles from five where the CPU has them; y in bf16, or with `wide` the fp32 sums. */
void mossserve_gemm_bf16(const uint16_t *w, const uint16_t *x, void *y, int64_t n, int64_t k, int m, int wide,
                         int threads) {
    float *widened = malloc(sizeof(float) * m * k);
    for (int64_t i = 0; i < m * k; i++)
        widened[i] = widen(x[i]);
    uint16_t *pairs = m >= AMX_MIN_ROWS && amx_available() ? calloc((size_t)padded_rows(m) * (k + 32), 2) : NULL;
#pragma omp parallel num_threads(threads)
    {
        if (pairs != NULL)
            configure_tiles(m);
        product_team(w, widened, pairs, (Out){y, wide}, n, k, m);
        if (pairs != NULL)
            _tile_release();
    }
    free(pairs);
    free(widened);
}

/* ---- decoder layers ---------------------------------------------------------------------------- */

/* The sizes of a backbone, its cache and its rotary tables (rows; 0 without), in the order
 * layers/cpu_decode.py passes them. */
typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, intermediate, cache_slots, cache_len, qk_norm, table_rows;
} Dims;

/* Per layer, the order of its weight pointers (layers/cpu_decode.py). */
enum { INPUT_NORM, QKV, Q_NORM, K_NORM, O_PROJ, POST_NORM, GATE_UP, DOWN, WEIGHTS_PER_LAYER };

/* out = weight * bf16(x * rsqrt(mean(x^2) + eps)), each product rounded to bf16 (and kept in fp32):
 * torch's RMSNorm on bf16, whose normalisation runs in fp32 (layers/norms.py). The squares are summed
 * in 16 lanes, then across them. */
static void rms_norm(const uint16_t *x, const uint16_t *weight, float *out, int64_t n, float eps) {
    __m512 squares = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        __m512 v = load16(x + i, block_mask(n, i));
        squares = _mm512_fmadd_ps(v, v, squares);
    }
    __m512 scale = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(squares) / (float)n + eps));
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 mask = block_mask(n, i);
        __m512 normed = rounded16(_mm512_mul_ps(load16(x + i, mask), scale));
        _mm512_mask_storeu_ps(out + i, mask, rounded16(_mm512_mul_ps(load16(weight + i, mask), normed)));
    }
}

/* One q or k head in place: its q/k norm (if the model has one), then the rotate-half rotation by
 * the tables' rows (none for a model without rotary: cos_row NULL), with torch's roundings
 * (layers/attention.py, layers/rotary.py), 16 values at a time. */
static void norm_and_rotate(uint16_t *head, const uint16_t *norm_weight, const float *cos_row, const float *sin_row,
                            int64_t d, float eps) {
    float v[MAX_HEAD_DIM], turned[MAX_HEAD_DIM];
    if (norm_weight != NULL)
        rms_norm(head, norm_weight, v, d, eps);
    else
        for (int64_t i = 0; i < d; i += 16)
            _mm512_mask_storeu_ps(v + i, block_mask(d, i), load16(head + i, block_mask(d, i)));
    int64_t half = d / 2;
    if (cos_row != NULL) { /* the other half of the head, in place of each value */
        memcpy(turned, v + half, sizeof(float) * half);
        memcpy(turned + half, v, sizeof(float) * half);
    }
    for (int64_t i = 0; i < d; i += 16) {
        __mmask16 mask = block_mask(d, i);
        __m512 value = _mm512_maskz_loadu_ps(mask, v + i);
        if (cos_row != NULL) {
            __m512 cos16 = rounded16(_mm512_maskz_loadu_ps(mask, cos_row + i));
            __m512 sin16 = rounded16(_mm512_maskz_loadu_ps(mask, sin_row + i));
            value = _mm512_add_ps(rounded16(_mm512_mul_ps(value, cos16)),
                                  rounded16(_mm512_mul_ps(_mm512_maskz_loadu_ps(mask, turned + i), sin16)));
        }
        _mm256_mask_storeu_epi16(head + i, mask, bf16_bits16(value));
    }
}

/* `n` query heads (consecutive in q and in out) over the first `count` cached positions of the
 * key/value head they share: softmax of the scaled scores in fp32, the weights rounded to bf16 before
 * they meet the values (as torch's CPU flash attention does), the sum divided by the fp32 total and
 * rounded once. Each key and value is read and widened once for all n heads (grouped-query
 * attention); every head's sums run in the order one head alone would. scores: n * count floats. */
static inline __attribute__((always_inline)) void attend_group(const uint16_t *q, int n, const uint16_t *keys,
                                                               const uint16_t *values, float *out, int64_t count,
                                                               int64_t d, float scale, float *scores) {
    __m512 query[SHARED_HEADS][MAX_HEAD_DIM / 16], acc[SHARED_HEADS][MAX_HEAD_DIM / 16];
    const int64_t blocks = (d + 15) / 16;
    float top[SHARED_HEADS], total[SHARED_HEADS];
    for (int h = 0; h < n; h++) {
        for (int64_t b = 0; b < blocks; b++) {
            query[h][b] = load16(q + h * d + 16 * b, block_mask(d, 16 * b));
            acc[h][b] = _mm512_setzero_ps();
        }
        top[h] = -INFINITY;
    }
    for (int64_t j = 0; j < count; j++) {
        const uint16_t *key = keys + j * d;
        for (int64_t line = 0; line < d * 2; line += 64) /* the value, summed after the scores: in cache by then */
            _mm_prefetch((const char *)(values + j * d) + line, _MM_HINT_T0);
        __m512 sums[SHARED_HEADS];
        for (int h = 0; h < n; h++)
            sums[h] = _mm512_setzero_ps();
        for (int64_t b = 0; b < blocks; b++) {
            __m512 wide = load16(key + 16 * b, block_mask(d, 16 * b));
            for (int h = 0; h < n; h++)
                sums[h] = _mm512_fmadd_ps(query[h][b], wide, sums[h]);
        }
        for (int h = 0; h < n; h++) {
            float score = _mm512_reduce_add_ps(sums[h]) * scale;
            scores[h * count + j] = score;
            top[h] = score > top[h] ? score : top[h];
        }
    }
    for (int h = 0; h < n; h++) {
        float *row = scores + h * count;
        __m512 totals = _mm512_setzero_ps();
        for (int64_t j = 0; j < count; j += 16) {
            __mmask16 mask = block_mask(count, j);
            __m512 weights = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, row + j), _mm512_set1_ps(top[h])));
            weights = _mm512_maskz_mov_ps(mask, weights);
            totals = _mm512_add_ps(totals, weights);
            _mm512_mask_storeu_ps(row + j, mask, rounded16(weights));
        }
        total[h] = _mm512_reduce_add_ps(totals);
    }
    for (int64_t j = 0; j < count; j++) {
        const uint16_t *value = values + j * d;
        for (int64_t b = 0; b < blocks; b++) {
            __m512 wide = load16(value + 16 * b, block_mask(d, 16 * b));
            for (int h = 0; h < n; h++)
                acc[h][b] = _mm512_fmadd_ps(_mm512_set1_ps(scores[h * count + j]), wide, acc[h][b]);
        }
    }
    float spread[16];
    for (int h = 0; h < n; h++)
        for (int64_t b = 0; b < blocks; b++) {
            _mm512_storeu_ps(spread, acc[h][b]);
            for (int64_t lane = 0; lane < 16 && 16 * b + lane < d; lane++)
                out[h * d + 16 * b + lane] = rounded(spread[lane] / total[h]);
        }
}

/* attend_group for one group, with the usual group sizes and head sizes as constants (its loops
 * over heads and blocks unrolled, the query and the sums in registers; the same sums in the same
 * order as the general case). */
static void attend_heads(const uint16_t *q, int n, const uint16_t *keys, const uint16_t *values, float *out,
                         int64_t count, int64_t d, float scale, float *scores) {
#define ATTEND(N, D) attend_group(q, N, keys, values, out, count, D, scale, scores)
    if (d == 64 && n == 1)
        ATTEND(1, 64);
    else if (d == 64 && n == 2)
        ATTEND(2, 64);
    else if (d == 64 && n == 4)
        ATTEND(4, 64);
    else if (d == 128 && n == 1)
        ATTEND(1, 128);
    else if (d == 128 && n == 2)
        ATTEND(2, 128);
    else
        ATTEND(n, d);
#undef ATTEND
}

/* x (m, hidden), the rows' residual stream, through every layer, in place. weights: layers x
 * WEIGHTS_PER_LAYER pointers; cache_k/v (layers, cache_slots, kv_heads, cache_len, head_dim); row
 * c writes position positions[c] of slot slots[c] and attends to positions 0..positions[c];
 * cos/sin: fp32 rotary tables (positions, head_dim), sin with its first half negated, or NULL for
 * a model without rotary (MOSS-TTS-Local's depth transformer). Returns 0, or -1 without touching
 * anything when a row's slot or position lies outside the cache or the tables. */
int mossserve_decode_bf16(uint16_t *x, int m, const uint16_t *const *weights, int layers, uint16_t *cache_k,
                           uint16_t *cache_v, const int64_t *slots, const int64_t *positions, const float *cos_table,
                           const float *sin_table, const Dims *dims, float eps, int threads) {
    const int64_t H = dims->hidden, heads = dims->heads, kv = dims->kv_heads, d = dims->head_dim;
    const int64_t I = dims->intermediate, qkv_width = (heads + 2 * kv) * d, group = heads / kv;
    const int64_t blocks = (I + 15) / 16;
    const int64_t layer_stride = dims->cache_slots * kv * dims->cache_len * d;
    for (int c = 0; c < m; c++)
        if (slots[c] < 0 || slots[c] >= dims->cache_slots || positions[c] < 0 || positions[c] >= dims->cache_len
            || (cos_table != NULL && positions[c] >= dims->table_rows))
            return -1;
    int64_t longest = 0;
    for (int c = 0; c < m; c++)
        longest = positions[c] + 1 > longest ? positions[c] + 1 : longest;
    /* the products' inputs in fp32 (bf16 values), their outputs in bf16 */
    float *normed = malloc(sizeof(float) * m * (H + heads * d + I));
    float *attended = normed + m * H, *activated = attended + m * heads * d;
    uint16_t *qkv = malloc(sizeof(uint16_t) * m * (qkv_width + H + 2 * I));
    uint16_t *projected = qkv + m * qkv_width, *gate_up = projected + m * H;
    float *scores = malloc(sizeof(float) * threads * SHARED_HEADS * longest);
    const int64_t chunks = (group + SHARED_HEADS - 1) / SHARED_HEADS; /* per key/value head */
    const float scale = 1.0f / sqrtf((float)d);
    int64_t widest = H > heads * d ? H : heads * d;
    widest = widest > I ? widest : I;
    uint16_t *pairs = m >= AMX_MIN_ROWS && amx_available() ? calloc((size_t)padded_rows(m) * (widest + 32), 2) : NULL;

#pragma omp parallel num_threads(threads)
    {
    if (pairs != NULL)
        configure_tiles(m);
    for (int layer = 0; layer < layers; layer++) {
        const uint16_t *const *w = weights + layer * WEIGHTS_PER_LAYER;
        uint16_t *layer_k = cache_k + layer * layer_stride, *layer_v = cache_v + layer * layer_stride;
#pragma omp for schedule(static)
        for (int c = 0; c < m; c++)
            rms_norm(x + c * H, w[INPUT_NORM], normed + c * H, H, eps);
        product_team(w[QKV], normed, pairs, bf16_out(qkv), qkv_width, H, m);
        /* q and k heads normed and rotated; k and v written to the cache */
#pragma omp for schedule(static)
        for (int64_t item = 0; item < m * (heads + 2 * kv); item++) {
            int64_t c = item / (heads + 2 * kv), j = item % (heads + 2 * kv), p = positions[c];
            uint16_t *head = qkv + c * qkv_width + j * d;
            if (j < heads + kv) {
                const uint16_t *norm = !dims->qk_norm ? NULL : j < heads ? w[Q_NORM] : w[K_NORM];
                norm_and_rotate(head, norm, cos_table == NULL ? NULL : cos_table + p * d,
                                sin_table == NULL ? NULL : sin_table + p * d, d, eps);
            }
            if (j >= heads) {
                int64_t kv_head = (j - heads) % kv;
                uint16_t *cache = j < heads + kv ? layer_k : layer_v;
                memcpy(cache + ((slots[c] * kv + kv_head) * dims->cache_len + p) * d, head, sizeof(uint16_t) * d);
            }
        }
#pragma omp for schedule(static)
        for (int64_t item = 0; item < m * kv * chunks; item++) {
            int64_t c = item / (kv * chunks), kv_head = item / chunks % kv, chunk = item % chunks;
            int64_t first = kv_head * group + chunk * SHARED_HEADS;
            int n = (int)(group - chunk * SHARED_HEADS < SHARED_HEADS ? group - chunk * SHARED_HEADS : SHARED_HEADS);
            int64_t base = (slots[c] * kv + kv_head) * dims->cache_len * d;
            attend_heads(qkv + c * qkv_width + first * d, n, layer_k + base, layer_v + base,
                         attended + c * heads * d + first * d, positions[c] + 1, d, scale,
                         scores + omp_get_thread_num() * SHARED_HEADS * longest);
        }
        product_team(w[O_PROJ], attended, pairs, bf16_out(projected), H, heads * d, m);
#pragma omp for schedule(static)
        for (int c = 0; c < m; c++) {
            for (int64_t i = 0; i < H; i++)
                x[c * H + i] = round_to_bf16(widen(x[c * H + i]) + widen(projected[c * H + i]));
            rms_norm(x + c * H, w[POST_NORM], normed + c * H, H, eps);
        }
        product_team(w[GATE_UP], normed, pairs, bf16_out(gate_up), 2 * I, H, m);
#pragma omp for schedule(static)
        for (int64_t item = 0; item < m * blocks; item++) { /* SiLU(gate) * up, 16 at a time */
            int64_t c = item / blocks, i = item % blocks * 16;
            __mmask16 mask = block_mask(I, i);
            const uint16_t *gate = gate_up + c * 2 * I + i;
            __m512 g = load16(gate, mask);
            __m512 silu = rounded16(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f),
                                                                    exp16(_mm512_sub_ps(_mm512_setzero_ps(), g)))));
            _mm512_mask_storeu_ps(activated + c * I + i, mask, rounded16(_mm512_mul_ps(silu, load16(gate + I, mask))));
        }
        product_team(w[DOWN], activated, pairs, bf16_out(projected), H, I, m);
#pragma omp for schedule(static)
        for (int64_t item = 0; item < m * H; item++)
            x[item] = round_to_bf16(widen(x[item]) + widen(projected[item]));
    }
    if (pairs != NULL)
        _tile_release();
    }
    free(pairs);
    free(scores);
    free(qkv);
    free(normed);
    return 0;
}
