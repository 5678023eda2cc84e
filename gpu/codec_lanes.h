/* codec_lanes.h - the body of the codec's lanes (codec_simd.c), a
 * template included once by each build: lanes_v4.c, lanes_v3.c,
 * lanes_base.c (after lanes.h, which holds the types and transposes).
 * Each defines LN (tokens per batch: the vector width of its ISA in fp32
 * lanes, so every vector is one native register and no comparison is
 * lowered lane by lane) and LANES_FN(name) (the build's exported name),
 * and sets its target ISA for the whole file before including this.
 *
 * Lane l of every vector is token t0 + l, and each lane performs exactly
 * the reference's sequence of IEEE operations for its token (codec_ref.c,
 * sigpos_ref.c): the same products, butterflies in the same order, the
 * same pairwise tree sums, divisions and conversions. Only LN tokens run
 * at once, so the bits are the reference's by construction (nothing is
 * reassociated; the build passes -ffp-contract=off). Per-token scalars (a
 * square root, an fp16 conversion, the RoPE angles) are computed lane by
 * lane by the reference's own functions. Helpers take pointers only, so no
 * vector crosses a call. */
#include "lanes.h"

/* ---- lane helpers (pointers only) ------------------------------------ */

/* kvarc_fwht on lanes: the same butterflies in the same order. */
AI void fwht_l(vf *x, int d)
{
    for (int h = 1; h < d; h *= 2)
        for (int i = 0; i < d; i += 2 * h)
            for (int j = i; j < i + h; j++) {
                vf a = x[j], b = x[j + h];
                x[j] = a + b;
                x[j + h] = a - b;
            }
}

/* kvarc_tree_sum on lanes, in place: the sum lands in t[0]. */
AI void tree_sum_l(vf *t, int d)
{
    for (int h = d / 2; h >= 1; h /= 2)
        for (int i = 0; i < h; i++)
            t[i] += t[i + h];
}

/* Lanes where v is NaN or +-Inf: -1, else 0 (v - v is +0 exactly for
 * finite v, NaN otherwise). */
AI void nonfinite_l(const vf *v, vi *bad) { *bad |= (*v - *v) != 0.0f; }

AI int any_l(const vi *m)
{
    int r = 0;
    for (int l = 0; l < LN; l++)
        r |= (*m)[l] != 0;
    return r;
}

/* Tokens t0..t0+m of [n][d] dt into lanes (zeros past m), minus mu as
 * load_centered does; *bad gets the lanes with a non-finite value or
 * difference. fp32 rows come in as vectors, LN dims of LN tokens a block,
 * transposed in registers. */
AI void load_l(kvarc_dtype dt, const void *base, size_t t0, int m, int d, const float *mu, vf *x, vi *bad)
{
    if (dt == KVARC_DTYPE_F32) {
        load_rows_l((const float *)base + t0 * (size_t)d, d, m, x);
    } else {
        for (int l = 0; l < LN; l++) {
            size_t o = (t0 + (size_t)l) * (size_t)d;
            for (int i = 0; i < d; i++)
                x[i][l] = l < m ? kvarc_load_f32(dt, base, o + (size_t)i) : 0.0f;
        }
    }
    for (int i = 0; i < d; i++) {
        nonfinite_l(&x[i], bad);
        if (mu) {
            x[i] = x[i] - mu[i];
            nonfinite_l(&x[i], bad);
        }
    }
}

/* kvg_rotate_ref on lanes, then the squared norm (tree sum) into *ss. */
AI void rotate_norm_l(const kvarc_rotation *rot, vf *x, vf *tmp, vf *ss)
{
    int d = rot->head_dim;
    for (int i = 0; i < d; i++)
        x[i] = x[i] * rot->signs[i];
    fwht_l(x, d);
    for (int i = 0; i < d; i++) {
        x[i] = x[i] * rot->inv_sqrt_d;
        tmp[i] = x[i] * x[i];
    }
    tree_sum_l(tmp, d);
    *ss = tmp[0];
}

/* make_signature on lanes: bits of lanes < m at bits + lane * d/8. */
AI void signature_l(const vf *y, const vf *ss, int d, int m, vf *tmp, uint8_t *bits, uint16_t *scale)
{
    for (int g = 0; g < d / 8; g++) {
        vi b = { 0 };
        for (int j = 0; j < 8; j++)
            b |= ~(y[8 * g + j] < 0.0f) & (1 << j);
        for (int l = 0; l < m; l++)
            bits[(size_t)l * (size_t)(d / 8) + (size_t)g] = (uint8_t)b[l];
    }
    for (int i = 0; i < d; i++)
        tmp[i] = (vf)((vi)y[i] & 0x7fffffff);             /* fabsf */
    tree_sum_l(tmp, d);
    for (int l = 0; l < m; l++) {
        float l1 = tmp[0][l], w = l1 > 0.0f ? (*ss)[l] / l1 : 0.0f;
        scale[l] = kvarc_f32_to_f16(fminf(w, 65504.0f));
    }
}

/* The codebook formats' half record (q3, q4) on lanes: cb is a constant
 * at each call, so the bisection below unrolls. */
AI void codebook_half_l(const int cb, const float *levels, const float *bounds, const kvarc_rotation *rot, vf *y,
                        const vf *ss, int m, vf *tmp, uint8_t *half, size_t stride)
{
    int d = rot->head_dim;
    int nb = (1 << cb) - 1;
    vf sigma = { 0 };
    for (int l = 0; l < LN; l++)
        sigma[l] = sqrtf((*ss)[l]) * rot->inv_sqrt_d;
    vi pos = sigma > 0.0f;
    /* where the codebook fits one register (and a variable permute is
     * native: LN >= 8), bounds and levels are looked up by index */
    int tables = LN >= 8 && nb + 1 <= LN;
    vf bv = { 0 }, lv = { 0 };
    for (int b = 0; tables && b <= nb; b++) {
        bv[b] = b < nb ? bounds[b] : 0.0f;
        lv[b] = levels[b];
    }
    for (int g = 0; g < d; g += 8) {
        vu w = { 0 };
        for (int j = 0; j < 8; j++) {
            int i = g + j;
            vf u = (vf)((vi)(y[i] / sigma) & pos);         /* sigma > 0 ? y / sigma : 0 */
            vi c = { 0 };
            vf lev;
            if (tables) {
                /* bounds ascend strictly, so the count of bounds below u is
                 * found by bisection: at step s, c is a multiple of 2s and
                 * bound c + s - 1 splits [c, c + 2s) */
                for (int st = (nb + 1) / 2; st >= 1; st /= 2)
                    c += (u > permute_l(bv, c + (st - 1))) & st;
                lev = permute_l(lv, c);
            } else {
                lev = (vf){ 0 } + levels[0];
                for (int b = 0; b < nb; b++) {
                    vi gt = u > bounds[b];                  /* bounds ascend: lev ends at levels[c] */
                    c -= gt;
                    lev = (vf)(((vi)lev & ~gt) | ((vi)((vf){ 0 } + levels[b + 1]) & gt));
                }
            }
            y[i] = y[i] * lev;
            tmp[i] = lev * lev;
            w |= (vu)c << (cb * j);
        }
        for (int l = 0; l < m; l++) {
            uint8_t *p = half + (size_t)l * stride + 4 + (size_t)(g * cb / 8);
            for (int k = 0; k < cb; k++)                   /* 8 codes of cb bits = cb bytes, LSB first */
                p[k] = (uint8_t)(w[l] >> (8 * k));
        }
    }
    tree_sum_l(y, d);
    tree_sum_l(tmp, d);
    vf scale = y[0] / tmp[0];
    for (int l = 0; l < m; l++) {
        float sl = scale[l];              /* no address of a vector element (clang) */
        memcpy(half + (size_t)l * stride, &sl, 4);
    }
}

/* encode_rotated_half on lanes: half records of lanes < m at half +
 * lane * stride. y is consumed (the products y_i L[c_i] replace it). */
AI void encode_half_l(const kvarc_format_info *fi, const kvarc_rotation *rot, vf *y, const vf *ss, int m,
                      vf *tmp, uint8_t *half, size_t stride)
{
    int d = rot->head_dim;
    if (fi->id == KVARC_FMT_I8) {
        vf mx = { 0 };
        for (int i = 0; i < d; i++) {
            vf a = (vf)((vi)y[i] & 0x7fffffff);
            vi gt = a > mx;                                /* fmaxf of finite values */
            mx = (vf)(((vi)a & gt) | ((vi)mx & ~gt));
        }
        vf scale = mx / 127.0f;
        vi pos = scale > 0.0f;
        for (int i = 0; i < d; i++) {
            vf u = y[i] / scale;
            u = (u + 12582912.0f) - 12582912.0f;           /* rintf: |u| <= 127 < 2^22 */
            u = (vf)((vi)u & pos);
            vi lo = u < -127.0f, hi = u > 127.0f;
            u = (vf)(((vi)u & ~lo) | ((vi)((vf){ 0 } - 127.0f) & lo));
            u = (vf)(((vi)u & ~hi) | ((vi)((vf){ 0 } + 127.0f) & hi));
            vi q = __builtin_convertvector(u, vi);
            for (int l = 0; l < m; l++)
                half[(size_t)l * stride + 4 + (size_t)i] = (uint8_t)(int8_t)q[l];
        }
        for (int l = 0; l < m; l++) {
            float sl = scale[l];
            memcpy(half + (size_t)l * stride, &sl, 4);
        }
        return;
    }
    if (fi->id == KVARC_FMT_Q3)
        codebook_half_l(3, kvarc_q3_levels, kvarc_q3_bounds, rot, y, ss, m, tmp, half, stride);
    else
        codebook_half_l(4, kvarc_q4_levels, kvarc_q4_bounds, rot, y, ss, m, tmp, half, stride);
}

/* unpack_levels on lanes: the level values of the half records of lanes
 * < m at half + lane * stride into x (lanes past m are zero), their
 * scales into *scale. */
AI void levels_l(const kvarc_format_info *fi, int d, const uint8_t *half, size_t stride, int m, vf *x, vf *scale)
{
    *scale = (vf){ 0 };
    for (int l = 0; l < LN; l++) {
        if (l >= m) {
            for (int i = 0; i < d; i++)
                x[i][l] = 0.0f;
            continue;
        }
        const uint8_t *h = half + (size_t)l * stride, *codes = h + 4;
        float sl;
        memcpy(&sl, h, 4);
        (*scale)[l] = sl;
        if (fi->id == KVARC_FMT_I8) {
            for (int i = 0; i < d; i++)
                x[i][l] = (float)(int8_t)codes[i];
        } else if (fi->id == KVARC_FMT_Q4) {
            for (int i = 0; i < d; i += 2) {
                x[i][l] = kvarc_q4_levels[codes[i / 2] & 15];
                x[i + 1][l] = kvarc_q4_levels[codes[i / 2] >> 4];
            }
        } else {
            for (int i = 0; i < d; i += 8) {
                const uint8_t *p = codes + i / 8 * 3;
                uint32_t w = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16;
                for (int j = 0; j < 8; j++)
                    x[i + j][l] = kvarc_q3_levels[(w >> (3 * j)) & 7];
            }
        }
    }
}

/* decode_rotated_half on lanes: half records of lanes < m at half +
 * lane * stride into x (lanes past m are zero). */
AI void decode_half_l(const kvarc_format_info *fi, const kvarc_rotation *rot, const uint8_t *half, size_t stride,
                      int m, const float *mu, vf *x)
{
    int d = rot->head_dim;
    vf scale;
    levels_l(fi, d, half, stride, m, x, &scale);
    for (int i = 0; i < d; i++)
        x[i] = scale * x[i];
    fwht_l(x, d);
    for (int i = 0; i < d; i++) {
        x[i] = (x[i] * rot->inv_sqrt_d) * rot->signs[i];
        if (mu)
            x[i] += mu[i];
    }
}

/* Lanes x (transposed in place: x is scratch afterwards) to rows out[m][d]. */
AI void store_l(vf *x, int d, int m, float *out)
{
    for (int i0 = 0; i0 < d; i0 += LN) {
        vf *b = x + i0;
        transpose_l(b);
        for (int l = 0; l < m; l++)
            memcpy(out + (size_t)l * (size_t)d + (size_t)i0, &b[l], sizeof(vf));
    }
}

/* ---- bodies ------------------------------------------------------------ */

/* One half record's lanes and one temporary: K and V go through in turn,
 * so the working set (32 KB at 16 lanes, head_dim 256: 64 KB) stays in L1
 * at head_dim 128 (two halves at once at 16 lanes did not fit, and ran
 * slower than 8 lanes). */
typedef struct scratch {
    vf x[KVARC_HEAD_DIM_MAX];
    union {
        vf     t[KVARC_HEAD_DIM_MAX];
        double cs[LN][KVARC_HEAD_DIM_MAX];      /* stage 2: each lane's angles */
    } u;
} scratch;

/* Encode tokens [t0, t0 + m), m <= LN; 0, or 1 if the batch must go to
 * the reference. */
AI int encode_body(const kvg_codec *c, const kvarc_format_info *fi, kvarc_dtype dt, const void *k, const void *v,
                   size_t t0, int m, size_t n, uint8_t *records, uint8_t *sig_bits, uint16_t *sig_scale, scratch *s)
{
    int d = c->rot->head_dim, half = kvarc_record_half_bytes(fi->id, d);
    for (int p = 0; p < 2; p++) {
        vi bad = { 0 };
        vf ss;
        /* the next batch's rows of this half, while this one computes (a
         * batch is 16 tokens x 512 B of each at head_dim 128: the
         * hardware's prefetcher alone left encode waiting on memory) */
        const size_t es = kvarc_dtype_size(dt), row = (size_t)d * es;
        if (t0 + LN < n) {                    /* only rows that are there: no pointer past the input */
            const char *nx = (const char *)(p ? v : k) + (t0 + LN) * row;
            const size_t nrow = n - (t0 + LN) < (size_t)LN ? n - (t0 + LN) : (size_t)LN;
            for (size_t o = 0; o < nrow * row; o += 64)
                __builtin_prefetch(nx + o);
        }
        load_l(dt, p ? v : k, t0, m, d, p ? c->mu_v : c->mu_k, s->x, &bad);
        if (any_l(&bad))
            return 1;
        rotate_norm_l(c->rot, s->x, s->u.t, &ss);
        nonfinite_l(&ss, &bad);
        if (any_l(&bad))
            return 1;
        if (p == 0)
            signature_l(s->x, &ss, d, m, s->u.t, sig_bits + t0 * (size_t)(d / 8), sig_scale + t0);
        encode_half_l(fi, c->rot, s->x, &ss, m, s->u.t, records + t0 * (size_t)(2 * half) + (size_t)(p * half),
                      (size_t)(2 * half));
    }
    return 0;
}

AI void decode_body(const kvg_codec *c, const kvarc_format_info *fi, const uint8_t *records, size_t t0, int m,
                    float *k_out, float *v_out, scratch *s)
{
    int d = c->rot->head_dim, half = kvarc_record_half_bytes(fi->id, d);
    const uint8_t *rec = records + t0 * (size_t)(2 * half);
    for (int p = 0; p < 2; p++) {
        float *out = p ? v_out : k_out;
        if (!out)
            continue;
        decode_half_l(fi, c->rot, rec + p * half, (size_t)(2 * half), m, p ? c->mu_v : c->mu_k, s->x);
        store_l(s->x, d, m, out + t0 * (size_t)d);
    }
}

/* kvg_key_scores_pos_ref for records [j0, j0 + m). */
AI void scores_pos_body(const kvg_codec *c, const kvarc_format_info *fi, const kvg_rope *r,
                        const kvg_rope_table *tb, const float *q_r, int n_q, const uint8_t *records,
                        const uint64_t *pos, size_t j0, int m, float *scores, scratch *s)
{
    int d = r->d, half = kvarc_record_half_bytes(fi->id, d);
    int np = r->rotary_dims / 2;
    vf *k = s->x;
    decode_half_l(fi, c->rot, records + j0 * (size_t)(2 * half), (size_t)(2 * half), m, c->mu_k, k);
    /* the angles, lane by lane, by the reference's own functions */
    for (int l = 0; l < LN; l++) {
        double *o = s->u.cs[l];
        uint64_t p = pos[j0 + (size_t)(l < m ? l : 0)];
        if (tb)
            kvg_rope_table_angles(tb, r, p, o);
        else
            kvg_rope_angles(o, d, r->rotary_dims, r->inv_freq, (double)p);
    }
    for (int i = 0; i < np; i++) {
        vd co, si;
        for (int l = 0; l < LN; l++) {
            co[l] = s->u.cs[l][2 * i];
            si[l] = s->u.cs[l][2 * i + 1];
        }
        int a = r->layout ? 2 * i : i, b = r->layout ? 2 * i + 1 : i + np;
        vd xa = __builtin_convertvector(k[a], vd), xb = __builtin_convertvector(k[b], vd);
        k[a] = __builtin_convertvector(xa * co - xb * si, vf);
        k[b] = __builtin_convertvector(xa * si + xb * co, vf);
    }
    vf best = { 0 };
    for (int h = 0; h < n_q; h++) {
        const float *q = q_r + (size_t)h * (size_t)d;
        vf acc = { 0 };
        for (int i = 0; i < d; i++)
            acc += q[i] * k[i];
        vi gt = h == 0 ? (vi){ 0 } - 1 : acc > best;        /* h == 0 || s > best */
        best = (vf)(((vi)acc & gt) | ((vi)best & ~gt));
    }
    for (int l = 0; l < m; l++)
        scores[j0 + (size_t)l] = best[l];
}

/* kvg_key_scores_ref's rotated-format scores for records [j0, j0 + m):
 * r[n_q][d] the rotated queries, bias[n_q] their q . mu_k (both as the
 * reference prepares them). */
AI void key_scores_body(const kvarc_format_info *fi, int d, const float *r, const float *bias, int n_q,
                        const uint8_t *records, size_t j0, int m, float *scores, scratch *s)
{
    int rb = kvarc_record_bytes(fi->id, d);
    vf scale, best = { 0 };
    levels_l(fi, d, records + j0 * (size_t)rb, (size_t)rb, m, s->x, &scale);
    for (int h = 0; h < n_q; h++) {
        const float *rh = r + (size_t)h * (size_t)d;
        vf acc = { 0 };
        for (int i = 0; i < d; i++)
            acc += rh[i] * s->x[i];
        acc = scale * acc + bias[h];
        vi gt = h == 0 ? (vi){ 0 } - 1 : acc > best;        /* h == 0 || s > best */
        best = (vf)(((vi)acc & gt) | ((vi)best & ~gt));
    }
    for (int l = 0; l < m; l++)
        scores[j0 + (size_t)l] = best[l];
}

/* ---- the build's entry points (codec_simd.c calls them) ---------------- */

/* Encode n tokens; 0, or 1 with *bad_t0 = the first batch the reference
 * must redo (a non-finite input or norm). */
int LANES_FN(encode)(const kvg_codec *c, const kvarc_format_info *fi, kvarc_dtype dt, const void *k, const void *v,
                     size_t n, uint8_t *records, uint8_t *sig_bits, uint16_t *sig_scale, size_t *bad_t0)
{
    scratch s;
    for (size_t t0 = 0; t0 < n; t0 += LN) {
        int m = n - t0 < LN ? (int)(n - t0) : LN;
        if (encode_body(c, fi, dt, k, v, t0, m, n, records, sig_bits, sig_scale, &s)) {
            *bad_t0 = t0;
            return 1;
        }
    }
    return 0;
}

/* kvg_signature_ref of n keys x[n][d] (already centered); 0, or 1 with
 * *bad_t0 = the first batch the reference must redo. */
int LANES_FN(signatures)(const kvarc_rotation *rot, const float *x, size_t n, uint8_t *bits, uint16_t *scales,
                         size_t *bad_t0)
{
    scratch s;
    int d = rot->head_dim;
    for (size_t t0 = 0; t0 < n; t0 += LN) {
        int m = n - t0 < LN ? (int)(n - t0) : LN;
        vi bad = { 0 };
        vf ss;
        load_l(KVARC_DTYPE_F32, x, t0, m, d, NULL, s.x, &bad);
        if (!any_l(&bad)) {
            rotate_norm_l(rot, s.x, s.u.t, &ss);
            nonfinite_l(&ss, &bad);
        }
        if (any_l(&bad)) {
            *bad_t0 = t0;
            return 1;
        }
        signature_l(s.x, &ss, d, m, s.u.t, bits + t0 * (size_t)(d / 8), scales + t0);
    }
    return 0;
}

/* kvg_summary_ref of one block (n <= KVG_SIG_BLOCK tokens x[n][d]): the
 * means and variances LN dimensions a vector (each dimension's sum over
 * the tokens in order, as the reference's loop), the whitened distances
 * LN tokens a vector (the same quotients, the same tree sum). 0, or 1
 * where the reference must run (a non-finite mean, norm or distance: it
 * returns the code). */
int LANES_FN(summary)(const kvarc_rotation *rot, const float *x, const uint8_t *bits, const uint16_t *scales,
                      size_t n, uint8_t *sum_bits, uint16_t *sum_scales)
{
    const int d = rot->head_dim;
    const size_t sb = (size_t)d / 8;
    float m[KVARC_HEAD_DIM_MAX] __attribute__((aligned(64))) = { 0 };
    float v[KVARC_HEAD_DIM_MAX] __attribute__((aligned(64))) = { 0 };
    float r[KVG_SIG_BLOCK];
    scratch s;
    for (int i0 = 0; i0 < d; i0 += LN) {
        vf acc = { 0 };
        for (size_t j = 0; j < n; j++) {
            vf row;
            memcpy(&row, x + j * (size_t)d + (size_t)i0, sizeof row);
            acc = acc + row;
        }
        vf mm = acc / (float)n;
        memcpy(m + i0, &mm, sizeof mm);
    }
    if (kvg_signature_ref(rot, m, sum_bits, &sum_scales[0]))
        return 1;
    for (int i0 = 0; i0 < d; i0 += LN) {
        vf acc = { 0 }, mm;
        memcpy(&mm, m + i0, sizeof mm);
        for (size_t j = 0; j < n; j++) {
            vf row;
            memcpy(&row, x + j * (size_t)d + (size_t)i0, sizeof row);
            vf e = row - mm;
            acc = acc + e * e;
        }
        vf vv = acc / (float)n;
        memcpy(v + i0, &vv, sizeof vv);
    }
    for (size_t t0 = 0; t0 < n; t0 += LN) {
        const int mt = n - t0 < LN ? (int)(n - t0) : LN;
        load_rows_l(x + t0 * (size_t)d, d, mt, s.x);
        for (int i = 0; i < d; i++) {
            vf e = s.x[i] - m[i];
            s.u.t[i] = v[i] > 0.0f ? e * e / v[i] : (vf){ 0 };
        }
        tree_sum_l(s.u.t, d);
        vi bad = { 0 };
        nonfinite_l(&s.u.t[0], &bad);
        for (int l = 0; l < mt; l++) {
            if (bad[l])
                return 1;
            r[t0 + (size_t)l] = s.u.t[0][l];
        }
    }
    kvg_summary_pick(r, n, bits, scales, sb, sum_bits, sum_scales);
    return 0;
}

void LANES_FN(decode)(const kvg_codec *c, const kvarc_format_info *fi, const uint8_t *records, size_t n,
                      float *k_out, float *v_out)
{
    scratch s;
    for (size_t t0 = 0; t0 < n; t0 += LN)
        decode_body(c, fi, records, t0, n - t0 < LN ? (int)(n - t0) : LN, k_out, v_out, &s);
}

void LANES_FN(scores_pos)(const kvg_codec *c, const kvarc_format_info *fi, const kvg_rope *r,
                          const kvg_rope_table *tb, const float *q_r, int n_q, const uint8_t *records,
                          const uint64_t *pos, size_t n, float *scores)
{
    scratch s;
    for (size_t j0 = 0; j0 < n; j0 += LN)
        scores_pos_body(c, fi, r, tb, q_r, n_q, records, pos, j0, n - j0 < LN ? (int)(n - j0) : LN, scores, &s);
}

void LANES_FN(key_scores)(const kvarc_format_info *fi, int d, const float *r, const float *bias, int n_q,
                          const uint8_t *records, size_t n, float *scores)
{
    scratch s;
    for (size_t j0 = 0; j0 < n; j0 += LN)
        key_scores_body(fi, d, r, bias, n_q, records, j0, n - j0 < LN ? (int)(n - j0) : LN, scores, &s);
}
