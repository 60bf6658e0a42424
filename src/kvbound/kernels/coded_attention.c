/* Attention over integer-coded K/V, without a float copy of the K/V.
 *
 * K and V are each described by a Coded (below): packed codes (kvbound.cache.codec: D * bits / 8 bytes
 * per token, planar -- byte j holds channels j, j + D/per, ... lowest bits first) and float16 scales
 * and zero points (x ~ code * scale + zero), either
 *   per token (groups of `group` channels; the offload store's records, where scale, zero and
 *   `outliers` channel indices + float16 values follow each token's codes, and KIVI's values), or
 *   per channel (blocks of `group` tokens; KIVI's keys).
 *
 * For each (batch, KV head) the kernel walks the tokens in tiles of TILE, computes the logits of up
 * to ROWS query rows at once (GQA: query heads h*groups .. h*groups+groups-1, T rows each), and keeps
 * flash attention's online softmax per row (Dao et al. 2022): a running maximum, a running sum and
 * an unnormalized output, rescaled when a tile raises the maximum. Output: each row's normalized
 * output and log-sum-exp, which kvbound's tiered attention merges with the other blocks.
 *
 * Two ways to read a tile:
 *   direct (groups of a multiple of 8 channels or per-channel keys, no outliers):
 *     codes are read in place, centred (c = code - h, z' = zero + h * scale, h = 2^(bits-1): less
 *     cancellation);
 *     a key is dequantized in registers (c * s + z', s and z' per token or per channel), and a
 *     value's scale is folded into the probability, p * (c * s + z') = (p * s) * c + p * z', with
 *     the p * z' terms summed apart per group -- no per-channel work beyond converting the code;
 *   otherwise (offload records with narrow groups or outliers): the tile's keys and values are
 *     dequantized from the records themselves (scales, zero points and outliers follow the codes)
 *     into two small float tiles first (they stay in the L1 cache).
 *
 * kvb_coded_attention splits the tokens into ranges run on OpenMP threads; the caller merges the
 * ranges' outputs by their log-sum-exp.
 *
 * Portable C11 with GCC/Clang vector extensions (8 floats: one AVX register, two SSE/NEON ones).
 * Built once by kvbound/kernels/__init__.py with the system C compiler and called through ctypes.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX__) || defined(__F16C__)
#include <immintrin.h>
#endif

#define TILE 32 /* tokens dequantized at a time */
#define ROWS 4  /* query rows computed together */
#define LANES 8

#define INLINE static inline __attribute__((always_inline))

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8f load8(const float *p) { v8f v; memcpy(&v, p, sizeof v); return v; }
static inline void store8(float *p, v8f v) { memcpy(p, &v, sizeof v); }
static inline v8f splat(float x) { return (v8f){x, x, x, x, x, x, x, x}; }
/* 8 codes (bits (p[i] >> shift) & mask) minus half of their range, as floats (centred: less
 * cancellation against the zero point). */
#if defined(__AVX2__)
static inline v8f codes8(const uint8_t *p, int shift, int mask, float half) { /* GCC won't vectorize it alone */
    __m256i x = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    x = _mm256_and_si256(_mm256_srl_epi32(x, _mm_cvtsi32_si128(shift)), _mm256_set1_epi32(mask));
    return (v8f)_mm256_cvtepi32_ps(x) - splat(half);
}
#else
static inline v8f codes8(const uint8_t *p, int shift, int mask, float half) {
    float f[LANES];
    for (int l = 0; l < LANES; l++) f[l] = (float)((p[l] >> shift) & mask) - half;
    return load8(f);
}
#endif

#if defined(__AVX__)
static inline float hsum(v8f v) { /* the sum of the 8 lanes, with shuffles instead of lane extracts */
    __m128 x = _mm_add_ps(_mm256_castps256_ps128((__m256)v), _mm256_extractf128_ps((__m256)v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}
#else
static inline float hsum(v8f v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}
#endif

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

#if defined(__F16C__)
static inline float half_to_float(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, sizeof h); /* x86: little-endian, as torch stores float16 */
    return _cvtsh_ss(h);
}
#else
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
#endif

/* The D channels of one record, in float (D, and each bit plane's D/per channels, multiples of 8). */
static inline void dequant(const uint8_t *rec, int64_t D, int bits, int64_t group, int64_t outliers,
                           float *restrict out) {
    const int per = 8 / bits;
    const int64_t w = D / per, groups = D / group;
    const uint8_t *scale = rec + w, *zero = rec + w + 2 * groups;
    const unsigned mask = (1u << bits) - 1u;
    for (int64_t j = 0; j < w; j += LANES) /* bit plane i holds channels i*w .. i*w + w */
        for (int i = 0; i < per; i++) store8(out + i * w + j, codes8(rec + j, bits * i, (int)mask, 0.0f));
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

#define MAX_CHUNKS 128 /* D <= 8 * MAX_CHUNKS */

/* K or V as the caller holds them (strides in bytes). Codes of token t of (b, h) at
 * codes + b*sb + h*sh + t*st; its float16 scale and zero point at scale/zero + b*msb + h*msh + i*mst
 * + 2*j, with (i, j) = (t, channel / group) per token or (t / group, channel) per channel. */
typedef struct {
    const uint8_t *codes, *scale, *zero;
    int64_t sb, sh, st, msb, msh, mst, group;
    int64_t per_channel;
} Coded;

enum { DEQUANTIZED = 0, PER_TOKEN = 1, PER_CHANNEL = 2 }; /* how a tile is read: see the top comment */

/* One tile of TILE tokens as rows_tile reads it. DEQUANTIZED: the float rows kt/vt [TILE, D]. Else the
 * codes kc/vc in place (token stride st; channels c .. c+8 are the bits (byte >> shift[c/8]) & mask
 * of bytes off[c/8] ..), centred by half; value scales vs and centred zero points vz [TILE, vgroups];
 * keys' likewise ks/kz [TILE, kgroups] (PER_TOKEN) or, PER_CHANNEL, rows kcs/kcz [blocks, D] with
 * token t in block kb[t]. */
typedef struct {
    const float *kt, *vt;
    const uint8_t *kc, *vc;
    int64_t kst, vst, kgroups, vgroups;
    float *ks, *kz, *vs, *vz, *kcs, *kcz;
    int mask;
    float half;
    int32_t off[MAX_CHUNKS], shift[MAX_CHUNKS], kb[TILE];
} Tile;

/* Channels c .. c+8 of token t's codes at base (token stride st), centred. */
INLINE v8f codes_at(const Tile *tl, const uint8_t *base, int64_t st, int64_t t, int64_t c) {
    return codes8(base + t * st + tl->off[c / LANES], tl->shift[c / LANES], tl->mask, tl->half);
}

/* Channels c .. c+8 of key t (PER_TOKEN: scale and zero are the token's, splatted). */
INLINE v8f key8(const int MODE, const Tile *tl, int64_t t, int64_t c, int64_t D, v8f scale, v8f zero) {
    if (MODE == DEQUANTIZED) return load8(tl->kt + t * D + c);
    const v8f x = codes_at(tl, tl->kc, tl->kst, t, c);
    if (MODE == PER_TOKEN) return x * scale + zero;
    return x * load8(tl->kcs + tl->kb[t] * D + c) + load8(tl->kcz + tl->kb[t] * D + c);
}

/* NR (1..ROWS, a constant after inlining) query rows q (row stride D) against the nt tokens of tile
 * tl: logits into s [ROWS, TILE], then the online softmax update of the rows' running max m, sum l,
 * unnormalized output acc [NR, D] and (direct) zero-point sums zacc [NR, vgroups]; w [ROWS, vgroups,
 * TILE] holds the direct paths' scaled probabilities. */
INLINE void rows_tile(const int NR, const int MODE, const float *q, const Tile *tl, int64_t nt, int64_t D,
                      float scaling, float softcap, float *s, float *w, float *m, float *l, float *acc, float *zacc) {
    const int64_t KG = MODE == PER_TOKEN ? tl->kgroups : 1, kgroup = D / KG;
    const int64_t VG = MODE == DEQUANTIZED ? 1 : tl->vgroups, vgroup = D / VG;
    for (int64_t t = 0; t < nt; t += 2) { /* logits of the NR rows against tokens t and t + 1 */
        const int64_t u = t + 1 < nt ? t + 1 : t; /* an odd tile's last pair: token t twice */
        v8f a[ROWS] = {0}, b[ROWS] = {0};
        for (int64_t g = 0; g < KG; g++) {
            v8f s0 = splat(0.0f), z0 = s0, s1 = s0, z1 = s0;
            if (MODE == PER_TOKEN) {
                s0 = splat(tl->ks[t * KG + g]), z0 = splat(tl->kz[t * KG + g]);
                s1 = splat(tl->ks[u * KG + g]), z1 = splat(tl->kz[u * KG + g]);
            }
            for (int64_t c = g * kgroup; c < (g + 1) * kgroup; c += LANES) {
                const v8f k0 = key8(MODE, tl, t, c, D, s0, z0), k1 = key8(MODE, tl, u, c, D, s1, z1);
                for (int r = 0; r < NR; r++) {
                    const v8f qr = load8(q + r * D + c);
                    a[r] += qr * k0;
                    b[r] += qr * k1;
                }
            }
        }
        for (int r = 0; r < NR; r++) {
            float x = hsum(a[r]) * scaling, y = hsum(b[r]) * scaling;
            if (softcap > 0.0f) {
                x = softcap * tanhf(x / softcap);
                y = softcap * tanhf(y / softcap);
            }
            s[r * TILE + t] = x;
            s[r * TILE + u] = y;
        }
    }
    for (int r = 0; r < NR; r++) { /* online softmax over the tile */
        float *sr = s + r * TILE, mt = m[r];
        for (int64_t t = 0; t < nt; t++) mt = sr[t] > mt ? sr[t] : mt;
        if (mt > m[r]) { /* a new maximum: rescale what was summed so far */
            const float c = expf(m[r] - mt);
            l[r] *= c;
            for (int64_t j = 0; j < D; j++) acc[r * D + j] *= c;
            for (int64_t g = 0; MODE != DEQUANTIZED && g < VG; g++) zacc[r * VG + g] *= c;
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
        for (int64_t g = 0; MODE != DEQUANTIZED && g < VG; g++) { /* p * scale for the codes, p * zero apart */
            float *wr = w + (r * VG + g) * TILE, z = 0.0f;
            for (int64_t t = 0; t < nt; t++) {
                wr[t] = sr[t] * tl->vs[t * VG + g];
                z += sr[t] * tl->vz[t * VG + g];
            }
            zacc[r * VG + g] += z;
        }
    }
    for (int64_t c = 0; c < D; c += LANES) { /* acc += p @ values, the NR rows in registers */
        const float *wr[ROWS];
        v8f a[ROWS];
        for (int r = 0; r < NR; r++) {
            wr[r] = MODE != DEQUANTIZED ? w + (r * VG + c / vgroup) * TILE : s + r * TILE;
            a[r] = load8(acc + r * D + c);
        }
        for (int64_t t = 0; t < nt; t++) {
            const v8f v = MODE != DEQUANTIZED ? codes_at(tl, tl->vc, tl->vst, t, c) : load8(tl->vt + t * D + c);
            for (int r = 0; r < NR; r++) a[r] += splat(wr[r][t]) * v;
        }
        for (int r = 0; r < NR; r++) store8(acc + r * D + c, a[r]);
    }
}

/* Per-token scales and centred zero points of tokens ta .. ta+nt of (b, h) into sc/zc [nt, groups]. */
static void token_scales(const Coded *x, int64_t b, int64_t h, int64_t ta, int64_t nt, int64_t groups, float half,
                         float *sc, float *zc) {
    const uint8_t *sp = x->scale + b * x->msb + h * x->msh, *zp = x->zero + b * x->msb + h * x->msh;
    for (int64_t t = 0; t < nt; t++) {
        for (int64_t g = 0; g < groups; g++) { /* x = code*s + z = (code - half)*s + (z + half*s) */
            const float s = half_to_float(sp + (ta + t) * x->mst + 2 * g);
            sc[t * groups + g] = s;
            zc[t * groups + g] = half_to_float(zp + (ta + t) * x->mst + 2 * g) + half * s;
        }
    }
}

/* Floats of scratch one token range needs for head_dim D and R = groups*T query rows. */
int64_t kvb_scratch_floats(int64_t D, int64_t R) {
    return 6 * TILE * D + 2 * (TILE + 1) * D + ROWS * TILE + ROWS * D * TILE + R * (2 * D + 2);
}

/* Tokens t0 .. t1 of every (batch, KV head), read as MODE; `outliers` (DEQUANTIZED records only). */
static void attend_range(const float *query, int64_t B, int64_t H, int64_t groups, int64_t T, int64_t D,
                         const Coded *k, const Coded *v, int mode, int bits, int64_t outliers, int64_t t0, int64_t t1,
                         float scaling, float softcap, float *out, float *lse, float *scratch) {
    const int64_t R = groups * T, width = D * bits / 8; /* code bytes per token */
    const int64_t VG = D / v->group, KG = k->per_channel ? 1 : D / k->group;
    float *kt = scratch, *vt = kt + TILE * D;      /* [TILE, D] dequantized keys, values */
    float *sz = vt + TILE * D;                      /* [4, TILE, D] scales and zero points */
    float *kcs = sz + 4 * TILE * D, *kcz = kcs + (TILE + 1) * D; /* [TILE + 1, D] per-channel key scales */
    float *s = kcz + (TILE + 1) * D;                /* [ROWS, TILE] logits, then probabilities */
    float *w = s + ROWS * TILE;                     /* [ROWS, VG, TILE] probabilities * value scales */
    float *acc = w + ROWS * D * TILE;               /* [R, D] unnormalized outputs */
    float *zacc = acc + R * D;                      /* [R, VG] sums of probabilities * value zero points */
    float *m = zacc + R * D, *l = m + R;            /* [R] running max and sum */
    Tile tl = {kt, vt, NULL, NULL, k->st, v->st, KG, VG, sz, sz + TILE * D, sz + 2 * TILE * D, sz + 3 * TILE * D,
               kcs, kcz, (1 << bits) - 1, (float)(1 << (bits - 1)), {0}, {0}, {0}};
    for (int64_t c = 0; c < D; c += LANES) { /* planar packing: channel c is in bit plane c / width */
        tl.off[c / LANES] = (int32_t)(c % width);
        tl.shift[c / LANES] = (int32_t)(bits * (c / width));
    }
    for (int64_t b = 0; b < B; b++) {
        for (int64_t h = 0; h < H; h++) {
            const float *q = query + (b * H + h) * R * D; /* the R rows reading KV head h */
            const uint8_t *kb = k->codes + b * k->sb + h * k->sh, *vb = v->codes + b * v->sb + h * v->sh;
            for (int64_t r = 0; r < R; r++) { m[r] = -INFINITY; l[r] = 0.0f; }
            memset(acc, 0, sizeof(float) * R * 2 * D);
            for (int64_t ta = t0; ta < t1; ta += TILE) {
                const int64_t nt = t1 - ta < TILE ? t1 - ta : TILE;
                tl.kc = kb + ta * k->st;
                tl.vc = vb + ta * v->st;
                if (mode == DEQUANTIZED) {
                    for (int64_t t = 0; t < nt; t++) {
                        dequant(tl.kc + t * k->st, D, bits, k->group, outliers, kt + t * D);
                        dequant(tl.vc + t * v->st, D, bits, v->group, outliers, vt + t * D);
                    }
                } else {
                    token_scales(v, b, h, ta, nt, VG, tl.half, tl.vs, tl.vz);
                    if (mode == PER_TOKEN) {
                        token_scales(k, b, h, ta, nt, KG, tl.half, tl.ks, tl.kz);
                    } else { /* the key blocks the tile spans, one float row each */
                        const int64_t first = ta / k->group, last = (ta + nt - 1) / k->group;
                        const uint8_t *sp = k->scale + b * k->msb + h * k->msh, *zp = k->zero + b * k->msb + h * k->msh;
                        for (int64_t i = first; i <= last; i++) {
                            float *cs = kcs + (i - first) * D, *cz = kcz + (i - first) * D;
                            for (int64_t c = 0; c < D; c++) {
                                cs[c] = half_to_float(sp + i * k->mst + 2 * c);
                                cz[c] = half_to_float(zp + i * k->mst + 2 * c) + tl.half * cs[c];
                            }
                        }
                        for (int64_t t = 0; t < nt; t++) tl.kb[t] = (int32_t)((ta + t) / k->group - first);
                    }
                }
                for (int64_t r0 = 0; r0 < R; r0 += ROWS) {
                    const float *qr = q + r0 * D;
                    float *ar = acc + r0 * D, *zr = zacc + r0 * VG, *mr = m + r0, *lr = l + r0;
                    const int nr = (int)(R - r0 < ROWS ? R - r0 : ROWS);
#define ROWS_TILE(NR, MODE) rows_tile(NR, MODE, qr, &tl, nt, D, scaling, softcap, s, w, mr, lr, ar, zr)
#define EACH_ROWS(MODE) switch (nr) { /* constant row counts: loops unrolled */ \
    case 1: ROWS_TILE(1, MODE); break; case 2: ROWS_TILE(2, MODE); break; \
    case 3: ROWS_TILE(3, MODE); break; default: ROWS_TILE(4, MODE); break; }
                    if (mode == PER_TOKEN) EACH_ROWS(PER_TOKEN)
                    else if (mode == PER_CHANNEL) EACH_ROWS(PER_CHANNEL)
                    else EACH_ROWS(DEQUANTIZED)
#undef EACH_ROWS
#undef ROWS_TILE
                }
            }
            float *o = out + (b * H + h) * R * D, *e = lse + (b * H + h) * R;
            for (int64_t r = 0; r < R; r++) {
                const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
                for (int64_t j = 0; j < D; j++) {
                    const float z = mode == DEQUANTIZED ? 0.0f : zacc[r * VG + j / v->group];
                    o[r * D + j] = (acc[r * D + j] + z) * inv;
                }
                e[r] = l[r] > 0.0f ? m[r] + logf(l[r]) : -INFINITY;
            }
        }
    }
}

#define MAX_PARTS 64

/* Attention of query [B, H*groups, T, D] (float32, contiguous) over tokens 0 .. n of k and v, every
 * key visible to every query, split into `parts` token ranges (n * i / parts ..): range i's
 * normalized output goes to out + i*B*H*groups*T*D, its log-sum-exp to lse + i*B*H*groups*T (an
 * empty range: 0 and -inf), using scratch + i*scratch_floats (kvb_scratch_floats). The ranges run on
 * OpenMP threads where the library was built with OpenMP: inside PyTorch that is PyTorch's own
 * OpenMP runtime (same soname, loaded first), so the kernel shares its thread pool instead of
 * competing with it. softcap > 0 caps the logits as Gemma 2 does: cap * tanh(logit / cap).
 * Returns 0, or > 0 for arguments it does not take. */
int kvb_coded_attention(const float *query, int64_t B, int64_t H, int64_t groups, int64_t T, int64_t D,
                        const Coded *k, const Coded *v, int bits, int64_t outliers, int64_t n, int64_t parts,
                        float scaling, float softcap, float *out, float *lse, float *scratch, int64_t scratch_floats) {
    if (bits != 2 && bits != 4 && bits != 8) return 1;
    if (D % (LANES * (8 / bits)) || D > LANES * MAX_CHUNKS || v->per_channel || v->group <= 0 || D % v->group
        || k->group <= 0 || (!k->per_channel && D % k->group))
        return 2;
    if (parts < 1 || parts > MAX_PARTS) return 3;
    const int direct = v->group % LANES == 0 && !outliers && (k->per_channel || k->group % LANES == 0);
    if (k->per_channel && !direct) return 4; /* per-channel keys are read in place only */
    const int mode = !direct ? DEQUANTIZED : k->per_channel ? PER_CHANNEL : PER_TOKEN;
    const int64_t rows = B * H * groups * T;
#pragma omp parallel for num_threads((int)parts) schedule(static, 1)
    for (int64_t i = 0; i < parts; i++)
        attend_range(query, B, H, groups, T, D, k, v, mode, bits, outliers, n * i / parts, n * (i + 1) / parts,
                     scaling, softcap, out + i * rows * D, lse + i * rows, scratch + i * scratch_floats);
    return 0;
}
