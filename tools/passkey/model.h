/* model.h - the passkey model's forward pass in C, attention pluggable.
 *
 * Loads the KVARCMDL file tools/passkey/train.py writes (a Llama-style
 * decoder: RMSNorm, RoPE half-split, GQA, SwiGLU, untied head) and runs it
 * over chunks of tokens. Every attention layer goes through a pk_attn
 * backend, so the same forward pass runs with:
 *   - exact attention over every earlier token (full), or over the sinks
 *     plus the last `window` tokens (a sliding window), kept here;
 *   - libkvarc: K and V appended to a conversation archived in kvarcd,
 *     attention by kvarc_attend (sinks + retrieved + hot window).
 * No Python at run time. */
#ifndef KVARC_PASSKEY_MODEL_H
#define KVARC_PASSKEY_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "kvarc.h"

typedef struct pk_layer_w {
    const float *attn_norm, *ffn_norm;      /* [d] */
    float       *wq, *wk, *wv, *wo;         /* transposed: [in][out] */
    float       *w1, *w3, *w2;
} pk_layer_w;

typedef struct pk_model {
    uint32_t    vocab, d, n_layers, n_heads, n_kv_heads, head_dim, ffn, train_len;
    float       rope_theta, norm_eps;
    float      *file;                       /* the weights as read (fp32) */
    float      *t;                          /* the transposed matrices */
    const float *emb;                       /* [vocab][d] */
    const float *norm;                      /* [d] */
    float       *head;                      /* transposed [d][vocab] */
    pk_layer_w  *L;
} pk_model;

/* Load path; 0 or -1 with a message naming the file and what is wrong. */
int  pk_model_load(const char *path, pk_model *m, char *err, size_t len);
void pk_model_free(pk_model *m);

/* The kvarc_model shape of m (rotary over the whole head, half-split). */
kvarc_model pk_model_shape(const pk_model *m, const char *fingerprint);

/* An attention backend for one sequence. */
typedef enum pk_attn_kind { PK_ATTN_EXACT, PK_ATTN_KVARC } pk_attn_kind;
typedef struct pk_attn {
    pk_attn_kind kind;
    /* exact: window 0 = every earlier token; else sinks + the last window */
    uint32_t     sinks, window;
    int          f16;                       /* exact: round K and V to fp16 as stored */
    uint32_t     n_layers;
    uint64_t     cap, *len;                 /* tokens held, per layer */
    float      **kr, **v;                   /* [layer] -> [cap][kv head][hd] (K turned) */
    double      *inv_freq;
    double      *mean_acc;                  /* NULL, or sums of pre-RoPE K, V: [layer][kv][2][hd] */
    /* kvarc */
    kvarc_conv  *cv;
    int          kv_dtype;                  /* KVARC_DTYPE_F32 or F16 handed to kvarc_append */
    double       kvarc_s;                   /* seconds inside kvarc_append and kvarc_attend */
} pk_attn;

/* Exact attention for up to cap tokens. */
int  pk_attn_exact_init(pk_attn *a, const pk_model *m, uint64_t cap, uint32_t sinks, uint32_t window, int f16);
/* libkvarc attention through cv (borrowed); kv_dtype as above. */
void pk_attn_kvarc_init(pk_attn *a, kvarc_conv *cv, int kv_dtype);
void pk_attn_free(pk_attn *a);

/* Run tokens tok[0..n) (the next n of the sequence) through the model.
 * logits: NULL, or [n][vocab] for every token, or (last_only) [vocab] for
 * the last. 0, or -1 with a message. */
int pk_forward(const pk_model *m, pk_attn *a, const int32_t *tok, uint32_t n, float *logits, int last_only,
               char *err, size_t len);

/* The arg max of logits[vocab] (lowest index on ties). */
int32_t pk_argmax(const float *logits, uint32_t vocab);

#endif
