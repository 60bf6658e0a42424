/* Attention over integer-coded K/V records, without a float copy of the K/V.
 *
 * A record is one token of one KV head as kvbound's codec writes it (Codec.to_bytes):
 *   codes   D * bits / 8 bytes  (planar packing: byte j holds channels j, j + D/per, ... lowest bits first)
 *   scale   D / group float16
 *   zero    D / group float16   (x ~ code * scale + zero)
 *   oidx    `outliers` uint8 channel indices
 *   oval    `outliers` float16 values (restored exactly)
 *
 * For each (batch, KV head) the kernel walks the tokens in tiles of TILE: it dequantizes the tile's
 * keys and values into two small scratch tiles (they stay in the L1 cache), computes the logits of
 * up to ROWS query rows at once (GQA: query heads h*groups .. h*groups+groups-1, T rows each), and
 * keeps flash attention's online softmax per row (Dao et al. 2022): a running maximum, a running
 * sum and an unnormalized output, rescaled when a tile raises the maximum. Output: each row's
 * normalized output and log-sum-exp, which kvbound's tiered attention merges with the other blocks.
 *
 * Portable C11 with GCC/Clang vector extensions (8 floats: one AVX register, two SSE/NEON ones).
 * Built once by kvbound/kernels/__init__.py with the system C compiler and called through ctypes
 * (which releases the GIL, so several token ranges can run on threads at once).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define TILE 32 /* tokens dequantized at a time */
#define ROWS 4  /* query rows computed together */
#define LANES 8

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8f load8(const float *p) { v8f v; memcpy(&v, p, sizeof v); return v; }
static inline void store8(float *p, v8f v) { memcpy(p, &v, sizeof v); }
static inline v8f splat(float x) { return (v8f){x, x, x, x, x, x, x, x}; }
static inline v8f to_float(const uint8_t *p, int shift, unsigned mask) { /* 8 codes (a loop GCC vectorizes) */
    float f[LANES];
    for (int l = 0; l < LANES; l++) f[l] = (float)((p[l] >> shift) & mask);
    return load8(f);
}
static inline float hsum(v8f v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

/* exp(x) for x <= 0, 8 lanes: Cephes' expf (range reduction by ln 2, degree-5 polynomial), ~1 ulp. */
static inline v8f exp8(v8f x) {
    const v8i low = x < splat(-87.3f); /* below: 2^n underflows; the result is ~1e-38 */
    x = (v8f)(((v8i)x & ~low) | ((v8i)splat(-87.3f) & low));
    v8f n = x * splat(1.44269504088896341f) + splat(0.5f);
    v8f fl = __builtin_convertvector(__builtin_convertvector(n, v8i), v8f); /* trunc, then floor: */
    fl += __builtin_convertvector(fl > n, v8f); /* (fl > n) is -1 where truncation rounded up */
    x = x - fl * splat(0.693359375f) - fl * splat(-2.12194440e-4f);
    v8f y = splat(1.9875691500e-4f);
    y = y * x + splat(1.3981999507e-3f);
    y = y * x + splat(8.3334519073e-3f);
    y = y * x + splat(4.1665795894e-2f);
    y = y * x + splat(1.6666665459e-1f);
    y = y * x + splat(5.0000001201e-1f);
    y = y * x * x + x + splat(1.0f);
    v8i bits = (__builtin_convertvector(fl, v8i) + 127) << 23; /* 2^fl */
    v8f scale;
    memcpy(&scale, &bits, sizeof scale);
    return y * scale;
}

static inline float half_to_float(const uint8_t *p) {
    uint16_t h = (uint16_t)(p[0] | (p[1] << 8)); /* little-endian, as torch stores float16 */
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
    if (exp == 0) { /* zero or subnormal */
        float f = ldexpf((float)man, -24);
        return sign ? -f : f;
    }
    bits = sign | (exp == 31 ? 0x7f800000u | (man << 13) : ((exp + 112u) << 23) | (man << 13));
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* The D channels of one record, in float (D, and each bit plane's D/per channels, multiples of 8). */
static inline void dequant(const uint8_t *rec, int64_t D, int bits, int64_t group, int64_t outliers,
                           float *restrict out) {
    const int per = 8 / bits;
    const int64_t w = D / per, groups = D / group;
    const uint8_t *scale = rec + w, *zero = rec + w + 2 * groups;
    const unsigned mask = (1u << bits) - 1u;
    for (int64_t j = 0; j < w; j += LANES) /* bit plane i holds channels i*w .. i*w + w */
        for (int i = 0; i < per; i++) store8(out + i * w + j, to_float(rec + j, bits * i, mask));
    if (group % LANES == 0) {
        for (int64_t g = 0; g < groups; g++) {
            const v8f s = splat(half_to_float(scale + 2 * g)), z = splat(half_to_float(zero + 2 * g));
            for (int64_t c = g * group; c < (g + 1) * group; c += LANES) store8(out + c, load8(out + c) * s + z);
        }
    } else {
        for (int64_t g = 0; g < groups; g++) {
            const float s = half_to_float(scale + 2 * g), z = half_to_float(zero + 2 * g);
            for (int64_t c = g * group; c < (g + 1) * group; c++) out[c] = out[c] * s + z;
        }
    }
    if (outliers) {
        const uint8_t *oidx = zero + 2 * groups, *oval = oidx + outliers;
        for (int64_t k = 0; k < outliers; k++) out[oidx[k]] = half_to_float(oval + 2 * k);
    }
}

/* One tile's keys and values as rows_tile reads them: dequantized rows kt/vt [TILE, D] (any format),
 * or, for int8 records with groups of a multiple of 8 channels (DIRECT), the codes in place (record
 * stride st) with each token's scales and zero points kscale/kzero/vscale/vzero [TILE, D / group]. */
typedef struct {
    const float *kt, *vt;
    const uint8_t *kc, *vc;
    int64_t st, group, groups;
    const float *kscale, *kzero, *vscale, *vzero;
} Tile;

static inline __attribute__((always_inline)) v8f tile_row(const int DIRECT, const Tile *tl, int value, int64_t t,
                                                          int64_t c, int64_t D) {
    if (!DIRECT) return load8((value ? tl->vt : tl->kt) + t * D + c);
    const int64_t g = t * tl->groups + c / tl->group;
    const float *scale = value ? tl->vscale : tl->kscale, *zero = value ? tl->vzero : tl->kzero;
    return to_float((value ? tl->vc : tl->kc) + t * tl->st + c, 0, 0xffu) * splat(scale[g]) + splat(zero[g]);
}

/* NR (1..ROWS, a constant after inlining) query rows q (row stride D) against the nt tokens of the
 * tile tl: logits into s [ROWS, TILE], then the online softmax update of the rows'
 * running max m, sum l and unnormalized output acc (row stride D). */
static inline __attribute__((always_inline)) void rows_tile(
    const int NR, const int DIRECT, const float *q, const Tile *tl, int64_t nt, int64_t D,
    float scaling, float softcap, float *s, float *m, float *l, float *acc) {
    for (int64_t t = 0; t < nt; t++) { /* logits of the NR rows against token t */
        v8f a[ROWS] = {0};
        for (int64_t c = 0; c < D; c += LANES) {
            const v8f k = tile_row(DIRECT, tl, 0, t, c, D);
            for (int r = 0; r < NR; r++) a[r] += load8(q + r * D + c) * k;
        }
        for (int r = 0; r < NR; r++) {
            const float x = hsum(a[r]) * scaling;
            s[r * TILE + t] = softcap > 0.0f ? softcap * tanhf(x / softcap) : x;
        }
    }
    for (int r = 0; r < NR; r++) { /* online softmax over the tile */
        float *sr = s + r * TILE, mt = m[r];
        for (int64_t t = 0; t < nt; t++) mt = sr[t] > mt ? sr[t] : mt;
        if (mt > m[r]) { /* a new maximum: rescale what was summed so far */
            const float c = expf(m[r] - mt);
            l[r] *= c;
            for (int64_t j = 0; j < D; j++) acc[r * D + j] *= c;
            m[r] = mt;
        }
        v8f sum = splat(0.0f);
        for (int64_t t = 0; t < TILE; t += LANES) {
            v8f p = exp8(load8(sr + t) - splat(mt));
            if (t + LANES > nt) { /* lanes past the tile's end */
                for (int64_t i = 0; i < LANES; i++) p[i] = t + i < nt ? p[i] : 0.0f;
            }
            store8(sr + t, p);
            sum += p;
        }
        l[r] += hsum(sum);
    }
    for (int64_t c = 0; c < D; c += LANES) { /* acc += p @ values, the NR rows in registers */
        v8f a[ROWS];
        for (int r = 0; r < NR; r++) a[r] = load8(acc + r * D + c);
        for (int64_t t = 0; t < nt; t++) {
            const v8f v = tile_row(DIRECT, tl, 1, t, c, D);
            for (int r = 0; r < NR; r++) a[r] += splat(s[r * TILE + t]) * v;
        }
        for (int r = 0; r < NR; r++) store8(acc + r * D + c, a[r]);
    }
}

/* Floats of scratch kvb_coded_attention needs for head_dim D and R = groups*T query rows. */
int64_t kvb_scratch_floats(int64_t D, int64_t R) {
    return 6 * TILE * D + ROWS * TILE + R * (D + 2); /* 4 * TILE * (D / group) <= 4 * TILE * D */
}

/* Tokens t0 .. t1 of every (batch, KV head).
 *   query  [B, H*groups, T, D] float32, contiguous; D a multiple of 8 * (8 / bits)
 *   keys/values: record bytes of token t of (b, h) at base + b*sb + h*sh + t*st
 *   out    [B, H*groups, T, D] float32 (normalized; rows of an empty range: 0)
 *   lse    [B, H*groups, T] float32 (empty range: -inf)
 *   scratch  kvb_scratch_floats(D, groups*T) floats
 * softcap > 0 caps the logits as Gemma 2 does: cap * tanh(logit / cap). Returns 0, or >0 for bad arguments. */
int kvb_coded_attention(const float *query, int64_t B, int64_t H, int64_t groups, int64_t T, int64_t D,
                        const uint8_t *keys, const uint8_t *values, int64_t sb, int64_t sh, int64_t st,
                        int64_t t0, int64_t t1, int bits, int64_t group, int64_t outliers,
                        float scaling, float softcap, float *out, float *lse, float *scratch) {
    if (bits != 2 && bits != 4 && bits != 8) return 1;
    if (group <= 0 || D % group || D % (LANES * (8 / bits))) return 2;
    const int64_t R = groups * T;
    const int direct = bits == 8 && group % LANES == 0 && !outliers;
    const int64_t G = D / group;
    float *kt = scratch, *vt = kt + TILE * D;     /* [TILE, D] dequantized keys, values */
    float *sz = vt + TILE * D;                     /* [4, TILE, G] direct: scales and zero points */
    float *s = sz + 4 * TILE * G;                  /* [ROWS, TILE] logits, then probabilities */
    float *acc = s + ROWS * TILE;                  /* [R, D] unnormalized outputs */
    float *m = acc + R * D, *l = m + R;            /* [R] running max and sum */
    Tile tl = {kt, vt, NULL, NULL, st, group, G, sz, sz + TILE * G, sz + 2 * TILE * G, sz + 3 * TILE * G};
    for (int64_t b = 0; b < B; b++) {
        for (int64_t h = 0; h < H; h++) {
            const float *q = query + (b * H + h) * R * D; /* the R rows reading KV head h */
            const uint8_t *kb = keys + b * sb + h * sh, *vb = values + b * sb + h * sh;
            for (int64_t r = 0; r < R; r++) { m[r] = -INFINITY; l[r] = 0.0f; }
            memset(acc, 0, sizeof(float) * R * D);
            for (int64_t ta = t0; ta < t1; ta += TILE) {
                const int64_t nt = t1 - ta < TILE ? t1 - ta : TILE;
                if (direct) {
                    tl.kc = kb + ta * st;
                    tl.vc = vb + ta * st;
                    for (int64_t t = 0; t < nt; t++) {
                        for (int64_t g = 0; g < G; g++) {
                            const uint8_t *kr = tl.kc + t * st + D, *vr = tl.vc + t * st + D;
                            sz[t * G + g] = half_to_float(kr + 2 * g);
                            sz[(TILE + t) * G + g] = half_to_float(kr + 2 * (G + g));
                            sz[(2 * TILE + t) * G + g] = half_to_float(vr + 2 * g);
                            sz[(3 * TILE + t) * G + g] = half_to_float(vr + 2 * (G + g));
                        }
                    }
                } else {
                    for (int64_t t = 0; t < nt; t++) {
                        dequant(kb + (ta + t) * st, D, bits, group, outliers, kt + t * D);
                        dequant(vb + (ta + t) * st, D, bits, group, outliers, vt + t * D);
                    }
                }
                for (int64_t r0 = 0; r0 < R; r0 += ROWS) {
                    const float *qr = q + r0 * D;
                    float *ar = acc + r0 * D, *mr = m + r0, *lr = l + r0;
                    const int nr = (int)(R - r0 < ROWS ? R - r0 : ROWS);
#define ROWS_TILE(NR, DIRECT) rows_tile(NR, DIRECT, qr, &tl, nt, D, scaling, softcap, s, mr, lr, ar)
                    switch (nr * 2 + direct) { /* constant row counts and layouts: loops unrolled */
                    case 2: ROWS_TILE(1, 0); break;
                    case 3: ROWS_TILE(1, 1); break;
                    case 4: ROWS_TILE(2, 0); break;
                    case 5: ROWS_TILE(2, 1); break;
                    case 6: ROWS_TILE(3, 0); break;
                    case 7: ROWS_TILE(3, 1); break;
                    case 8: ROWS_TILE(4, 0); break;
                    default: ROWS_TILE(4, 1); break;
                    }
#undef ROWS_TILE
                }
            }
            float *o = out + (b * H + h) * R * D, *e = lse + (b * H + h) * R;
            for (int64_t r = 0; r < R; r++) {
                const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
                for (int64_t j = 0; j < D; j++) o[r * D + j] = acc[r * D + j] * inv;
                e[r] = l[r] > 0.0f ? m[r] + logf(l[r]) : -INFINITY;
            }
        }
    }
    return 0;
}
