/* torch's CPU random stream (its Mersenne Twister, mt19937), drawn here instead of by torch.

A seeded request replays the reference's random stream: its sampling draws exponential noise over
the whole vocabulary, one 64-bit number (two 32-bit outputs) per element, even where only two
columns matter, so that every later draw starts where the reference's does. torch makes those
numbers one at a time through its generator (~6 ns a number); here whole blocks of the state are
tempered in plain loops the compiler vectorizes.

`mossserve_random53` does what `torch.empty(count, dtype=torch.int64).random_(0, 2**53,
generator=g)` does on a CPU generator: out[i] = ((first & 0x1fffff) << 32) | second, first and
second being the i-th pair of the generator's outputs, and the generator left where torch leaves
it. It works on the bytes of `g.get_state()` (the legacy layout: int32 `left` at offset 8, uint64
`next` at 16, 624 uint64 state words from 24), which the caller gives back to `g.set_state`.
layers/cpu_random.py checks the result against torch's own draws before using it. */
#include <stdint.h>
#include <string.h>

#define STATE_N 624
#define STATE_M 397
#define LEFT_OFFSET 8
#define NEXT_OFFSET 16
#define WORDS_OFFSET 24

/* Wider vectors where the CPU has them, chosen when the library loads (GCC and clang on x86-64). */
#if defined(__x86_64__) && defined(__GNUC__)
#define VECTORIZED __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VECTORIZED
#endif

static inline uint32_t twist(uint32_t u, uint32_t v) {
    uint32_t mixed = (u & 0x80000000u) | (v & 0x7fffffffu);
    return (mixed >> 1) ^ (-(v & 1u) & 0x9908b0dfu);
}

/* The next 624 words, in place, as torch's mt19937::next_state. */
VECTORIZED static void next_state(uint32_t *s) {
    for (int i = 0; i < STATE_N - STATE_M; i++) s[i] = s[i + STATE_M] ^ twist(s[i], s[i + 1]);
    for (int i = STATE_N - STATE_M; i < STATE_N - 1; i++) s[i] = s[i + STATE_M - STATE_N] ^ twist(s[i], s[i + 1]);
    s[STATE_N - 1] = s[STATE_M - 1] ^ twist(s[STATE_N - 1], s[0]);
}

static inline uint32_t temper(uint32_t y) {
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    return y ^ (y >> 18);
}

VECTORIZED static void temper_block(const uint32_t *words, uint32_t *out, int64_t count) {
    for (int64_t i = 0; i < count; i++) out[i] = temper(words[i]);
}

static inline int64_t bits53(uint32_t first, uint32_t second) {
    return (int64_t)(((uint64_t)(first & 0x1fffffu) << 32) | second);
}

VECTORIZED static void combine_pairs(const uint32_t *outputs, int64_t *out, int64_t pairs) {
    for (int64_t p = 0; p < pairs; p++) out[p] = bits53(outputs[2 * p], outputs[2 * p + 1]);
}

void mossserve_random53(uint8_t *torch_state, int64_t count, int64_t *out) {
    int32_t left;
    uint64_t next;
    uint32_t s[STATE_N], block[STATE_N];
    memcpy(&left, torch_state + LEFT_OFFSET, sizeof left);
    memcpy(&next, torch_state + NEXT_OFFSET, sizeof next);
    for (int i = 0; i < STATE_N; i++) {
        uint64_t word;
        memcpy(&word, torch_state + WORDS_OFFSET + 8 * i, sizeof word);
        s[i] = (uint32_t)word;
    }
    /* A call takes s[next] after decrementing `left`; the one that brings it to 0 first makes the
       next state (left = 624, next = 0). So left - 1 outputs are ready before the next state. */
    uint32_t first = 0;
    int have_first = 0;
    int64_t i = 0;
    while (i < count) {
        if (left == 1) {
            next_state(s);
            left = STATE_N + 1;
            next = 0;
        }
        int64_t take = left - 1, wanted = 2 * (count - i) - have_first;
        if (take > wanted) take = wanted;
        temper_block(s + next, block, take);
        int64_t j = 0;
        if (have_first) {  /* the second half of a pair split by the next state */
            out[i++] = bits53(first, block[0]);
            have_first = 0;
            j = 1;
        }
        int64_t pairs = (take - j) / 2;
        combine_pairs(block + j, out + i, pairs);
        i += pairs;
        j += 2 * pairs;
        if (j < take) {
            first = block[j];
            have_first = 1;
        }
        next += (uint64_t)take;
        left -= (int32_t)take;
    }
    memcpy(torch_state + LEFT_OFFSET, &left, sizeof left);
    memcpy(torch_state + NEXT_OFFSET, &next, sizeof next);
    for (int i = 0; i < STATE_N; i++) {
        uint64_t word = s[i];
        memcpy(torch_state + WORDS_OFFSET + 8 * i, &word, sizeof word);
    }
}
