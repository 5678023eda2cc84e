/* synth.h - structured synthetic K/V/Q for the quality harness, the demo
 * and the benchmarks (tools/; not part of libkvarc).
 *
 * Keys (pre-RoPE, per kv head) are the sum of
 *   - a shared mean direction (|mu| = 2 per dimension on average),
 *   - outlier channels: 4 fixed dimensions with 5x the spread,
 *   - a topic vector: the conversation moves through topics, one per run of
 *     ~64 tokens (local smoothness), drawn from a pool of 256,
 *   - AR(1) noise, rho 0.8 (neighbouring tokens look alike),
 * and the model applies RoPE to the first half of the dimensions
 * (rotary_dims = head_dim / 2): topics and needles live in the other half,
 * so they match at any distance, as semantic content does in a real model.
 * Needles: at chosen positions a key carries a strong unit direction of
 * its own and its value a pattern; a needle query points at that
 * direction (strength chosen so that full attention puts about half its
 * weight on the needle even among a million tokens). Ordinary queries point
 * at a past topic.
 * Everything is a function of (seed, position): tokens in order cost one
 * Gaussian per value; any token out of order is rebuilt from a short
 * window (the AR noise forgets in ~24 steps), so results match to ~1e-3.
 */
#ifndef KVARC_SYNTH_H
#define KVARC_SYNTH_H

#include <stddef.h>
#include <stdint.h>

#define SYNTH_TOPICS  256
#define SYNTH_RUN     64
#define SYNTH_NEEDLES 8

typedef struct synth {
    int      d, n_kv_heads, n_q_heads;
    uint64_t seed;
    int      n_needles;
    uint64_t needle_pos[SYNTH_NEEDLES];
    float   *mu;         /* [H][d] */
    float   *topic;      /* [TOPICS][H][d] (zero in the rotary half) */
    float   *needle_dir; /* [NEEDLES][H][d] unit, non-rotary half */
    float   *ar;         /* [H][d] AR(1) state after next_pos - 1 */
    uint64_t next_pos;   /* synth_kv in order is cheap; out of order rebuilds */
} synth;

/* Needles at the given fractions of n_tokens (at most SYNTH_NEEDLES). */
int  synth_init(synth *s, int head_dim, int n_kv_heads, int n_q_heads, uint64_t seed, uint64_t n_tokens,
                const double *needle_depths, int n_needles);
void synth_free(synth *s);

/* K and V of token pos: [n_kv_heads][d] each (fp32, pre-RoPE). */
void synth_kv(synth *s, uint64_t pos, float *k, float *v);

/* The query of a decode step at position pos: [n_q_heads][d], pre-RoPE.
 * needle >= 0 aims at that needle; otherwise at a past topic. */
void synth_query(const synth *s, uint64_t pos, int needle, float *q);

/* The topic of token pos (for tests of the generator). */
int synth_topic(const synth *s, uint64_t pos);

/* Per (kv head) means of K and V over n sample tokens spread across
 * [0, n_tokens): means[H][2][d], what a client passes at create. */
void synth_means(synth *s, uint64_t n_tokens, int n, float *means);

#endif
