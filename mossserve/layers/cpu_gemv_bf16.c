/* y = x @ W.T for one to four bf16 rows on an AVX-512 CPU: W (n, k), x (m, k), y (m, n), row-major.
 *
 * Four rows of W at a time are read once for all m rows of x. bf16 values widen to fp32 exactly (a
 * 16-bit shift), the products are summed in fp32 by FMAs, and each sum is rounded once to bf16
 * (nearest, ties to even), as torch does. FMAs rather than AVX512-BF16 dot products: on the Xeon
 * measured the dot product instruction made a product of two or more rows compute-bound, and the
 * FMAs were faster at every row count (docs/performance.md). W's rows are split between `threads`
 * OpenMP threads: built with -fopenmp, this runs on the libgomp torch loaded, so the calling thread
 * keeps the one pool it has (mossserve/openmp.py). Built and loaded by
 * mossserve/layers/cpu_gemv.py. */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define MAX_ROWS 4

static uint16_t round_to_bf16(float value) {
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((bits >> 16) | 0x40u); /* NaN stays a quiet NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* The 16 bf16 values at p under `mask` (zeros elsewhere), widened to fp32. */
static inline __m512 load16(const uint16_t *p, __mmask16 mask) {
    __m256i half = _mm256_maskz_loadu_epi16(mask, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
}

/* y[c][r] = x[c] . w[r] for `rows` rows of w and m rows of x. Called with constant rows and m, and
 * every loop over them unrolled, so the sums live in registers. */
static inline __attribute__((always_inline)) void dot_rows(const uint16_t *w, const uint16_t *x, uint16_t *y,
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
            xs[c] = load16(x + c * k + j, mask);
#pragma GCC unroll 4
        for (int r = 0; r < rows; r++) {
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
            y[c * n + r] = round_to_bf16(_mm512_reduce_add_ps(sums[r][c]));
}

void mossserve_gemm_bf16(const uint16_t *w, const uint16_t *x, uint16_t *y, int64_t n, int64_t k, int m,
                         int threads) {
    int64_t groups = (n + 3) / 4;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        int64_t first = 4 * g;
        const uint16_t *block = w + first * k;
        if (n - first < 4)
            dot_rows(block, x, y + first, n, k, (int)(n - first), m);
        else if (m == 1)
            dot_rows(block, x, y + first, n, k, 4, 1);
        else if (m == 2)
            dot_rows(block, x, y + first, n, k, 4, 2);
        else if (m == 3)
            dot_rows(block, x, y + first, n, k, 4, 3);
        else
            dot_rows(block, x, y + first, n, k, 4, 4);
    }
}
