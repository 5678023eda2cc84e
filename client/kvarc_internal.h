/* kvarc_internal.h - libkvarc's insides (not installed). */
#ifndef KVARC_INTERNAL_H
#define KVARC_INTERNAL_H

#include <stdarg.h>

#include "kvarc.h"
#include "kvarc_rpc.h"
#include "kvg.h"
#include "wire.h"   /* kw_rc_of: a gRPC status as a libkvarc return code */

/* ---- record cache (cache.c) ------------------------------------------- */

/* An LRU cache of records keyed by (layer, head, position): an open-
 * addressing table of slot indices over a slot array that holds the
 * records and a doubly linked recency list. Fixed capacity, allocated
 * once. */
typedef struct kl_cache {
    size_t    cap, n, rb;        /* capacity (records), in use, record bytes */
    size_t    tombs;             /* deleted table entries (the table is rebuilt past cap/2) */
    size_t    tab_mask;          /* table size - 1 (a power of two >= 2 cap) */
    uint32_t *tab;               /* slot + 1, 0 empty, UINT32_MAX deleted */
    uint64_t *key;               /* [cap] */
    uint32_t *prev, *next;       /* [cap] recency list, UINT32_MAX ends */
    uint32_t  head, tail;        /* most / least recently used */
    uint8_t  *rec;               /* [cap][rb] */
} kl_cache;

#define KL_CACHE_MAX ((size_t)1 << 30)   /* records: the cache's indices are 32-bit */
int  kl_cache_init(kl_cache *c, size_t cap, size_t rb);
void kl_cache_free(kl_cache *c);
uint64_t kl_cache_key(uint32_t layer, uint32_t head, uint64_t pos);
/* The record for key, made most recent; NULL if absent. */
const uint8_t *kl_cache_get(kl_cache *c, uint64_t key);
/* 1 if present (does not change recency). */
int kl_cache_has(const kl_cache *c, uint64_t key);
/* Insert (or refresh) key's record, evicting the least recent if full. */
void kl_cache_put(kl_cache *c, uint64_t key, const uint8_t *rec);

/* Work space of kl_stage1_coarse, grown as needed, freed by kl_coarse_scratch_free. */
typedef struct kl_coarse_scratch {
    size_t    n_items, n_blocks, n_tok;   /* capacities: summary items, blocks, scanned tokens */
    float    *ib, *is, *bs;      /* item biases [G][items], item scores, block scores */
    uint32_t *bidx, *tk;         /* chosen blocks; top-k work space */
    uint64_t *chosen, *tmp;      /* chosen blocks sorted */
    uint64_t *runs;              /* [2][runs] */
    uint32_t *rel;               /* [n_tok] a scanned token's index from ns */
    float    *ts;                /* [n_tok] its score */
    uint32_t *tidx, *tk2;        /* [n_tok] top-k output and work space */
    size_t    nt;                /* tokens the last kl_coarse_runs chose */
} kl_coarse_scratch;

/* What stage 1 through the coarse tier covers (kl_coarse_plan_of). */
typedef struct kl_coarse_plan {
    uint64_t ns, hot_lo;         /* the cold range */
    uint64_t fb, lb;             /* the first and last block it touches */
    uint64_t se;                 /* summarized blocks: [fb, se) */
    uint64_t nsum;               /* se - fb */
    uint32_t blocks;             /* how many to choose */
    size_t   ntok_max;           /* tokens the chosen blocks hold at most */
} kl_coarse_plan;

/* ---- stage 1 over threads (stage1.c) ---------------------------------- */

#define KVARC_THREADS_MAX 256

/* One thread's stage-1 work space, kept across calls. */
typedef struct kl_s1_lane {
    const float     **qp, **mp;  /* [pcap] the block-bias pass's queries and centerings */
    float           **op;        /* [pcap] and outputs */
    size_t            pcap;
    uint64_t          cap;       /* cold tokens the arrays hold */
    float            *scores;
    uint32_t         *idx, *tk;
    kl_coarse_scratch co;
} kl_s1_lane;

typedef struct kl_s1_lanes {
    kl_s1_lane *lane;
    int         n;
} kl_s1_lanes;

/* Runs of positions a fast-tier stage 1 hands to kvarcd: v[2i] the first
 * position (less the cold range's first, ns), v[2i + 1] the count. */
typedef struct kl_runs {
    uint64_t *v;
    size_t    n, cap;            /* runs; room for cap of them */
} kl_runs;

/* One query's stage 1: H kv heads, each with G prepared queries qs[H][G]
 * over the cold range [ns, hot_lo); true mode: each thread first makes its
 * heads' kind-2 block biases into bb (kvg_block_bias_n, one pass over the
 * angle table); head h's best r into idx_out[h][r] (indices from ns, as
 * kvg_topk_ref orders them), their count into got[h]. */
typedef struct kl_s1_args {
    size_t           H, G, r, nblk;
    uint64_t         ns, hot_lo;
    const kvg_query *qs;
    float           *bb;         /* out, [H][G][nblk]: true mode's block biases (NULL: remapped) */
    uint32_t        *idx_out;
    const float     *q_r;        /* [H][G][d] the queries turned to their position (for bb) */
    const float *const *mu;      /* [H * G] each query's centering (its kv head's mu_k) */
    const double    *bcs;        /* the conversation's tiled block angle table (kvg_block_angles_tm) */
    uint64_t         b0;         /* ns / 64 */
    uint32_t         coarse;     /* the coarse tier's blocks for this query (0: every cold token) */
    size_t           take;       /* this query's shortlist length (<= r, the stride of idx_out) */
    kl_runs         *runs_out;   /* [H] fast tier: each head's runs instead of a shortlist (got[h]: how
                                    many), for kvarcd's stage 1b; NULL: the shortlists here */
} kl_s1_args;

/* ---- one kvarc_attend call: attend.c, its stages stage1.c, stage2.c ---- */

/* The geometry of one kvarc_attend call (attend.c's design notes), worked
 * out once by attend.c and read by the stages. */
typedef struct kl_step {
    uint32_t      layer, n_q;
    size_t        H, QH, G, d;
    uint64_t      len, cs;       /* the layer's length; the chunk's first position */
    uint64_t      ns, hot_lo;    /* sinks; the hot window's first position */
    uint64_t      cold, nh;      /* cold tokens [ns, hot_lo); hot tokens [hot_lo, len) */
    size_t        kret, R_n;     /* records per item from stage 2; stage 1's shortlist length */
    int           rot, lay, remap;
    float         scale;
    uint64_t      b0;            /* true positions: the cold range's first signature block */
    size_t        nblk;          /* and its blocks (0 remapped) */
    const double *bcs;           /* the conversation's block angle table (true positions) */
    size_t        qb, ni;        /* queries per group (one RerankLayer); items per group (qb x H) */
} kl_step;

typedef struct kl_posrec {
    uint64_t pos;
    uint32_t j;                  /* index in the result (best first) */
} kl_posrec;

/* kvarc_attend's work space: one allocation kept on the conversation,
 * carved for each call's geometry and grown (never shrunk) when a call
 * needs more, so that a decode step allocates no work space of its own
 * (the RerankLayer reply and some kernels' buffers still come and go).
 * Freed with the conversation (kl_ax_free). */
typedef struct kl_ax {
    uint8_t      *mem;
    size_t        mem_cap;
    /* stage 1 (stage1.c) */
    uint32_t     *idx;           /* [H][R] one query's shortlists, indices from ns */
    long         *got;           /* [H] their lengths */
    float        *qsc;           /* [items][G][d] scoring queries */
    float        *bb;            /* [QH][nblk] true positions: a query's kind-2 block biases, every head */
    kvg_query    *qs;            /* [QH] one query's heads, prepared */
    const float **mus;           /* [QH] each query head's centering (its kv head's mu_k) */
    uint32_t     *item_head;     /* [items] */
    uint64_t     *shortlist;     /* [items][R] */
    uint32_t     *nsl;           /* [items] each item's shortlist length (prefill_shortlist) */
    uint64_t     *have;          /* [items][R] shortlisted and in the record cache, sorted */
    size_t       *nhave;         /* [items] */
    uint64_t     *sort_tmp;      /* [R] kvg_sort_u64's work space */
    /* stage 2 (stage2.c) */
    Kvarc__V1__RerankItem  *items;   /* [items] the RerankLayer request */
    Kvarc__V1__RerankItem **ip;
    uint64_t     *lkey;          /* [lcap] records landed in ret_rec: (head << 48 | pos) + 1, 0 = empty */
    uint8_t     **lrec;          /* [lcap] where */
    size_t        lcap;          /* a power of two >= 2 x items x kret */
    uint64_t     *ret_pos;       /* [items][kret] */
    uint8_t      *ret_rec;       /* [items][kret][rb] */
    uint32_t     *ret_n;         /* [items] */
    /* attention (attend.c) */
    float        *hot_k, *hot_v; /* [H][nh][d] the hot window, keys at true positions */
    float        *sink_k, *sink_v;   /* [H][ns][d] keys turned */
    float        *rk, *rv;       /* [H][kret][d] one query's retrieved, keys turned */
    float        *qi, *oi;       /* [QH][d] */
    kl_posrec    *pr;            /* [kret] */
    double       *cs_rank;       /* [kret][d] remapped: RoPE angles of rank r when all kret came back */
    double        cs_score[KVARC_HEAD_DIM_MAX];   /* RoPE angles of the scoring distance */
    uint64_t     *dkey;          /* [dslots] decoded map: (head << 48 | pos) + 1, 0 = empty */
    uint32_t     *dat;           /* [dslots] where that entry's K and V are */
    float        *dk, *dv;       /* [dcap][d] decoded (true positions: turned) */
    uint8_t      *stage;         /* [kret][rb] records to decode together */
    uint64_t     *spos;          /* [kret] their positions */
    size_t        dcap, dslots, dn;   /* dcap: items x kret + 1; dslots: a power of two >= 2 dcap */
    /* fast tier: each head's runs from stage 1, then every item's runs and
     * block biases for stage 1b in kvarcd (grown as needed, not carved) */
    kl_runs      *hruns;         /* [hcap] */
    size_t        hcap;
    uint64_t     *iruns;         /* the group's items' runs, absolute (first, count) pairs */
    float        *ibias;         /* true positions: their block biases, [G][blocks] per item */
    size_t        iruns_n, iruns_cap, ibias_n, ibias_cap;
    size_t       *roff, *rn, *boff, *bn;   /* [items] (carved) where each item's runs / biases are, how
                                              many values */
} kl_ax;

void kl_ax_free(kl_ax *x);
/* The slot of (head, pos) in an open-addressing table keys[n] (n a power
 * of two; key (head << 48 | pos) + 1, 0 = empty): where it is or would go. */
size_t kl_slot_of(const uint64_t *keys, size_t n, size_t head, uint64_t pos);
/* Stage 1 of the group's query i (query g0 + i of the chunk q): every
 * query head turned and prepared, every kv head's shortlist (kl_stage1),
 * into items [i H, i H + H) of x: shortlist, nsl, the cached ones in
 * have / nhave, item_head. 0 or an error (message set). */
int  kl_stage1_query(kvarc_conv *cv, const kl_step *s, kl_ax *x, const float *q, uint32_t g0, uint32_t i);
/* Stage 2 of the group's items [0, n): one RerankLayer; every item's
 * records, from the reply or the record cache, into ret_rec / ret_pos /
 * ret_n. 0 or an error (message set). */
int  kl_stage2(kvarc_conv *cv, const kl_step *s, kl_ax *x, size_t n);

/* ---- conversation ------------------------------------------------------ */

typedef struct kl_gpu kl_gpu;    /* the device backend (gpu.h): gpu.c, or gpu_none.c without CUDA */

struct kvarc_client {
    kvc_conn *conn;
    char      err[512];
};

typedef struct kl_layer {
    uint64_t  len;               /* tokens appended */
    uint64_t  archived;          /* tokens durable in kvarcd */
    uint64_t  inherited;         /* the layer's length in kvarcd at attach: [archived, inherited)
                                    a dead writer already stored; kl_flush checks, never resends */
    float    *sink_k, *sink_v;   /* [H][sinks][d], pre-RoPE */
    float    *ring_k, *ring_v;   /* [H][ring][d], token p at slot p % ring, pre-RoPE */
    float    *ring_kr;           /* [H][ring][d] the same keys turned by RoPE to their position */
    kvg_plane *sig;              /* [H]: the signatures of positions [sig_base, archived), in the
                                    layout stage 1 scans (kvg_plane: blocks of 32, word-major); plane
                                    index = position - sig_base */
    uint64_t  sig_base;          /* 0; fast tier: the first position of the unfinished block (the
                                    summaries stand for the finished ones, kvarcd holds the rest) */
    uint8_t **sum_bits;          /* [H] -> [sum_cap][KVG_SUM_ITEMS][d/8]: the coarse tier's summaries
                                    of blocks [0, sum_n) (coarse.c) */
    uint16_t **sum_scale;        /* [H] -> [sum_cap][KVG_SUM_ITEMS] */
    uint8_t  *sum_ok;            /* [sum_cap] 1: the block has its summaries (0: scanned always) */
    uint64_t  sum_n, sum_cap;
} kl_layer;

struct kvarc_conv {
    kvarc_client  *cl;
    uint64_t       id;
    char           ns[64], name[128];
    kvarc_model    m;
    char           fingerprint[64];
    kvarc_options  o;
    uint32_t       ring;         /* hot_window + max_chunk */
    size_t         rb;           /* record bytes */
    kvarc_rotation rot;
    kvg_rope       rope;         /* RoPE: frequencies, and the slow pairs kind-2 signatures center */
    double        *bcs;          /* true positions: block angles, tiled (kvg_block_angles_tm) */
    uint64_t       bcs_n;        /* blocks in bcs (a multiple of KVG_BIAS_TILE) */
    float         *means;        /* [L][H][2][d] */
    kl_layer      *layers;
    kl_cache       cache;
    kvarc_stats    st;
    uint64_t      *last_ret;     /* [H][top_k]: the last query's retrieved positions */
    uint32_t       last_n;       /* per head */
    kl_gpu        *gpu;          /* stage 1 and attention on the device, or NULL */
    kl_s1_lanes    lanes;        /* stage 1's per-thread scratch (stage1.c) */
    kl_ax          ax;           /* kvarc_attend's work space (attend.c) */
    size_t         append_many_max; /* bytes of blocks one AppendMany carries at most (KL_APPEND_MANY_MAX) */
    kvc_pending   *inflight;     /* append_together 2: the AppendMany in flight, or NULL (conv.c) */
    uint32_t      *inflight_layer; /* [n_layers] the layer of each of its blocks */
    size_t         inflight_n;   /* its blocks */
    int            broken;       /* a pipelined AppendMany failed: its code, returned from then on */
    char           broken_msg[512];
    double        *ang;          /* [KL_ANG_SLOTS][d] RoPE angles of recent positions (conv.c), or NULL */
    uint64_t      *ang_pos;      /* [KL_ANG_SLOTS] the position each slot holds (UINT64_MAX: none) */
    char           err[512];
};

/* Positions whose RoPE angles kvarc_append keeps: every layer appends the
 * same positions, so a batch's angles are computed by the first layer
 * and read by the rest. */
#define KL_ANG_SLOTS 128

/* An AppendMany carries blocks of at most this many bytes (gRPC's message
 * limit is 16 MiB); kl_flush_all sends more in several. */
#define KL_APPEND_MANY_MAX ((size_t)12 << 20)

int  kl_fail(kvarc_conv *cv, int rc, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
int64_t kl_now_ns(void);
/* The codec of (layer, head). */
kvg_codec kl_codec(const kvarc_conv *cv, uint32_t layer, uint32_t head);
/* Put token p's exact K, V ([d] each, pre-RoPE) of head h in the ring,
 * and its key turned to p in ring_kr (cs: p's kvg_rope_angles, or NULL). */
void kl_ring_put(kvarc_conv *cv, kl_layer *y, size_t h, uint64_t p, const float *k, const float *v, const double *cs);
/* The vectors positions [first, first + n) of head h's signatures sign,
 * from the ring into x[n][d]: kind 1 k - mu_k; kind 2 the ring's key turned
 * to its position (as kvg_sig_pos_ref turns it) minus its block's
 * centering. The ring must still hold them. */
void kl_sig_keys(const kvarc_conv *cv, const kl_layer *y, size_t h, const float *mu_k, uint64_t first, uint64_t n,
                 float *x);
/* Encode and archive tokens [archived, len) of a layer (from the ring);
 * those below `inherited` are checked against kvarcd's signatures instead
 * of being sent. */
int  kl_flush(kvarc_conv *cv, uint32_t layer);
/* o.append_together: every layer's unarchived tokens in one AppendMany
 * (one durable commit in kvarcd); the first refusal is the error, what
 * was stored is kept. */
int  kl_flush_all(kvarc_conv *cv);
/* append_together 2: wait for the AppendMany in flight (if any) and check
 * its answer; every call that sends to or reads from kvarcd comes after
 * it. 0, or its error (and the same error from then on: the conversation
 * kept its blocks as archived when it sent them). */
int  kl_drain(kvarc_conv *cv);
/* The block angles of blocks [0, nb), nb >= 1, tiled
 * (kvg_block_angles_tm: cv->bcs_n blocks, grown by tiles as needed); NULL
 * when out of memory. */
const double *kl_block_angles(kvarc_conv *cv, uint64_t nb);

/* ---- coarse tier (coarse.c) ------------------------------------------- */


/* Summaries (kvg_summary_ref) of the blocks that tokens [a, a + n) of a
 * layer complete, [a / 64, (a + n) / 64), for every head, from the ring's
 * exact keys; tok_bits [H][n][d/8] and tok_sc [H][n] are the n tokens'
 * signatures (earlier ones come from the mirror). *sbits [H][nsb][S][d/8]
 * and *sscale [H][nsb][S] (malloc'ed) for the nsb returned; 0: none
 * completed; -1: not possible (a block's first tokens already left the
 * ring, right after an attach: those blocks go without); or an error. */
long kl_coarse_make(kvarc_conv *cv, uint32_t layer, uint64_t a, uint32_t n, const uint8_t *tok_bits,
                    const uint16_t *tok_sc, uint8_t **sbits, uint16_t **sscale);
/* Keep the summaries of blocks [b0, b0 + nsb) (laid out as
 * kl_coarse_make's; NULL: those blocks have none, stage 1 always scans
 * them) past y->sum_n. 0, -ENOMEM, -EIO. */
int  kl_coarse_keep(kvarc_conv *cv, kl_layer *y, uint64_t b0, uint64_t nsb, const uint8_t *sbits,
                    const uint16_t *sscale);
/* Stage 1 of one kv head's query group qs[G] through the coarse tier over
 * the cold range [ns, hot_lo): the summaries of its blocks scored
 * (bb: kind-2 block biases [G][nblk] from block ns / 64, or NULL), the
 * tokens of the best `blocks` blocks (and of blocks not yet
 * summarized) scanned, their best r into idx_out as indices from ns, as
 * kvg_topk_ref orders them. -ENOTSUP when the coarse tier would scan about
 * as much as the full scan (or is off): scan it all. runs_only (the fast
 * tier): no scan; the number of runs, x->runs[2i] their first position
 * less ns, x->runs[2i + 1] their length. Other errors are
 * returned, not reported (cv is only read: threads call it for different
 * heads with their own scratch). */
long kl_stage1_coarse(const kvarc_conv *cv, const kl_layer *y, size_t h, const kvg_query *qs, int G, uint64_t ns,
                      uint64_t hot_lo, const float *bb, size_t nblk, size_t r, uint32_t blocks, int runs_only,
                      kl_coarse_scratch *x, uint32_t *idx_out);
void kl_coarse_scratch_free(kl_coarse_scratch *x);
/* kl_stage1_coarse's steps, shared with the GPU's (gpu.c): the plan, 0 or
 * -ENOTSUP (the full scan instead); room in x for it (0, -ENOMEM); and
 * once the summaries chose nc blocks (x->bidx, from pl->fb): the runs to
 * scan (their count; x->runs, from ns), x->rel[x->nt] each scanned
 * token's index from ns in position order, or -ENOTSUP (fewer than r). */
int  kl_coarse_plan_of(const kl_layer *y, uint64_t ns, uint64_t hot_lo, size_t r, uint32_t blocks,
                       kl_coarse_plan *pl);
int  kl_coarse_reserve(kl_coarse_scratch *x, const kl_coarse_plan *pl);
long kl_coarse_runs(const kl_layer *y, const kl_coarse_plan *pl, size_t r, long nc, kl_coarse_scratch *x);

/* The threads a call may use: o.threads, or every online CPU for 0. */
int  kl_threads(const kvarc_conv *cv);
/* Stage 1 of every head of one query, on kl_threads(cv) threads (the GPU's
 * when it has one); the same answer whatever the thread count. 0 or an
 * error (message set, naming the first failing head). */
int  kl_stage1(kvarc_conv *cv, uint32_t layer, const kl_s1_args *a, kl_s1_lanes *lanes, long *got);
void kl_s1_lanes_free(kl_s1_lanes *l);

#endif
