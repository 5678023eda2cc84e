/* conv.c - libkvarc conversations: create/attach, append and archive,
 * fork/snapshot/restore, counters.
 *
 * Design notes
 * Per layer, a token goes through: appended (exact, fp32, in the ring) ->
 * archived (encoded with the conversation's codec and appended to kvarcd
 * by kl_flush, its signature kept in the layer's mirror) -> cold (left
 * the hot window: found by stage 1 only) and, later, out of the ring.
 * Invariants: 1. archived <= len; 2. a token leaves the ring only once
 * archived (kvarc_append flushes before it would overwrite one); 3.
 * hot_window >= batch, so every token older than the hot window is
 * archived and has a signature; 4. the first `sinks` tokens are also kept
 * exact outside the ring; 5. no position below `inherited` is ever sent
 * (kvarcd holds it already; kvarcd refuses an Append not at a layer's end).
 *
 * Archiving (kl_flush, kl_flush_all). With o.append_together (the
 * default) a layer's full batch waits for the last layer's, and then one
 * AppendMany carries every layer's pending tokens: kvarcd makes them
 * durable in one group commit. A layer goes alone (an Append) when its
 * ring would overwrite an unarchived token (invariant 2), when attend
 * needs its cold tokens (invariant 3), or while it has re-fed tokens to
 * check; with append_together = 0 every layer's batch is its own Append.
 * append_together = 2 pipelines the AppendMany: kl_flush_all encodes the
 * new batch while the last one's commit is in flight, waits for that
 * answer (kl_drain), then keeps the new blocks as archived at once
 * (flush_keep: `archived` moves, the mirror and summaries take them) and
 * starts their AppendMany (kvc_call_start) without waiting. Every call
 * that sends to or reads from kvarcd for this conversation (kl_flush,
 * kvarc_attend, sync, so fork and close) drains first, so kvarcd always
 * holds what a later call relies on, and calls on a conversation stay in
 * order. A refused AppendMany leaves the handle ahead of kvarcd: it is
 * marked broken and every later drain fails, naming the cause.
 *
 * Taking over from a dead writer (kvarc_conv_attach). Layers are archived
 * by separate Appends (or AppendMany blocks that kvarcd stores or refuses
 * one by one), so a writer that dies between them leaves layers of
 * different lengths in kvarcd. Attach
 * continues every layer at the common (shortest) length L: its sinks, hot
 * window and signatures are rebuilt from [0, L) as after any crash, and
 * each layer also loads the signatures of what it holds past L
 * (`inherited`). The taker re-feeds the tokens from L on; kl_flush encodes
 * each layer's re-fed tokens below `inherited`, compares their signature
 * bits with the stored ones (a wrong transcript is refused, -EILSEQ, while
 * the bit flips of a non-deterministic but equal recomputation pass) and
 * advances `archived` without an Append; from `inherited` on it appends as
 * usual. Stored records win: what kvarcd acknowledged is never rewritten.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "gpu.h"

void kvarc_options_default(kvarc_options *o)
{
    memset(o, 0, sizeof *o);
    o->format = KVARC_FMT_Q3;
    o->pos_mode = 0;
    o->seed = 0x6b76617263ull;      /* "kvarc" */
    o->sinks = 4;
    o->hot_window = 256;
    o->top_k = 64;
    o->shortlist = 8;
    o->batch = 64;
    o->max_chunk = 512;
    o->score_mode = 0;
    o->combine = 0;
    o->score_distance = -1;
    o->cache_records = 1 << 18;
    o->scale = 0.0f;
    o->use_gpu = 1;
    o->append_together = 1;
    o->coarse_blocks = 0;
    o->prefill_coarse_blocks = 0;
    o->prefill_shortlist = 0;
}

/* ---- client ---------------------------------------------------------------- */

int kvarc_client_open(const char *target, const char *token, const char *tls_ca_file, kvarc_client **out)
{
    kvarc_client *c = calloc(1, sizeof *c);
    if (!c)
        return -ENOMEM;
    kvc_options o = { .token = token, .tls_ca_file = tls_ca_file };
    int rc = kvc_connect_opts(target, &o, &c->conn, c->err, sizeof c->err);
    if (rc) {
        free(c);
        return rc;
    }
    *out = c;
    return 0;
}

void kvarc_client_close(kvarc_client *c)
{
    if (!c)
        return;
    kvc_close(c->conn);
    free(c);
}

const char *kvarc_client_errmsg(const kvarc_client *c)
{
    return c ? c->err : "no client";
}

const char *kvarc_errmsg(const kvarc_conv *cv)
{
    return cv ? cv->err : "no conversation";
}

/* ---- handle ---------------------------------------------------------------- */

static void conv_free(kvarc_conv *cv)
{
    if (!cv)
        return;
    kl_gpu_free(cv);              /* first: it unregisters the host rings */
    for (uint32_t l = 0; cv->layers && l < cv->m.n_layers; l++) {
        kl_layer *y = &cv->layers[l];
        free(y->sink_k);
        free(y->sink_v);
        free(y->ring_k);
        free(y->ring_v);
        free(y->ring_kr);
        for (uint32_t h = 0; y->sig && h < cv->m.n_kv_heads; h++)
            kvg_plane_free(&y->sig[h]);
        free(y->sig);
        for (uint32_t h = 0; y->sum_bits && h < cv->m.n_kv_heads; h++) {
            free(y->sum_bits[h]);
            free(y->sum_scale[h]);
        }
        free(y->sum_bits);
        free(y->sum_scale);
        free(y->sum_ok);
    }
    free(cv->layers);
    kl_s1_lanes_free(&cv->lanes);
    kl_ax_free(&cv->ax);
    free(cv->bcs);
    free(cv->means);
    free(cv->last_ret);
    if (cv->inflight)                      /* a close that failed before waiting: wait, drop the answer */
        kvc_call_finish(cv->inflight, &kvarc__v1__append_many_reply__descriptor, NULL, NULL, 0);
    free(cv->inflight_layer);
    free(cv->ang);
    free(cv->ang_pos);
    kl_cache_free(&cv->cache);
    free(cv);
}

/* 1 (message in c->err) unless ns and name fit: 1..63 and 1..127 bytes (kvarcd checks the characters) */
static int names_bad(kvarc_client *c, const char *ns, const char *name)
{
    if (ns && name && *ns && *name && strlen(ns) <= 63 && strlen(name) <= 127)
        return 0;
    snprintf(c->err, sizeof c->err, "bad name: namespace of 1..63 and name of 1..127 bytes (given %zu and %zu)",
             ns ? strlen(ns) : 0, name ? strlen(name) : 0);
    return 1;
}

/* A handle with its buffers, for model m and options o (validated here). */
static int conv_new(kvarc_client *c, const char *ns, const char *name, const kvarc_model *m,
                    const kvarc_options *o, kvarc_conv **out)
{
    kvarc_options def;
    if (!o) {
        kvarc_options_default(&def);
        o = &def;
    }
    if (names_bad(c, ns, name))
        return -EINVAL;
    int rb = m ? kvarc_record_bytes(o->format, (int)m->head_dim) : -1;
    if (!m || m->n_layers < 1 || m->n_kv_heads < 1 || m->n_q_heads < m->n_kv_heads ||
        m->n_q_heads % m->n_kv_heads || rb <= 0) {
        snprintf(c->err, sizeof c->err, "bad model or format: %u layers, %u kv heads, %u query heads (a "
                 "multiple of the kv heads), head_dim %u, format %d", m ? m->n_layers : 0, m ? m->n_kv_heads : 0,
                 m ? m->n_q_heads : 0, m ? m->head_dim : 0, o->format);
        return -EINVAL;
    }
    if (o->hot_window < o->batch || o->batch < 1 || o->shortlist < 1 || o->max_chunk < 1 ||
        o->pos_mode < 0 || o->pos_mode > 1 || o->score_mode < 0 || o->score_mode > 1) {
        snprintf(c->err, sizeof c->err, "bad options: hot_window %u must be >= batch %u >= 1; shortlist, "
                 "max_chunk >= 1; pos_mode and score_mode 0 or 1", o->hot_window, o->batch);
        return -EINVAL;
    }
    if (o->combine < 0 || o->combine > 1 || !(o->scale >= 0 && o->scale < INFINITY) ||
        o->cache_records > KL_CACHE_MAX) {
        snprintf(c->err, sizeof c->err, "bad options: combine %d (0 max, 1 mean), scale %g (0: 1/sqrt(head_dim), "
                 "else finite > 0), cache_records %zu (at most %zu)", o->combine, (double)o->scale,
                 o->cache_records, (size_t)KL_CACHE_MAX);
        return -EINVAL;
    }
    if (o->threads > KVARC_THREADS_MAX) {
        snprintf(c->err, sizeof c->err, "bad options: threads %u; 0 (every CPU) .. %d", o->threads,
                 KVARC_THREADS_MAX);
        return -EINVAL;
    }
    if (o->append_together < 0 || o->append_together > 2) {
        snprintf(c->err, sizeof c->err, "bad options: append_together %d; 0 (an Append per layer), 1 (every "
                 "layer's batch in one AppendMany) or 2 (the same, one AppendMany in flight while the writer goes "
                 "on)", o->append_together);
        return -EINVAL;
    }
    if (o->fast_tier != 0 && o->fast_tier != 1) {
        snprintf(c->err, sizeof c->err, "bad options: fast_tier %d; 0 (signatures in the client) or 1 (block "
                 "summaries only, stage 1b in kvarcd)", o->fast_tier);
        return -EINVAL;
    }
    if (o->prefill_shortlist > o->shortlist) {
        snprintf(c->err, sizeof c->err, "bad options: prefill_shortlist %u; 0 (as shortlist) or 1..shortlist (%u)",
                 o->prefill_shortlist, o->shortlist);
        return -EINVAL;
    }
    for (int pf = 0; pf < 2; pf++) {
        uint32_t cb = pf ? o->prefill_coarse_blocks : o->coarse_blocks;
        if (cb && ((uint64_t)cb * KVG_SIG_BLOCK < (uint64_t)o->shortlist * o->top_k || cb > (1u << 24))) {
            snprintf(c->err, sizeof c->err, "bad options: %s %u scans %llu tokens, fewer than the "
                     "shortlist (%u x top_k %u); 0 (off) or %llu..16777216",
                     pf ? "prefill_coarse_blocks" : "coarse_blocks", cb, (unsigned long long)cb * KVG_SIG_BLOCK,
                     o->shortlist, o->top_k,
                     ((unsigned long long)o->shortlist * o->top_k + KVG_SIG_BLOCK - 1) / KVG_SIG_BLOCK);
            return -EINVAL;
        }
    }
    if (m->fingerprint && strlen(m->fingerprint) > 63) {
        snprintf(c->err, sizeof c->err, "fingerprint longer than 63 bytes");
        return -EINVAL;
    }
    kvarc_conv *cv = calloc(1, sizeof *cv);
    if (!cv)
        return -ENOMEM;
    cv->cl = c;
    snprintf(cv->ns, sizeof cv->ns, "%s", ns);
    snprintf(cv->name, sizeof cv->name, "%s", name);
    cv->m = *m;
    snprintf(cv->fingerprint, sizeof cv->fingerprint, "%s", m->fingerprint ? m->fingerprint : "");
    cv->m.fingerprint = cv->fingerprint;
    cv->o = *o;
    if (cv->o.score_distance < 0)
        cv->o.score_distance = (int32_t)cv->o.hot_window;
    cv->ring = o->hot_window + o->max_chunk + KVG_SIG_BLOCK;   /* + a block: its summary reads its keys */
    cv->rb = (size_t)rb;
    size_t L = m->n_layers, H = m->n_kv_heads, d = m->head_dim;
    if (kvg_rope_init(&cv->rope, (int)d, (int)m->rotary_dims, m->rope_layout, m->rope_theta)) {
        snprintf(c->err, sizeof c->err, "bad RoPE: rotary_dims %u, layout %d (0 or 1), theta %g (finite, > 0 "
                 "when rotary_dims > 0)", m->rotary_dims, m->rope_layout, (double)m->rope_theta);
        free(cv);
        return -EINVAL;
    }
    int rc = kvarc_rotation_init(&cv->rot, (int)d, o->seed);
    if (rc) {
        snprintf(c->err, sizeof c->err, "head_dim %zu: %s", d, kvarc_strerror(rc));
        free(cv);
        return rc;
    }
    cv->means = calloc(L * H * 2 * d, sizeof *cv->means);
    cv->last_ret = calloc(H * (size_t)o->top_k + 1, sizeof *cv->last_ret);
    cv->inflight_layer = malloc(L * sizeof *cv->inflight_layer);
    cv->append_many_max = KL_APPEND_MANY_MAX;
    cv->ang = malloc(KL_ANG_SLOTS * d * sizeof *cv->ang);
    cv->ang_pos = malloc(KL_ANG_SLOTS * sizeof *cv->ang_pos);
    if (!cv->last_ret || !cv->inflight_layer || !cv->ang || !cv->ang_pos)
        goto oom;
    memset(cv->ang_pos, 0xff, KL_ANG_SLOTS * sizeof *cv->ang_pos);   /* UINT64_MAX: no position */
    cv->layers = calloc(L, sizeof *cv->layers);
    if (!cv->means || !cv->layers || kl_cache_init(&cv->cache, o->cache_records, cv->rb))
        goto oom;
    for (size_t l = 0; l < L; l++) {
        kl_layer *y = &cv->layers[l];
        size_t sk = (size_t)(o->sinks ? o->sinks : 1) * H * d, rg = (size_t)cv->ring * H * d;
        y->sink_k = malloc(sk * 4);
        y->sink_v = malloc(sk * 4);
        y->ring_k = malloc(rg * 4);
        y->ring_v = malloc(rg * 4);
        y->ring_kr = malloc(rg * 4);
        y->sig = calloc(H, sizeof *y->sig);
        y->sum_bits = calloc(H, sizeof *y->sum_bits);
        y->sum_scale = calloc(H, sizeof *y->sum_scale);
        if (!y->sink_k || !y->sink_v || !y->ring_k || !y->ring_v || !y->ring_kr || !y->sig ||
            !y->sum_bits || !y->sum_scale)
            goto oom;
    }
    if (!cv->o.fast_tier && kl_gpu_init(cv)) {      /* the fast tier scans in kvarcd, not on a device */
        snprintf(c->err, sizeof c->err, "%s", cv->err);
        conv_free(cv);
        return -ENOMEM;
    }
    *out = cv;
    return 0;
oom:
    conv_free(cv);
    snprintf(c->err, sizeof c->err, "out of memory");
    return -ENOMEM;
}

/* The coarse tier's summaries of a layer's blocks [0, nb) from kvarcd
 * (LoadSummaries, per head, in pages) into the layer's arrays. */
static int load_summaries(kvarc_conv *cv, uint32_t layer, uint64_t nb)
{
    const size_t H = cv->m.n_kv_heads, sb = cv->m.head_dim / 8, S = KVG_SUM_ITEMS;
    kl_layer *y = &cv->layers[layer];
    int rc = kl_coarse_keep(cv, y, 0, nb, NULL, NULL);     /* room, and "none" until a page says otherwise */
    for (size_t h = 0; !rc && h < H; h++)
        for (uint64_t b = 0; !rc && b < nb;) {
            Kvarc__V1__LoadSummariesRequest r = KVARC__V1__LOAD_SUMMARIES_REQUEST__INIT;
            r.conv = cv->id;
            r.layer = layer;
            r.head = (uint32_t)h;
            r.first_block = b;
            r.count = nb - b < 65536 ? nb - b : 65536;
            ProtobufCMessage *rep = NULL;
            int st = kvc_call(cv->cl->conn, "LoadSummaries", &r.base, &kvarc__v1__load_summaries_reply__descriptor,
                              &rep, 0, cv->err, sizeof cv->err);
            if (st) {
                rc = kw_rc_of(st);
                break;
            }
            Kvarc__V1__LoadSummariesReply *a = (Kvarc__V1__LoadSummariesReply *)rep;
            uint64_t n = a->count;
            if (a->first_block != b || n != r.count || a->bits.len != n * S * sb || a->scales.len != n * S * 2 ||
                a->present.len != n)
                rc = kl_fail(cv, -EIO, "LoadSummaries of layer %u head %zu answered %llu blocks from %llu for %llu "
                             "from %llu", layer, h, (unsigned long long)n, (unsigned long long)a->first_block,
                             (unsigned long long)r.count, (unsigned long long)b);
            for (uint64_t j = 0; !rc && j < n; j++) {
                if (h == 0)
                    y->sum_ok[b + j] = a->present.data[j] != 0;
                else if (y->sum_ok[b + j] != (a->present.data[j] != 0))
                    rc = kl_fail(cv, -EIO, "block %llu of layer %u has summaries for some heads only",
                                 (unsigned long long)(b + j), layer);
                memcpy(y->sum_bits[h] + (b + j) * S * sb, a->bits.data + j * S * sb, S * sb);
                memcpy(y->sum_scale[h] + (b + j) * S, a->scales.data + j * S * 2, S * 2);
            }
            cv->st.bytes_received += a->bits.len + a->scales.len + a->present.len;
            protobuf_c_message_free_unpacked(rep, NULL);
            b += n;
        }
    return rc;
}

/* Room for signatures of positions [sig_base, n) in every head's mirror. */
static int sig_reserve(kvarc_conv *cv, kl_layer *y, uint64_t n)
{
    for (uint32_t h = 0; h < cv->m.n_kv_heads; h++)
        if (kvg_plane_reserve(&y->sig[h], (int)cv->m.head_dim, n - y->sig_base))
            return kl_fail(cv, -ENOMEM, "out of memory for %llu signatures of head %u", (unsigned long long)n, h);
    return 0;
}

static void fill_shape(const kvarc_conv *cv, Kvarc__V1__Shape *s)
{
    kvarc__v1__shape__init(s);
    s->n_layers = cv->m.n_layers;
    s->n_kv_heads = cv->m.n_kv_heads;
    s->n_q_heads = cv->m.n_q_heads;
    s->head_dim = cv->m.head_dim;
    s->format = (uint32_t)cv->o.format;
    s->pos_mode = cv->o.pos_mode == 1 ? KVARC_POS_REMAPPED : KVARC_POS_TRUE;
    s->rope_layout = (uint32_t)cv->m.rope_layout;
    s->dtype = (uint32_t)cv->m.dtype;
    s->rotary_dims = cv->m.rotary_dims;
    s->rope_theta = cv->m.rope_theta;
    s->seed = cv->o.seed;
    s->fingerprint = (char *)cv->fingerprint;
}

int kvarc_conv_create(kvarc_client *c, const char *ns, const char *name, const kvarc_model *m,
                      const kvarc_options *o, const float *means, kvarc_conv **out)
{
    kvarc_conv *cv;
    int rc = conv_new(c, ns, name, m, o, &cv);
    if (rc)
        return rc;
    size_t nm = (size_t)m->n_layers * m->n_kv_heads * 2 * m->head_dim;
    if (means)
        memcpy(cv->means, means, nm * sizeof *means);
    Kvarc__V1__CreateRequest r = KVARC__V1__CREATE_REQUEST__INIT;
    Kvarc__V1__Shape sh;
    fill_shape(cv, &sh);
    r.ns = cv->ns;
    r.name = cv->name;
    r.shape = &sh;
    r.n_means = means ? nm : 0;
    r.means = cv->means;
    ProtobufCMessage *rep = NULL;
    int st = kvc_call(c->conn, "Create", &r.base, &kvarc__v1__conv_reply__descriptor, &rep, 0, c->err, sizeof c->err);
    if (st) {
        conv_free(cv);
        return kw_rc_of(st);
    }
    cv->id = ((Kvarc__V1__ConvReply *)rep)->info->id;
    protobuf_c_message_free_unpacked(rep, NULL);
    *out = cv;
    return 0;
}

/* Fetch records [first, first + n) of (layer, head) and decode them into k, v [n][d]. */
static int fetch_decode(kvarc_conv *cv, uint32_t layer, uint32_t head, uint64_t first, uint32_t n, float *k,
                        float *v)
{
    if (!n)
        return 0;
    uint64_t *pos = malloc(n * sizeof *pos);
    if (!pos)
        return kl_fail(cv, -ENOMEM, "out of memory");
    for (uint32_t i = 0; i < n; i++)
        pos[i] = first + i;
    Kvarc__V1__FetchRequest r = KVARC__V1__FETCH_REQUEST__INIT;
    r.conv = cv->id;
    r.layer = layer;
    r.head = head;
    r.positions = pos;
    r.n_positions = n;
    ProtobufCMessage *rep = NULL;
    int st = kvc_call(cv->cl->conn, "Fetch", &r.base, &kvarc__v1__fetch_reply__descriptor, &rep, 0, cv->err,
                      sizeof cv->err);
    free(pos);
    if (st)
        return kw_rc_of(st);
    Kvarc__V1__FetchReply *f = (Kvarc__V1__FetchReply *)rep;
    int rc = f->records.len == n * cv->rb ? 0 : kl_fail(cv, -EIO, "Fetch returned %zu bytes for %u records",
                                                        f->records.len, n);
    kvg_codec codec = kl_codec(cv, layer, head);
    if (!rc && (rc = kvg_decode(&codec, f->records.data, n, k, v)))
        kl_fail(cv, rc, "decoding records of layer %u head %u: %s", layer, head, kvarc_strerror(rc));
    cv->st.bytes_received += f->records.len;
    protobuf_c_message_free_unpacked(rep, NULL);
    return rc;
}

int kvarc_conv_attach(kvarc_client *c, const char *ns, const char *name, const kvarc_model *m,
                      const kvarc_options *o, kvarc_conv **out)
{
    if (names_bad(c, ns, name))
        return -EINVAL;
    if (!m || !out) {
        snprintf(c->err, sizeof c->err, "attach %s/%s: the model and out must be given", ns, name);
        return -EINVAL;
    }
    kvarc_options opt;
    if (o)
        opt = *o;
    else
        kvarc_options_default(&opt);
    Kvarc__V1__OpenRequest r = KVARC__V1__OPEN_REQUEST__INIT;
    r.ns = (char *)ns;
    r.name = (char *)name;
    r.with_means = 1;
    ProtobufCMessage *rep = NULL;
    int st = kvc_call(c->conn, "Open", &r.base, &kvarc__v1__conv_reply__descriptor, &rep, 0, c->err, sizeof c->err);
    if (st)
        return kw_rc_of(st);
    Kvarc__V1__ConvReply *cr = (Kvarc__V1__ConvReply *)rep;
    Kvarc__V1__ConvInfo *info = cr->info;
    Kvarc__V1__Shape *sh = info->shape;
    int rc = 0;
    if (sh->n_layers != m->n_layers || sh->n_kv_heads != m->n_kv_heads || sh->n_q_heads != m->n_q_heads ||
        sh->head_dim != m->head_dim || sh->rotary_dims != m->rotary_dims || sh->rope_theta != m->rope_theta ||
        (int)sh->rope_layout != m->rope_layout || strcmp(sh->fingerprint, m->fingerprint ? m->fingerprint : "")) {
        snprintf(c->err, sizeof c->err, "conversation '%s/%s' was created for %u layers x %u kv heads (%u query "
                 "heads) x head_dim %u, rotary %u theta %g layout %u, model '%s'; this client has %u x %u (%u) x %u, "
                 "rotary %u theta %g layout %d, model '%s'", ns, name, sh->n_layers, sh->n_kv_heads, sh->n_q_heads,
                 sh->head_dim, sh->rotary_dims, (double)sh->rope_theta, sh->rope_layout, sh->fingerprint,
                 m->n_layers, m->n_kv_heads, m->n_q_heads, m->head_dim, m->rotary_dims, (double)m->rope_theta,
                 m->rope_layout, m->fingerprint ? m->fingerprint : "");
        rc = KVARC_ESHAPE;
    }
    if (!rc && info->n_layer_lengths != m->n_layers) {
        snprintf(c->err, sizeof c->err, "kvarcd did not report '%s/%s's layer lengths", ns, name);
        rc = -EIO;
    }
    /* layers of different lengths: a writer died between its per-layer
     * Appends; continue at the common length (design notes) */
    uint64_t len = UINT64_MAX;
    for (size_t l = 0; !rc && l < info->n_layer_lengths; l++)
        if (info->layer_lengths[l] < len)
            len = info->layer_lengths[l];
    if (!rc && sh->pos_mode == KVARC_POS_TRUE_FREE) {
        snprintf(c->err, sizeof c->err, "conversation '%s/%s' was archived in true-position mode with position-free "
                 "signatures (by a kvarc before signature kind 2): its retrieval would rank keys by a score "
                 "attention does not use, so it is not served; its records are intact (Fetch, export): archive "
                 "its tokens again into a new conversation", ns, name);
        rc = KVARC_EVERSION;
    } else if (!rc && sh->pos_mode > KVARC_POS_KIND_MAX) {
        snprintf(c->err, sizeof c->err, "conversation '%s/%s' has position mode / signature kind %u, which this "
                 "libkvarc does not know (a newer kvarc wrote it): not served", ns, name, sh->pos_mode);
        rc = KVARC_EVERSION;
    }
    opt.format = (int)sh->format;
    opt.pos_mode = sh->pos_mode == KVARC_POS_REMAPPED ? 1 : 0;
    opt.seed = sh->seed;
    kvarc_conv *cv = NULL;
    if (!rc)
        rc = conv_new(c, ns, name, m, &opt, &cv);
    if (!rc && cr->n_means != (size_t)m->n_layers * m->n_kv_heads * 2 * m->head_dim) {
        snprintf(c->err, sizeof c->err, "kvarcd sent %zu means for '%s/%s'", cr->n_means, ns, name);
        rc = -EIO;
    }
    if (!rc) {
        memcpy(cv->means, cr->means, cr->n_means * sizeof *cr->means);
        cv->id = info->id;
        for (uint32_t l = 0; l < m->n_layers; l++)
            cv->layers[l].inherited = info->layer_lengths[l];
    }
    protobuf_c_message_free_unpacked(rep, NULL);
    if (rc) {
        conv_free(cv);
        return rc;
    }
    size_t H = m->n_kv_heads, d = m->head_dim, sb = d / 8;
    for (uint32_t l = 0; !rc && l < m->n_layers; l++) {
        kl_layer *y = &cv->layers[l];
        y->len = y->archived = len;
        /* signatures: one server stream per layer, every head, past len up
         * to what the layer holds (kl_flush checks re-fed tokens with them);
         * the fast tier's from the unfinished block on only */
        uint64_t held = y->inherited;
        y->sig_base = cv->o.fast_tier ? len / KVG_SIG_BLOCK * KVG_SIG_BLOCK : 0;
        if ((rc = sig_reserve(cv, y, held)))
            break;
        Kvarc__V1__LoadSignaturesRequest lr = KVARC__V1__LOAD_SIGNATURES_REQUEST__INIT;
        lr.conv = cv->id;
        lr.layer = l;
        lr.first = y->sig_base;
        lr.count = held - y->sig_base;
        kvc_stream *s;
        uint64_t got = 0;
        if (held && !kvc_sstream_open(c->conn, "LoadSignatures", &lr.base, 0, &s)) {
            ProtobufCMessage *mm;
            while (kvc_sstream_next(s, &kvarc__v1__sig_chunk__descriptor, &mm) == 1) {
                Kvarc__V1__SigChunk *ch = (Kvarc__V1__SigChunk *)mm;
                if (ch->head < H && ch->first_pos >= y->sig_base && ch->first_pos + ch->count <= held &&
                    ch->bits.len == ch->count * sb && ch->scales.len == ch->count * 2) {
                    kvg_plane_put(&y->sig[ch->head], ch->first_pos - y->sig_base, ch->count, ch->bits.data,
                                  ch->scales.data);
                    if (cv->gpu && kl_gpu_put_sigs(cv, l, ch->head, ch->first_pos, ch->bits.data,
                                                   y->sig[ch->head].scale + ch->first_pos, ch->count))
                        kl_gpu_free(cv);          /* the host mirror is whole: the CPU path serves */
                    got += ch->count;
                    cv->st.bytes_received += ch->bits.len + ch->scales.len;
                }
                protobuf_c_message_free_unpacked(mm, NULL);
            }
            st = kvc_stream_finish(s, &kvarc__v1__empty__descriptor, NULL, cv->err, sizeof cv->err);
            if (st)
                rc = kw_rc_of(st);
        }
        if (!rc && got != (held - y->sig_base) * H)
            rc = kl_fail(cv, -EIO, "LoadSignatures of layer %u gave %llu of %llu signatures", l,
                         (unsigned long long)got, (unsigned long long)((held - y->sig_base) * H));
        if (!rc)
            rc = load_summaries(cv, l, held / KVG_SIG_BLOCK);
        /* sinks and the ring, decoded from their records: the whole ring
         * (hot window + max_chunk), as a writer's holds it, so that attending
         * the last n_q <= max_chunk tokens finds each query's hot window */
        uint32_t ns_ = (uint32_t)(len < cv->o.sinks ? len : cv->o.sinks);
        uint64_t hot = len < cv->ring ? len : cv->ring;
        float *tk = malloc((hot + ns_ + 1) * d * 4), *tv = malloc((hot + ns_ + 1) * d * 4);
        if (!tk || !tv)
            rc = kl_fail(cv, -ENOMEM, "out of memory");
        for (uint32_t h = 0; !rc && h < H; h++) {
            if ((rc = fetch_decode(cv, l, h, 0, ns_, tk, tv)))
                break;
            memcpy(y->sink_k + (size_t)h * cv->o.sinks * d, tk, (size_t)ns_ * d * 4);
            memcpy(y->sink_v + (size_t)h * cv->o.sinks * d, tv, (size_t)ns_ * d * 4);
            if ((rc = fetch_decode(cv, l, h, len - hot, (uint32_t)hot, tk, tv)))
                break;
            for (uint64_t t = 0; t < hot; t++)
                kl_ring_put(cv, y, h, len - hot + t, tk + t * d, tv + t * d, NULL);
        }
        free(tk);
        free(tv);
    }
    if (rc) {
        snprintf(c->err, sizeof c->err, "%s", cv->err);
        conv_free(cv);
        return rc;
    }
    *out = cv;
    return 0;
}

/* ---- append and archive --------------------------------------------------- */

/* A re-fed token differs from the stored one when more than this share of
 * its signature bits differ: a recomputation of the same token (another
 * batch shape, another GPU) flips the few near-zero coordinates, another
 * token flips about half of them. */
#define REFED_MAX_FLIPS(d) ((d) / 4)

/* Check the signatures of n re-fed tokens from position `archived` ([H][n]
 * [d/8] bits) against those kvarcd stores (in the mirror since attach). */
static int check_refed(kvarc_conv *cv, uint32_t layer, const uint8_t *bits, uint32_t n)
{
    kl_layer *y = &cv->layers[layer];
    size_t H = cv->m.n_kv_heads, d = cv->m.head_dim, sb = d / 8;
    for (uint32_t t = 0; t < n; t++)
        for (size_t h = 0; h < H; h++) {
            const uint8_t *a = bits + (h * n + t) * sb;
            uint8_t b[KVARC_HEAD_DIM_MAX / 8];
            kvg_plane_get(&y->sig[h], y->archived + t - y->sig_base, 1, b, NULL);
            unsigned flips = 0;
            for (size_t i = 0; i < sb; i++)
                flips += (unsigned)__builtin_popcount((unsigned)(a[i] ^ b[i]));
            if (flips > REFED_MAX_FLIPS(d))
                return kl_fail(cv, -EILSEQ, "'%s/%s' layer %u position %llu head %zu: the token given there differs "
                               "from the one a previous writer archived (%u of %zu signature bits differ); after "
                               "attach, append the conversation's own tokens from its attach length on (or fork it "
                               "at that length right after attach and continue the fork)", cv->ns, cv->name, layer,
                               (unsigned long long)(y->archived + t), h, flips, d);
        }
    return 0;
}

void kl_sig_keys(const kvarc_conv *cv, const kl_layer *y, size_t h, const float *mu_k, uint64_t first, uint64_t n,
                 float *x)
{
    const size_t d = cv->m.head_dim;
    const int remap = cv->o.pos_mode == 1;
    for (uint64_t t = 0; t < n; t++) {
        uint64_t p = first + t;
        const float *k = (remap ? y->ring_k : y->ring_kr) + (h * cv->ring + p % cv->ring) * d;
        if (!remap)                               /* kind 2: centered per block below */
            memcpy(x + t * d, k, d * sizeof *x);
        else
            for (size_t i = 0; i < d; i++)       /* kind 1: k - mu_k */
                x[t * d + i] = k[i] - mu_k[i];
    }
    if (!remap)
        kvg_sig_pos_center(&cv->rope, mu_k, first, n, x);
}

/* The fast tier keeps the signatures of the unfinished block only (and,
 * after an attach, those of the re-fed range until it is checked): once
 * archiving finishes a block, the mirror starts at the next. */
static void sig_rebase(kvarc_conv *cv, kl_layer *y)
{
    const uint64_t nb = y->archived / KVG_SIG_BLOCK * KVG_SIG_BLOCK, m = y->archived - nb;
    if (!cv->o.fast_tier || nb <= y->sig_base || y->archived < y->inherited)
        return;
    uint8_t tb[KVG_SIG_BLOCK * KVARC_HEAD_DIM_MAX / 8];
    uint16_t ts[KVG_SIG_BLOCK];
    for (uint32_t h = 0; h < cv->m.n_kv_heads; h++) {
        kvg_plane_get(&y->sig[h], nb - y->sig_base, (size_t)m, tb, ts);
        kvg_plane_put(&y->sig[h], 0, (size_t)m, tb, ts);
    }
    y->sig_base = nb;
}

/* One layer's tokens [archived, archived + n) encoded on their way to
 * kvarcd: flush_encode makes them, an Append (or AppendMany, or the
 * re-fed check) takes them, flush_keep keeps them once acknowledged. */
typedef struct kl_pend {
    uint32_t  layer, n;
    uint8_t  *bits, *recs, *sbits;   /* [H][n][d/8], [H][n][rb], the summaries [H][nsb][S][d/8] */
    uint16_t *sc, *sscale;           /* [H][n], [H][nsb][S] */
    long      nsb;                   /* blocks summarized (0: none, -1: not possible) */
} kl_pend;

static void pend_free(kl_pend *p)
{
    free(p->bits);
    free(p->recs);
    free(p->sc);
    free(p->sbits);
    free(p->sscale);
    memset(p, 0, sizeof *p);
}

/* Encode tokens [archived, archived + n) of a layer from the ring, and
 * (unless held: kvarcd has them already) the summaries of the blocks
 * they complete. */
static int flush_encode(kvarc_conv *cv, uint32_t layer, uint32_t n, int held, kl_pend *p)
{
    kl_layer *y = &cv->layers[layer];
    size_t H = cv->m.n_kv_heads, d = cv->m.head_dim, sb = d / 8;
    memset(p, 0, sizeof *p);
    p->layer = layer;
    p->n = n;
    int rc = sig_reserve(cv, y, y->archived + n);
    if (rc)
        return rc;
    p->bits = malloc(H * n * sb);
    p->recs = malloc(H * n * cv->rb);
    p->sc = malloc(H * n * 2);
    float *k = malloc((size_t)n * d * 4), *v = malloc((size_t)n * d * 4);
    if (!p->bits || !p->recs || !p->sc || !k || !v)
        rc = kl_fail(cv, -ENOMEM, "out of memory");
    const size_t s0 = (size_t)(y->archived % cv->ring);
    for (size_t h = 0; !rc && h < H; h++) {
        const float *ek = y->ring_k + (h * cv->ring + s0) * d, *ev = y->ring_v + (h * cv->ring + s0) * d;
        if (s0 + n > cv->ring) {              /* the range wraps: its rows in order, copied */
            for (uint32_t t = 0; t < n; t++) {
                size_t slot = (h * cv->ring + (s0 + t) % cv->ring) * d;
                memcpy(k + t * d, y->ring_k + slot, d * 4);
                memcpy(v + t * d, y->ring_v + slot, d * 4);
            }
            ek = k;
            ev = v;
        }
        kvg_codec codec = kl_codec(cv, layer, (uint32_t)h);
        size_t bad = 0;
        rc = kvg_encode(&codec, KVARC_DTYPE_F32, ek, ev, n, p->recs + h * n * cv->rb, p->bits + h * n * sb,
                        p->sc + h * n, &bad);
        if (!rc && cv->o.pos_mode == 0) {   /* true positions: kind-2 signatures replace the encoder's */
            kl_sig_keys(cv, y, h, codec.mu_k, y->archived, n, k);   /* from the ring's turned keys, not again */
            rc = kvg_signatures(&cv->rot, k, n, p->bits + h * n * sb, p->sc + h * n, &bad);
        }
        if (rc)
            kl_fail(cv, rc, "layer %u head %zu position %llu: %s", layer, h,
                    (unsigned long long)(y->archived + bad), kvarc_strerror(rc));
    }
    free(k);
    free(v);
    /* the summaries of the blocks these tokens complete (sent with them) */
    p->nsb = rc || held ? 0 : kl_coarse_make(cv, layer, y->archived, n, p->bits, p->sc, &p->sbits, &p->sscale);
    if (p->nsb < -1)
        rc = (int)p->nsb;
    return rc;
}

/* The Append of p (pointing into p). */
static void pend_request(const kvarc_conv *cv, const kl_pend *p, Kvarc__V1__AppendRequest *r)
{
    const size_t H = cv->m.n_kv_heads, sb = cv->m.head_dim / 8;
    kvarc__v1__append_request__init(r);
    r->conv = cv->id;
    r->layer = p->layer;
    r->first_pos = cv->layers[p->layer].archived;
    r->count = p->n;
    r->sig_bits.data = p->bits;
    r->sig_bits.len = H * p->n * sb;
    r->sig_scale.data = (uint8_t *)p->sc;
    r->sig_scale.len = H * p->n * 2;
    r->records.data = p->recs;
    r->records.len = H * p->n * cv->rb;
    if (p->nsb > 0) {
        r->sum_bits.data = p->sbits;
        r->sum_bits.len = H * (size_t)p->nsb * KVG_SUM_ITEMS * sb;
        r->sum_scale.data = (uint8_t *)p->sscale;
        r->sum_scale.len = H * (size_t)p->nsb * KVG_SUM_ITEMS * 2;
    }
}

/* p acknowledged by kvarcd: its signatures into the mirror (and VRAM),
 * its summaries kept, the layer's `archived` past it. */
static int flush_keep(kvarc_conv *cv, const kl_pend *p)
{
    kl_layer *y = &cv->layers[p->layer];
    const size_t H = cv->m.n_kv_heads, sb = cv->m.head_dim / 8, n = p->n;
    const uint64_t sb0 = y->archived / KVG_SIG_BLOCK, snb = (y->archived + n) / KVG_SIG_BLOCK - sb0;
    cv->st.bytes_sent += H * n * (sb + 2 + cv->rb) + (p->nsb > 0 ? H * (size_t)p->nsb * KVG_SUM_ITEMS * (sb + 2) : 0);
    for (size_t h = 0; h < H; h++) {
        kvg_plane_put(&y->sig[h], y->archived - y->sig_base, n, p->bits + h * n * sb, p->sc + h * n);
        if (cv->gpu && kl_gpu_put_sigs(cv, p->layer, (uint32_t)h, y->archived, p->bits + h * n * sb, p->sc + h * n,
                                       n))
            kl_gpu_free(cv);              /* the host mirror is whole: the CPU path serves */
    }
    int rc = kl_coarse_keep(cv, y, sb0, snb, p->nsb > 0 ? p->sbits : NULL, p->sscale);
    y->archived += n;
    cv->st.archived += n;
    if (!rc)
        sig_rebase(cv, y);
    return rc;
}

/* Encode tokens [archived, archived + n) of a layer from the ring; send
 * them (an Append), or, with `held` (kvarcd already holds them), check them
 * against the stored signatures and keep those. */
static int flush_range(kvarc_conv *cv, uint32_t layer, uint32_t n, int held)
{
    kl_layer *y = &cv->layers[layer];
    int64_t t0 = kl_now_ns();
    kl_pend p;
    int rc = flush_encode(cv, layer, n, held, &p);
    if (!rc && held) {
        const uint64_t sb0 = y->archived / KVG_SIG_BLOCK, snb = (y->archived + n) / KVG_SIG_BLOCK - sb0;
        if (!(rc = check_refed(cv, layer, p.bits, n)) && !(rc = kl_coarse_keep(cv, y, sb0, snb, NULL, NULL))) {
            y->archived += n;
            sig_rebase(cv, y);
        }
    } else if (!rc) {
        Kvarc__V1__AppendRequest r;
        pend_request(cv, &p, &r);
        ProtobufCMessage *rep = NULL;
        int st = kvc_call(cv->cl->conn, "Append", &r.base, &kvarc__v1__append_reply__descriptor, &rep, 0, cv->err,
                          sizeof cv->err);
        if (st) {
            rc = kw_rc_of(st);
        } else {
            protobuf_c_message_free_unpacked(rep, NULL);
            rc = flush_keep(cv, &p);
        }
    }
    pend_free(&p);
    cv->st.ns_archive += (uint64_t)(kl_now_ns() - t0);
    return rc;
}

/* append_together: every layer's unarchived tokens in one AppendMany, so
 * that kvarcd makes them durable in one group commit. Layers with a re-fed
 * range to check (after an attach) go one by one, as kl_flush does. The
 * blocks kvarcd stored are kept even when another was refused; the first
 * refusal is the error. */
static int drain(kvarc_conv *cv, int count_time);

/* An AppendMany reply against the n blocks sent: -EIO (message set) when
 * it does not answer each of them, else 0. */
static int many_answers(kvarc_conv *cv, const Kvarc__V1__AppendManyReply *am, size_t n)
{
    return am->n_results == n ? 0 : kl_fail(cv, -EIO, "AppendMany answered %zu results for %zu blocks",
                                            am->n_results, n);
}

/* Its block i (of layer): 0 if kvarcd stored it, else its refusal as the
 * error (message set). */
static int many_refused(kvarc_conv *cv, const Kvarc__V1__AppendManyReply *am, size_t i, uint32_t layer)
{
    const Kvarc__V1__AppendResult *r = am->results[i];
    return r->status ? kl_fail(cv, kw_rc_of((int)r->status), "append to layer %u: %s", layer, r->message) : 0;
}

/* One AppendMany of n blocks (p[i] as request rp[i]): waited for and kept
 * block by block (what kvarcd stored is kept, the first refusal is the
 * error), or with `async` (append_together 2) started after the last one
 * in flight is answered, every block kept as archived at once, its answer
 * left for kl_drain. */
static int send_many(kvarc_conv *cv, kl_pend *p, Kvarc__V1__AppendRequest **rp, size_t n, int async)
{
    Kvarc__V1__AppendManyRequest r = KVARC__V1__APPEND_MANY_REQUEST__INIT;
    r.conv = cv->id;
    r.n_blocks = n;
    r.blocks = rp;
    int rc = drain(cv, 0);                /* kl_flush_all's own clock counts the wait */
    if (rc)
        return rc;
    if (async) {
        int st = kvc_call_start(cv->cl->conn, "AppendMany", &r.base, 0, &cv->inflight);
        if (st)
            return kl_fail(cv, kw_rc_of(st), "sending AppendMany: %s", kvc_status_name(st));
        cv->inflight_n = n;
        for (size_t i = 0; i < n; i++)
            cv->inflight_layer[i] = p[i].layer;
        for (size_t i = 0; i < n; i++) {  /* every block sent is kept: the handle must match what was sent */
            int krc = flush_keep(cv, &p[i]);
            rc = rc ? rc : krc;
        }
        if (rc) {
            cv->broken = rc;
            snprintf(cv->broken_msg, sizeof cv->broken_msg, "%s", cv->err);
        }
        return rc;
    }
    ProtobufCMessage *rep = NULL;
    int st = kvc_call(cv->cl->conn, "AppendMany", &r.base, &kvarc__v1__append_many_reply__descriptor, &rep, 0,
                      cv->err, sizeof cv->err);
    if (st)
        return kw_rc_of(st);
    Kvarc__V1__AppendManyReply *am = (Kvarc__V1__AppendManyReply *)rep;
    if (!(rc = many_answers(cv, am, n)))
        for (size_t i = 0; i < n; i++) {  /* what kvarcd stored is kept, past a refusal too */
            if (am->results[i]->status) {
                rc = rc ? rc : many_refused(cv, am, i, p[i].layer);
                continue;
            }
            int krc = flush_keep(cv, &p[i]);
            rc = rc ? rc : krc;
        }
    protobuf_c_message_free_unpacked(rep, NULL);
    return rc;
}

int kl_flush_all(kvarc_conv *cv)
{
    const uint32_t L = cv->m.n_layers;
    int64_t t0 = kl_now_ns();
    kl_pend *p = calloc(L, sizeof *p);
    Kvarc__V1__AppendRequest *rq = calloc(L, sizeof *rq), **rp = calloc(L, sizeof *rp);
    int rc = p && rq && rp ? 0 : kl_fail(cv, -ENOMEM, "out of memory");
    size_t np = 0;
    for (uint32_t l = 0; !rc && l < L; l++) {
        kl_layer *y = &cv->layers[l];
        if (y->archived < y->inherited)
            rc = kl_flush(cv, l);
        else if (y->archived < y->len && !(rc = flush_encode(cv, l, (uint32_t)(y->len - y->archived), 0, &p[np]))) {
            pend_request(cv, &p[np], &rq[np]);
            rp[np] = &rq[np];
            np++;
        }
    }
    /* in AppendMany requests of at most cv->append_many_max bytes (gRPC refuses messages over 16 MiB: a
     * chunk of 512 tokens on 80 layers of 8 heads is 40 MB), each layer's block whole; with
     * append_together 2 the last request stays in flight */
    for (size_t g0 = 0, g1; !rc && g0 < np; g0 = g1) {
        size_t bytes = protobuf_c_message_get_packed_size(&rq[g0].base);
        for (g1 = g0 + 1; g1 < np; g1++) {
            size_t bb = protobuf_c_message_get_packed_size(&rq[g1].base);
            if (bytes + bb > cv->append_many_max)
                break;
            bytes += bb;
        }
        rc = send_many(cv, p + g0, rp + g0, g1 - g0, cv->o.append_together == 2 && g1 == np);
    }
    for (size_t i = 0; p && i < np; i++)
        pend_free(&p[i]);
    free(p);
    free(rq);
    free(rp);
    cv->st.ns_archive += (uint64_t)(kl_now_ns() - t0);
    return rc;
}

static int drain(kvarc_conv *cv, int count_time)
{
    if (cv->broken)
        return kl_fail(cv, cv->broken, "an earlier AppendMany (sent while the writer went on) failed: %s; this "
                       "conversation no longer matches kvarcd: attach it again", cv->broken_msg);
    if (!cv->inflight)
        return 0;
    int64_t t0 = kl_now_ns();
    ProtobufCMessage *rep = NULL;
    int st = kvc_call_finish(cv->inflight, &kvarc__v1__append_many_reply__descriptor, &rep, cv->err,
                             sizeof cv->err);
    cv->inflight = NULL;
    int rc = 0;
    if (st) {
        char why[sizeof cv->err];
        snprintf(why, sizeof why, "%s", cv->err);
        rc = kl_fail(cv, kw_rc_of(st), "an AppendMany sent while the writer went on failed (%s): %.300s; "
                     "this conversation no longer matches kvarcd: attach it again", kvc_status_name(st), why);
    } else {
        Kvarc__V1__AppendManyReply *am = (Kvarc__V1__AppendManyReply *)rep;
        rc = many_answers(cv, am, cv->inflight_n);
        for (size_t i = 0; !rc && i < cv->inflight_n; i++)
            rc = many_refused(cv, am, i, cv->inflight_layer[i]);
        protobuf_c_message_free_unpacked(rep, NULL);
    }
    if (count_time)
        cv->st.ns_archive += (uint64_t)(kl_now_ns() - t0);
    if (rc) {
        cv->broken = rc;
        snprintf(cv->broken_msg, sizeof cv->broken_msg, "%s", cv->err);
    }
    return rc;
}

int kl_drain(kvarc_conv *cv)
{
    return drain(cv, 1);
}

int kl_flush(kvarc_conv *cv, uint32_t layer)
{
    kl_layer *y = &cv->layers[layer];
    int rc = kl_drain(cv);                /* one call at a time on the conversation's layers */
    while (!rc && y->archived < y->len) {
        int held = y->archived < y->inherited;
        uint64_t end = held && y->inherited < y->len ? y->inherited : y->len;
        rc = flush_range(cv, layer, (uint32_t)(end - y->archived), held);
    }
    return rc;
}

const double *kl_block_angles(kvarc_conv *cv, uint64_t nb)
{
    if (nb > cv->bcs_n) {                 /* tiled: grown by tiles, those there kept */
        uint64_t cap = cv->bcs_n ? cv->bcs_n : 256;
        while (cap < nb)
            cap *= 2;
        double *t = realloc(cv->bcs, kvg_block_angles_tm_len(&cv->rope, cap) * sizeof *t + 1);
        if (!t)
            return NULL;
        kvg_block_angles_tm(&cv->rope, cv->bcs_n / KVG_BIAS_TILE, (cap - cv->bcs_n) / KVG_BIAS_TILE, t);
        cv->bcs = t;
        cv->bcs_n = cap;
    }
    return cv->bcs;
}

void kl_ring_put(kvarc_conv *cv, kl_layer *y, size_t h, uint64_t p, const float *k, const float *v, const double *cs)
{
    size_t d = cv->m.head_dim, slot = (h * cv->ring + p % cv->ring) * d;
    memcpy(y->ring_k + slot, k, d * 4);
    memcpy(y->ring_v + slot, v, d * 4);
    memcpy(y->ring_kr + slot, k, d * 4);
    if (cs)
        kvg_rope_turn(y->ring_kr + slot, (int)d, cv->rope.rotary_dims, cv->rope.layout, cs);
    else
        kvg_rope_apply(y->ring_kr + slot, (int)d, cv->rope.rotary_dims, cv->rope.layout, cv->rope.inv_freq,
                       (double)p);
    if (p < cv->o.sinks) {
        memcpy(y->sink_k + (h * cv->o.sinks + p) * d, k, d * 4);
        memcpy(y->sink_v + (h * cv->o.sinks + p) * d, v, d * 4);
    }
}

/* Position p's kvg_rope_angles, from the conversation's slots of recent
 * positions (computed there when p is not in its slot; the same bits
 * either way). */
static const double *angles_of(kvarc_conv *cv, uint64_t p)
{
    const size_t d = cv->m.head_dim, slot = (size_t)(p % KL_ANG_SLOTS);
    double *cs = cv->ang + slot * d;
    if (cv->ang_pos[slot] != p) {
        kvg_rope_angles(cs, (int)d, cv->rope.rotary_dims, cv->rope.inv_freq, (double)p);
        cv->ang_pos[slot] = p;
    }
    return cs;
}

/* The first token of k or v ([H][n][d] of dtype) with a NaN, an Inf or a magnitude of 2^59 or
 * more in some head (*head: the lowest such head), or -1. 2^59: the encoder sums head_dim (<= 256)
 * squares in fp32, which such a value overflows (then every later sync would fail on the token).
 * On the exponent bits, so the loops vectorize; an fp16 value can only be NaN or Inf here. */
static int64_t first_nonfinite(int dtype, const void *k, const void *v, size_t H, uint32_t n, size_t d,
                               size_t *head)
{
    int64_t first = -1;
    for (size_t h = 0; h < H; h++)
        for (uint32_t t = 0; t < n && (first < 0 || t < (uint64_t)first); t++) {
            const size_t at = (h * n + t) * d;
            int bad = 0;
            if (dtype == KVARC_DTYPE_F32) {
                const uint32_t lim = (127u + 59u) << 23, *a = (const uint32_t *)k + at, *b = (const uint32_t *)v + at;
                for (size_t i = 0; i < d; i++)
                    bad |= ((a[i] & 0x7f800000u) >= lim) | ((b[i] & 0x7f800000u) >= lim);
            } else {
                const uint16_t m = dtype == KVARC_DTYPE_F16 ? 0x7c00 : 0x7f80;
                const uint16_t lim = dtype == KVARC_DTYPE_F16 ? 0x7c00 : (127u + 59u) << 7;
                const uint16_t *a = (const uint16_t *)k + at, *b = (const uint16_t *)v + at;
                for (size_t i = 0; i < d; i++)
                    bad |= ((a[i] & m) >= lim) | ((b[i] & m) >= lim);
            }
            if (bad) {
                first = t, *head = h;
                break;
            }
        }
    return first;
}

int kvarc_append(kvarc_conv *cv, uint32_t layer, int dtype, const void *k, const void *v, uint32_t n)
{
    if (layer >= cv->m.n_layers || !k || !v)
        return kl_fail(cv, -EINVAL, "append to layer %u of %u (k and v must be given)", layer, cv->m.n_layers);
    if (!kvarc_dtype_size((kvarc_dtype)dtype))
        return kl_fail(cv, KVARC_EDTYPE, "append: dtype %d is not f16, bf16 or f32", dtype);
    kl_layer *y = &cv->layers[layer];
    size_t H = cv->m.n_kv_heads, d = cv->m.head_dim;
    /* every value checked before any token is kept: a NaN or Inf refuses the whole call */
    size_t bad_h;
    int64_t bad = first_nonfinite(dtype, k, v, H, n, d, &bad_h);
    if (bad >= 0)
        return kl_fail(cv, KVARC_ENONFINITE, "append to layer %u: token %lld of %u (position %llu) head %zu has a "
                       "NaN, an Inf or a value of 2^59 or more in k or v; nothing was appended", layer, (long long)bad, n,
                       (unsigned long long)(y->len + (uint64_t)bad), bad_h);
    float *tok_k = malloc(2 * H * d * sizeof *tok_k), *tok_v = tok_k + H * d;
    if (!tok_k)
        return kl_fail(cv, -ENOMEM, "out of memory");
    /* append_together, but not while the layer has re-fed tokens to check (after an attach): those
     * send nothing, and a wrong transcript is refused at once */
    const int together = cv->o.append_together && cv->m.n_layers > 1 && y->len >= y->inherited;
    for (uint32_t t = 0; t < n; t++) {
        uint64_t p = y->len;
        /* a full ring must archive first (invariant 2); a full batch too, unless the layers' batches go
         * together (then the last layer sends them, below) */
        if (p - y->archived >= cv->ring || (!together && p - y->archived >= cv->o.batch)) {
            int rc = kl_flush(cv, layer);
            if (rc) {
                free(tok_k);
                return rc;
            }
        }
        for (size_t h = 0; h < H; h++) {
            size_t src = (h * n + t) * d;
            if (dtype == KVARC_DTYPE_F32) {
                memcpy(tok_k + h * d, (const float *)k + src, d * sizeof *tok_k);
                memcpy(tok_v + h * d, (const float *)v + src, d * sizeof *tok_v);
            } else {
                for (size_t i = 0; i < d; i++) {
                    tok_k[h * d + i] = kvarc_load_f32((kvarc_dtype)dtype, k, src + i);
                    tok_v[h * d + i] = kvarc_load_f32((kvarc_dtype)dtype, v, src + i);
                }
            }
        }
        const double *cs = angles_of(cv, p);     /* position p's RoPE angles, once for every head and layer */
        for (size_t h = 0; h < H; h++)
            kl_ring_put(cv, y, h, p, tok_k + h * d, tok_v + h * d, cs);
        y->len = p + 1;
    }
    free(tok_k);
    if (y->len - y->archived < cv->o.batch)
        return 0;
    if (together)                         /* the last layer's batch sends every layer's */
        return layer + 1 == cv->m.n_layers ? kl_flush_all(cv) : 0;
    return kl_flush(cv, layer);
}

int kvarc_conv_sync(kvarc_conv *cv)
{
    if (cv->o.append_together && cv->m.n_layers > 1) {
        int rc = kl_flush_all(cv);
        return rc ? rc : kl_drain(cv);
    }
    for (uint32_t l = 0; l < cv->m.n_layers; l++) {
        int rc = kl_flush(cv, l);
        if (rc)
            return rc;
    }
    return 0;
}

int kvarc_conv_close(kvarc_conv *cv)
{
    if (!cv)
        return 0;
    int rc = kvarc_conv_sync(cv);
    if (rc && cv->cl)
        snprintf(cv->cl->err, sizeof cv->cl->err, "%s", cv->err);
    conv_free(cv);
    return rc;
}

uint64_t kvarc_length(const kvarc_conv *cv, uint32_t layer)
{
    return layer < cv->m.n_layers ? cv->layers[layer].len : 0;
}

void kvarc_conv_options(const kvarc_conv *cv, kvarc_options *out)
{
    *out = cv->o;
}

void kvarc_conv_stats(const kvarc_conv *cv, kvarc_stats *out)
{
    *out = cv->st;
}

int kvarc_uses_gpu(const kvarc_conv *cv)
{
    return cv && cv->gpu != NULL;
}

size_t kvarc_last_retrieved(const kvarc_conv *cv, uint32_t head, uint64_t *pos, size_t max)
{
    if (head >= cv->m.n_kv_heads)
        return 0;
    size_t n = cv->last_n < max ? cv->last_n : max;
    if (n)                                /* pos may be NULL with max 0: how many there are */
        memcpy(pos, cv->last_ret + (size_t)head * cv->o.top_k, n * sizeof *pos);
    return cv->last_n;
}

/* ---- fork, snapshot, restore ---------------------------------------------- */

static int fork_rpc(kvc_conn *conn, const char *method, const char *sns, const char *sname, const char *dns,
                    const char *dname, uint64_t at, int has_at, char *err, size_t errlen)
{
    Kvarc__V1__ForkRequest r = KVARC__V1__FORK_REQUEST__INIT;
    r.src_ns = (char *)sns;
    r.src_name = (char *)sname;
    r.dst_ns = (char *)dns;
    r.dst_name = (char *)dname;
    r.has_at_len = has_at;
    r.at_len = at;
    ProtobufCMessage *rep = NULL;
    int st = kvc_call(conn, method, &r.base, &kvarc__v1__conv_reply__descriptor, &rep, 0, err, errlen);
    if (!st)
        protobuf_c_message_free_unpacked(rep, NULL);
    return kw_rc_of(st);
}

int kvarc_fork(kvarc_conv *cv, const char *dst_ns, const char *dst_name, int snapshot)
{
    int rc = kvarc_conv_sync(cv);
    if (rc)
        return rc;
    for (uint32_t l = 1; l < cv->m.n_layers; l++)
        if (cv->layers[l].len != cv->layers[0].len)
            return kl_fail(cv, -EINVAL, "fork needs every layer at the same length (layer 0: %llu, layer %u: %llu)",
                           (unsigned long long)cv->layers[0].len, l, (unsigned long long)cv->layers[l].len);
    return fork_rpc(cv->cl->conn, snapshot ? "Snapshot" : "Fork", cv->ns, cv->name, dst_ns, dst_name,
                    cv->layers[0].len, 1, cv->err, sizeof cv->err);
}

int kvarc_restore(kvarc_client *c, const char *snap_ns, const char *snap_name, const char *dst_ns,
                  const char *dst_name)
{
    return fork_rpc(c->conn, "Restore", snap_ns, snap_name, dst_ns, dst_name, 0, 0, c->err, sizeof c->err);
}
