/* trial.h - the passkey experiments: one trial per (mode, length, seed),
 * the equivalence gate, and next-token agreement with full attention.
 * Shared by tools/passkey/kvarc_passkey.c (the report) and
 * tests/test_passkey.c (the asserts). */
#ifndef KVARC_PASSKEY_TRIAL_H
#define KVARC_PASSKEY_TRIAL_H

#include <stddef.h>
#include <stdint.h>

#include "kvarc.h"
#include "model.h"
#include "task.h"

typedef enum pk_mode {
    PK_FULL,        /* exact attention over every earlier token */
    PK_WINDOW,      /* exact, sinks + the last (hot + top_k) tokens: kvarc's token budget */
    PK_KVARC,       /* libkvarc, remapped positions */
    PK_KVARC_TRUE,  /* libkvarc, true positions */
    PK_ABLATION,    /* libkvarc remapped with top_k 0: cold retrieval cut off */
    PK_MODES
} pk_mode;

const char *pk_mode_name(pk_mode mode);
int         pk_mode_parse(const char *s);   /* -1 if unknown */

typedef struct pk_setup {
    const pk_model *m;
    kvarc_client   *cl;          /* for the kvarc modes */
    const char     *ns;          /* namespace of the trial conversations */
    const float    *means;       /* centering means [layers][kv][2][hd], or NULL */
    int             format;      /* KVARC_FMT_* */
    uint32_t        top_k, hot, sinks, chunk;   /* chunk: prefill tokens per forward call */
    uint32_t        coarse;                     /* kvarc_options.coarse_blocks (0: the full scan) */
    uint32_t        prefill_coarse;             /* kvarc_options.prefill_coarse_blocks */
    uint32_t        prefill_shortlist;          /* kvarc_options.prefill_shortlist */
    uint32_t        decode_steps;               /* greedy decode steps after the answer (timing) */
} pk_setup;

/* libkvarc options for a kvarc mode of s (pos_mode, top_k, ...). */
void pk_setup_options(const pk_setup *s, pk_mode mode, kvarc_options *o);

typedef struct pk_result {
    int      correct;            /* the 5 greedy tokens are the key */
    int32_t  key[PK_KEY_DIGITS], answer[PK_KEY_DIGITS];
    uint32_t needle;             /* position of the first key digit */
    int      retrieved;          /* kvarc modes: the last layer's retrieval for the question's last
                                    token held a needle token ("key:" or a digit) for some kv head
                                    (1/0); -1 otherwise */
    double   seconds;
    double   decode_s;           /* the decode steps after the prompt (PK_KEY_DIGITS - 1 + decode_steps) */
    double   decode_kvarc_s;     /* of it, inside kvarc_append and kvarc_attend (kvarc modes) */
    double   stage_s[5];         /* kvarc modes: stage 1, stage 2, decode, attention, archiving (s) */
} pk_result;

/* The prompt of (length, seed): prompt[length - 5], key, needle position. */
void pk_prompt(uint32_t length, uint64_t seed, int32_t *prompt, int32_t *key, uint32_t *needle);

/* One trial. 0, or -1 with a message. */
int pk_trial(const pk_setup *s, pk_mode mode, uint32_t length, uint64_t seed, pk_result *r, char *err, size_t len);

/* Centering means: pre-RoPE K and V of the prompt (length, seed) through
 * full attention, averaged per (layer, kv head). means as pk_setup's. */
int pk_calibrate(const pk_model *m, uint32_t length, uint64_t seed, float *means, char *err, size_t len);

/* The equivalence gate: greedy decoding of n_gen tokens after the prompt
 * (length, seed), full attention over fp16-rounded K/V against libkvarc
 * with the lossless f16 format, true positions, top_k >= every cold
 * token. *same = 1 when the tokens are identical; *max_diff the largest
 * |logit difference| seen; *same_f32 = 1 when kvarc's tokens are also
 * those of full attention over the unrounded fp32 K/V (fed kvarc's tokens). */
int pk_gate(const pk_setup *s, uint32_t length, uint32_t n_gen, uint64_t seed, int *same, double *max_diff,
            int *same_f32, char *err, size_t len);

/* Next-token agreement of a kvarc mode (s's format, top_k, hot) with full
 * attention on the prompt (length, seed), at every position >= from: sums
 * of KL(full || kvarc) in nats and of top-1 agreements, the count, and
 * every position's KL (for the median: a few large KLs at positions where
 * full attention is sure of a token dominate the mean). Start from
 * pk_agree a = { 0 } and add prompts; pk_agree_free releases kl. */
typedef struct pk_agree {
    double   kl_sum, kl_max;
    uint64_t top1_same, n;
    double  *kl;                 /* [n] each position's KL, in the order added; owned */
    uint64_t kl_cap;
} pk_agree;
int pk_agreement(const pk_setup *s, pk_mode mode, uint32_t length, uint64_t seed, uint32_t from, pk_agree *acc,
                 char *err, size_t len);

/* The q-quantile (0..1) of the KLs added, interpolated between ranks
 * (q = 0.5: the median, the mean of the middle two when n is even); 0 if
 * none. Sorts acc->kl. */
double pk_agree_quantile(pk_agree *acc, double q);
void   pk_agree_free(pk_agree *acc);

#endif
