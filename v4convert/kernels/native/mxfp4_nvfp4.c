#define _POSIX_C_SOURCE 200809L
/* MXFP4 (E2M1 codes + one E8M0 byte per 32-block) -> NVFP4 with a power-of-two global scale.
 *
 * Plain C99 + pthreads, no torch headers, no float math: reproduces the common path of
 * formats/mxfp4.py:mxfp4_to_nvfp4 bit for bit with integer exponent arithmetic.
 *   value v = MAG[idx] * 2**E, E = byte - 127, MAG = {0, .5, 1, 1.5, 2, 3, 4, 6}
 *   per 16-half-block with largest magnitude index M > 0:
 *     t = clamp(E + T[M], -127, 125)   T = {-, -3, -2, -2, -1, -1, 0, 0}: ceil(log2(MAG[M]*2**E / 6))
 *     (mxfp4_block_exponents ROUND_UP, exact: MAG[M] / 6 <= 2**T[M] < 2 * MAG[M] / 6)
 *   g = clamp(max t - 8, -126, 126) over all rows (0 if every block is zero)
 *   rel = max(t - g, -9);  E4M3 block scale 2**rel;  effective scale 2**(rel + g) in both
 *   conventions (powers of two, exact); codes = E2M1 RNE of v / 2**(rel+g) = MAG[idx] * 2**d,
 *   d = E - rel - g (sign bit kept), from a per-d byte table (d = 0: the bytes are copied).
 * A block is exact when every element lands on the E2M1 grid; the others (only possible when rel was
 * clamped to -9) are counted, with max |decoded - v| as float32 |deq - v| (both exact float32 values,
 * one IEEE subtraction: torch's diff). Their codes stay the 2**rel ones: the torch codec's RTN fallback
 * never wins there. Proof: t - g <= -10 gives amax / 6 <= 2**(g - 10), so the RTN block scale rounds
 * (monotone float32 ops, then E4M3 RNE of a value <= 2**-10, the tie between 0 and 2**-9) to 0, decoding
 * the block to 0; the 2**rel codes round each v to its nearest grid point (no saturation: v / 2**s <= 6),
 * so every |deq - v| <= |v| = |0 - v| and the float32 squared-error sums keep err_pow2 <= err_rtn (rounding
 * is monotone, same summation order), so "err_rtn < err_pow2" is false. tests/test_native_repack.py checks
 * the bytes against the torch codec on tensors where most blocks take this path.
 * Values >= 2**128 (byte 254 with M >= 4, byte 253 with M >= 6) decode to inf in float32: pass 1
 * reports them and the caller uses the torch codec for the whole tensor (its inf semantics).
 * Layout: packed uint8 [n, k/2] (low nibble = even element), scale uint8 [n, k/32],
 * out packed uint8 [n, k/2], ws uint8 E4M3 [n, k/16].
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#include "rows.h"
#ifdef __SSE2__
#include <emmintrin.h>
#endif
#ifdef __SSSE3__
#include <tmmintrin.h>
#endif

#define MAX_THREADS 64
#define D_MIN (-8) /* below: every quotient < 6 * 2**-8 < .25 -> code 0, same table */
#define D_MAX 8
#define N_D (D_MAX - D_MIN + 1)

static const int T_UP[8] = {0, -3, -2, -2, -1, -1, 0, 0};
static const double MAG[8] = {0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0};
static const double E2M1_BOUND[7] = {0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0};
static const int E2M1_INCLUSIVE[7] = {0, 1, 0, 1, 0, 1, 0}; /* ties to the even code */

typedef struct {
    uint8_t out[N_D][256]; /* d -> input byte -> output byte */
    uint8_t exact[N_D][256];
    uint8_t nib[N_D][16];  /* d -> input nibble -> output nibble (pshufb table) */
    uint8_t nib_ex[N_D][16]; /* d -> input nibble -> 0xFF if exact else 0 */
} tables_t;

/* E2M1 index of |q| (q = MAG[i] * 2**d exact in double), as formats/fp4.py:e2m1_magnitude_index. */
static unsigned e2m1_index(double a) {
    unsigned k = 0;
    for (int i = 0; i < 7; i++) k += E2M1_INCLUSIVE[i] ? (a >= E2M1_BOUND[i]) : (a > E2M1_BOUND[i]);
    return k;
}

static void build_tables(tables_t *tb) {
    for (int di = 0; di < N_D; di++) {
        int d = D_MIN + di;
        double p = 1.0;
        for (int s = 0; s < (d < 0 ? -d : d); s++) p = d < 0 ? p * 0.5 : p * 2.0;
        uint8_t code[16], ex[16];
        for (unsigned n = 0; n < 16; n++) {
            double q = MAG[n & 7] * p;
            unsigned c = e2m1_index(q);
            code[n] = (uint8_t)(c | (n & 8)); /* sign bit of v kept (also for -0 and rounding to 0) */
            ex[n] = MAG[c] == q;
            tb->nib[di][n] = code[n];
            tb->nib_ex[di][n] = ex[n] ? 0xFF : 0;
        }
        for (unsigned b = 0; b < 256; b++) {
            tb->out[di][b] = (uint8_t)(code[b & 15] | (code[b >> 4] << 4));
            tb->exact[di][b] = ex[b & 15] & ex[b >> 4];
        }
    }
}

/* largest magnitude index (0..7) of the nibbles of nbytes (8 or 16) bytes */
static inline unsigned max_idx(const uint8_t *x, int nbytes) {
#ifdef __SSE2__
    __m128i v = nbytes == 16 ? _mm_loadu_si128((const __m128i *)x) : _mm_loadl_epi64((const __m128i *)x);
    __m128i m7 = _mm_set1_epi8(0x07);
    __m128i m = _mm_max_epu8(_mm_and_si128(v, m7), _mm_and_si128(_mm_srli_epi16(v, 4), m7));
    m = _mm_max_epu8(m, _mm_srli_si128(m, 8));
    m = _mm_max_epu8(m, _mm_srli_si128(m, 4));
    m = _mm_max_epu8(m, _mm_srli_si128(m, 2));
    m = _mm_max_epu8(m, _mm_srli_si128(m, 1));
    return (unsigned)_mm_cvtsi128_si32(m) & 0xFFu; /* zero bytes of the 8-byte load do not matter */
#else
    unsigned m = 0;
    for (int i = 0; i < nbytes; i++) {
        unsigned a = x[i] & 7u, b = (x[i] >> 4) & 7u;
        a = a > b ? a : b;
        m = a > m ? a : m;
    }
    return m;
#endif
}

static inline int block_t(int e, unsigned m) { /* ROUND_UP exponent of MAG[m] * 2**e, clamped */
    int t = e + T_UP[m];
    return t < -127 ? -127 : (t > 125 ? 125 : t);
}

typedef struct {
    const uint8_t *packed, *scale;
    int64_t n, k;
    int g;
    const tables_t *tb;
    uint8_t *out, *ws;
    int64_t r0, r1;
    /* pass 1 results */
    int tmax, any_nz, has_inf, has_nan;
    int best_m, best_e;     /* block with the largest |v| (compared as MAG[m] * 2**e) */
    /* pass 2 results */
    int64_t n_inexact;
    float max_err;
} job_t;

static int larger(unsigned m, int e, unsigned bm, int be) { /* MAG[m]*2**e > MAG[bm]*2**be, m, bm > 0 */
    /* compare exactly via doubled magnitudes 2*MAG = {_,1,2,3,4,6,8,12} scaled by 2**e */
    static const int H[8] = {0, 1, 2, 3, 4, 6, 8, 12};
    if (e == be) return H[m] > H[bm];
    if (e > be) return e - be >= 4 || (H[m] << (e - be)) > H[bm];
    return be - e < 4 && H[m] > (H[bm] << (be - e));
}

static void *pass1(void *arg) {
    job_t *j = (job_t *)arg;
    int64_t nb32 = j->k / 32;
    for (int64_t i = j->r0; i < j->r1; i++) {
        const uint8_t *row = j->packed + i * (j->k / 2), *srow = j->scale + i * nb32;
        for (int64_t b = 0; b < nb32; b++) {
            unsigned s = srow[b];
            if (s == 0xFF) { j->has_nan = 1; continue; }
            unsigned m = max_idx(row + b * 16, 16); /* the max of the two halves' t is t(max M) */
            if (m == 0) continue;
            int e = (int)s - 127;
            if ((e == 127 && m >= 4) || (e == 126 && m >= 6)) j->has_inf = 1;
            int t = block_t(e, m);
            if (!j->any_nz || t > j->tmax) j->tmax = t;
            if (!j->any_nz || larger(m, e, (unsigned)j->best_m, j->best_e)) { j->best_m = (int)m; j->best_e = e; }
            j->any_nz = 1;
        }
    }
    return NULL;
}

/* 8 packed bytes through the d-table: returns 1 when every element stayed exact */
static inline unsigned remap8(const tables_t *tb, int di, const uint8_t *x, uint8_t *o) {
#ifdef __SSSE3__
    __m128i v = _mm_loadl_epi64((const __m128i *)x), m4 = _mm_set1_epi8(0x0F);
    __m128i lo = _mm_and_si128(v, m4), hi = _mm_and_si128(_mm_srli_epi16(v, 4), m4);
    __m128i tab = _mm_loadu_si128((const __m128i *)tb->nib[di]);
    __m128i etab = _mm_loadu_si128((const __m128i *)tb->nib_ex[di]);
    /* output nibbles are <= 15, so the 16-bit shift never carries into the next byte */
    __m128i ob = _mm_or_si128(_mm_shuffle_epi8(tab, lo), _mm_slli_epi16(_mm_shuffle_epi8(tab, hi), 4));
    _mm_storel_epi64((__m128i *)o, ob);
    __m128i ex = _mm_and_si128(_mm_shuffle_epi8(etab, lo), _mm_shuffle_epi8(etab, hi));
    return (_mm_movemask_epi8(ex) & 0xFF) == 0xFF;
#else
    const uint8_t *tout = tb->out[di], *tex = tb->exact[di];
    unsigned ex = 1;
    for (int u = 0; u < 8; u++) {
        o[u] = tout[x[u]];
        ex &= tex[x[u]];
    }
    return ex;
#endif
}

static void *pass2(void *arg) {
    job_t *j = (job_t *)arg;
    int64_t nb16 = j->k / 16, nb32 = j->k / 32;
    const int g = j->g;
    for (int64_t i = j->r0; i < j->r1; i++) {
        const uint8_t *row = j->packed + i * (j->k / 2), *srow = j->scale + i * nb32;
        uint8_t *orow = j->out + i * (j->k / 2), *wrow = j->ws + i * nb16;
        for (int64_t b = 0; b < nb16; b++) {
            const uint8_t *x = row + b * 8;
            uint8_t *o = orow + b * 8;
            unsigned m = max_idx(x, 8);
            if (m == 0) { /* zero block: scale 0, codes +-0 as stored */
                wrow[b] = 0;
                memcpy(o, x, 8);
                continue;
            }
            int e = (int)srow[b / 2] - 127;
            int rel = block_t(e, m) - g;
            if (rel < -9) rel = -9;
            wrow[b] = (uint8_t)(rel >= -6 ? (rel + 7) << 3 : 1 << (rel + 9)); /* 2**rel as E4M3 */
            int d = e - rel - g;
            if (d == 0) { memcpy(o, x, 8); continue; }
            int di = (d < D_MIN ? D_MIN : (d > D_MAX ? D_MAX : d)) - D_MIN;
            if (!remap8(j->tb, di, x, o)) {
                j->n_inexact++;
                /* 2**e >= 2**-127 and 2**(rel+g) >= 2**-135 are float32 values, MAG[.] times them too (exact
                 * products); one rounding in the subtraction, as torch's |back - vb| */
                float pv = ldexpf(1.0f, e), pd = ldexpf(1.0f, rel + g);
                for (int u = 0; u < 16; u++) {
                    unsigned ni = (x[u / 2] >> (4 * (u & 1))) & 7u, no = (o[u / 2] >> (4 * (u & 1))) & 7u;
                    float err = fabsf((float)MAG[no] * pd - (float)MAG[ni] * pv);
                    if (err > j->max_err) j->max_err = err;
                }
            }
        }
    }
    return NULL;
}

V4C_DEFINE_RUN_THREADS(job_t, MAX_THREADS)

/* Pass 1 over one part [n, k/2] + [n, k/32]. info[0] = any nonzero block, info[1] = max t,
 * info[2] = has inf, info[3] = has NaN scale byte, info[4], info[5] = (M, E) of the largest |v|. */
void v4c_mxfp4_nvfp4_reduce(const uint8_t *packed, const uint8_t *scale, int64_t n, int64_t k, int32_t *info,
                            int nthreads) {
    job_t base, jobs[MAX_THREADS];
    memset(&base, 0, sizeof base);
    base.packed = packed; base.scale = scale; base.n = n; base.k = k;
    int used = run_threads(&base, nthreads, pass1, jobs);
    memset(info, 0, 6 * sizeof(int32_t));
    for (int t = 0; t < used; t++) {
        info[2] |= jobs[t].has_inf;
        info[3] |= jobs[t].has_nan;
        if (!jobs[t].any_nz) continue;
        if (!info[0] || jobs[t].tmax > info[1]) info[1] = jobs[t].tmax;
        if (!info[0] || larger((unsigned)jobs[t].best_m, jobs[t].best_e, (unsigned)info[4], info[5])) {
            info[4] = jobs[t].best_m;
            info[5] = jobs[t].best_e;
        }
        info[0] = 1;
    }
}

/* Pass 2 for global exponent g: out packed, ws E4M3. Returns the number of inexact 16-blocks and
 * stores the largest absolute error (float32) in *max_err. */
int64_t v4c_mxfp4_nvfp4_encode(const uint8_t *packed, const uint8_t *scale, int64_t n, int64_t k, int g,
                               uint8_t *out, uint8_t *ws, float *max_err, int nthreads) {
    tables_t local; /* built per call: 17 x 256 entries, negligible next to a tensor */
    build_tables(&local);
    job_t base, jobs[MAX_THREADS];
    memset(&base, 0, sizeof base);
    base.packed = packed; base.scale = scale; base.n = n; base.k = k; base.g = g; base.tb = &local;
    base.out = out; base.ws = ws;
    int used = run_threads(&base, nthreads, pass2, jobs);
    int64_t total = 0;
    float err = 0.0f;
    for (int t = 0; t < used; t++) {
        total += jobs[t].n_inexact;
        err = jobs[t].max_err > err ? jobs[t].max_err : err;
    }
    *max_err = err;
    return total;
}
