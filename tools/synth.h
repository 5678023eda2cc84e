/* synth.h - structured synthetic K/V/Q for the quality harness, the demo
 * and the benchmarks (tools/; not part of libkvarc).
 *
 * Two generators, chosen at init:
 *
 * "free" (synth_init; the demo's and the original harness's, unchanged):
 * keys (pre-RoPE, per kv head) are the sum of
 *   - a shared mean direction (|mu| = 2 per dimension on average),
 *   - outlier channels: 4 fixed dimensions with 5x the spread,
 *   - a topic vector: the conversation moves through topics, one per run of
 *     ~64 tokens (local smoothness), drawn from a pool of 256,
 *   - AR(1) noise, rho 0.8 (neighbouring tokens look alike),
 * and the model applies RoPE to the first half of the dimensions
 * (rotary_dims = head_dim / 2, theta 10000): topics and needles live in the
 * other half, so they match at any distance. Needles: at chosen positions a
 * key carries a strong unit direction of its own and its value a pattern; a
 * needle query points at that direction (full attention's weight on the
 * needle, as bench-quality measures it: 0.97 / 0.77 / 0.30 on average at
 * 4K / 32K / 1M, some needles far less). Ordinary queries point
 * at a past topic. Because nothing a query looks for turns with position,
 * this generator cannot tell whether retrieval ranks keys at the distance
 * attention uses.
 *
 * "pos" (synth_init_pos; position-true, as in Llama): the same key parts,
 * but RoPE turns every dimension (rotary_dims = head_dim, theta 500000) and
 * topics and needles live in every dimension. A needle spans needle_len
 * consecutive tokens (default 16) that share its direction u. A query at
 * position m aims at what it wants at that thing's true distance: for a
 * needle centred at c (pre-RoPE) q = s * RoPE(c - m) u + noise, so that
 * RoPE(m) q . RoPE(n) k = s * u . RoPE(n - c) k for a key at n: only keys
 * at (about) the right distance match, the fast rotary pairs decorrelating
 * within a few tokens and the slow ones over thousands. An ordinary query
 * aims the same way at the centre of a past topic run. s is set so that
 * full attention puts about half its weight on the needle's 16 tokens at
 * 1M tokens (more at shorter contexts); bench-quality prints the share.
 * Gaussians are cheaper here (one hash per value): 1M tokens of 2 kv heads
 * in ~1.6 s on the 2-core VM, 20x faster than free's.
 *
 * Everything is a function of (seed, position): tokens in order cost one
 * Gaussian per value; any token out of order is rebuilt from a short
 * window (the AR noise forgets in ~24 steps), so results match to ~1e-3.
 * Values do not depend on that state at all (synth_v).
 */
#ifndef KVARC_SYNTH_H
#define KVARC_SYNTH_H

#include <stddef.h>
#include <stdint.h>

#define SYNTH_TOPICS     256
#define SYNTH_RUN        64
#define SYNTH_NEEDLES    8
#define SYNTH_NEEDLE_LEN 16         /* pos generator's default needle length */

typedef enum synth_gen {
    SYNTH_GEN_FREE = 0,             /* topics and needles where RoPE does not turn */
    SYNTH_GEN_POS  = 1,             /* RoPE on every dimension, aims at true distances */
} synth_gen;

typedef struct synth {
    int      d, n_kv_heads, n_q_heads;
    uint64_t seed;
    synth_gen gen;
    int      rotary_dims;           /* the RoPE a model of this generator uses (layout 0: half-split) */
    float    rope_theta;
    int      needle_len;            /* tokens per needle: 1 (free) or needle_len (pos) */
    int      n_needles;
    uint64_t needle_pos[SYNTH_NEEDLES]; /* first token of each needle */
    float   *mu;         /* [H][d] */
    float   *topic;      /* [TOPICS][H][d] (free: zero in the rotary half) */
    float   *needle_dir; /* [NEEDLES][H][d] unit (free: in the non-rotary half) */
    float   *ar;         /* [H][d] AR(1) state after next_pos - 1 */
    uint64_t next_pos;   /* synth_kv in order is cheap; out of order rebuilds */
} synth;

/* The free generator. Needles (one token each) at the given fractions of
 * n_tokens (at most SYNTH_NEEDLES). Returns 0 or -1 (out of memory). */
int  synth_init(synth *s, int head_dim, int n_kv_heads, int n_q_heads, uint64_t seed, uint64_t n_tokens,
                const double *needle_depths, int n_needles);

/* The position-true generator: needles of needle_len tokens (0: 16) whose
 * first token sits at the given fractions of n_tokens, kept inside
 * [0, n_tokens - needle_len]. Returns 0 or -1 (out of memory, bad sizes). */
int  synth_init_pos(synth *s, int head_dim, int n_kv_heads, int n_q_heads, uint64_t seed, uint64_t n_tokens,
                    const double *needle_depths, int n_needles, int needle_len);
void synth_free(synth *s);

/* K and V of token pos: [n_kv_heads][d] each (fp32, pre-RoPE). */
void synth_kv(synth *s, uint64_t pos, float *k, float *v);

/* V alone of token pos ([n_kv_heads][d]): exactly synth_kv's, at any
 * position, without touching the AR state. */
void synth_v(const synth *s, uint64_t pos, float *v);

/* The needle token pos belongs to, or -1. */
int synth_needle_at(const synth *s, uint64_t pos);

/* The query of a decode step at position pos: [n_q_heads][d], pre-RoPE.
 * needle >= 0 aims at that needle; otherwise at a past topic. */
void synth_query(const synth *s, uint64_t pos, int needle, float *q);

/* The topic of token pos (for tests of the generator). */
int synth_topic(const synth *s, uint64_t pos);

/* Per (kv head) means of K and V over n sample tokens spread across
 * [0, n_tokens): means[H][2][d], what a client passes at create. */
void synth_means(synth *s, uint64_t n_tokens, int n, float *means);

#endif
