/* mquant's native CPU kernels for AVX-512 VNNI (ALGORITHMS.md §14.2): int8 products that read 4- or
 * 8-bit weight codes directly, and the activation quantizers, each one call with no intermediate
 * tensors. Built on first use by mquant/runtime/native.py (plain C, no torch headers: a second to
 * compile) and called through ctypes; OpenMP is the runtime torch already loaded (same soname).
 *
 * Activations are unsigned codes (code + 128): VNNI's vpdpbusd multiplies u8 x s8, so
 *   sum_k (x_k + 128) w_k = sum_k x_k w_k + 128 sum_k w_k,
 * and the second term (`corr`, per output channel) is subtracted from the int32 accumulator, exactly.
 *
 * Weight layouts, per block of 16 output channels (n) and group of input channels (k):
 *   w4: [N/16][K/8][16][4] bytes; byte (n, t) of group g holds code(n, 8g+t) + 8 in its low nibble
 *       and code(n, 8g+4+t) + 8 in its high nibble;
 *   w8: [N/16][K/4][16][4] int8 codes; byte (n, t) of group g is code(n, 4g+t).
 * Epilogue: y = float(acc - corr) * (s_m * w_scale[n]) + bias[n], in fp32 or bf16 (round to nearest
 * even, as torch converts), with the activation scale s_m of row m: `inner` for rows [start, stop)
 * and `x_scale` for the others (AIFS's two blocks; start == stop: one scale), times row_scale[m]
 * when given (per-token scales).
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ROWS_TILE 8 /* activation rows sharing one pass over a weight block */

static inline __m512 load16(const void *x, int bf16, int64_t i, __mmask16 m) {
    if (bf16) {
        __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)x + i);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_maskz_loadu_ps(m, (const float *)x + i);
}

static inline void store16(void *y, int bf16, int64_t i, __m512 v) {
    if (bf16) {
        __m512i b = _mm512_castps_si512(v);
        __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
        __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
        r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000));
        _mm256_storeu_si256((__m256i *)((uint16_t *)y + i), _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
    } else {
        _mm512_storeu_ps((float *)y + i, v);
    }
}

static inline int32_t load4(const uint8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* One block of 16 output channels for `rows` (<= ROWS_TILE, a constant after inlining) rows. */
static inline __attribute__((always_inline)) void block_w4(const uint8_t *x, int64_t K, const uint8_t *wb,
                                                          int rows, __m512i acc[ROWS_TILE]) {
    const __m512i low = _mm512_set1_epi8(0x0F), eight = _mm512_set1_epi8(8);
    __m512i lo_acc[ROWS_TILE], hi_acc[ROWS_TILE];
    for (int r = 0; r < rows; r++) lo_acc[r] = hi_acc[r] = _mm512_setzero_si512();
    for (int64_t g = 0; g < K / 8; g++) {
        __m512i v = _mm512_loadu_si512(wb + g * 64);
        __m512i lo = _mm512_sub_epi8(_mm512_and_si512(v, low), eight);
        __m512i hi = _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(v, 4), low), eight);
        for (int r = 0; r < rows; r++) {
            const uint8_t *xr = x + r * K + g * 8;
            lo_acc[r] = _mm512_dpbusd_epi32(lo_acc[r], _mm512_set1_epi32(load4(xr)), lo);
            hi_acc[r] = _mm512_dpbusd_epi32(hi_acc[r], _mm512_set1_epi32(load4(xr + 4)), hi);
        }
    }
    for (int r = 0; r < rows; r++) acc[r] = _mm512_add_epi32(lo_acc[r], hi_acc[r]);
}

static inline __attribute__((always_inline)) void block_w8(const uint8_t *x, int64_t K, const int8_t *wb,
                                                          int rows, __m512i acc[ROWS_TILE]) {
    __m512i even[ROWS_TILE], odd[ROWS_TILE]; /* two chains: a dpbusd's latency is not the loop's */
    for (int r = 0; r < rows; r++) even[r] = odd[r] = _mm512_setzero_si512();
    int64_t g = 0;
    for (; g + 1 < K / 4; g += 2) {
        __m512i v0 = _mm512_loadu_si512(wb + g * 64), v1 = _mm512_loadu_si512(wb + g * 64 + 64);
        for (int r = 0; r < rows; r++) {
            const uint8_t *xr = x + r * K + g * 4;
            even[r] = _mm512_dpbusd_epi32(even[r], _mm512_set1_epi32(load4(xr)), v0);
            odd[r] = _mm512_dpbusd_epi32(odd[r], _mm512_set1_epi32(load4(xr + 4)), v1);
        }
    }
    if (g < K / 4) {
        __m512i v0 = _mm512_loadu_si512(wb + g * 64);
        for (int r = 0; r < rows; r++)
            even[r] = _mm512_dpbusd_epi32(even[r], _mm512_set1_epi32(load4(x + r * K + g * 4)), v0);
    }
    for (int r = 0; r < rows; r++) acc[r] = _mm512_add_epi32(even[r], odd[r]);
}

typedef struct {
    __m512 outer, inner; /* x_scale * w_scale and inner * w_scale for this block of channels */
    int64_t start, stop;
    const float *row_scale;
} scales_t;

static inline void epilogue(__m512i acc[ROWS_TILE], int rows, __m512i corr, const scales_t *sc, __m512 bias,
                            void *y, int64_t N, int64_t m0, int64_t n0, int bf16) {
    for (int r = 0; r < rows; r++) {
        const int64_t m = m0 + r;
        __m512 s = (m >= sc->start && m < sc->stop) ? sc->inner : sc->outer;
        if (sc->row_scale) s = _mm512_mul_ps(_mm512_set1_ps(sc->row_scale[m]), s);
        __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r], corr)), s);
        store16(y, bf16, (m0 + r) * N + n0, _mm512_add_ps(v, bias));
    }
}

/* The last M % ROWS_TILE rows, with a row count the compiler sees as a constant. */
#define REST(BLOCK, R)                                                                                         \
    case R:                                                                                                    \
        BLOCK(x + m0 * K, K, wb, R, acc);                                                                      \
        epilogue(acc, R, c, &sc, b, y, N, m0, nb * 16, bf16);                                                      \
        break;

#define GEMM(NAME, BLOCK, WTYPE, GROUP)                                                                         \
    void NAME(const uint8_t *x, int64_t M, int64_t K, const WTYPE *w, const int32_t *corr, const float *w_scale, \
              float x_scale, float inner, int64_t start, int64_t stop, const float *row_scale,                \
              const float *bias, void *y, int64_t N, int bf16) {                                                \
        const int64_t blocks = N / 16, block_bytes = K / GROUP * 64;                                            \
        _Pragma("omp parallel for schedule(static) if (blocks > 1 && M * K * N > 65536)")                       \
        for (int64_t nb = 0; nb < blocks; nb++) {                                                               \
            const WTYPE *wb = w + nb * block_bytes;                                                             \
            __m512i c = _mm512_loadu_si512(corr + nb * 16), acc[ROWS_TILE];                                     \
            __m512 ws = _mm512_loadu_ps(w_scale + nb * 16);                                                     \
            scales_t sc = {_mm512_mul_ps(_mm512_set1_ps(x_scale), ws), _mm512_mul_ps(_mm512_set1_ps(inner), ws),   \
                           start, stop, row_scale};                                                             \
            __m512 b = bias ? _mm512_loadu_ps(bias + nb * 16) : _mm512_setzero_ps();                            \
            int64_t m0 = 0;                                                                                     \
            for (; m0 + ROWS_TILE <= M; m0 += ROWS_TILE) {                                                      \
                BLOCK(x + m0 * K, K, wb, ROWS_TILE, acc);                                                       \
                epilogue(acc, ROWS_TILE, c, &sc, b, y, N, m0, nb * 16, bf16);                                   \
            }                                                                                                   \
            switch (M - m0) {                                                                                   \
            REST(BLOCK, 7) REST(BLOCK, 6) REST(BLOCK, 5) REST(BLOCK, 4)                                         \
            REST(BLOCK, 3) REST(BLOCK, 2) REST(BLOCK, 1)                                                        \
            default: break;                                                                                     \
            }                                                                                                   \
        }                                                                                                       \
    }

GEMM(mq_gemm_w4, block_w4, uint8_t, 8)
GEMM(mq_gemm_w8, block_w8, int8_t, 4)

/* Codes of x [M, K] (fp32 or bf16, rows `ld` elements apart), plus `offset` (128: unsigned codes,
 * 0: signed), as bytes [M, K]: round-half-even(x / scale) clamped to [qmin, qmax] -- a division, as
 * the fake-quant reference computes it, so the codes are its codes bit for bit. The scale of row m:
 * `dynamic`: max(absmax(row) / qmax, min_scale), written to row_scale[m]; else row_scale[m] when
 * row_scale is given; else `inner` for rows [start, stop) and `outer` for the others. */
void mq_quantize(const void *x, int bf16, int64_t M, int64_t K, int64_t ld, float outer, float inner, int64_t start,
                 int64_t stop, float *row_scale, int dynamic, float min_scale, int qmin, int qmax, int offset,
                 uint8_t *out) {
    const __m512 lo = _mm512_set1_ps((float)qmin), hi = _mm512_set1_ps((float)qmax);
    const __m512i off = _mm512_set1_epi32(offset);
    const __mmask16 tail = (__mmask16)((1u << (K % 16)) - 1);
    _Pragma("omp parallel for schedule(static) if (M * K > (1 << 16))")
    for (int64_t m = 0; m < M; m++) {
        const int64_t base = m * ld;
        float s;
        if (dynamic) {
            __m512 amax = _mm512_setzero_ps();
            for (int64_t i = 0; i < K; i += 16)
                amax = _mm512_max_ps(amax, _mm512_abs_ps(load16(x, bf16, base + i, i + 16 <= K ? 0xFFFF : tail)));
            s = _mm512_reduce_max_ps(amax) / (float)qmax;
            s = s < min_scale ? min_scale : s;
            row_scale[m] = s;
        } else if (row_scale) {
            s = row_scale[m];
        } else {
            s = (m >= start && m < stop) ? inner : outer;
        }
        const __m512 sv = _mm512_set1_ps(s);
        for (int64_t i = 0; i < K; i += 16) {
            __mmask16 mask = i + 16 <= K ? 0xFFFF : tail;
            __m512 q = _mm512_roundscale_ps(_mm512_div_ps(load16(x, bf16, base + i, mask), sv),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            q = _mm512_min_ps(_mm512_max_ps(q, lo), hi);
            _mm512_mask_cvtepi32_storeu_epi8(out + m * K + i, mask, _mm512_add_epi32(_mm512_cvtps_epi32(q), off));
        }
    }
}

/* In-place x -> x H_p (Sylvester, p a power of two) on one segment: butterflies, the first four
 * stages inside each 16-lane vector (a lane and its partner lane ^ h), the others between vectors. */
static void fwht(float *a, int64_t p) {
    if (p < 16) {
        for (int64_t h = 1; h < p; h *= 2)
            for (int64_t i = 0; i < p; i += 2 * h)
                for (int64_t j = i; j < i + h; j++) {
                    float u = a[j], v = a[j + h];
                    a[j] = u + v, a[j + h] = u - v;
                }
        return;
    }
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int64_t i = 0; i < p; i += 16) {
        __m512 v = _mm512_loadu_ps(a + i);
        for (int h = 1; h < 16; h *= 2) {
            __m512 partner = _mm512_permutexvar_ps(_mm512_xor_si512(lane, _mm512_set1_epi32(h)), v);
            __mmask16 upper = _mm512_test_epi32_mask(lane, _mm512_set1_epi32(h)); /* lanes holding u - v */
            v = _mm512_mask_sub_ps(_mm512_add_ps(v, partner), upper, partner, v);
        }
        _mm512_storeu_ps(a + i, v);
    }
    for (int64_t h = 16; h < p; h *= 2)
        for (int64_t i = 0; i < p; i += 2 * h)
            for (int64_t j = i; j < i + h; j += 16) {
                __m512 u = _mm512_loadu_ps(a + j), v = _mm512_loadu_ps(a + j + h);
                _mm512_storeu_ps(a + j, _mm512_add_ps(u, v));
                _mm512_storeu_ps(a + j + h, _mm512_sub_ps(u, v));
            }
}

/* Outputs o0 .. o0 + outs - 1 (a constant after inlining) of the H_k mixing, 16 positions at a
 * time: one load of each input segment serves every output of the tile (and each output is its own
 * dependency chain). */
#define MIX_TILE 8
static inline __attribute__((always_inline)) void mix(const float *buf, const float *hk, int64_t k, int64_t p,
                                                     int64_t o0, int outs, float *mixed) {
    for (int64_t j = 0; j < p; j += 16) {
        __m512 acc[MIX_TILE];
        for (int t = 0; t < outs; t++) acc[t] = _mm512_setzero_ps();
        for (int64_t i = 0; i < k; i++) {
            __m512 v = _mm512_loadu_ps(buf + i * p + j);
            for (int t = 0; t < outs; t++) acc[t] = _mm512_fmadd_ps(_mm512_set1_ps(hk[i * k + o0 + t]), v, acc[t]);
        }
        for (int t = 0; t < outs; t++) _mm512_storeu_ps(mixed + (o0 + t) * p + j, acc[t]);
    }
}
#define MIX_REST(R)                                                                                            \
    case R: mix(buf, hk, k, p, o, R, mixed); break;

/* out [rows, order] = (x [rows, n] zero-padded to order) (H_k (x) H_p) * scale, order = k p: each
 * row viewed as [k, p], H_p on each of the k segments, then H_k across them (hk: k x k, row-major:
 * out[i'] = sum_i hk[i][i'] seg[i]). In fp32, rounded once to the output dtype. */
void mq_hadamard(const void *x, int bf16, int64_t rows, int64_t n, int64_t ld, int64_t order, int64_t k,
                 const float *hk, float scale, void *out, int out_bf16) {
    const int64_t p = order / k;
    const int vector = p % 16 == 0;
    _Pragma("omp parallel if (rows * order > (1 << 15))") {
        float *buf = (float *)malloc(2 * order * sizeof(float)), *mixed = buf + order;
        _Pragma("omp for schedule(static)") for (int64_t r = 0; r < rows; r++) {
            for (int64_t i = 0; i < order; i += 16) {
                int64_t left = n - i;
                __mmask16 mask = left >= 16 ? 0xFFFF : left <= 0 ? 0 : (__mmask16)((1u << left) - 1);
                __m512 v = load16(x, bf16, r * ld + i, mask);
                if (i + 16 <= order) _mm512_storeu_ps(buf + i, v);
                else _mm512_mask_storeu_ps(buf + i, (__mmask16)((1u << (order - i)) - 1), v);
            }
            for (int64_t s = 0; s < k; s++) fwht(buf + s * p, p);
            float *src = buf;
            if (k > 1) {
                src = mixed;
                int64_t o = 0;
                if (vector) {
                    for (; o + MIX_TILE <= k; o += MIX_TILE) mix(buf, hk, k, p, o, MIX_TILE, mixed);
                    switch (k - o) {
                        MIX_REST(7) MIX_REST(6) MIX_REST(5) MIX_REST(4) MIX_REST(3) MIX_REST(2) MIX_REST(1)
                        default: break;
                    }
                } else {
                    for (; o < k; o++)
                        for (int64_t j = 0; j < p; j++) {
                            float acc = 0.0f;
                            for (int64_t i = 0; i < k; i++) acc += hk[i * k + o] * buf[i * p + j];
                            mixed[o * p + j] = acc;
                        }
                }
            }
            const __m512 sv = _mm512_set1_ps(scale);
            int64_t j = 0;
            for (; j + 16 <= order; j += 16) store16(out, out_bf16, r * order + j, _mm512_mul_ps(_mm512_loadu_ps(src + j), sv));
            for (; j < order; j++) {
                float v = src[j] * scale;
                if (out_bf16) {
                    uint32_t b;
                    memcpy(&b, &v, 4);
                    b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16; /* round to nearest even (finite values) */
                    ((uint16_t *)out)[r * order + j] = (uint16_t)b;
                } else {
                    ((float *)out)[r * order + j] = v;
                }
            }
        }
        free(buf);
    }
}
