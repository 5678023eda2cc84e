/* trial.c - the passkey experiments (see trial.h).
 *
 * Design notes
 * 1. Every experiment runs the prompt in chunks of s->chunk tokens, then
 *    decodes one token at a time, whatever the attention: the modes differ
 *    only in the pk_attn backend, so a difference in answers is the
 *    attention's.
 * 2. A kvarc trial owns one conversation ns/pk-<mode>-<length>-<seed>-<pid>
 *    -<n>; it is closed (synced) at the end, left for the caller's data
 *    directory to hold or drop.
 */
#include "trial.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kvarc_schema.h"
#include "toolutil.h"

static const char *const names[PK_MODES] = { "full", "window", "kvarc", "kvarc-true", "no-retrieval" };

const char *pk_mode_name(pk_mode mode)
{
    return mode < PK_MODES ? names[mode] : "?";
}

int pk_mode_parse(const char *s)
{
    for (int i = 0; i < PK_MODES; i++)
        if (!strcmp(s, names[i]))
            return i;
    return -1;
}

void pk_prompt(uint32_t length, uint64_t seed, int32_t *prompt, int32_t *key, uint32_t *needle)
{
    pk_rng g = { seed };
    uint32_t depth;
    pk_passkey_sequence(&g, length, prompt, key, &depth);
    *needle = depth + 1;
}

void pk_setup_options(const pk_setup *s, pk_mode mode, kvarc_options *o)
{
    kvarc_options_default(o);
    o->format = s->format;
    o->pos_mode = mode == PK_KVARC_TRUE ? 0 : 1;
    o->top_k = mode == PK_ABLATION ? 0 : s->top_k;
    o->hot_window = s->hot;
    o->sinks = s->sinks;
    o->coarse_blocks = s->coarse;
    o->prefill_coarse_blocks = s->prefill_coarse;
    o->prefill_shortlist = s->prefill_shortlist;
    if (o->batch > s->hot)
        o->batch = s->hot;
    if (o->max_chunk < s->chunk)
        o->max_chunk = s->chunk;
}

/* A backend for mode: exact (cap tokens) or a new conversation. */
static int open_attn(const pk_setup *s, pk_mode mode, const kvarc_options *o, uint64_t cap, const char *tag,
                     pk_attn *a, char *err, size_t len)
{
    if (mode == PK_FULL || mode == PK_WINDOW) {
        if (pk_attn_exact_init(a, s->m, cap, s->sinks, mode == PK_WINDOW ? s->hot + s->top_k : 0, 0)) {
            snprintf(err, len, "out of memory for exact attention over %llu tokens", (unsigned long long)cap);
            return -1;
        }
        return 0;
    }
    static unsigned counter;
    char name[128];
    snprintf(name, sizeof name, "pk-%s-%s-%d-%u", pk_mode_name(mode), tag, (int)getpid(), counter++);
    kvarc_model shape = pk_model_shape(s->m, "kvarc-passkey");
    kvarc_conv *cv;
    int rc = kvarc_conv_create(s->cl, s->ns, name, &shape, o, s->means, &cv);
    if (rc) {
        snprintf(err, len, "creating %s/%s: %s", s->ns, name, kvarc_client_errmsg(s->cl));
        return -1;
    }
    pk_attn_kvarc_init(a, cv, o->format == KVARC_FMT_F16 ? KVARC_DTYPE_F16 : KVARC_DTYPE_F32);
    return 0;
}

static int close_attn(pk_attn *a, char *err, size_t len)
{
    int rc = 0;
    if (a->kind == PK_ATTN_KVARC && a->cv) {
        if ((rc = kvarc_conv_close(a->cv)))
            snprintf(err, len, "closing a trial conversation: %s", kvarc_strerror(rc));
    }
    pk_attn_free(a);
    return rc ? -1 : 0;
}

/* The prompt through the model in chunks; logits of its last token. */
static int prefill(const pk_setup *s, pk_attn *a, const int32_t *tok, uint32_t n, float *logits, char *err,
                   size_t len)
{
    for (uint32_t at = 0; at < n; at += s->chunk) {
        uint32_t c = n - at < s->chunk ? n - at : s->chunk;
        if (pk_forward(s->m, a, tok + at, c, at + c == n ? logits : NULL, 1, err, len))
            return -1;
    }
    return 0;
}

int pk_trial(const pk_setup *s, pk_mode mode, uint32_t length, uint64_t seed, pk_result *r, char *err, size_t len)
{
    memset(r, 0, sizeof *r);
    r->retrieved = -1;
    double t0 = tu_now_s();
    int32_t *prompt = malloc(length * sizeof *prompt);
    float *logits = malloc(s->m->vocab * sizeof *logits);
    pk_attn a;
    memset(&a, 0, sizeof a);
    int rc = -1, opened = 0;
    if (!prompt || !logits) {
        snprintf(err, len, "out of memory for a prompt of %u tokens", length);
        goto out;
    }
    pk_prompt(length, seed, prompt, r->key, &r->needle);
    const uint32_t np = length - PK_KEY_DIGITS;
    kvarc_options o;
    pk_setup_options(s, mode, &o);
    char tag[64];
    snprintf(tag, sizeof tag, "%u-%llu", length, (unsigned long long)seed);
    if (open_attn(s, mode, &o, length + s->decode_steps, tag, &a, err, len))
        goto out;
    opened = 1;
    if (prefill(s, &a, prompt, np, logits, err, len))
        goto out;
    if (a.kind == PK_ATTN_KVARC && mode != PK_ABLATION) {
        uint64_t pos[4096];
        r->retrieved = 0;
        for (uint32_t h = 0; h < s->m->n_kv_heads; h++) {
            size_t n = kvarc_last_retrieved(a.cv, h, pos, sizeof pos / sizeof *pos);
            for (size_t i = 0; i < n && i < sizeof pos / sizeof *pos; i++)   /* "key:" or a digit */
                r->retrieved |= pos[i] + 1 >= r->needle && pos[i] < r->needle + PK_KEY_DIGITS;
        }
    }
    const double td = tu_now_s(), k0 = a.kvarc_s;
    for (int i = 0; i < PK_KEY_DIGITS; i++) {
        r->answer[i] = pk_argmax(logits, s->m->vocab);
        if (i + 1 < PK_KEY_DIGITS && pk_forward(s->m, &a, &r->answer[i], 1, logits, 1, err, len))
            goto out;
    }
    int32_t next = r->answer[PK_KEY_DIGITS - 1];
    for (uint32_t i = 0; i < s->decode_steps; i++) {   /* on past the answer, for timing */
        if (pk_forward(s->m, &a, &next, 1, logits, 1, err, len))
            goto out;
        next = pk_argmax(logits, s->m->vocab);
    }
    r->decode_s = tu_now_s() - td;
    r->decode_kvarc_s = a.kvarc_s - k0;
    r->correct = !memcmp(r->answer, r->key, sizeof r->key);
    if (a.kind == PK_ATTN_KVARC) {
        kvarc_stats st;
        kvarc_conv_stats(a.cv, &st);
        const uint64_t ns[5] = { st.ns_stage1, st.ns_stage2, st.ns_decode, st.ns_attend, st.ns_archive };
        for (int i = 0; i < 5; i++)
            r->stage_s[i] = 1e-9 * (double)ns[i];
    }
    rc = 0;
out:
    if (opened && close_attn(&a, err, len))
        rc = -1;
    free(prompt);
    free(logits);
    r->seconds = tu_now_s() - t0;
    return rc;
}

int pk_calibrate(const pk_model *m, uint32_t length, uint64_t seed, float *means, char *err, size_t len)
{
    const size_t n_acc = (size_t)m->n_layers * m->n_kv_heads * 2 * m->head_dim;
    int32_t *prompt = malloc(length * sizeof *prompt), key[PK_KEY_DIGITS];
    uint32_t needle;
    pk_attn a;
    if (!prompt || pk_attn_exact_init(&a, m, length, 0, 0, 0)) {
        free(prompt);
        snprintf(err, len, "out of memory calibrating on %u tokens", length);
        return -1;
    }
    a.mean_acc = calloc(n_acc, sizeof *a.mean_acc);
    pk_prompt(length, seed, prompt, key, &needle);
    int rc = -1;
    if (!a.mean_acc) {
        snprintf(err, len, "out of memory calibrating");
        goto out;
    }
    const uint32_t np = length - PK_KEY_DIGITS;
    for (uint32_t at = 0; at < np; at += 256)
        if (pk_forward(m, &a, prompt + at, np - at < 256 ? np - at : 256, NULL, 1, err, len))
            goto out;
    for (size_t i = 0; i < n_acc; i++)
        means[i] = (float)(a.mean_acc[i] / np);
    rc = 0;
out:
    free(a.mean_acc);
    a.mean_acc = NULL;
    pk_attn_free(&a);
    free(prompt);
    return rc;
}

/* Full attention and a kvarc conversation side by side on one prompt. */
typedef struct pair {
    pk_attn  full, kv;
    int      n_open;             /* 1: full open, 2: both */
    int32_t *prompt, key[PK_KEY_DIGITS];
    float   *lf, *lk;            /* logits [rows][vocab] of each */
    uint32_t needle;
} pair;

static int pair_open(const pk_setup *s, pk_mode mode, const kvarc_options *o, uint32_t length, uint64_t seed,
                     uint64_t cap, size_t rows, int f16, const char *tag, pair *p, char *err, size_t len)
{
    memset(p, 0, sizeof *p);
    p->prompt = malloc(length * sizeof *p->prompt);
    p->lf = malloc(rows * s->m->vocab * 4);
    p->lk = malloc(rows * s->m->vocab * 4);
    if (!p->prompt || !p->lf || !p->lk || pk_attn_exact_init(&p->full, s->m, cap, 0, 0, f16)) {
        snprintf(err, len, "out of memory for the %s run", tag);
        return -1;
    }
    p->n_open = 1;
    pk_prompt(length, seed, p->prompt, p->key, &p->needle);
    if (open_attn(s, mode, o, 0, tag, &p->kv, err, len))
        return -1;
    p->n_open = 2;
    return 0;
}

static int pair_close(pair *p, int rc, char *err, size_t len)
{
    if (p->n_open > 1 && close_attn(&p->kv, err, len))
        rc = -1;
    if (p->n_open > 0)
        pk_attn_free(&p->full);
    free(p->prompt);
    free(p->lf);
    free(p->lk);
    return rc;
}

int pk_gate(const pk_setup *s, uint32_t length, uint32_t n_gen, uint64_t seed, int *same, double *max_diff,
            int *same_f32, char *err, size_t len)
{
    *same = *same_f32 = 0;
    *max_diff = 0;
    const uint32_t np = length - PK_KEY_DIGITS, V = s->m->vocab;
    pk_setup g = *s;
    g.format = KVARC_FMT_F16;
    g.top_k = np + n_gen;                /* >= every cold token */
    kvarc_options o;
    pk_setup_options(&g, PK_KVARC_TRUE, &o);
    o.shortlist = 1;
    o.prefill_coarse_blocks = 0;         /* the gate retrieves every token: no prefill shortcuts */
    o.prefill_shortlist = 0;
    pair p;
    pk_attn f32;                         /* full attention over the fp32 K/V, as the model computed them */
    float *l32 = malloc(V * 4);
    int32_t tf, tk, t32;
    if (!l32 || pk_attn_exact_init(&f32, s->m, length + n_gen, 0, 0, 0)) {
        free(l32);
        snprintf(err, len, "out of memory for the gate");
        return -1;
    }
    int rc = -1;
    if (pair_open(&g, PK_KVARC_TRUE, &o, length, seed, length + n_gen, 1, 1, "gate", &p, err, len) ||
        prefill(s, &p.full, p.prompt, np, p.lf, err, len) || prefill(s, &p.kv, p.prompt, np, p.lk, err, len) ||
        prefill(s, &f32, p.prompt, np, l32, err, len))
        goto out;
    *same = *same_f32 = 1;
    for (uint32_t i = 0; i < n_gen; i++) {
        for (uint32_t j = 0; j < V; j++)
            if (fabs((double)p.lf[j] - p.lk[j]) > *max_diff)
                *max_diff = fabs((double)p.lf[j] - p.lk[j]);
        tf = pk_argmax(p.lf, V), tk = pk_argmax(p.lk, V), t32 = pk_argmax(l32, V);
        *same_f32 &= t32 == tk;
        if (tf != tk) {
            *same = 0;
            break;
        }
        if (i + 1 < n_gen && (pk_forward(s->m, &p.full, &tf, 1, p.lf, 1, err, len) ||
                              pk_forward(s->m, &p.kv, &tk, 1, p.lk, 1, err, len) ||
                              pk_forward(s->m, &f32, &tk, 1, l32, 1, err, len)))
            goto out;
    }
    rc = 0;
out:
    pk_attn_free(&f32);
    free(l32);
    return pair_close(&p, rc, err, len);
}

int pk_agreement(const pk_setup *s, pk_mode mode, uint32_t length, uint64_t seed, uint32_t from, pk_agree *acc,
                 char *err, size_t len)
{
    const uint32_t np = length - PK_KEY_DIGITS, V = s->m->vocab;
    kvarc_options o;
    pk_setup_options(s, mode, &o);
    pair p;
    if (pair_open(s, mode, &o, length, seed, length, s->chunk, 0, "agree", &p, err, len))
        return pair_close(&p, -1, err, len);
    if (np > from && acc->n + (np - from) > acc->kl_cap) {
        uint64_t cap = acc->kl_cap ? 2 * acc->kl_cap : 4096;
        while (cap < acc->n + (np - from))
            cap *= 2;
        double *kl = realloc(acc->kl, cap * sizeof *kl);
        if (!kl) {
            snprintf(err, len, "out of memory for the KLs of %llu positions", (unsigned long long)cap);
            return pair_close(&p, -1, err, len);
        }
        acc->kl = kl, acc->kl_cap = cap;
    }
    for (uint32_t at = 0; at < np; at += s->chunk) {
        uint32_t c = np - at < s->chunk ? np - at : s->chunk;
        if (pk_forward(s->m, &p.full, p.prompt + at, c, p.lf, 0, err, len) ||
            pk_forward(s->m, &p.kv, p.prompt + at, c, p.lk, 0, err, len))
            return pair_close(&p, -1, err, len);
        for (uint32_t t = 0; t < c; t++) {
            if (at + t < from)
                continue;
            const float *a = p.lf + (size_t)t * V, *b = p.lk + (size_t)t * V;
            double ma = -INFINITY, mb = -INFINITY, za = 0, zb = 0, kl = 0;
            for (uint32_t j = 0; j < V; j++) {
                ma = a[j] > ma ? a[j] : ma;
                mb = b[j] > mb ? b[j] : mb;
            }
            for (uint32_t j = 0; j < V; j++) {
                za += exp(a[j] - ma);
                zb += exp(b[j] - mb);
            }
            for (uint32_t j = 0; j < V; j++) {
                double la = a[j] - ma - log(za), lb = b[j] - mb - log(zb);
                kl += exp(la) * (la - lb);
            }
            acc->kl_sum += kl;
            acc->kl_max = kl > acc->kl_max ? kl : acc->kl_max;
            acc->top1_same += pk_argmax(a, V) == pk_argmax(b, V);
            acc->kl[acc->n++] = kl;
        }
    }
    return pair_close(&p, 0, err, len);
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

double pk_agree_quantile(pk_agree *acc, double q)
{
    if (!acc->n || !acc->kl)
        return 0;
    qsort(acc->kl, acc->n, sizeof *acc->kl, cmp_double);
    double at = q * (double)(acc->n - 1);
    uint64_t lo = (uint64_t)at, hi = lo + 1 < acc->n ? lo + 1 : lo;
    return acc->kl[lo] + (at - (double)lo) * (acc->kl[hi] - acc->kl[lo]);
}

void pk_agree_free(pk_agree *acc)
{
    free(acc->kl);
    acc->kl = NULL;
    acc->kl_cap = 0;
}
