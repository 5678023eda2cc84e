/* model.c - the passkey model's forward pass (see model.h).
 *
 * Design notes
 * 1. The file is read whole and kept; matrices are transposed once to
 *    [in][out] so that y += x[k] * W[k][:] runs along rows (vectorizes
 *    without reassociating sums).
 * 2. A forward call takes the next n tokens of one sequence; every layer
 *    finishes the whole chunk before the next layer starts, which is the
 *    order libkvarc needs (a layer's K/V appended, then its attention).
 * 3. The exact backend keeps K turned to its true position and V, in fp32
 *    (or rounded to fp16 first, to be compared with a lossless kvarc
 *    format bit for bit in what is stored), token-major [t][kv head][hd],
 *    and attends with the tools' tu_exact_attention (softmax in double).
 */
#include "model.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvarc_schema.h"
#include "kvg.h"
#include "toolutil.h"

#define HEADER_U32 9

static int fail(char *err, size_t len, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int fail(char *err, size_t len, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, len, fmt, ap);
    va_end(ap);
    return -1;
}

/* w[out][in] -> t[in][out] */
static void transpose(float *t, const float *w, uint32_t out, uint32_t in)
{
    for (uint32_t o = 0; o < out; o++)
        for (uint32_t i = 0; i < in; i++)
            t[(size_t)i * out + o] = w[(size_t)o * in + i];
}

int pk_model_load(const char *path, pk_model *m, char *err, size_t len)
{
    memset(m, 0, sizeof *m);
    FILE *f = fopen(path, "rb");
    if (!f)
        return fail(err, len, "%s: cannot open: %s", path, strerror(errno));
    char magic[8];
    uint32_t h[HEADER_U32];
    float hf[2];
    if (fread(magic, 1, 8, f) != 8 || memcmp(magic, "KVARCMDL", 8) || fread(h, 4, HEADER_U32, f) != HEADER_U32 ||
        fread(hf, 4, 2, f) != 2 || h[0] != 1) {
        fclose(f);
        return fail(err, len, "%s: not a KVARCMDL v1 file (tools/passkey/train.py writes them)", path);
    }
    m->vocab = h[1], m->d = h[2], m->n_layers = h[3], m->n_heads = h[4], m->n_kv_heads = h[5];
    m->head_dim = h[6], m->ffn = h[7], m->train_len = h[8], m->rope_theta = hf[0], m->norm_eps = hf[1];
    if (!m->vocab || m->vocab > 65536 || !m->d || m->d > 8192 || !m->n_layers || m->n_layers > 64 ||
        !m->n_kv_heads || m->n_heads % m->n_kv_heads || !m->head_dim || m->head_dim % 2 || m->head_dim > 256 ||
        !m->ffn || m->ffn > 65536) {
        fclose(f);
        return fail(err, len, "%s: implausible shape in the header", path);
    }
    const size_t d = m->d, qd = (size_t)m->n_heads * m->head_dim, kd = (size_t)m->n_kv_heads * m->head_dim;
    const size_t per_layer = 2 * d + qd * d + 2 * kd * d + d * qd + 3 * d * m->ffn;
    const size_t total = (size_t)m->vocab * d + m->n_layers * per_layer + d + (size_t)m->vocab * d;
    m->file = malloc(total * 4);
    m->t = malloc((total - 2 * d * m->n_layers - d - (size_t)m->vocab * d) * 4);
    m->L = calloc(m->n_layers, sizeof *m->L);
    if (!m->file || !m->t || !m->L) {
        fclose(f);
        pk_model_free(m);
        return fail(err, len, "%s: out of memory for %zu floats", path, total);
    }
    size_t got = fread(m->file, 4, total, f);
    int extra = fgetc(f) != EOF;
    fclose(f);
    if (got != total || extra) {
        pk_model_free(m);
        return fail(err, len, "%s: size does not match its header (%zu floats expected)", path, total);
    }
    const float *p = m->file;
    float *t = m->t;
    m->emb = p, p += (size_t)m->vocab * d;
#define TAKE(dst, out, in) (transpose(t, p, (uint32_t)(out), (uint32_t)(in)), (dst) = t, t += (size_t)(out) * (in), \
                            p += (size_t)(out) * (in))
    for (uint32_t l = 0; l < m->n_layers; l++) {
        pk_layer_w *w = &m->L[l];
        w->attn_norm = p, p += d;
        TAKE(w->wq, qd, d);
        TAKE(w->wk, kd, d);
        TAKE(w->wv, kd, d);
        TAKE(w->wo, d, qd);
        w->ffn_norm = p, p += d;
        TAKE(w->w1, m->ffn, d);
        TAKE(w->w3, m->ffn, d);
        TAKE(w->w2, d, m->ffn);
    }
    m->norm = p, p += d;
    TAKE(m->head, m->vocab, d);
#undef TAKE
    return 0;
}

void pk_model_free(pk_model *m)
{
    free(m->file);
    free(m->t);
    free(m->L);
    memset(m, 0, sizeof *m);
}

kvarc_model pk_model_shape(const pk_model *m, const char *fingerprint)
{
    kvarc_model s = {
        .n_layers = m->n_layers, .n_kv_heads = m->n_kv_heads, .n_q_heads = m->n_heads, .head_dim = m->head_dim,
        .dtype = KVARC_DTYPE_F32, .rope_theta = m->rope_theta, .rotary_dims = m->head_dim, .rope_layout = 0,
        .fingerprint = fingerprint,
    };
    return s;
}

int pk_attn_exact_init(pk_attn *a, const pk_model *m, uint64_t cap, uint32_t sinks, uint32_t window, int f16)
{
    memset(a, 0, sizeof *a);
    a->kind = PK_ATTN_EXACT;
    a->n_layers = m->n_layers;
    a->sinks = sinks, a->window = window, a->f16 = f16, a->cap = cap;
    a->len = calloc(m->n_layers, sizeof *a->len);
    a->kr = calloc(m->n_layers, sizeof *a->kr);
    a->v = calloc(m->n_layers, sizeof *a->v);
    a->inv_freq = malloc(m->head_dim / 2 * sizeof *a->inv_freq);
    if (!a->len || !a->kr || !a->v || !a->inv_freq)
        goto nomem;
    for (uint32_t l = 0; l < m->n_layers; l++) {
        a->kr[l] = malloc((size_t)m->n_kv_heads * cap * m->head_dim * 4);
        a->v[l] = malloc((size_t)m->n_kv_heads * cap * m->head_dim * 4);
        if (!a->kr[l] || !a->v[l])
            goto nomem;
    }
    kvg_rope_freqs(a->inv_freq, (int)m->head_dim, (int)m->head_dim, m->rope_theta);
    return 0;
nomem:
    pk_attn_free(a);
    return -ENOMEM;
}

void pk_attn_kvarc_init(pk_attn *a, kvarc_conv *cv, int kv_dtype)
{
    memset(a, 0, sizeof *a);
    a->kind = PK_ATTN_KVARC;
    a->cv = cv;
    a->kv_dtype = kv_dtype;
}

void pk_attn_free(pk_attn *a)
{
    if (a->kind == PK_ATTN_EXACT) {
        for (uint32_t l = 0; l < a->n_layers && a->kr && a->v; l++) {
            free(a->kr[l]);
            free(a->v[l]);
        }
        free(a->kr);
        free(a->v);
        free(a->len);
        free(a->inv_freq);
    }
    memset(a, 0, sizeof *a);
}

static float f16_round(float x)
{
    return kvarc_f16_to_f32(kvarc_f32_to_f16(x));
}

/* Exact attention of layer l for n new tokens (head-major q, k, v). */
static int exact_layer(const pk_model *m, pk_attn *a, uint32_t l, const float *q, const float *k, const float *v,
                       uint32_t n, float *out, char *err, size_t len)
{
    const size_t hd = m->head_dim, H = m->n_kv_heads, G = m->n_heads / m->n_kv_heads;
    const uint64_t base = a->len[l];
    if (base + n > a->cap)
        return fail(err, len, "exact attention holds %llu tokens; the sequence is longer", (unsigned long long)a->cap);
    for (size_t h = 0; h < H; h++)
        for (uint32_t i = 0; i < n; i++) {
            float *kd = a->kr[l] + ((base + i) * H + h) * hd, *vd = a->v[l] + ((base + i) * H + h) * hd;
            const float *ks = k + (h * n + i) * hd, *vs = v + (h * n + i) * hd;
            if (a->mean_acc)
                for (size_t j = 0; j < hd; j++) {
                    a->mean_acc[((l * H + h) * 2) * hd + j] += ks[j];
                    a->mean_acc[((l * H + h) * 2 + 1) * hd + j] += vs[j];
                }
            for (size_t j = 0; j < hd; j++) {
                kd[j] = a->f16 ? f16_round(ks[j]) : ks[j];
                vd[j] = a->f16 ? f16_round(vs[j]) : vs[j];
            }
            kvg_rope_apply(kd, (int)hd, (int)hd, 0, a->inv_freq, (double)(base + i));
        }
    a->len[l] = base + n;
    double *s = malloc((base + n) * sizeof *s);
    if (!s)
        return fail(err, len, "out of memory for %llu logits", (unsigned long long)(base + n));
    float qr[256];
    for (uint32_t i = 0; i < n; i++) {
        const uint64_t p = base + i;
        const uint64_t lo = a->window && p + 1 > a->window ? p + 1 - a->window : 0;
        for (size_t hq = 0; hq < m->n_heads; hq++) {
            memcpy(qr, q + (hq * n + i) * hd, hd * 4);
            kvg_rope_apply(qr, (int)hd, (int)hd, 0, a->inv_freq, (double)p);
            tu_exact_attention(a->kr[l], a->v[l], (int)H, (int)hd, qr, (int)(hq / G), p, a->sinks, lo,
                               out + (hq * n + i) * hd, s);
        }
    }
    free(s);
    return 0;
}

static int kvarc_layer(const pk_model *m, pk_attn *a, uint32_t l, const float *q, const float *k, const float *v,
                       uint32_t n, float *out, char *err, size_t len)
{
    int rc;
    const double t0 = tu_now_s();
    if (a->kv_dtype == KVARC_DTYPE_F16) {
        size_t nk = (size_t)m->n_kv_heads * n * m->head_dim;
        uint16_t *k16 = malloc(nk * 2), *v16 = malloc(nk * 2);
        if (!k16 || !v16) {
            free(k16);
            free(v16);
            return fail(err, len, "out of memory for %zu fp16 values", nk);
        }
        for (size_t i = 0; i < nk; i++) {
            k16[i] = kvarc_f32_to_f16(k[i]);
            v16[i] = kvarc_f32_to_f16(v[i]);
        }
        rc = kvarc_append(a->cv, l, KVARC_DTYPE_F16, k16, v16, n);
        free(k16);
        free(v16);
    } else {
        rc = kvarc_append(a->cv, l, KVARC_DTYPE_F32, k, v, n);
    }
    if (!rc)
        rc = kvarc_attend(a->cv, l, q, n, out);
    a->kvarc_s += tu_now_s() - t0;
    if (rc)
        return fail(err, len, "libkvarc: %s (%d)", kvarc_errmsg(a->cv), rc);
    return 0;
}

/* y[n][out] = x[n][in] . wt[in][out], four rows at a time. */
static void matmul(float *restrict y, const float *restrict x, const float *restrict wt, uint32_t n, uint32_t in,
                   uint32_t out)
{
    memset(y, 0, (size_t)n * out * 4);
    uint32_t i = 0;
    for (; i + 4 <= n; i += 4) {
        float *y0 = y + (size_t)i * out, *y1 = y0 + out, *y2 = y1 + out, *y3 = y2 + out;
        const float *x0 = x + (size_t)i * in, *x1 = x0 + in, *x2 = x1 + in, *x3 = x2 + in;
        for (uint32_t k = 0; k < in; k++) {
            const float *w = wt + (size_t)k * out;
            const float a0 = x0[k], a1 = x1[k], a2 = x2[k], a3 = x3[k];
            for (uint32_t j = 0; j < out; j++) {
                y0[j] += a0 * w[j];
                y1[j] += a1 * w[j];
                y2[j] += a2 * w[j];
                y3[j] += a3 * w[j];
            }
        }
    }
    for (; i < n; i++) {
        float *yi = y + (size_t)i * out;
        const float *xi = x + (size_t)i * in;
        for (uint32_t k = 0; k < in; k++) {
            const float *w = wt + (size_t)k * out;
            for (uint32_t j = 0; j < out; j++)
                yi[j] += xi[k] * w[j];
        }
    }
}

static void rmsnorm(float *y, const float *x, const float *w, uint32_t d, float eps)
{
    double ss = 0;
    for (uint32_t i = 0; i < d; i++)
        ss += (double)x[i] * x[i];
    float r = (float)(1.0 / sqrt(ss / d + eps));
    for (uint32_t i = 0; i < d; i++)
        y[i] = x[i] * r * w[i];
}

/* [n][heads][hd] <-> [heads][n][hd] */
static void to_heads(float *dst, const float *src, uint32_t n, uint32_t heads, uint32_t hd, int back)
{
    for (uint32_t t = 0; t < n; t++)
        for (uint32_t h = 0; h < heads; h++) {
            float *a = dst + (back ? ((size_t)t * heads + h) : ((size_t)h * n + t)) * hd;
            const float *b = src + (back ? ((size_t)h * n + t) : ((size_t)t * heads + h)) * hd;
            memcpy(a, b, (size_t)hd * 4);
        }
}

int pk_forward(const pk_model *m, pk_attn *a, const int32_t *tok, uint32_t n, float *logits, int last_only,
               char *err, size_t len)
{
    const size_t d = m->d, qd = (size_t)m->n_heads * m->head_dim, kd = (size_t)m->n_kv_heads * m->head_dim;
    const size_t F = m->ffn;
    int rc = -1;
    float *x = malloc(n * d * 4), *h = malloc(n * d * 4), *q = malloc(n * qd * 4), *k = malloc(n * kd * 4);
    float *v = malloc(n * kd * 4), *qh = malloc(n * qd * 4), *kh = malloc(n * kd * 4), *vh = malloc(n * kd * 4);
    float *oh = malloc(n * qd * 4), *g1 = malloc(n * F * 4), *g3 = malloc(n * F * 4), *y = malloc(n * d * 4);
    if (!x || !h || !q || !k || !v || !qh || !kh || !vh || !oh || !g1 || !g3 || !y) {
        fail(err, len, "out of memory for a chunk of %u tokens", n);
        goto out;
    }
    for (uint32_t t = 0; t < n; t++) {
        if (tok[t] < 0 || (uint32_t)tok[t] >= m->vocab) {
            fail(err, len, "token %d is outside the vocabulary of %u", tok[t], m->vocab);
            goto out;
        }
        memcpy(x + t * d, m->emb + (size_t)tok[t] * d, d * 4);
    }
    for (uint32_t l = 0; l < m->n_layers; l++) {
        const pk_layer_w *w = &m->L[l];
        for (uint32_t t = 0; t < n; t++)
            rmsnorm(h + t * d, x + t * d, w->attn_norm, (uint32_t)d, m->norm_eps);
        matmul(q, h, w->wq, n, (uint32_t)d, (uint32_t)qd);
        matmul(k, h, w->wk, n, (uint32_t)d, (uint32_t)kd);
        matmul(v, h, w->wv, n, (uint32_t)d, (uint32_t)kd);
        to_heads(qh, q, n, m->n_heads, m->head_dim, 0);
        to_heads(kh, k, n, m->n_kv_heads, m->head_dim, 0);
        to_heads(vh, v, n, m->n_kv_heads, m->head_dim, 0);
        if (a->kind == PK_ATTN_EXACT ? exact_layer(m, a, l, qh, kh, vh, n, oh, err, len)
                                     : kvarc_layer(m, a, l, qh, kh, vh, n, oh, err, len))
            goto out;
        to_heads(q, oh, n, m->n_heads, m->head_dim, 1);
        matmul(y, q, w->wo, n, (uint32_t)qd, (uint32_t)d);
        for (size_t i = 0; i < n * d; i++)
            x[i] += y[i];
        for (uint32_t t = 0; t < n; t++)
            rmsnorm(h + t * d, x + t * d, w->ffn_norm, (uint32_t)d, m->norm_eps);
        matmul(g1, h, w->w1, n, (uint32_t)d, (uint32_t)F);
        matmul(g3, h, w->w3, n, (uint32_t)d, (uint32_t)F);
        for (size_t i = 0; i < n * F; i++)
            g1[i] = g1[i] / (1.0f + expf(-g1[i])) * g3[i];
        matmul(y, g1, w->w2, n, (uint32_t)F, (uint32_t)d);
        for (size_t i = 0; i < n * d; i++)
            x[i] += y[i];
    }
    if (logits) {
        uint32_t first = last_only ? n - 1 : 0;
        for (uint32_t t = first; t < n; t++)
            rmsnorm(h + (t - first) * d, x + t * d, m->norm, (uint32_t)d, m->norm_eps);
        matmul(logits, h, m->head, n - first, (uint32_t)d, m->vocab);
    }
    rc = 0;
out:
    free(x), free(h), free(q), free(k), free(v), free(qh), free(kh), free(vh), free(oh), free(g1), free(g3), free(y);
    return rc;
}

int32_t pk_argmax(const float *logits, uint32_t vocab)
{
    int32_t best = 0;
    for (uint32_t i = 1; i < vocab; i++)
        if (logits[i] > logits[best])
            best = (int32_t)i;
    return best;
}
