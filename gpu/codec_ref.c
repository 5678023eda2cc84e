/* codec_ref.c - CPU reference of the record codec (SCHEMA.md sections 3-5).
 *
 * Every arithmetic step follows the order SCHEMA.md fixes (butterflies,
 * pairwise-tree sums, one rounding per operation, no contraction into
 * FMA: the build passes -ffp-contract=off), so that the CUDA version can
 * reproduce these bytes exactly. */
#include "kvg.h"

#include <errno.h>
#include <math.h>
#include <string.h>

void kvg_rotate_ref(const kvarc_rotation *rot, const float *x, float *y)
{
    int d = rot->head_dim;
    float t[KVARC_HEAD_DIM_MAX];
    for (int i = 0; i < d; i++)
        t[i] = x[i] * rot->signs[i];
    kvarc_fwht(t, d);
    for (int i = 0; i < d; i++)
        y[i] = t[i] * rot->inv_sqrt_d;
}

void kvg_unrotate_ref(const kvarc_rotation *rot, const float *y, float *x)
{
    int d = rot->head_dim;
    float t[KVARC_HEAD_DIM_MAX];
    memcpy(t, y, (size_t)d * sizeof(float));
    kvarc_fwht(t, d);
    for (int i = 0; i < d; i++)
        x[i] = (t[i] * rot->inv_sqrt_d) * rot->signs[i];
}

/* Load token x[0..d) of dt, subtract mu; KVARC_ENONFINITE on NaN/Inf. */
static int load_centered(kvarc_dtype dt, const void *base, size_t tok, int d,
                         const float *mu, float *x)
{
    for (int i = 0; i < d; i++) {
        float v = kvarc_load_f32(dt, base, tok * (size_t)d + (size_t)i);
        if (!isfinite(v))
            return KVARC_ENONFINITE;
        x[i] = mu ? v - mu[i] : v;
        if (!isfinite(x[i]))
            return KVARC_ENONFINITE;
    }
    return 0;
}

static void put_f32(uint8_t *p, float f) { memcpy(p, &f, 4); }
static float get_f32(const uint8_t *p) { float f; memcpy(&f, p, 4); return f; }

/* Lloyd-Max code: number of bounds strictly below u. */
static int lm_code(float u, const float *bounds, int nb)
{
    int c = 0;
    for (int j = 0; j < nb; j++)
        c += u > bounds[j];
    return c;
}

/* Pack code c (bits wide) at index i of an LSB-first bit stream. */
static void put_code(uint8_t *codes, int i, int bits, unsigned c)
{
    unsigned pos = (unsigned)i * (unsigned)bits;
    for (int b = 0; b < bits; b++, pos++)
        if ((c >> b) & 1)
            codes[pos / 8] |= (uint8_t)(1u << (pos % 8));
}

/* Encode rotated, centered y[0..d) (squared norm ss, finite) into one half
 * record of a rotated format. */
static void encode_rotated_half(const kvarc_format_info *fi, const kvarc_rotation *rot,
                                const float *y, float ss, uint8_t *half)
{
    int d = rot->head_dim;
    uint8_t *codes = half + 4;
    memset(codes, 0, (size_t)(d * fi->code_bits / 8));
    if (fi->id == KVARC_FMT_I8) {
        float m = 0.0f;
        for (int i = 0; i < d; i++)
            m = fmaxf(m, fabsf(y[i]));
        float scale = m / 127.0f;
        for (int i = 0; i < d; i++) {
            float q = scale > 0.0f ? rintf(y[i] / scale) : 0.0f;
            q = fminf(127.0f, fmaxf(-127.0f, q));
            codes[i] = (uint8_t)(int8_t)q;
        }
        put_f32(half, scale);
        return;
    }
    const float *levels = fi->id == KVARC_FMT_Q3 ? kvarc_q3_levels : kvarc_q4_levels;
    const float *bounds = fi->id == KVARC_FMT_Q3 ? kvarc_q3_bounds : kvarc_q4_bounds;
    int nb = (1 << fi->code_bits) - 1;
    float sigma = sqrtf(ss) * rot->inv_sqrt_d;
    float prod[KVARC_HEAD_DIM_MAX], sq[KVARC_HEAD_DIM_MAX];
    for (int i = 0; i < d; i++) {
        float u = sigma > 0.0f ? y[i] / sigma : 0.0f;
        int c = lm_code(u, bounds, nb);
        put_code(codes, i, fi->code_bits, (unsigned)c);
        prod[i] = y[i] * levels[c];
        sq[i] = levels[c] * levels[c];
    }
    /* least-squares scale for the chosen codes: <y, L> / <L, L> */
    put_f32(half, kvarc_tree_sum(prod, d) / kvarc_tree_sum(sq, d));
}

/* Codes of one half record as level values (q3/q4: the Lloyd-Max level;
 * i8: the integer), unpacked a byte group at a time. */
static void unpack_levels(const kvarc_format_info *fi, const uint8_t *codes, int d, float *out)
{
    if (fi->id == KVARC_FMT_I8) {
        for (int i = 0; i < d; i++)
            out[i] = (float)(int8_t)codes[i];
    } else if (fi->id == KVARC_FMT_Q4) {
        for (int i = 0; i < d; i += 2) {
            out[i] = kvarc_q4_levels[codes[i / 2] & 15];
            out[i + 1] = kvarc_q4_levels[codes[i / 2] >> 4];
        }
    } else {
        for (int i = 0; i < d; i += 8) {
            const uint8_t *p = codes + i / 8 * 3;
            uint32_t w = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16;
            for (int j = 0; j < 8; j++)
                out[i + j] = kvarc_q3_levels[(w >> (3 * j)) & 7];
        }
    }
}

static void decode_rotated_half(const kvarc_format_info *fi, const kvarc_rotation *rot,
                                const uint8_t *half, const float *mu, float *x)
{
    int d = rot->head_dim;
    float scale = get_f32(half), y[KVARC_HEAD_DIM_MAX];
    unpack_levels(fi, half + 4, d, y);
    for (int i = 0; i < d; i++)
        y[i] = scale * y[i];
    kvg_unrotate_ref(rot, y, x);
    if (mu)
        for (int i = 0; i < d; i++)
            x[i] += mu[i];
}

/* Lossless half: the values as given, converted to the format's dtype. */
static void encode_raw_half(const kvarc_format_info *fi, kvarc_dtype dt, const void *base,
                            size_t tok, int d, uint8_t *half)
{
    kvarc_dtype want = fi->id == KVARC_FMT_F16 ? KVARC_DTYPE_F16 : KVARC_DTYPE_BF16;
    for (int i = 0; i < d; i++) {
        size_t e = tok * (size_t)d + (size_t)i;
        uint16_t h;
        if (dt == want) {
            memcpy(&h, (const uint8_t *)base + e * 2, 2);
        } else {
            float v = kvarc_load_f32(dt, base, e);
            h = want == KVARC_DTYPE_F16 ? kvarc_f32_to_f16(v) : kvarc_f32_to_bf16(v);
        }
        memcpy(half + 2 * i, &h, 2);
    }
}

static void decode_raw_half(const kvarc_format_info *fi, const uint8_t *half, int d, float *x)
{
    for (int i = 0; i < d; i++) {
        uint16_t h;
        memcpy(&h, half + 2 * i, 2);
        x[i] = fi->id == KVARC_FMT_F16 ? kvarc_f16_to_f32(h) : kvarc_bf16_to_f32(h);
    }
}

/* Rotated, centered copy y of x and its squared norm; nonzero if the
 * squared norm is not a finite fp32. */
static int rotate_norm(const kvarc_rotation *rot, const float *x, float *y, float *ss)
{
    int d = rot->head_dim;
    float sq[KVARC_HEAD_DIM_MAX];
    kvg_rotate_ref(rot, x, y);
    for (int i = 0; i < d; i++)
        sq[i] = y[i] * y[i];
    *ss = kvarc_tree_sum(sq, d);
    return isfinite(*ss) ? 0 : KVARC_ENONFINITE;
}

/* Signature of rotated, centered key y with squared norm ss. */
static void make_signature(const float *y, float ss, int d, uint8_t *bits, uint16_t *scale)
{
    float ab[KVARC_HEAD_DIM_MAX];
    memset(bits, 0, (size_t)d / 8);
    for (int i = 0; i < d; i++) {
        if (!(y[i] < 0.0f))
            bits[i / 8] |= (uint8_t)(1u << (i % 8));
        ab[i] = fabsf(y[i]);
    }
    float l1 = kvarc_tree_sum(ab, d);
    float w = l1 > 0.0f ? ss / l1 : 0.0f;
    *scale = kvarc_f32_to_f16(fminf(w, 65504.0f));
}

int kvg_signature_ref(const kvarc_rotation *rot, const float *x, uint8_t *bits, uint16_t *scale)
{
    float y[KVARC_HEAD_DIM_MAX], ss;
    if (!rot || !x || !bits || !scale)
        return -EINVAL;
    for (int i = 0; i < rot->head_dim; i++)
        if (!isfinite(x[i]))
            return KVARC_ENONFINITE;
    int rc = rotate_norm(rot, x, y, &ss);
    if (!rc)
        make_signature(y, ss, rot->head_dim, bits, scale);
    return rc;
}

/* The checks every codec entry point starts with: the format's table entry
 * in *fi, or an error code. */
static int codec_check(const kvg_codec *c, const kvarc_format_info **fi)
{
    if (!c || !c->rot)
        return -EINVAL;
    if (!(*fi = kvarc_format_get(c->format)))
        return KVARC_EFORMAT;
    return kvarc_head_dim_check(c->rot->head_dim) ? KVARC_EHEADDIM : 0;
}

int kvg_encode_ref(const kvg_codec *c, kvarc_dtype dt, const void *k, const void *v,
                   size_t n, uint8_t *records, uint8_t *sig_bits, uint16_t *sig_scale,
                   size_t *bad_token)
{
    const kvarc_format_info *fi;
    int chk = codec_check(c, &fi);
    if (chk)
        return chk;
    int d = c->rot->head_dim;
    if (!kvarc_dtype_size(dt))
        return KVARC_EDTYPE;
    if (n == 0)
        return 0;
    if (!k || !v || !records || !sig_bits || !sig_scale)
        return -EINVAL;
    int half = kvarc_record_half_bytes(fi->id, d);
    float xk[KVARC_HEAD_DIM_MAX], xv[KVARC_HEAD_DIM_MAX];
    float yk[KVARC_HEAD_DIM_MAX], yv[KVARC_HEAD_DIM_MAX];
    for (size_t t = 0; t < n; t++) {
        uint8_t *rec = records + t * (size_t)(2 * half);
        float ssk = 0.0f, ssv = 0.0f;   /* set by rotate_norm; -O3 cannot see ssv only feeds the rotated path */
        int rc = load_centered(dt, k, t, d, c->mu_k, xk);
        if (!rc)
            rc = load_centered(dt, v, t, d, c->mu_v, xv);
        if (!rc)
            rc = rotate_norm(c->rot, xk, yk, &ssk);
        if (!rc && fi->rotated)
            rc = rotate_norm(c->rot, xv, yv, &ssv);
        if (rc) {
            if (bad_token)
                *bad_token = t;
            return rc;
        }
        make_signature(yk, ssk, d, sig_bits + t * (size_t)(d / 8), &sig_scale[t]);
        if (fi->rotated) {
            encode_rotated_half(fi, c->rot, yk, ssk, rec);
            encode_rotated_half(fi, c->rot, yv, ssv, rec + half);
        } else {
            encode_raw_half(fi, dt, k, t, d, rec);
            encode_raw_half(fi, dt, v, t, d, rec + half);
        }
    }
    return 0;
}

int kvg_decode_ref(const kvg_codec *c, const uint8_t *records, size_t n,
                   float *k_out, float *v_out)
{
    const kvarc_format_info *fi;
    int chk = codec_check(c, &fi);
    if (chk)
        return chk;
    int d = c->rot->head_dim;
    if (n && !records)
        return -EINVAL;
    int half = kvarc_record_half_bytes(fi->id, d);
    for (size_t t = 0; t < n; t++) {
        const uint8_t *rec = records + t * (size_t)(2 * half);
        for (int part = 0; part < 2; part++) {
            float *out = part ? v_out : k_out;
            if (!out)
                continue;
            out += t * (size_t)d;
            if (fi->rotated)
                decode_rotated_half(fi, c->rot, rec + part * half, part ? c->mu_v : c->mu_k, out);
            else
                decode_raw_half(fi, rec + part * half, d, out);
        }
    }
    return 0;
}

int kvg_key_query_prep(const kvg_codec *c, const float *q, int n_q, float *r, float *bias)
{
    int d = c->rot->head_dim;
    float prod[KVARC_HEAD_DIM_MAX];
    for (int h = 0; h < n_q; h++) {
        const float *qh = q + (size_t)h * (size_t)d;
        for (int i = 0; i < d; i++) {
            if (!isfinite(qh[i]))
                return KVARC_ENONFINITE;
            prod[i] = c->mu_k ? qh[i] * c->mu_k[i] : 0.0f;
        }
        bias[h] = kvarc_tree_sum(prod, d);
        if (r)
            kvg_rotate_ref(c->rot, qh, r + (size_t)h * (size_t)d);
    }
    return 0;
}

int kvg_key_scores_ref(const kvg_codec *c, const float *q, int n_q, const uint8_t *records,
                       size_t n, float *scores)
{
    const kvarc_format_info *fi;
    int chk = codec_check(c, &fi);
    if (chk)
        return chk;
    if (!q || n_q < 1 || n_q > 64)
        return -EINVAL;
    int d = c->rot->head_dim;
    if (n && (!records || !scores))
        return -EINVAL;
    int rb = kvarc_record_bytes(fi->id, d);
    float r[64 * KVARC_HEAD_DIM_MAX], bias[64], lv[KVARC_HEAD_DIM_MAX];   /* r: [n_q][d] */
    int prc = kvg_key_query_prep(c, q, n_q, fi->rotated ? r : NULL, bias);
    if (prc)
        return prc;
    for (size_t j = 0; j < n; j++) {
        const uint8_t *rec = records + j * (size_t)rb;
        float scale = 0.0f, best = 0.0f;
        if (fi->rotated) {
            scale = get_f32(rec);
            unpack_levels(fi, rec + 4, d, lv);
        } else {
            decode_raw_half(fi, rec, d, lv);
        }
        for (int h = 0; h < n_q; h++) {
            float s = 0.0f;
            if (fi->rotated) {
                for (int i = 0; i < d; i++)
                    s += r[(size_t)h * (size_t)d + (size_t)i] * lv[i];
                s = scale * s + bias[h];
            } else {
                const float *qh = q + (size_t)h * (size_t)d;
                for (int i = 0; i < d; i++)
                    s += qh[i] * lv[i];
            }
            if (h == 0 || s > best)
                best = s;
        }
        scores[j] = best;
    }
    return 0;
}
