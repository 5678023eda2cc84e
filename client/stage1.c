/* stage1.c - libkvarc's stage 1 for one query: every kv head's shortlist,
 * the heads spread over threads.
 *
 * Design notes
 * A query's kv heads are independent: each scores its GQA group's
 * prepared queries against its own signatures (through the coarse tier
 * when it pays, coarse.c; else the full scan) and keeps the best r. So
 * kl_stage1 hands heads to o.threads threads (0: every online CPU; 1: the
 * caller's only), head h to lane h mod T: each lane has its own scratch
 * (kl_s1_lane, kept across calls), and a head's shortlist depends only on
 * its inputs, so the answer is the same bits whatever the thread count.
 * In true-position mode a lane first makes the block biases of all its
 * heads' queries in one pass over the angle table (kvg_block_bias_n: the
 * table's memory is that work's cost).
 * The caller's thread is lane 0; the others are started per call and
 * joined before it returns (a layer-step's stage 1 at long contexts is
 * milliseconds, a thread start tens of microseconds); under
 * KL_S1_THREADED_MIN cold tokens one thread does it all (a prefill of
 * short contexts runs stage 1 per query, and starting threads would cost
 * more than its scan). Workers only read the conversation;
 * errors come back as codes and the caller reports the first head's. The
 * GPU path (one device stream) and single-head models run on the caller's
 * thread.
 * Around it, kl_stage1_query takes one query of kvarc_attend's group:
 * its heads turned and prepared as the position mode scores (attend.c),
 * and after kl_stage1 the shortlists as positions, with the ones the
 * record cache holds listed for stage 2 (`have`).
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "gpu.h"

#define KL_S1_THREADED_MIN 32768   /* cold tokens from which stage 1 uses threads */

void kl_s1_lanes_free(kl_s1_lanes *l)
{
    for (int t = 0; t < l->n; t++) {
        free(l->lane[t].scores);
        free(l->lane[t].idx);
        free(l->lane[t].tk);
        free(l->lane[t].qp);
        free(l->lane[t].mp);
        free(l->lane[t].op);
        kl_coarse_scratch_free(&l->lane[t].co);
    }
    free(l->lane);
    memset(l, 0, sizeof *l);
}

int kl_threads(const kvarc_conv *cv)
{
    if (cv->o.threads)
        return (int)cv->o.threads;
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : n > KVARC_THREADS_MAX ? KVARC_THREADS_MAX : (int)n;
}

/* Lanes 0..n-1 with room for cold scores and nq bias queries each. */
static int lanes_reserve(kl_s1_lanes *l, int n, uint64_t cold, size_t nq)
{
    if (n > l->n) {
        kl_s1_lane *nl = realloc(l->lane, (size_t)n * sizeof *nl);
        if (!nl)
            return -ENOMEM;
        memset(nl + l->n, 0, (size_t)(n - l->n) * sizeof *nl);
        l->lane = nl;
        l->n = n;
    }
    for (int t = 0; t < n; t++) {
        kl_s1_lane *a = &l->lane[t];
        if (cold + 1 > a->cap) {
            free(a->scores);
            free(a->idx);
            free(a->tk);
            a->scores = malloc((cold + 1) * 4);
            a->idx = malloc((cold + 1) * 4);
            a->tk = malloc((cold + 1) * 4);
            a->cap = a->scores && a->idx && a->tk ? cold + 1 : 0;
            if (!a->cap)
                return -ENOMEM;
        }
        if (nq > a->pcap) {
            free(a->qp);
            free(a->mp);
            free(a->op);
            a->qp = malloc(nq * sizeof *a->qp);
            a->mp = malloc(nq * sizeof *a->mp);
            a->op = malloc(nq * sizeof *a->op);
            a->pcap = a->qp && a->mp && a->op ? nq : 0;
            if (!a->pcap)
                return -ENOMEM;
        }
    }
    return 0;
}

typedef struct s1_work {
    kvarc_conv       *cv;
    const kl_layer   *y;
    const kl_s1_args *a;
    kl_s1_lanes      *lanes;
    int               T;
    long             *got;          /* [H] shortlisted, or an error code */
} s1_work;

typedef struct s1_arg {
    s1_work *w;
    int      t;
} s1_arg;

/* Head h's shortlist into a->idx_out[h] (indices from ns). */
static long one_head(s1_work *w, kl_s1_lane *ln, size_t h)
{
    kvarc_conv *cv = w->cv;
    const kl_s1_args *a = w->a;
    const size_t G = a->G;
    const kvg_query *qs = a->qs + h * G;
    const float *bb = a->bb ? a->bb + h * G * a->nblk : NULL;
    uint32_t *idx = a->idx_out + h * a->r;
    if (a->runs_out) {                 /* fast tier: the blocks' runs (or the whole range) for kvarcd */
        kl_runs *ro = &a->runs_out[h];
        uint64_t whole[2] = { 0, a->hot_lo - a->ns };
        long nr = kl_stage1_coarse(cv, w->y, h, qs, (int)G, a->ns, a->hot_lo, bb, a->nblk, a->take, a->coarse, 1,
                                   &ln->co, NULL);
        const uint64_t *src = nr == -ENOTSUP ? whole : ln->co.runs;
        if (nr == -ENOTSUP)
            nr = 1;
        if (nr < 0)
            return nr;
        if ((size_t)nr > ro->cap) {
            uint64_t *v = realloc(ro->v, (size_t)nr * 2 * sizeof *v);
            if (!v)
                return -ENOMEM;
            ro->v = v;
            ro->cap = (size_t)nr;
        }
        memcpy(ro->v, src, (size_t)nr * 2 * sizeof *src);
        ro->n = (size_t)nr;
        return nr;
    }
    long got = kl_stage1_coarse(cv, w->y, h, qs, (int)G, a->ns, a->hot_lo, bb, a->nblk, a->take, a->coarse, 0,
                                &ln->co, idx);
    if (got != -ENOTSUP)
        return got;
    const uint64_t cold = a->hot_lo - a->ns;
    return kvg_plane_topk((kvg_score_mode)cv->o.score_mode, (kvg_combine)cv->o.combine, qs, (int)G, &w->y->sig[h],
                          a->ns, (size_t)cold, bb, a->nblk, a->take, idx, NULL, ln->scores, ln->tk);
}

/* Lane t's block biases (true mode): every query of its heads t, t + T, ...
 * (or of the heads given) in one pass over the angle table. 0 or
 * KVARC_ENONFINITE. */
static int lane_biases(s1_work *w, kl_s1_lane *ln, size_t h0, size_t step)
{
    const kl_s1_args *a = w->a;
    const size_t d = w->cv->m.head_dim;
    size_t n = 0;
    for (size_t h = h0; h < a->H; h += step)
        for (size_t g = 0; g < a->G; g++, n++) {
            ln->qp[n] = a->q_r + (h * a->G + g) * d;
            ln->mp[n] = a->mu[h * a->G + g];
            ln->op[n] = a->bb + (h * a->G + g) * a->nblk;
        }
    return kvg_block_bias_nt(&w->cv->rope, (int)n, ln->mp, ln->qp, a->b0, a->nblk, a->bcs, ln->op);
}

/* Lane t: its heads' biases, then their shortlists (a bias that overflows
 * fails each of its heads). */
static void run_lane(s1_work *w, kl_s1_lane *ln, size_t h0, size_t step)
{
    int rc = w->a->bb ? lane_biases(w, ln, h0, step) : 0;
    for (size_t h = h0; h < w->a->H; h += step)
        w->got[h] = rc ? rc : one_head(w, ln, h);
}

static void *lane_main(void *p)
{
    s1_arg *x = p;
    run_lane(x->w, &x->w->lanes->lane[x->t], (size_t)x->t, (size_t)x->w->T);
    return NULL;
}

int kl_stage1(kvarc_conv *cv, uint32_t layer, const kl_s1_args *a, kl_s1_lanes *lanes, long *got)
{
    const kl_layer *y = &cv->layers[layer];
    int T = kl_threads(cv);
    if ((size_t)T > a->H)
        T = (int)a->H;
    if (a->hot_lo - a->ns < KL_S1_THREADED_MIN)   /* too little to scan to pay for starting threads */
        T = 1;
    int rc = 0;
    if (cv->gpu) {                     /* one device stream: the caller's thread, head by head */
        int all = 1;
        if ((rc = lanes_reserve(lanes, 1, 0, a->H * a->G)) ||
            (a->bb && (rc = lane_biases(&(s1_work){ cv, y, a, lanes, 1, got }, &lanes->lane[0], 0, 1))))
            return kl_fail(cv, rc, "stage 1 on layer %u: %s", layer, kvarc_strerror(rc));
        for (size_t h = 0; h < a->H; h++) {
            got[h] = kl_gpu_stage1(cv, layer, (uint32_t)h, a->qs + h * a->G, (int)a->G, a->ns, a->hot_lo - a->ns,
                                   a->bb ? a->bb + h * a->G * a->nblk : NULL, a->nblk, a->take, a->coarse,
                                   &lanes->lane[0].co, a->idx_out + h * a->r);
            if (got[h] < 0) {          /* -ENOTSUP: the device cannot; else it failed: the CPU from now on */
                if (got[h] != -ENOTSUP)
                    kl_gpu_free(cv);
                all = 0;
                break;
            }
        }
        if (all)
            return 0;
    }
    if ((rc = lanes_reserve(lanes, T, a->runs_out ? 0 : a->hot_lo - a->ns, a->H * a->G)))
        return kl_fail(cv, rc, "out of memory for stage 1 over %llu cold tokens",
                       (unsigned long long)(a->hot_lo - a->ns));
    s1_work w = { cv, y, a, lanes, T, got };
    s1_arg args[KVARC_THREADS_MAX];
    pthread_t tid[KVARC_THREADS_MAX];
    int started = 1;                   /* lanes [1, started) run on threads of their own */
    for (int t = 1; t < T; t++) {
        args[t] = (s1_arg){ &w, t };
        if (pthread_create(&tid[t], NULL, lane_main, &args[t]))
            break;
        started = t + 1;
    }
    args[0] = (s1_arg){ &w, 0 };
    lane_main(&args[0]);
    for (int t = started; t < T; t++)  /* lanes whose thread would not start: here, with lane 0's scratch */
        run_lane(&w, &lanes->lane[0], (size_t)t, (size_t)T);
    for (int t = 1; t < started; t++)
        pthread_join(tid[t], NULL);
    for (size_t h = 0; h < a->H; h++)
        if (got[h] < 0)
            return kl_fail(cv, (int)got[h], got[h] == KVARC_ENONFINITE
                           ? "stage 1 on layer %u head %zu: a query's bias against the centering overflows fp32 (%s)"
                           : "stage 1 on layer %u head %zu failed: %s", layer, h, kvarc_strerror((int)got[h]));
    return 0;
}

/* Room for n more values at the end of *v (a growable array). */
static int grow_to(void **v, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap)
        return 0;
    size_t c = *cap ? *cap : 1024;
    while (c < need)
        c *= 2;
    void *nv = realloc(*v, c * elem);
    if (!nv)
        return -ENOMEM;
    *v = nv;
    *cap = c;
    return 0;
}

/* Fast tier: the group's query i's items carry each head's runs (absolute
 * positions) and, at true positions, the block biases of the runs' blocks
 * ([G][blocks], run order) for kvarcd's stage 1b; their shortlists are
 * made there (nsl: how long; no `have`: the client cannot know them). */
static int item_runs(kvarc_conv *cv, const kl_step *s, kl_ax *x, uint32_t i, size_t take)
{
    const size_t H = s->H, G = s->G, B = KVG_SIG_BLOCK;
    for (size_t h = 0; h < H; h++) {
        size_t it = (size_t)i * H + h, nb = 0;
        const kl_runs *hr = &x->hruns[h];
        if (grow_to((void **)&x->iruns, &x->iruns_cap, x->iruns_n + 2 * hr->n, sizeof *x->iruns))
            return kl_fail(cv, -ENOMEM, "out of memory for stage 1b's runs");
        x->roff[it] = x->iruns_n;
        x->rn[it] = 2 * hr->n;
        for (size_t j = 0; j < hr->n; j++) {
            uint64_t first = s->ns + hr->v[2 * j], cnt = hr->v[2 * j + 1];
            x->iruns[x->iruns_n++] = first;
            x->iruns[x->iruns_n++] = cnt;
            nb += (size_t)kvg_blocks_of(first, cnt);
        }
        x->boff[it] = x->ibias_n;
        x->bn[it] = s->remap ? 0 : G * nb;
        if (!s->remap && grow_to((void **)&x->ibias, &x->ibias_cap, x->ibias_n + G * nb, sizeof *x->ibias))
            return kl_fail(cv, -ENOMEM, "out of memory for stage 1b's block biases");
        for (size_t g = 0; g < G && !s->remap; g++) {
            const float *row = x->bb + (h * G + g) * s->nblk;      /* blocks from b0 = ns / 64 */
            for (size_t j = 0; j < hr->n; j++) {
                uint64_t first = s->ns + hr->v[2 * j], last = first + hr->v[2 * j + 1] - 1;
                for (uint64_t b = first / B; b <= last / B; b++)
                    x->ibias[x->ibias_n++] = row[b - s->b0];
            }
        }
        x->nsl[it] = (uint32_t)take;
        x->nhave[it] = 0;
    }
    return 0;
}

int kl_stage1_query(kvarc_conv *cv, const kl_step *s, kl_ax *x, const float *q, uint32_t g0, uint32_t i)
{
    const size_t H = s->H, G = s->G, d = s->d;
    const uint32_t qn = g0 + i;                  /* the query's index in the chunk */
    int rc = 0;
    /* every query head turned and prepared (their block biases, true mode,
     * are made by kl_stage1's threads): remapped, turned by the scoring
     * distance against kind-1 signatures; true, turned to its own position
     * against kind-2 ones, the centering's bias per block */
    for (size_t h = 0; h < H; h++) {
        size_t it = (size_t)i * H + h;
        x->item_head[it] = (uint32_t)h;
        kvg_codec codec = kl_codec(cv, s->layer, (uint32_t)h);
        for (size_t g = 0; g < G; g++) {
            float *qv = x->qsc + (it * G + g) * d;
            memcpy(qv, q + ((h * G + g) * s->n_q + qn) * d, d * 4);
            if (s->remap)
                kvg_rope_turn(qv, (int)d, s->rot, s->lay, x->cs_score);
            else
                kvg_rope_apply(qv, (int)d, s->rot, s->lay, cv->rope.inv_freq, (double)(s->cs + qn));
            if ((rc = kvg_query_prep_ref(&cv->rot, s->remap ? codec.mu_k : NULL, KVARC_DTYPE_F32, qv,
                                         &x->qs[h * G + g])))
                return kl_fail(cv, rc, "query %u head %zu: %s", qn, h * G + g, kvarc_strerror(rc));
            x->mus[h * G + g] = codec.mu_k;
        }
    }
    /* every head's shortlist; a prefill chunk's queries but its last may
     * take a coarse tier and a shortlist of their own */
    int pre = s->n_q > 1 && qn != s->n_q - 1;
    uint32_t cb = pre && cv->o.prefill_coarse_blocks ? cv->o.prefill_coarse_blocks : cv->o.coarse_blocks;
    size_t take = s->R_n;
    if (pre && cv->o.prefill_shortlist && (size_t)cv->o.prefill_shortlist * cv->o.top_k < take)
        take = (size_t)cv->o.prefill_shortlist * cv->o.top_k;
    if (cv->o.fast_tier && x->hcap < H) {
        kl_runs *hr = realloc(x->hruns, H * sizeof *hr);
        if (!hr)
            return kl_fail(cv, -ENOMEM, "out of memory");
        memset(hr + x->hcap, 0, (H - x->hcap) * sizeof *hr);
        x->hruns = hr;
        x->hcap = H;
    }
    kl_s1_args a = { H, G, s->R_n, s->nblk, s->ns, s->hot_lo, x->qs, s->remap ? NULL : x->bb, x->idx,
                     x->qsc + (size_t)i * H * G * d, x->mus, s->remap ? NULL : s->bcs, s->b0,
                     cb, take, cv->o.fast_tier ? x->hruns : NULL };
    if ((rc = kl_stage1(cv, s->layer, &a, &cv->lanes, x->got)))
        return rc;
    if (cv->o.fast_tier)
        return item_runs(cv, s, x, i, take);
    /* the shortlists as positions, and which of them the cache holds */
    for (size_t h = 0; h < H; h++) {
        size_t it = (size_t)i * H + h;
        x->nsl[it] = (uint32_t)x->got[h];
        uint64_t *sl = x->shortlist + it * s->R_n, *hv = x->have + it * s->R_n;
        const uint32_t *idx = x->idx + h * s->R_n;
        size_t nhv = 0;
        for (long j = 0; j < x->got[h]; j++) {
            sl[j] = s->ns + idx[j];
            if (kl_cache_has(&cv->cache, kl_cache_key(s->layer, (uint32_t)h, sl[j])))
                hv[nhv++] = sl[j];
        }
        kvg_sort_u64(hv, nhv, x->sort_tmp);
        x->nhave[it] = nhv;
    }
    return 0;
}
