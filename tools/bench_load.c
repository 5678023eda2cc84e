/* bench-load - N client processes x M conversations for T seconds against
 * one kvarcd: what workers and admins do, all at once, every answer checked.
 *
 *   bench-load [--kvarcd PATH | --data DIR] [--clients N] [--convs M] [--seconds T]
 *              [--max-tokens K] [--admin-period S] [--seed X] [--keep] [--quiet]
 *
 * Design notes
 *
 * Processes. The parent forks the N clients and one admin before it makes
 * any gRPC channel (gRPC must not cross a fork); they wait on a pipe. Then
 * it starts kvarcd on a temporary directory (kd_spawn; or uses the one
 * serving --data DIR, found through its socket in /proc/net/unix), writes
 * the go bytes, and samples kvarcd's /proc/PID/status (VmRSS, Threads) and
 * /proc/PID/fd once a second until every child has exited. At the end it
 * runs one Verify of its own (0 problems), prints the table and one JSON
 * line, stops the kvarcd it started (exit 0 expected) and removes its
 * directory.
 *
 * Results. Each process writes its counters into its own slot of one
 * MAP_SHARED region (no locks: one writer per slot; the parent's progress
 * lines read them racily, the final table after the writers exited): per
 * method, calls by gRPC status, calls that ended as a test provoked them
 * ("expected"), unexpected ones, wrong answers, and a latency histogram
 * of the unprovoked calls (8 buckets per octave from 1 us: p50/p99 are
 * the upper edge of their bucket, within 9%; max is exact).
 *
 * Content. Every token's record and signature is a pure function of
 * (seed, layer, head, position), load_byte below, with the norms and
 * signature scales made finite so that kvarcd scores them as numbers. A
 * conversation is a list of segments [start, end) -> seed: a created one
 * has one; a fork, snapshot or restore at L takes its source's segments
 * clipped at L and adds its own seed from L. So every record a Fetch,
 * RerankLayer or LoadSignatures returns is checked byte for byte against
 * what was written, through any chain of forks, and a Search's answer is
 * checked against the same scan done here (kvg_score_ref + kvg_topk_ref
 * over the regenerated signatures: positions and scores equal).
 *
 * One client owns its conversations (namespace bl<run>-<client>): nobody
 * else appends to them, so it knows each one's length at all times and
 * can state exactly what every call must answer. The mix (weights in
 * load_ops): appends (Append per layer, AppendMany, AppendStream), Fetch,
 * RerankLayer (two items for one head now and then, `have` lists: what is
 * sent and what is not is checked), Search, LoadSignatures, Stat, Open,
 * List, Fork / Snapshot / Restore into a bounded pool of derived
 * conversations, Delete of derived ones, and a main conversation deleted
 * and created again under its name when it reaches --max-tokens (so the
 * disk stays bounded; derived conversations outlive the deleted parent
 * they share records with). Provoked errors (Fetch past the end, Append
 * to a snapshot or at a wrong position, Restore of a non-snapshot, Create
 * of a name taken, Open with another shape, Stat of a deleted id, Fork
 * past the end) count apart as expected. The admin runs Verify and Compact
 * in turn every --admin-period seconds, and Stats, Health, Metrics and a
 * List of every namespace in between. After T each client reads back the
 * newest and some random records of every layer and head of every
 * conversation it holds (the sweep).
 *
 * Bounds. Calls time out after 120 s (an unexpected DEADLINE_EXCEEDED);
 * the parent kills what still runs 1.5 T + 300 s after the start. A
 * conversation holds at most --max-tokens tokens x 4 layers x 2 KV heads;
 * each client at most M/N + max(2, M/N/4) conversations. Loopback only:
 * kvarcd's unix socket.
 *
 * Exit 0 only when no call ended unexpectedly, no answer was wrong, Verify
 * found nothing, and the kvarcd we started exited cleanly.
 */
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "daemon.h"
#include "kvarc_rpc.h"
#include "kvarc_schema.h"
#include "kvg.h"

/* ---- the shape every conversation has (tests/kvarcd_util.h shape_pb) ---- */
#define LAYERS   4
#define HEADS    2
#define QPERKV   4                  /* n_q_heads 8: a GQA group of 4 */
#define D        128
#define RB       104                /* q3 record bytes at head_dim 128 */
#define SB       (D / 8)            /* signature bits */
#define SHAPE_SEED 42
#define CALL_MS  120000

/* ---- methods and what is counted of them ---- */
enum {
    M_CREATE, M_OPEN, M_STAT, M_LIST, M_DELETE, M_FORK, M_SNAPSHOT, M_RESTORE, M_APPEND, M_APPEND_MANY,
    M_APPEND_STREAM, M_FETCH, M_LOAD_SIGS, M_RERANK_LAYER, M_SEARCH, M_STATS, M_HEALTH, M_METRICS, M_VERIFY,
    M_COMPACT, M_N
};
static const char *const mname[M_N] = {
    "Create", "Open", "Stat", "List", "Delete", "Fork", "Snapshot", "Restore", "Append", "AppendMany",
    "AppendStream", "Fetch", "LoadSignatures", "RerankLayer", "Search", "Stats", "Health", "Metrics", "Verify",
    "Compact"
};

#define NSTATUS 17
#define NBUCK   224                 /* 8 per octave from 1 us: up to ~2^28 us */
#define NERR    4

typedef struct mstat {
    uint64_t st[NSTATUS];           /* calls by gRPC status */
    uint64_t expected;              /* ended with the status a provoked call must get */
    uint64_t unexpected;            /* ended otherwise */
    uint64_t wrong;                 /* OK, but the answer was not what was written */
    uint64_t max_ns, sum_ns, timed; /* over unprovoked calls */
    uint32_t hist[NBUCK];
} mstat;

typedef struct pstat {              /* one process's slot in the shared region */
    mstat    m[M_N];
    uint64_t records_checked;       /* records compared byte for byte */
    uint64_t tokens_appended;
    uint64_t verify_problems;
    uint64_t recycled;              /* main conversations deleted at --max-tokens and created again */
    int      started, done;
    int      nerr;
    char     err[NERR][256];        /* the first unexpected errors and wrong answers */
} pstat;

static pstat *S;                    /* [clients + 1]: the admin is the last */
static pstat *me;
static volatile int *stop_all;      /* shared: the parent saw kvarcd die */
static int err_run;                 /* this process's unexpected errors in a row */

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static void note_err(const char *fmt, ...)
{
    if (me->nerr >= NERR) {
        me->nerr++;
        return;
    }
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(me->err[me->nerr++], sizeof me->err[0], fmt, ap);
    va_end(ap);
}

/* Count a call of method m that ended with status st after dt seconds;
 * expect is what it had to end with. 1 when st was what was expected. */
static int count_call(int m, int st, int expect, double dt, const char *what, const char *msg)
{
    mstat *x = &me->m[m];
    x->st[st >= 0 && st < NSTATUS ? st : GRPC_STATUS_UNKNOWN]++;
    if (st != expect) {
        x->unexpected++;
        err_run++;
        note_err("%s %s: %s (expected %s): %s", mname[m], what, kvc_status_name(st), kvc_status_name(expect), msg);
        return 0;
    }
    err_run = 0;
    if (expect) {
        x->expected++;
        return 1;
    }
    uint64_t ns = (uint64_t)(dt * 1e9);
    x->timed++;
    x->sum_ns += ns;
    if (ns > x->max_ns)
        x->max_ns = ns;
    int b = ns <= 1000 ? 0 : (int)(8.0 * log2((double)ns / 1000.0));
    x->hist[b < NBUCK ? b : NBUCK - 1]++;
    return 1;
}

static void wrong(int m, const char *fmt, ...)
{
    char buf[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    me->m[m].wrong++;
    note_err("WRONG %s: %s", mname[m], buf);
}

/* ---- content ---- */
static uint64_t rng_next(uint64_t *s)
{
    return kvarc_splitmix64(s);
}

static uint64_t rnd(uint64_t *s, uint64_t n)         /* 0..n-1 */
{
    return n ? rng_next(s) % n : 0;
}

static uint64_t mix(uint64_t seed, uint32_t layer, uint32_t head, uint64_t pos, uint32_t b)
{
    uint64_t s = seed * 0x9e3779b97f4a7c15ull ^ ((uint64_t)layer << 56) ^ ((uint64_t)head << 48) ^ (pos << 12) ^ b;
    return kvarc_splitmix64(&s);
}

/* Byte b of the record of (seed, layer, head, pos); the K and V norms
 * (bytes 0..3 and 52..55, fp32) are finite numbers in [0.5, 1.5). */
static uint8_t rec_byte(uint64_t seed, uint32_t layer, uint32_t head, uint64_t pos, int b)
{
    if (b < 4 || (b >= 52 && b < 56)) {
        int half = b >= 52;
        float f = 0.5f + (float)(mix(seed, layer, head, pos, 5000 + (uint32_t)half) >> 40) / (float)(1 << 24);
        uint8_t u[4];
        memcpy(u, &f, 4);
        return u[b - (half ? 52 : 0)];
    }
    return (uint8_t)(mix(seed, layer, head, pos, (uint32_t)b) >> 56);
}

static uint8_t sig_byte(uint64_t seed, uint32_t layer, uint32_t head, uint64_t pos, int b)
{
    return (uint8_t)(mix(seed, layer, head, pos, 1000 + (uint32_t)b) >> 56);
}

static uint16_t sig_scale(uint64_t seed, uint32_t layer, uint32_t head, uint64_t pos)
{
    return kvarc_f32_to_f16(0.5f + (float)(mix(seed, layer, head, pos, 2000) >> 44) / (float)(1 << 20));
}

/* ---- a client's conversations ---- */
#define MAXSEG 12

typedef struct lconv {
    char     name[48];
    uint64_t id, len, parent, fork_len;
    int      live, snap, main;
    int      nseg;
    uint64_t seg_end[MAXSEG], seg_seed[MAXSEG];   /* [prev end, end) -> seed; the last ends at UINT64_MAX */
} lconv;

static uint64_t seed_at(const lconv *c, uint64_t pos)
{
    for (int i = 0; i < c->nseg; i++)
        if (pos < c->seg_end[i])
            return c->seg_seed[i];
    return 0;
}

typedef struct client {
    int       idx;
    kvc_conn *k;
    char      ns[48];
    uint64_t  rng;
    lconv    *cv;
    int       n_main, n_cv;           /* cv[0..n_main) main, then derived slots */
    uint64_t  max_tokens;
    uint64_t  next_name;
    uint64_t  dead[16];               /* ids deleted lately */
    int       n_dead;
    char      msg[512];
} client;

static Kvarc__V1__Shape shape_pb(uint32_t head_dim)
{
    Kvarc__V1__Shape s = KVARC__V1__SHAPE__INIT;
    s.n_layers = LAYERS;
    s.n_kv_heads = HEADS;
    s.n_q_heads = HEADS * QPERKV;
    s.head_dim = head_dim;
    s.format = KVARC_FMT_Q3;
    s.pos_mode = KVARC_POS_REMAPPED;
    s.dtype = KVARC_DTYPE_F16;
    s.rope_theta = 10000.0f;
    s.seed = SHAPE_SEED;
    s.fingerprint = "bench-load";
    return s;
}

/* A call through kvc_call, counted; *rep (when given) is the reply on OK. */
static int rpc(client *c, int m, const ProtobufCMessage *req, const ProtobufCMessageDescriptor *rd,
               ProtobufCMessage **rep, int expect, const char *what)
{
    ProtobufCMessage *r = NULL;
    double t0 = now_s();
    int st = kvc_call(c->k, mname[m], req, rd, &r, CALL_MS, c->msg, sizeof c->msg);
    count_call(m, st, expect, now_s() - t0, what, c->msg);
    if (rep && st == 0)
        *rep = r;
    else if (r)
        protobuf_c_message_free_unpacked(r, NULL);
    return st;
}

/* Check a ConvInfo against what the client holds. */
static void check_info(int m, const lconv *cv, const Kvarc__V1__ConvInfo *in)
{
    if (!in) {
        wrong(m, "%s: no info", cv->name);
        return;
    }
    int ok = in->id == cv->id && in->length == cv->len && in->n_layer_lengths == LAYERS &&
             in->parent == cv->parent && in->fork_len == cv->fork_len && (in->flags & 1) == (uint32_t)cv->snap;
    for (size_t l = 0; ok && l < in->n_layer_lengths; l++)
        ok = in->layer_lengths[l] == cv->len;
    if (!ok)
        wrong(m, "%s: id %" PRIu64 "/%" PRIu64 " length %" PRIu64 "/%" PRIu64 " parent %" PRIu64 "/%" PRIu64
              " fork_len %" PRIu64 "/%" PRIu64 " flags %u/%d (got/held)", cv->name, in->id, cv->id, in->length,
              cv->len, in->parent, cv->parent, in->fork_len, cv->fork_len, in->flags, cv->snap);
}

static int conv_create(client *c, lconv *cv)
{
    Kvarc__V1__CreateRequest r = KVARC__V1__CREATE_REQUEST__INIT;
    Kvarc__V1__Shape s = shape_pb(D);
    r.ns = c->ns;
    r.name = cv->name;
    r.shape = &s;
    ProtobufCMessage *rep = NULL;
    int st = rpc(c, M_CREATE, &r.base, &kvarc__v1__conv_reply__descriptor, &rep, 0, cv->name);
    if (st)
        return st;
    Kvarc__V1__ConvReply *cr = (Kvarc__V1__ConvReply *)rep;
    cv->id = cr->info ? cr->info->id : 0;
    cv->len = cv->parent = cv->fork_len = 0;
    cv->snap = 0;
    cv->live = 1;
    cv->nseg = 1;
    cv->seg_end[0] = UINT64_MAX;
    cv->seg_seed[0] = rng_next(&c->rng) | 1;
    check_info(M_CREATE, cv, cr->info);
    protobuf_c_message_free_unpacked(rep, NULL);
    return 0;
}

static void remember_dead(client *c, uint64_t id)
{
    c->dead[c->n_dead++ % 16] = id;
}

static int conv_delete(client *c, lconv *cv)
{
    Kvarc__V1__DeleteRequest r = KVARC__V1__DELETE_REQUEST__INIT;
    r.ns = c->ns;
    r.name = cv->name;
    int st = rpc(c, M_DELETE, &r.base, &kvarc__v1__empty__descriptor, NULL, 0, cv->name);
    if (!st) {
        cv->live = 0;
        remember_dead(c, cv->id);
    }
    return st;
}

/* A main conversation deleted and created again with a new seed (also how a
 * conversation whose state is in doubt after an unexpected error is reset). */
static void conv_recycle(client *c, lconv *cv)
{
    if (cv->live)
        conv_delete(c, cv);
    if (!cv->live && cv->main && !conv_create(c, cv))
        me->recycled++;
    if (cv->live && !cv->main)   /* a derived one in doubt: drop it */
        conv_delete(c, cv);
}

/* Fill [HEADS][count] signatures, scales and records of layer l at first. */
static void fill(const lconv *cv, uint32_t l, uint64_t first, uint32_t count, uint8_t *bits, uint16_t *sc,
                 uint8_t *recs)
{
    for (uint32_t h = 0; h < HEADS; h++)
        for (uint32_t t = 0; t < count; t++) {
            uint64_t p = first + t, seed = seed_at(cv, p);
            size_t i = (size_t)h * count + t;
            for (int b = 0; b < RB; b++)
                recs[i * RB + b] = rec_byte(seed, l, h, p, b);
            for (int b = 0; b < SB; b++)
                bits[i * SB + b] = sig_byte(seed, l, h, p, b);
            sc[i] = sig_scale(seed, l, h, p);
        }
}

typedef struct block {
    Kvarc__V1__AppendRequest r;
    uint8_t  bits[HEADS * 64 * SB];
    uint16_t sc[HEADS * 64];
    uint8_t  recs[HEADS * 64 * RB];
} block;

static void block_make(block *b, const lconv *cv, uint32_t l, uint64_t first, uint32_t count)
{
    Kvarc__V1__AppendRequest r = KVARC__V1__APPEND_REQUEST__INIT;
    fill(cv, l, first, count, b->bits, b->sc, b->recs);
    r.conv = cv->id;
    r.layer = l;
    r.first_pos = first;
    r.count = count;
    r.sig_bits.data = b->bits;
    r.sig_bits.len = (size_t)HEADS * count * SB;
    r.sig_scale.data = (uint8_t *)b->sc;
    r.sig_scale.len = (size_t)HEADS * count * 2;
    r.records.data = b->recs;
    r.records.len = (size_t)HEADS * count * RB;
    b->r = r;
}

/* ---- the operations ---- */

/* count tokens appended to every layer, three ways: 0 Append per layer,
 * 1 AppendMany (each layer in two blocks), 2 AppendStream (the same). */
static void op_append(client *c, lconv *cv, uint32_t count, int how)
{
    static block blk[2 * LAYERS];
    char what[96];
    snprintf(what, sizeof what, "%s at %" PRIu64 " +%u", cv->name, cv->len, count);
    uint32_t split = how && count > 1 ? 1 + (uint32_t)rnd(&c->rng, count - 1) : count;
    int nb = 0;
    for (uint32_t l = 0; l < LAYERS; l++) {
        block_make(&blk[nb++], cv, l, cv->len, split);
        if (split < count)
            block_make(&blk[nb++], cv, l, cv->len + split, count - split);
    }
    uint64_t want = cv->len + count;
    int ok = 1;
    if (how == 0) {
        for (int i = 0; i < nb && ok; i++) {
            ProtobufCMessage *rep = NULL;
            ok = !rpc(c, M_APPEND, &blk[i].r.base, &kvarc__v1__append_reply__descriptor, &rep, 0, what);
            if (ok && ((Kvarc__V1__AppendReply *)rep)->length != want)
                wrong(M_APPEND, "%s: length %" PRIu64 ", expected %" PRIu64, what,
                      ((Kvarc__V1__AppendReply *)rep)->length, want);
            if (rep)
                protobuf_c_message_free_unpacked(rep, NULL);
        }
    } else if (how == 1) {
        Kvarc__V1__AppendManyRequest r = KVARC__V1__APPEND_MANY_REQUEST__INIT;
        Kvarc__V1__AppendRequest *bp[2 * LAYERS];
        for (int i = 0; i < nb; i++)
            bp[i] = &blk[i].r;
        r.conv = cv->id;
        r.n_blocks = (size_t)nb;
        r.blocks = bp;
        ProtobufCMessage *rep = NULL;
        ok = !rpc(c, M_APPEND_MANY, &r.base, &kvarc__v1__append_many_reply__descriptor, &rep, 0, what);
        if (ok) {
            Kvarc__V1__AppendManyReply *am = (Kvarc__V1__AppendManyReply *)rep;
            if (am->n_results != (size_t)nb) {
                wrong(M_APPEND_MANY, "%s: %zu results for %d blocks", what, am->n_results, nb);
                ok = 0;
            }
            for (size_t i = 0; ok && i < am->n_results; i++)
                if (am->results[i]->status || am->results[i]->length != want) {
                    wrong(M_APPEND_MANY, "%s: block %zu status %u length %" PRIu64 " (%s)", what, i,
                          am->results[i]->status, am->results[i]->length, am->results[i]->message);
                    ok = 0;
                }
            protobuf_c_message_free_unpacked(rep, NULL);
        }
    } else {
        kvc_stream *s = NULL;
        double t0 = now_s();
        int st = kvc_stream_open(c->k, "AppendStream", CALL_MS, &s);
        for (int i = 0; !st && i < nb; i++)
            if (kvc_stream_send(s, &blk[i].r.base))
                break;
        ProtobufCMessage *rep = NULL;
        if (!st)
            st = kvc_stream_finish(s, &kvarc__v1__append_reply__descriptor, &rep, c->msg, sizeof c->msg);
        else
            snprintf(c->msg, sizeof c->msg, "could not open the stream");
        ok = count_call(M_APPEND_STREAM, st, 0, now_s() - t0, what, c->msg) && !st;
        if (ok) {
            Kvarc__V1__AppendReply *ar = (Kvarc__V1__AppendReply *)rep;
            if (ar->length != want || ar->blocks != (uint64_t)nb) {
                wrong(M_APPEND_STREAM, "%s: length %" PRIu64 " blocks %" PRIu64 ", expected %" PRIu64 " and %d",
                      what, ar->length, ar->blocks, want, nb);
                ok = 0;
            }
        }
        if (rep)
            protobuf_c_message_free_unpacked(rep, NULL);
    }
    if (ok) {
        cv->len = want;
        me->tokens_appended += count;
    } else {
        conv_recycle(c, cv);
    }
}

/* Fetch n positions of (layer, head) and check them. */
static void op_fetch(client *c, lconv *cv, uint32_t l, uint32_t h, const uint64_t *pos, size_t n)
{
    Kvarc__V1__FetchRequest r = KVARC__V1__FETCH_REQUEST__INIT;
    r.conv = cv->id;
    r.layer = l;
    r.head = h;
    r.positions = (uint64_t *)pos;
    r.n_positions = n;
    char what[96];
    snprintf(what, sizeof what, "%s layer %u head %u, %zu positions", cv->name, l, h, n);
    ProtobufCMessage *rep = NULL;
    if (rpc(c, M_FETCH, &r.base, &kvarc__v1__fetch_reply__descriptor, &rep, 0, what))
        return;
    Kvarc__V1__FetchReply *f = (Kvarc__V1__FetchReply *)rep;
    if (f->record_bytes != RB || f->records.len != n * RB) {
        wrong(M_FETCH, "%s: %zu bytes of %u-byte records", what, f->records.len, f->record_bytes);
    } else {
        for (size_t i = 0; i < n; i++) {
            uint64_t seed = seed_at(cv, pos[i]);
            for (int b = 0; b < RB; b++)
                if (f->records.data[i * RB + b] != rec_byte(seed, l, h, pos[i], b)) {
                    wrong(M_FETCH, "%s: position %" PRIu64 " byte %d differs", what, pos[i], b);
                    i = n;
                    break;
                }
        }
        me->records_checked += n;
    }
    protobuf_c_message_free_unpacked(rep, NULL);
}

static void op_fetch_random(client *c, lconv *cv)
{
    uint64_t pos[64];
    size_t n = 1 + rnd(&c->rng, 64);
    for (size_t i = 0; i < n; i++)
        pos[i] = i == 0 ? cv->len - 1 : rnd(&c->rng, cv->len);
    op_fetch(c, cv, (uint32_t)rnd(&c->rng, LAYERS), (uint32_t)rnd(&c->rng, HEADS), pos, n);
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* n distinct positions below len, shuffled; returns how many (<= n). */
static size_t distinct_positions(client *c, uint64_t len, uint64_t *out, size_t n)
{
    for (size_t i = 0; i < n; i++)
        out[i] = rnd(&c->rng, len);
    qsort(out, n, 8, cmp_u64);
    size_t m = 0;
    for (size_t i = 0; i < n; i++)
        if (!m || out[m - 1] != out[i])
            out[m++] = out[i];
    for (size_t i = m; i > 1; i--) {
        size_t j = rnd(&c->rng, i);
        uint64_t t = out[i - 1];
        out[i - 1] = out[j];
        out[j] = t;
    }
    return m;
}

static float rnd_unit(client *c)
{
    return (float)((int64_t)rnd(&c->rng, 2000001) - 1000000) / 1000000.0f;
}

#define RL_MAX_ITEMS (HEADS + 1)
#define RL_MAX_SL    96

static void op_rerank_layer(client *c, lconv *cv)
{
    Kvarc__V1__RerankItem it[RL_MAX_ITEMS], *ip[RL_MAX_ITEMS];
    static uint64_t sl[RL_MAX_ITEMS][RL_MAX_SL], have[RL_MAX_ITEMS][RL_MAX_SL];
    static float q[RL_MAX_ITEMS][QPERKV * D];
    size_t ni = HEADS + (rnd(&c->rng, 3) == 0);
    uint32_t l = (uint32_t)rnd(&c->rng, LAYERS);
    for (size_t i = 0; i < ni; i++) {
        Kvarc__V1__RerankItem x = KVARC__V1__RERANK_ITEM__INIT;
        x.head = i < HEADS ? (uint32_t)i : (uint32_t)rnd(&c->rng, HEADS);
        x.n_queries = QPERKV;
        for (int j = 0; j < QPERKV * D; j++)
            q[i][j] = rnd_unit(c);
        x.query = q[i];
        x.n_query = QPERKV * D;
        size_t want = 1 + rnd(&c->rng, cv->len < RL_MAX_SL ? cv->len : RL_MAX_SL);
        x.n_shortlist = distinct_positions(c, cv->len, sl[i], want);
        x.shortlist = sl[i];
        x.top_k = 1 + (uint32_t)rnd(&c->rng, x.n_shortlist);
        size_t nh = 0;
        for (size_t j = 0; j < x.n_shortlist; j++)
            if (rnd(&c->rng, 4) == 0)
                have[i][nh++] = sl[i][j];
        qsort(have[i], nh, 8, cmp_u64);
        x.have = have[i];
        x.n_have = nh;
        it[i] = x;
        ip[i] = &it[i];
    }
    Kvarc__V1__RerankLayerRequest r = KVARC__V1__RERANK_LAYER_REQUEST__INIT;
    r.conv = cv->id;
    r.layer = l;
    r.items = ip;
    r.n_items = ni;
    char what[96];
    snprintf(what, sizeof what, "%s layer %u, %zu items", cv->name, l, ni);
    ProtobufCMessage *rep = NULL;
    if (rpc(c, M_RERANK_LAYER, &r.base, &kvarc__v1__rerank_layer_reply__descriptor, &rep, 0, what))
        return;
    Kvarc__V1__RerankLayerReply *rl = (Kvarc__V1__RerankLayerReply *)rep;
    uint64_t sent_key[RL_MAX_ITEMS * RL_MAX_SL];
    size_t n_sent = 0;
    if (rl->record_bytes != RB || rl->n_results != ni) {
        wrong(M_RERANK_LAYER, "%s: %zu results of %u-byte records", what, rl->n_results, rl->record_bytes);
        goto out;
    }
    for (size_t i = 0; i < ni; i++) {
        Kvarc__V1__RerankResult *res = rl->results[i];
        size_t k = it[i].top_k < it[i].n_shortlist ? it[i].top_k : it[i].n_shortlist;
        if (res->n_positions != k || res->n_scores != k || res->n_sent != k) {
            wrong(M_RERANK_LAYER, "%s item %zu: %zu positions, %zu scores, %zu sent for top_k %zu", what, i,
                  res->n_positions, res->n_scores, res->n_sent, k);
            goto out;
        }
        size_t off = 0;
        for (size_t j = 0; j < k; j++) {
            uint64_t p = res->positions[j];
            int in_sl = 0;
            for (size_t s = 0; s < it[i].n_shortlist && !in_sl; s++)
                in_sl = sl[i][s] == p;
            for (size_t s = 0; s < j && in_sl; s++)
                in_sl = res->positions[s] != p;
            if (!in_sl || (j && !(res->scores[j] <= res->scores[j - 1]))) {
                wrong(M_RERANK_LAYER, "%s item %zu: position %" PRIu64 " (rank %zu) is not a distinct shortlisted "
                      "one in score order", what, i, p, j);
                goto out;
            }
            uint64_t key = (uint64_t)it[i].head << 48 | p;
            int dup = bsearch(&p, have[i], it[i].n_have, 8, cmp_u64) != NULL;
            for (size_t s = 0; s < n_sent && !dup; s++)
                dup = sent_key[s] == key;
            if (res->sent[j] != !dup) {
                wrong(M_RERANK_LAYER, "%s item %zu: position %" PRIu64 " sent=%d, expected %d", what, i, p,
                      res->sent[j], !dup);
                goto out;
            }
            if (!res->sent[j])
                continue;
            sent_key[n_sent++] = key;
            if (off + RB > res->records.len) {
                wrong(M_RERANK_LAYER, "%s item %zu: records end early", what, i);
                goto out;
            }
            uint64_t seed = seed_at(cv, p);
            for (int b = 0; b < RB; b++)
                if (res->records.data[off + b] != rec_byte(seed, l, it[i].head, p, b)) {
                    wrong(M_RERANK_LAYER, "%s item %zu: position %" PRIu64 " byte %d differs", what, i, p, b);
                    goto out;
                }
            off += RB;
            me->records_checked++;
        }
        if (off != res->records.len)
            wrong(M_RERANK_LAYER, "%s item %zu: %zu record bytes, %zu expected", what, i, res->records.len, off);
    }
out:
    protobuf_c_message_free_unpacked(rep, NULL);
}

/* Search, and the same scan done here over the regenerated signatures. */
static void op_search(client *c, lconv *cv)
{
    static float q[QPERKV * D], *scores;
    static uint8_t *bits;
    static uint16_t *sc;
    static uint32_t *idx;
    static float *best;
    static uint64_t cap;
    if (cap < cv->len) {
        cap = cv->len;
        free(scores); free(bits); free(sc); free(idx); free(best);
        scores = malloc(cap * 4);
        bits = malloc(cap * SB);
        sc = malloc(cap * 2);
        idx = malloc(cap * 4);
        best = malloc(cap * 4);
        if (!scores || !bits || !sc || !idx || !best) {
            fprintf(stderr, "bench-load: out of memory\n");
            exit(1);
        }
    }
    uint32_t l = (uint32_t)rnd(&c->rng, LAYERS), h = (uint32_t)rnd(&c->rng, HEADS);
    Kvarc__V1__SearchRequest r = KVARC__V1__SEARCH_REQUEST__INIT;
    for (int j = 0; j < QPERKV * D; j++)
        q[j] = rnd_unit(c);
    r.conv = cv->id;
    r.layer = l;
    r.head = h;
    r.n_queries = QPERKV;
    r.query = q;
    r.n_query = QPERKV * D;
    r.k = 1 + (uint32_t)rnd(&c->rng, 64);
    r.mode = (uint32_t)rnd(&c->rng, 2);
    r.combine = (uint32_t)rnd(&c->rng, 2);
    char what[128];
    snprintf(what, sizeof what, "%s layer %u head %u k %u mode %u combine %u", cv->name, l, h, r.k, r.mode, r.combine);
    ProtobufCMessage *rep = NULL;
    if (rpc(c, M_SEARCH, &r.base, &kvarc__v1__search_reply__descriptor, &rep, 0, what))
        return;
    Kvarc__V1__SearchReply *sr = (Kvarc__V1__SearchReply *)rep;
    kvarc_rotation rot;
    kvg_query qq[QPERKV];
    kvarc_rotation_init(&rot, D, SHAPE_SEED);
    for (int j = 0; j < QPERKV; j++)
        kvg_query_prep_ref(&rot, NULL, KVARC_DTYPE_F32, q + j * D, &qq[j]);
    for (uint64_t p = 0; p < cv->len; p++) {
        uint64_t seed = seed_at(cv, p);
        for (int b = 0; b < SB; b++)
            bits[p * SB + b] = sig_byte(seed, l, h, p, b);
        sc[p] = sig_scale(seed, l, h, p);
    }
    kvg_score_ref((kvg_score_mode)r.mode, (kvg_combine)r.combine, qq, QPERKV, bits, sc, cv->len, scores);
    long got = kvg_topk_ref(scores, cv->len, r.k, idx, best, NULL);
    int same = got >= 0 && sr->n_positions == (size_t)got && sr->n_scores == (size_t)got;
    for (long i = 0; same && i < got; i++)
        same = sr->positions[i] == idx[i] && sr->scores[i] == best[i];
    if (!same)
        wrong(M_SEARCH, "%s: %zu positions differ from the local scan's %ld (first: %" PRIu64 " vs %u)", what,
              sr->n_positions, got, sr->n_positions ? sr->positions[0] : 0, got > 0 ? idx[0] : 0);
    protobuf_c_message_free_unpacked(rep, NULL);
}

static void op_load_sigs(client *c, lconv *cv)
{
    Kvarc__V1__LoadSignaturesRequest r = KVARC__V1__LOAD_SIGNATURES_REQUEST__INIT;
    r.conv = cv->id;
    r.layer = (uint32_t)rnd(&c->rng, LAYERS);
    r.first = rnd(&c->rng, cv->len);
    r.count = rnd(&c->rng, 2) ? 0 : 1 + rnd(&c->rng, cv->len - r.first);
    r.chunk_tokens = rnd(&c->rng, 2) ? 0 : 1 + (uint32_t)rnd(&c->rng, 100);
    uint64_t end = r.count ? r.first + r.count : cv->len, next[HEADS];
    char what[128];
    snprintf(what, sizeof what, "%s layer %u [%" PRIu64 ", %" PRIu64 ") chunks of %u", cv->name, r.layer, r.first,
             end, r.chunk_tokens);
    for (int h = 0; h < HEADS; h++)
        next[h] = r.first;
    kvc_stream *s = NULL;
    double t0 = now_s();
    int st = kvc_sstream_open(c->k, "LoadSignatures", &r.base, CALL_MS, &s), bad = 0;
    if (!st) {
        ProtobufCMessage *m;
        int rc;
        while ((rc = kvc_sstream_next(s, &kvarc__v1__sig_chunk__descriptor, &m)) == 1) {
            Kvarc__V1__SigChunk *ch = (Kvarc__V1__SigChunk *)m;
            if (!bad && (ch->head >= HEADS || ch->first_pos != next[ch->head] || ch->first_pos + ch->count > end ||
                         ch->bits.len != (size_t)ch->count * SB || ch->scales.len != (size_t)ch->count * 2)) {
                wrong(M_LOAD_SIGS, "%s: chunk head %u [%" PRIu64 ", +%u) out of order or sized wrong", what,
                      ch->head, ch->first_pos, ch->count);
                bad = 1;
            }
            for (uint32_t t = 0; !bad && t < ch->count; t++) {
                uint64_t p = ch->first_pos + t, seed = seed_at(cv, p);
                uint16_t scl;
                memcpy(&scl, ch->scales.data + 2 * t, 2);
                for (int b = 0; b < SB && !bad; b++)
                    bad = ch->bits.data[t * SB + b] != sig_byte(seed, r.layer, ch->head, p, b);
                bad |= scl != sig_scale(seed, r.layer, ch->head, p);
                if (bad)
                    wrong(M_LOAD_SIGS, "%s: head %u position %" PRIu64 " differs", what, ch->head, p);
            }
            if (!bad)
                next[ch->head] += ch->count;
            protobuf_c_message_free_unpacked(m, NULL);
        }
        st = kvc_stream_finish(s, NULL, NULL, c->msg, sizeof c->msg);
        if (!st && rc < 0 && !bad) {
            wrong(M_LOAD_SIGS, "%s: the stream broke (%d) but ended OK", what, rc);
            bad = 1;
        }
    } else {
        snprintf(c->msg, sizeof c->msg, "could not open the stream");
    }
    count_call(M_LOAD_SIGS, st, 0, now_s() - t0, what, c->msg);
    for (int h = 0; !st && !bad && h < HEADS; h++)
        if (next[h] != end) {
            wrong(M_LOAD_SIGS, "%s: head %u ended at %" PRIu64, what, h, next[h]);
            break;
        }
}

static void op_stat(client *c, lconv *cv, uint64_t id, int expect)
{
    Kvarc__V1__StatRequest r = KVARC__V1__STAT_REQUEST__INIT;
    r.id = id;
    ProtobufCMessage *rep = NULL;
    char what[64];
    snprintf(what, sizeof what, "id %" PRIu64, id);
    if (rpc(c, M_STAT, &r.base, &kvarc__v1__conv_reply__descriptor, &rep, expect, what) || !rep)
        return;
    if (!expect && cv)
        check_info(M_STAT, cv, ((Kvarc__V1__ConvReply *)rep)->info);
    protobuf_c_message_free_unpacked(rep, NULL);
}

static void op_open(client *c, lconv *cv, uint32_t head_dim, int expect)
{
    Kvarc__V1__OpenRequest r = KVARC__V1__OPEN_REQUEST__INIT;
    Kvarc__V1__Shape s = shape_pb(head_dim);
    r.ns = c->ns;
    r.name = cv->name;
    r.expect = &s;
    ProtobufCMessage *rep = NULL;
    if (rpc(c, M_OPEN, &r.base, &kvarc__v1__conv_reply__descriptor, &rep, expect, cv->name) || !rep)
        return;
    if (!expect)
        check_info(M_OPEN, cv, ((Kvarc__V1__ConvReply *)rep)->info);
    protobuf_c_message_free_unpacked(rep, NULL);
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* List the client's namespace in pages of `limit`: the names it holds, in order. */
static void op_list(client *c, uint32_t limit)
{
    char **want = malloc((size_t)c->n_cv * sizeof *want), after[64] = "";
    size_t nw = 0, seen = 0;
    int bad = 0;
    for (int i = 0; i < c->n_cv; i++)
        if (c->cv[i].live)
            want[nw++] = c->cv[i].name;
    qsort(want, nw, sizeof *want, cmp_str);
    for (int page = 0; page < 10000 && !bad; page++) {
        Kvarc__V1__ListRequest r = KVARC__V1__LIST_REQUEST__INIT;
        r.ns = c->ns;
        r.after = after;
        r.limit = limit;
        ProtobufCMessage *rep = NULL;
        if (rpc(c, M_LIST, &r.base, &kvarc__v1__list_reply__descriptor, &rep, 0, c->ns)) {
            bad = 1;
            break;
        }
        Kvarc__V1__ListReply *lr = (Kvarc__V1__ListReply *)rep;
        for (size_t i = 0; i < lr->n_convs && !bad; i++) {
            if (seen >= nw || strcmp(lr->convs[i]->name, want[seen]) || strcmp(lr->convs[i]->ns, c->ns)) {
                wrong(M_LIST, "%s: entry %zu is %s/%s, expected %s", c->ns, seen, lr->convs[i]->ns,
                      lr->convs[i]->name, seen < nw ? want[seen] : "the end");
                bad = 1;
            }
            seen++;
        }
        if (lr->n_convs)
            snprintf(after, sizeof after, "%s", lr->convs[lr->n_convs - 1]->name);
        int more = lr->more;
        protobuf_c_message_free_unpacked(rep, NULL);
        if (!more)
            break;
    }
    if (!bad && seen != nw)
        wrong(M_LIST, "%s: %zu names listed, %zu held", c->ns, seen, nw);
    free(want);
}

/* A free derived slot, or NULL. */
static lconv *free_slot(client *c)
{
    for (int i = c->n_main; i < c->n_cv; i++)
        if (!c->cv[i].live)
            return &c->cv[i];
    return NULL;
}

static lconv *pick_live(client *c, int want_snap)
{
    for (int tries = 0; tries < 4 * c->n_cv; tries++) {
        lconv *cv = &c->cv[rnd(&c->rng, (uint64_t)c->n_cv)];
        if (cv->live && (want_snap < 0 || cv->snap == want_snap))
            return cv;
    }
    return NULL;
}

/* Fork, Snapshot or Restore of src into a free slot at a random length. */
static void op_derive(client *c, int m, lconv *src)
{
    lconv *dst = free_slot(c);
    if (!dst || src->nseg >= MAXSEG)
        return;
    Kvarc__V1__ForkRequest r = KVARC__V1__FORK_REQUEST__INIT;
    snprintf(dst->name, sizeof dst->name, "x%" PRIu64, c->next_name++);
    r.src_ns = c->ns;
    r.src_name = src->name;
    r.dst_ns = c->ns;
    r.dst_name = dst->name;
    r.has_at_len = rnd(&c->rng, 4) != 0;
    r.at_len = r.has_at_len ? rnd(&c->rng, src->len + 1) : 0;
    uint64_t at = r.has_at_len ? r.at_len : src->len;
    char what[128];
    snprintf(what, sizeof what, "%s at %" PRIu64 " -> %s", src->name, at, dst->name);
    ProtobufCMessage *rep = NULL;
    if (rpc(c, m, &r.base, &kvarc__v1__conv_reply__descriptor, &rep, 0, what))
        return;
    Kvarc__V1__ConvInfo *in = ((Kvarc__V1__ConvReply *)rep)->info;
    dst->id = in ? in->id : 0;
    dst->len = at;
    dst->parent = src->id;
    dst->fork_len = at;
    dst->snap = m == M_SNAPSHOT;
    dst->main = 0;
    dst->live = 1;
    dst->nseg = 0;
    for (int i = 0; i < src->nseg; i++) {
        uint64_t start = i ? src->seg_end[i - 1] : 0;
        if (start >= at)
            break;
        dst->seg_end[dst->nseg] = src->seg_end[i] < at ? src->seg_end[i] : at;
        dst->seg_seed[dst->nseg++] = src->seg_seed[i];
    }
    dst->seg_end[dst->nseg] = UINT64_MAX;
    dst->seg_seed[dst->nseg++] = rng_next(&c->rng) | 1;
    check_info(m, dst, in);
    protobuf_c_message_free_unpacked(rep, NULL);
}

/* A call that must fail with a given status. */
static void op_provoke(client *c)
{
    lconv *cv = pick_live(c, -1);
    if (!cv)
        return;
    switch (rnd(&c->rng, 8)) {
    case 0: {                                   /* Fetch past the end */
        Kvarc__V1__FetchRequest r = KVARC__V1__FETCH_REQUEST__INIT;
        uint64_t p = cv->len + rnd(&c->rng, 3);
        r.conv = cv->id;
        r.positions = &p;
        r.n_positions = 1;
        rpc(c, M_FETCH, &r.base, &kvarc__v1__fetch_reply__descriptor, NULL, GRPC_STATUS_INVALID_ARGUMENT,
            "past the end");
        break;
    }
    case 1: {                                   /* Append to a snapshot; at a wrong position */
        lconv *s = pick_live(c, 1);
        static block b;
        if (s) {
            block_make(&b, s, 0, s->len, 3);
            rpc(c, M_APPEND, &b.r.base, &kvarc__v1__append_reply__descriptor, NULL,
                GRPC_STATUS_FAILED_PRECONDITION, "to a snapshot");
        } else if (!cv->snap) {
            block_make(&b, cv, 1, cv->len + 7, 3);
            rpc(c, M_APPEND, &b.r.base, &kvarc__v1__append_reply__descriptor, NULL,
                GRPC_STATUS_INVALID_ARGUMENT, "at a wrong position");
        }
        break;
    }
    case 2: {                                   /* Restore of a conversation that is no snapshot */
        lconv *s = pick_live(c, 0);
        if (!s)
            break;
        Kvarc__V1__ForkRequest r = KVARC__V1__FORK_REQUEST__INIT;
        r.src_ns = r.dst_ns = c->ns;
        r.src_name = s->name;
        r.dst_name = "never";
        rpc(c, M_RESTORE, &r.base, &kvarc__v1__conv_reply__descriptor, NULL, GRPC_STATUS_FAILED_PRECONDITION,
            "of a non-snapshot");
        break;
    }
    case 3: {                                   /* Create of a name taken */
        Kvarc__V1__CreateRequest r = KVARC__V1__CREATE_REQUEST__INIT;
        Kvarc__V1__Shape s = shape_pb(D);
        r.ns = c->ns;
        r.name = cv->name;
        r.shape = &s;
        rpc(c, M_CREATE, &r.base, &kvarc__v1__conv_reply__descriptor, NULL, GRPC_STATUS_ALREADY_EXISTS, "taken");
        break;
    }
    case 4:                                     /* Open with another shape */
        op_open(c, cv, 64, GRPC_STATUS_FAILED_PRECONDITION);
        break;
    case 5:                                     /* Stat of a deleted conversation */
        if (c->n_dead)
            op_stat(c, NULL, c->dead[rnd(&c->rng, c->n_dead < 16 ? (uint64_t)c->n_dead : 16)],
                    GRPC_STATUS_NOT_FOUND);
        break;
    case 6: {                                   /* Fork past the end */
        Kvarc__V1__ForkRequest r = KVARC__V1__FORK_REQUEST__INIT;
        r.src_ns = r.dst_ns = c->ns;
        r.src_name = cv->name;
        r.dst_name = "never";
        r.has_at_len = 1;
        r.at_len = cv->len + 1;
        rpc(c, M_FORK, &r.base, &kvarc__v1__conv_reply__descriptor, NULL, GRPC_STATUS_INVALID_ARGUMENT,
            "past the end");
        break;
    }
    default: {                                  /* RerankLayer with a shortlist past the end */
        Kvarc__V1__RerankItem x = KVARC__V1__RERANK_ITEM__INIT, *xp = &x;
        static float q[QPERKV * D];
        uint64_t p = cv->len;
        x.n_queries = QPERKV;
        x.query = q;
        x.n_query = QPERKV * D;
        x.shortlist = &p;
        x.n_shortlist = 1;
        x.top_k = 1;
        Kvarc__V1__RerankLayerRequest r = KVARC__V1__RERANK_LAYER_REQUEST__INIT;
        r.conv = cv->id;
        r.items = &xp;
        r.n_items = 1;
        rpc(c, M_RERANK_LAYER, &r.base, &kvarc__v1__rerank_layer_reply__descriptor, NULL,
            GRPC_STATUS_INVALID_ARGUMENT, "past the end");
        break;
    }
    }
}

/* The weighted mix: each op's weight, out of their sum. */
enum { OP_APPEND, OP_APPEND_MANY, OP_APPEND_STREAM, OP_FETCH, OP_RERANK, OP_SEARCH, OP_LOAD_SIGS, OP_STAT, OP_OPEN,
       OP_LIST, OP_FORK, OP_SNAPSHOT, OP_RESTORE, OP_DELETE, OP_PROVOKE, OP_N };
static const int load_ops[OP_N] = { 12, 10, 8, 20, 20, 6, 3, 5, 2, 1, 2, 2, 2, 3, 4 };

static void client_step(client *c)
{
    int total = 0, o = 0;
    for (int i = 0; i < OP_N; i++)
        total += load_ops[i];
    int w = (int)rnd(&c->rng, (uint64_t)total);
    while (w >= load_ops[o])
        w -= load_ops[o++];
    lconv *cv = pick_live(c, o <= OP_APPEND_STREAM ? 0 : -1);
    if (!cv)
        return;
    if (o <= OP_APPEND_STREAM) {
        if (cv->len >= c->max_tokens) {         /* full: a main one starts over, a derived one goes */
            if (cv->main)
                conv_recycle(c, cv);
            else
                conv_delete(c, cv);
            return;
        }
        uint64_t room = c->max_tokens - cv->len;
        uint32_t n = rnd(&c->rng, 8) == 0 ? 1 + (uint32_t)rnd(&c->rng, 4) : 8 + (uint32_t)rnd(&c->rng, 57);
        op_append(c, cv, n < room ? n : (uint32_t)room, o - OP_APPEND);
        return;
    }
    if (o == OP_LIST) {
        op_list(c, 1 + (uint32_t)rnd(&c->rng, 40));
        return;
    }
    if (o == OP_PROVOKE) {
        op_provoke(c);
        return;
    }
    if (o == OP_DELETE) {                        /* mostly derived ones; a main one now and then */
        if (!cv->main || rnd(&c->rng, 4) == 0)
            conv_recycle(c, cv);
        return;
    }
    if (o == OP_FORK || o == OP_SNAPSHOT) {
        op_derive(c, o == OP_FORK ? M_FORK : M_SNAPSHOT, cv);
        return;
    }
    if (o == OP_RESTORE) {
        lconv *s = pick_live(c, 1);
        op_derive(c, s ? M_RESTORE : M_SNAPSHOT, s ? s : cv);
        return;
    }
    if (o == OP_STAT) {
        op_stat(c, cv, cv->id, 0);
        return;
    }
    if (o == OP_OPEN) {
        op_open(c, cv, D, 0);
        return;
    }
    if (!cv->len)
        return;
    if (o == OP_FETCH)
        op_fetch_random(c, cv);
    else if (o == OP_RERANK)
        op_rerank_layer(c, cv);
    else if (o == OP_SEARCH)
        op_search(c, cv);
    else
        op_load_sigs(c, cv);
}

/* After the run: the newest 8 and 8 random records of every layer and head
 * of every conversation held, and its Stat. */
static void client_sweep(client *c)
{
    for (int i = 0; i < c->n_cv; i++) {
        lconv *cv = &c->cv[i];
        if (!cv->live)
            continue;
        op_stat(c, cv, cv->id, 0);
        if (!cv->len)
            continue;
        for (uint32_t l = 0; l < LAYERS; l++)
            for (uint32_t h = 0; h < HEADS; h++) {
                uint64_t pos[16];
                size_t n = 0;
                for (uint64_t p = cv->len > 8 ? cv->len - 8 : 0; p < cv->len; p++)
                    pos[n++] = p;
                while (n < 16)
                    pos[n++] = rnd(&c->rng, cv->len);
                op_fetch(c, cv, l, h, pos, n);
            }
    }
}

static int client_main(int idx, const char *target, int n_main, uint64_t max_tokens, double seconds,
                       uint64_t seed, int cleanup, unsigned run_tag)
{
    client c;
    memset(&c, 0, sizeof c);
    c.idx = idx;
    c.max_tokens = max_tokens;
    c.rng = seed ^ (0xc0ffee00ull + (uint64_t)idx * 0x9e3779b97f4a7c15ull);
    snprintf(c.ns, sizeof c.ns, "bl%x-%d", run_tag, idx);
    c.n_main = n_main;
    c.n_cv = n_main + (n_main / 4 > 2 ? n_main / 4 : 2);
    c.cv = calloc((size_t)c.n_cv, sizeof *c.cv);
    if (!c.cv || kvc_connect(target, &c.k)) {
        note_err("client %d: cannot connect to %s", idx, target);
        return 1;
    }
    me->started = 1;
    for (int i = 0; i < n_main; i++) {
        snprintf(c.cv[i].name, sizeof c.cv[i].name, "conv%d", i);
        c.cv[i].main = 1;
        conv_create(&c, &c.cv[i]);
    }
    double end = now_s() + seconds;
    while (now_s() < end && !*stop_all && err_run < 100)   /* kvarcd gone: no storm of errors */
        client_step(&c);
    if (!*stop_all && err_run < 100)
        client_sweep(&c);
    if (cleanup)
        for (int i = 0; i < c.n_cv; i++)
            if (c.cv[i].live)
                conv_delete(&c, &c.cv[i]);
    kvc_close(c.k);
    free(c.cv);
    return 0;
}

/* ---- the admin ---- */
static void job(kvc_conn *k, int m, char *msg, size_t len)
{
    Kvarc__V1__Empty e = KVARC__V1__EMPTY__INIT;
    Kvarc__V1__CompactRequest cr = KVARC__V1__COMPACT_REQUEST__INIT;
    cr.threshold = 0.5f;
    Kvarc__V1__JobEvent *last = NULL;
    double t0 = now_s();
    int st = kvc_job(k, mname[m], m == M_VERIFY ? &e.base : &cr.base, 600000, NULL, NULL, &last, msg, len);
    count_call(m, st, 0, now_s() - t0, "", msg);
    if (!st && m == M_VERIFY) {
        if (!last || !last->verify)
            wrong(M_VERIFY, "no result");
        else if (last->verify->problems) {
            me->verify_problems += last->verify->problems;
            wrong(M_VERIFY, "%" PRIu64 " problem(s): %s", last->verify->problems,
                  last->verify->n_lines ? last->verify->lines[0] : "");
        }
    }
    if (last)
        protobuf_c_message_free_unpacked(&last->base, NULL);
}

static void admin_calls(kvc_conn *k, char *msg, size_t len)
{
    Kvarc__V1__Empty e = KVARC__V1__EMPTY__INIT;
    static const int ms[3] = { M_STATS, M_HEALTH, M_METRICS };
    static const ProtobufCMessageDescriptor *rd[3] = { &kvarc__v1__stats_reply__descriptor,
                                                       &kvarc__v1__health_reply__descriptor,
                                                       &kvarc__v1__metrics_reply__descriptor };
    for (int i = 0; i < 3; i++) {
        ProtobufCMessage *rep = NULL;
        double t0 = now_s();
        int st = kvc_call(k, mname[ms[i]], &e.base, rd[i], &rep, CALL_MS, msg, len);
        count_call(ms[i], st, 0, now_s() - t0, "", msg);
        if (!st && ms[i] == M_HEALTH && strcmp(((Kvarc__V1__HealthReply *)rep)->status, "serving"))
            wrong(M_HEALTH, "status %s", ((Kvarc__V1__HealthReply *)rep)->status);
        if (!st && ms[i] == M_METRICS && !strstr(((Kvarc__V1__MetricsReply *)rep)->text, "kvarc_rpc_calls_total"))
            wrong(M_METRICS, "no kvarc_rpc_calls_total in the text");
        if (rep)
            protobuf_c_message_free_unpacked(rep, NULL);
    }
    char after[256] = "";                       /* every namespace, in pages of 500 */
    for (int page = 0; page < 1000; page++) {
        Kvarc__V1__ListRequest r = KVARC__V1__LIST_REQUEST__INIT;
        r.after = after;
        r.limit = 500;
        ProtobufCMessage *rep = NULL;
        double t0 = now_s();
        int st = kvc_call(k, "List", &r.base, &kvarc__v1__list_reply__descriptor, &rep, CALL_MS, msg, len);
        count_call(M_LIST, st, 0, now_s() - t0, "every namespace", msg);
        if (st)
            break;
        Kvarc__V1__ListReply *lr = (Kvarc__V1__ListReply *)rep;
        if (lr->n_convs)
            snprintf(after, sizeof after, "%s/%s", lr->convs[lr->n_convs - 1]->ns, lr->convs[lr->n_convs - 1]->name);
        int more = lr->more;
        protobuf_c_message_free_unpacked(rep, NULL);
        if (!more)
            break;
    }
}

static int admin_main(const char *target, double seconds, double period)
{
    kvc_conn *k;
    char msg[512];
    if (kvc_connect(target, &k)) {
        note_err("admin: cannot connect to %s", target);
        return 1;
    }
    me->started = 1;
    double t0 = now_s(), end = t0 + seconds, next = t0 + period / 2;
    int turn = 0;
    while (now_s() < end && !*stop_all && err_run < 100) {
        admin_calls(k, msg, sizeof msg);
        if (now_s() >= next && now_s() < end) {
            job(k, turn++ % 2 ? M_COMPACT : M_VERIFY, msg, sizeof msg);
            next += period;
        }
        usleep(500000);
    }
    kvc_close(k);
    return 0;
}

/* ---- the parent: kvarcd's process, samples, the report ---- */

/* The pid of the process serving DIR/kvarcd.sock: its inode in
 * /proc/net/unix, then the process holding a descriptor of it. 0 if none. */
static pid_t find_server(const char *dir)
{
    char sock[1200], line[1400], path[1200];
    snprintf(sock, sizeof sock, "%s/kvarcd.sock", dir);
    char *real = realpath(sock, NULL);
    FILE *f = fopen("/proc/net/unix", "r");
    unsigned long ino = 0;
    while (f && real && fgets(line, sizeof line, f)) {
        unsigned long in;
        if (sscanf(line, "%*s %*s %*s %*s %*s %*s %lu %1199s", &in, path) == 2 && !strcmp(path, real)) {
            ino = in;
            break;
        }
    }
    if (f)
        fclose(f);
    free(real);
    if (!ino)
        return 0;
    char want[64];
    snprintf(want, sizeof want, "socket:[%lu]", ino);
    DIR *p = opendir("/proc");
    struct dirent *de;
    pid_t found = 0;
    while (p && !found && (de = readdir(p))) {
        if (de->d_name[0] < '1' || de->d_name[0] > '9')
            continue;
        char fdd[300];
        snprintf(fdd, sizeof fdd, "/proc/%s/fd", de->d_name);
        DIR *fd = opendir(fdd);
        struct dirent *fe;
        while (fd && !found && (fe = readdir(fd))) {
            char lp[600], to[64];
            snprintf(lp, sizeof lp, "%s/%s", fdd, fe->d_name);
            ssize_t n = readlink(lp, to, sizeof to - 1);
            if (n > 0) {
                to[n] = 0;
                if (!strcmp(to, want))
                    found = (pid_t)atoi(de->d_name);
            }
        }
        if (fd)
            closedir(fd);
    }
    if (p)
        closedir(p);
    return found;
}

typedef struct sample {
    double t;
    long   rss_kb, anon_kb, threads, fds;   /* VmRSS, RssAnon (the heap's part: LMDB's map and
                                                 the segments' pages are file-backed) */
    uint64_t calls, bad;
} sample;

static int proc_sample(pid_t pid, sample *s)
{
    char path[64], line[256];
    snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    s->rss_kb = s->anon_kb = s->threads = -1;
    while (fgets(line, sizeof line, f)) {
        if (!strncmp(line, "VmRSS:", 6))
            s->rss_kb = atol(line + 6);
        else if (!strncmp(line, "RssAnon:", 8))
            s->anon_kb = atol(line + 8);
        else if (!strncmp(line, "Threads:", 8))
            s->threads = atol(line + 8);
    }
    fclose(f);
    snprintf(path, sizeof path, "/proc/%d/fd", (int)pid);
    DIR *d = opendir(path);
    s->fds = 0;
    struct dirent *de;
    while (d && (de = readdir(d)))
        s->fds += de->d_name[0] != '.';
    if (d)
        closedir(d);
    return 0;
}

static void totals(int np, uint64_t *calls, uint64_t *unexpected, uint64_t *wrongs, uint64_t *expected)
{
    *calls = *unexpected = *wrongs = 0;
    if (expected)
        *expected = 0;
    for (int p = 0; p < np; p++)
        for (int m = 0; m < M_N; m++) {
            for (int s = 0; s < NSTATUS; s++)
                *calls += S[p].m[m].st[s];
            *unexpected += S[p].m[m].unexpected;
            *wrongs += S[p].m[m].wrong;
            if (expected)
                *expected += S[p].m[m].expected;
        }
}

static double hist_q(const uint32_t *h, uint64_t n, double q)
{
    uint64_t want = (uint64_t)ceil(q * (double)n), acc = 0;
    for (int b = 0; b < NBUCK; b++) {
        acc += h[b];
        if (acc >= want && want)
            return 1e-3 * pow(2.0, (double)(b + 1) / 8.0);    /* the bucket's upper edge, in ms */
    }
    return 0;
}

static uint64_t du_bytes(const char *path)
{
    struct stat st;
    if (lstat(path, &st))
        return 0;
    uint64_t n = (uint64_t)st.st_blocks * 512;
    if (S_ISDIR(st.st_mode)) {
        DIR *d = opendir(path);
        struct dirent *de;
        while (d && (de = readdir(d))) {
            if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
                continue;
            char p[4096];
            snprintf(p, sizeof p, "%s/%s", path, de->d_name);
            n += du_bytes(p);
        }
        if (d)
            closedir(d);
    }
    return n;
}

static void usage(int code)
{
    fprintf(code ? stderr : stdout,
            "usage: bench-load [--kvarcd PATH | --data DIR] [--clients N] [--convs M] [--seconds T]\n"
            "                  [--max-tokens K] [--admin-period S] [--seed X] [--keep] [--quiet]\n"
            "  N client processes (default 4) own M conversations (default 16) between them and run a\n"
            "  mix of every call for T seconds (default 15) against one kvarcd: its own on a temporary\n"
            "  directory (the build's, or PATH), or the one serving DIR. Exit 0: no unexpected error,\n"
            "  no wrong record.\n");
    exit(code);
}

int main(int argc, char **argv)
{
    const char *kvarcd = NULL, *data = NULL;
    int clients = 4, convs = 16, keep = 0, quiet = 0;
    double seconds = 15, period = 0;
    uint64_t max_tokens = 512, seed = 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help"))
            usage(0);
        else if (!strcmp(a, "--keep"))
            keep = 1;
        else if (!strcmp(a, "--quiet"))
            quiet = 1;
        else if (!v)
            usage(2);
        else if (!strcmp(a, "--kvarcd"))
            kvarcd = argv[++i];
        else if (!strcmp(a, "--data"))
            data = argv[++i];
        else if (!strcmp(a, "--clients"))
            clients = atoi(argv[++i]);
        else if (!strcmp(a, "--convs"))
            convs = atoi(argv[++i]);
        else if (!strcmp(a, "--seconds"))
            seconds = atof(argv[++i]);
        else if (!strcmp(a, "--max-tokens"))
            max_tokens = strtoull(argv[++i], NULL, 10);
        else if (!strcmp(a, "--admin-period"))
            period = atof(argv[++i]);
        else if (!strcmp(a, "--seed"))
            seed = strtoull(argv[++i], NULL, 0);
        else
            usage(2);
    }
    if (clients < 1 || clients > 1024 || convs < clients || seconds <= 0 || max_tokens < 16 || max_tokens > 65536) {
        fprintf(stderr, "bench-load: need 1 <= clients <= 1024, convs >= clients, seconds > 0, "
                        "16 <= max-tokens <= 65536\n");
        return 2;
    }
    if (period <= 0)
        period = seconds / 10 > 3 ? (seconds / 10 < 60 ? seconds / 10 : 60) : 3;
    int np = clients + 1;
    S = mmap(NULL, (size_t)np * sizeof *S, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    stop_all = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (S == MAP_FAILED || stop_all == MAP_FAILED) {
        perror("bench-load: mmap");
        return 1;
    }
    kd_run run = { "", 0 };
    char target[1100], log[1200] = "";
    if (data) {
        snprintf(target, sizeof target, "%s", data);
    } else {
        snprintf(run.dir, sizeof run.dir, "/var/tmp/kvarc-load-XXXXXX");
        if (!mkdtemp(run.dir)) {
            perror("bench-load: mkdtemp");
            return 1;
        }
        snprintf(target, sizeof target, "%s", run.dir);
        snprintf(log, sizeof log, "%s.log", run.dir);
    }
    unsigned run_tag = (unsigned)getpid();

    /* children first: no gRPC in this process yet */
    int go[2];
    if (pipe(go)) {
        perror("bench-load: pipe");
        return 1;
    }
    pid_t *kids = calloc((size_t)np, sizeof *kids);
    for (int p = 0; p < np; p++) {
        kids[p] = fork();
        if (kids[p] < 0) {
            perror("bench-load: fork");
            return 1;
        }
        if (kids[p] == 0) {
            char b;
            close(go[1]);
            me = &S[p];
            if (read(go[0], &b, 1) != 1)
                _exit(3);
            int n_main = convs / clients + (p < convs % clients);
            int rc = p < clients ? client_main(p, target, n_main, max_tokens, seconds, seed, data != NULL, run_tag)
                                 : admin_main(target, seconds, period);
            me->done = 1;
            _exit(rc);
        }
    }
    close(go[0]);

    char kbuf[4096], msg[512];
    pid_t dpid = 0;
    if (!data) {
        kvarcd = kd_find_kvarcd(kvarcd, kbuf, sizeof kbuf);
        if (kd_spawn(kvarcd, run.dir, log, &run.pid, msg, sizeof msg)) {
            fprintf(stderr, "bench-load: %s\n", msg);
            close(go[1]);
            for (int p = 0; p < np; p++)
                waitpid(kids[p], NULL, 0);
            kd_run_end(&run, "bench-load");
            return 1;
        }
        dpid = run.pid;
    } else if (!kd_alive(data, 10000)) {
        fprintf(stderr, "bench-load: no kvarcd answers at %s\n", data);
        close(go[1]);
        for (int p = 0; p < np; p++)
            waitpid(kids[p], NULL, 0);
        return 1;
    } else {
        dpid = find_server(data);
    }
    printf("bench-load: %d clients x %d conversations (4 layers x 2 KV heads x d128, q3; at most %" PRIu64
           " tokens each), %.0f s, admin every %.0f s; kvarcd pid %d on %s\n", clients, convs, max_tokens, seconds,
           period, (int)dpid, target);
    fflush(stdout);

    size_t cap = (size_t)(seconds * 1.5 + 400), ns = 0;
    sample *smp = calloc(cap, sizeof *smp);
    double t0 = now_s(), deadline = t0 + seconds * 1.5 + 300, next_print = t0 + seconds / 10;
    for (int p = 0; p < np; p++)
        if (write(go[1], "g", 1) != 1)
            perror("bench-load: write");
    close(go[1]);
    int alive = np, killed = 0, child_fail = 0;
    uint64_t last_calls = 0;
    double last_t = t0;
    while (alive) {
        usleep(200000);
        for (int p = 0; p < np; p++) {
            int st;
            if (kids[p] > 0 && waitpid(kids[p], &st, WNOHANG) == kids[p]) {
                if (!WIFEXITED(st) || WEXITSTATUS(st))
                    child_fail++;
                kids[p] = 0;
                alive--;
            }
        }
        double t = now_s();
        if (ns < cap && t - t0 >= (double)ns + 1 && dpid) {
            sample *s = &smp[ns];
            int up = !proc_sample(dpid, s) && s->rss_kb >= 0;
            if (!up && !*stop_all) {
                fprintf(stderr, "bench-load: kvarcd (pid %d) is gone at t=%.0f s; stopping the clients\n", (int)dpid,
                        t - t0);
                *stop_all = 1;
            }
            if (up) {
                s->t = t - t0;
                uint64_t u, w;
                totals(np, &s->calls, &u, &w, NULL);
                s->bad = u + w;
                ns++;
                if (!quiet && (t >= next_print || !alive)) {
                    printf("  t=%5.0fs  kvarcd rss %7.1f MB (anon %6.1f)  threads %3ld  fds %4ld   calls %9" PRIu64
                           " (%6.0f/s)  unexpected+wrong %" PRIu64 "\n", s->t, s->rss_kb / 1024.0,
                           s->anon_kb / 1024.0, s->threads,
                           s->fds, s->calls, (double)(s->calls - last_calls) / (t - last_t), s->bad);
                    fflush(stdout);
                    last_calls = s->calls;
                    last_t = t;
                    next_print += seconds / 10;
                }
            }
        }
        if (t > deadline && !killed) {
            fprintf(stderr, "bench-load: still running %.0f s after the start; killing the clients\n", t - t0);
            for (int p = 0; p < np; p++)
                if (kids[p] > 0)
                    kill(kids[p], SIGKILL);
            killed = 1;
        }
    }
    double wall = now_s() - t0;

    /* a last Verify over the whole archive, and the archive's size */
    me = &S[clients];                        /* counted as the admin's */
    kvc_conn *k = NULL;
    uint64_t seg_bytes = 0, n_conv = 0;
    if (!kvc_connect(target, &k)) {
        job(k, M_VERIFY, msg, sizeof msg);
        Kvarc__V1__Empty e = KVARC__V1__EMPTY__INIT;
        ProtobufCMessage *rep = NULL;
        if (!kvc_call(k, "Stats", &e.base, &kvarc__v1__stats_reply__descriptor, &rep, CALL_MS, msg, sizeof msg)) {
            seg_bytes = ((Kvarc__V1__StatsReply *)rep)->segment_bytes;
            n_conv = ((Kvarc__V1__StatsReply *)rep)->conversations;
            protobuf_c_message_free_unpacked(rep, NULL);
        }
        kvc_close(k);
    }
    uint64_t disk = du_bytes(target);

    /* the table */
    uint64_t calls, unexpected, wrongs, expected, checked = 0, tokens = 0, recycled = 0, vprob = 0;
    totals(np, &calls, &unexpected, &wrongs, &expected);
    for (int p = 0; p < np; p++) {
        checked += S[p].records_checked;
        tokens += S[p].tokens_appended;
        recycled += S[p].recycled;
        vprob += S[p].verify_problems;
    }
    printf("\n%-15s %9s %9s %8s %8s %6s %9s %9s %9s %9s\n", "method", "calls", "calls/s", "expected", "unexpctd",
           "wrong", "p50 ms", "p99 ms", "max ms", "mean ms");
    char json[8192];
    size_t jn = (size_t)snprintf(json, sizeof json, "{\"bench\":\"load\",\"clients\":%d,\"convs\":%d,\"seconds\":%.0f,"
                                 "\"max_tokens\":%" PRIu64 ",\"methods\":{", clients, convs, seconds, max_tokens);
    int first = 1;
    for (int m = 0; m < M_N; m++) {
        mstat a;
        memset(&a, 0, sizeof a);
        for (int p = 0; p < np; p++) {
            for (int s = 0; s < NSTATUS; s++)
                a.st[s] += S[p].m[m].st[s];
            a.expected += S[p].m[m].expected;
            a.unexpected += S[p].m[m].unexpected;
            a.wrong += S[p].m[m].wrong;
            a.timed += S[p].m[m].timed;
            a.sum_ns += S[p].m[m].sum_ns;
            if (S[p].m[m].max_ns > a.max_ns)
                a.max_ns = S[p].m[m].max_ns;
            for (int b = 0; b < NBUCK; b++)
                a.hist[b] += S[p].m[m].hist[b];
        }
        uint64_t n = 0;
        for (int s = 0; s < NSTATUS; s++)
            n += a.st[s];
        if (!n)
            continue;
        double p50 = hist_q(a.hist, a.timed, 0.5), p99 = hist_q(a.hist, a.timed, 0.99);
        double mean = a.timed ? 1e-6 * (double)a.sum_ns / (double)a.timed : 0;
        printf("%-15s %9" PRIu64 " %9.1f %8" PRIu64 " %8" PRIu64 " %6" PRIu64 " %9.2f %9.2f %9.1f %9.2f", mname[m], n,
               (double)n / wall, a.expected, a.unexpected, a.wrong, p50, p99, 1e-6 * (double)a.max_ns, mean);
        for (int s = 1; s < NSTATUS; s++)
            if (a.st[s])
                printf("  %s %" PRIu64, kvc_status_name(s), a.st[s]);
        printf("\n");
        if (jn < sizeof json)
            jn += (size_t)snprintf(json + jn, sizeof json - jn, "%s\"%s\":{\"calls\":%" PRIu64 ",\"expected\":%" PRIu64
                                   ",\"unexpected\":%" PRIu64 ",\"wrong\":%" PRIu64 ",\"p50_ms\":%.3f,\"p99_ms\":%.3f,"
                                   "\"max_ms\":%.1f}", first ? "" : ",", mname[m], n, a.expected, a.unexpected,
                                   a.wrong, p50, p99, 1e-6 * (double)a.max_ns);
        first = 0;
    }
    printf("%-15s %9" PRIu64 " %9.1f %8" PRIu64 " %8" PRIu64 " %6" PRIu64 "\n", "total", calls, (double)calls / wall,
           expected, unexpected, wrongs);

    /* kvarcd over time: warm-up is the first fifth of the run (at most 60 s) */
    double warm = seconds / 5 < 60 ? seconds / 5 : 60;
    long rss_warm = -1, rss_max_after = -1, rss_end = -1, rss_max = -1, thr_max = 0, fds_max = 0, fds_end = 0;
    long anon_warm = -1, anon_max_after = -1, anon_end = -1;
    double slope = 0, aslope = 0;
    {
        double sx = 0, sy = 0, sxx = 0, sxy = 0, ay = 0, axy = 0;
        int n = 0;
        for (size_t i = 0; i < ns; i++) {
            sample *s = &smp[i];
            if (s->rss_kb > rss_max)
                rss_max = s->rss_kb;
            thr_max = s->threads > thr_max ? s->threads : thr_max;
            fds_max = s->fds > fds_max ? s->fds : fds_max;
            if (s->t <= warm) {
                rss_warm = s->rss_kb;
                anon_warm = s->anon_kb;
            } else if (s->t <= seconds) {
                if (s->rss_kb > rss_max_after)
                    rss_max_after = s->rss_kb;
                if (s->anon_kb > anon_max_after)
                    anon_max_after = s->anon_kb;
                sx += s->t; sy += (double)s->rss_kb; sxx += s->t * s->t; sxy += s->t * (double)s->rss_kb;
                ay += (double)s->anon_kb; axy += s->t * (double)s->anon_kb;
                n++;
            }
            rss_end = s->rss_kb;
            anon_end = s->anon_kb;
            fds_end = s->fds;
        }
        if (rss_warm < 0 && ns) {                       /* a run too short for a warm-up sample */
            rss_warm = smp[0].rss_kb;
            anon_warm = smp[0].anon_kb;
        }
        if (n > 2) {                                    /* least squares, MB per minute */
            slope = (n * sxy - sx * sy) / (n * sxx - sx * sx) * 60.0 / 1024.0;
            aslope = (n * axy - sx * ay) / (n * sxx - sx * sx) * 60.0 / 1024.0;
        }
    }
    printf("\nkvarcd: rss %.1f MB at the end of warm-up (%.0f s), at most %.1f MB after it (%+.1f MB, "
           "trend %+.2f MB/min), at most %.1f MB overall, %.1f MB at the end; threads at most %ld; fds at most %ld, "
           "%ld at the end\n", rss_warm / 1024.0, warm, rss_max_after / 1024.0, (rss_max_after - rss_warm) / 1024.0,
           slope, rss_max / 1024.0, rss_end / 1024.0, thr_max, fds_max, fds_end);
    printf("kvarcd: anonymous rss (heap) %.1f MB at the end of warm-up, at most %.1f MB after it (%+.1f MB, trend "
           "%+.2f MB/min), %.1f MB at the end\n", anon_warm / 1024.0, anon_max_after / 1024.0,
           (anon_max_after - anon_warm) / 1024.0, aslope, anon_end / 1024.0);
    printf("kvarcd over time (s: rss MB / anon MB / threads / fds):");
    size_t step = ns > 20 ? ns / 20 : 1;
    for (size_t i = 0; i < ns; i += step)
        printf(" %.0f: %.1f/%.1f/%ld/%ld", smp[i].t, smp[i].rss_kb / 1024.0, smp[i].anon_kb / 1024.0, smp[i].threads,
               smp[i].fds);
    printf("\nrecords checked byte for byte: %" PRIu64 "; tokens appended: %" PRIu64 " (x %d layers x %d heads); "
           "conversations recycled at --max-tokens: %" PRIu64 "\n", checked, tokens, LAYERS, HEADS, recycled);
    printf("archive at the end: %" PRIu64 " conversations, segments %.1f MB, %.1f MB on disk; Verify problems %" PRIu64
           "\n", n_conv, seg_bytes / 1e6, disk / 1e6, vprob);
    int shown = 0;
    for (int p = 0; p < np && shown < 12; p++)
        for (int i = 0; i < S[p].nerr && i < NERR && shown < 12; i++, shown++)
            fprintf(stderr, "bench-load: %s %d: %s\n", p < clients ? "client" : "admin", p, S[p].err[i]);
    int drc = 0;
    if (!data && !keep) {
        drc = kd_stop(run.pid);
        run.pid = 0;
        if (drc)
            fprintf(stderr, "bench-load: kvarcd exited with %d; its log: %s\n", drc, log);
    }
    int fail = unexpected || wrongs || vprob || child_fail || killed || drc || *stop_all;
    if (jn < sizeof json)
        snprintf(json + jn, sizeof json - jn, "},\"calls\":%" PRIu64 ",\"calls_per_s\":%.1f,\"expected_errors\":%" PRIu64
                 ",\"unexpected_errors\":%" PRIu64 ",\"wrong\":%" PRIu64 ",\"records_checked\":%" PRIu64
                 ",\"rss_warm_mb\":%.1f,\"rss_max_after_warm_mb\":%.1f,\"rss_trend_mb_per_min\":%.2f,"
                 "\"rss_end_mb\":%.1f,\"anon_warm_mb\":%.1f,\"anon_max_after_warm_mb\":%.1f,"
                 "\"anon_trend_mb_per_min\":%.2f,\"anon_end_mb\":%.1f,\"threads_max\":%ld,\"fds_max\":%ld,\"disk_mb\":%.1f,\"pass\":%s}",
                 calls, (double)calls / wall, expected, unexpected, wrongs, checked, rss_warm / 1024.0,
                 rss_max_after / 1024.0, slope, rss_end / 1024.0, anon_warm / 1024.0, anon_max_after / 1024.0, aslope,
                 anon_end / 1024.0, thr_max, fds_max, disk / 1e6,
                 fail ? "false" : "true");
    printf("%s\n", json);
    if (!data) {
        if (keep) {
            printf("bench-load: kept kvarcd (pid %d) serving %s\n", (int)run.pid, run.dir);
        } else {
            kd_run_end(&run, "bench-load");
            if (!fail)
                unlink(log);
        }
    }
    free(kids);
    free(smp);
    if (fail)
        fprintf(stderr, "bench-load: FAIL (%" PRIu64 " unexpected, %" PRIu64 " wrong, %" PRIu64 " verify problems, "
                "%d clients failed%s)\n", unexpected, wrongs, vprob, child_fail, killed ? ", killed" : "");
    return fail ? 1 : 0;
}
