/* codec_simd.c - the record codec and the stage-2 key scoring many tokens
 * at a time, chosen at run time: kvg_encode, kvg_decode and
 * kvg_key_scores_pos. The references (codec_ref.c, sigpos_ref.c) stay the
 * definition; these give their bits.
 *
 * Design notes.
 * - Lanes are tokens (codec_lanes.h): each vector lane runs the
 *   reference's exact operations for one token, so the bits are the
 *   reference's by construction.
 * - One body, three builds: lanes_v4.c (x86-64-v4, AVX-512, 16 tokens a
 *   batch), lanes_v3.c (x86-64-v3, AVX2, 8) and lanes_base.c (the build's
 *   baseline, 4). Each batch is one native
 *   register wide: wider generic vectors made GCC lower every comparison
 *   lane by lane (AVX2 ran 6x slower than AVX-512 that way).
 *   kvg_codec_isa_best() picks the widest build the CPU supports, once
 *   (__builtin_cpu_supports); the *_isa entry points let tests and
 *   benchmarks run each one.
 * - Errors go back to the reference. A batch holding a non-finite input
 *   or a squared norm that overflows is re-run by the reference from its
 *   first token, which writes what it writes and returns the same code and
 *   bad token the reference run over the whole input would have.
 * - Lossless formats (f16, bf16) have no arithmetic worth lanes: they run
 *   the reference.
 */
#include <errno.h>
#include <math.h>
#include <string.h>

#include "kvg.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HAVE_LEVELS 1
#else
#define HAVE_LEVELS 0
#endif

#define DECLARE(sfx)                                                                                          \
    int kvg_lanes_encode_##sfx(const kvg_codec *c, const kvarc_format_info *fi, kvarc_dtype dt, const void *k,  \
                               const void *v, size_t n, uint8_t *records, uint8_t *sig_bits,                   \
                               uint16_t *sig_scale, size_t *bad_t0);                                           \
    int kvg_lanes_signatures_##sfx(const kvarc_rotation *rot, const float *x, size_t n, uint8_t *bits,           \
                                   uint16_t *scales, size_t *bad_t0);                                         \
    int kvg_lanes_summary_##sfx(const kvarc_rotation *rot, const float *x, const uint8_t *bits,                 \
                                const uint16_t *scales, size_t n, uint8_t *sum_bits, uint16_t *sum_scales);    \
    void kvg_lanes_decode_##sfx(const kvg_codec *c, const kvarc_format_info *fi, const uint8_t *records,       \
                                size_t n, float *k_out, float *v_out);                                        \
    void kvg_lanes_key_scores_##sfx(const kvarc_format_info *fi, int d, const float *r, const float *bias,      \
                                    int n_q, const uint8_t *records, size_t n, float *scores);                \
    void kvg_lanes_scores_pos_##sfx(const kvg_codec *c, const kvarc_format_info *fi, const kvg_rope *r,       \
                                    const kvg_rope_table *tb, const float *q_r, int n_q,                      \
                                    const uint8_t *records, const uint64_t *pos, size_t n, float *scores);
DECLARE(v4)
DECLARE(v3)
DECLARE(base)

typedef struct variant {
    const char *name;
    int (*encode)(const kvg_codec *, const kvarc_format_info *, kvarc_dtype, const void *, const void *, size_t,
                  uint8_t *, uint8_t *, uint16_t *, size_t *);
    int (*signatures)(const kvarc_rotation *, const float *, size_t, uint8_t *, uint16_t *, size_t *);
    void (*decode)(const kvg_codec *, const kvarc_format_info *, const uint8_t *, size_t, float *, float *);
    void (*key_scores)(const kvarc_format_info *, int, const float *, const float *, int, const uint8_t *, size_t,
                       float *);
    void (*scores_pos)(const kvg_codec *, const kvarc_format_info *, const kvg_rope *, const kvg_rope_table *,
                       const float *, int, const uint8_t *, const uint64_t *, size_t, float *);
    int (*summary)(const kvarc_rotation *, const float *, const uint8_t *, const uint16_t *, size_t, uint8_t *,
                   uint16_t *);
} variant;

static const variant variants[] = {
    [KVG_ISA_REF]  = { "scalar reference", NULL, NULL, NULL, NULL, NULL, NULL },
    [KVG_ISA_BASE] = { "lanes x4, baseline (SSE)", kvg_lanes_encode_base, kvg_lanes_signatures_base,
                       kvg_lanes_decode_base, kvg_lanes_key_scores_base, kvg_lanes_scores_pos_base,
                       kvg_lanes_summary_base },
    [KVG_ISA_V3]   = { "lanes x8, x86-64-v3 (AVX2)", kvg_lanes_encode_v3, kvg_lanes_signatures_v3,
                       kvg_lanes_decode_v3, kvg_lanes_key_scores_v3, kvg_lanes_scores_pos_v3,
                       kvg_lanes_summary_v3 },
    [KVG_ISA_V4]   = { "lanes x16, x86-64-v4 (AVX-512)", kvg_lanes_encode_v4, kvg_lanes_signatures_v4,
                       kvg_lanes_decode_v4, kvg_lanes_key_scores_v4, kvg_lanes_scores_pos_v4,
                       kvg_lanes_summary_v4 },
};

int kvg_codec_isa_supported(kvg_isa isa)
{
    switch (isa) {
    case KVG_ISA_REF:
    case KVG_ISA_BASE:
        return 1;
#if HAVE_LEVELS
    case KVG_ISA_V3:
        return __builtin_cpu_supports("x86-64-v3");
    case KVG_ISA_V4:
        return __builtin_cpu_supports("x86-64-v4");
#endif
    default:
        return 0;
    }
}

kvg_isa kvg_codec_isa_best(void)
{
    static kvg_isa best = (kvg_isa)-1;          /* a benign race: every thread computes the same */
    kvg_isa b = __atomic_load_n(&best, __ATOMIC_RELAXED);
    if ((int)b < 0) {
        b = kvg_codec_isa_supported(KVG_ISA_V4) ? KVG_ISA_V4 :
            kvg_codec_isa_supported(KVG_ISA_V3) ? KVG_ISA_V3 : KVG_ISA_BASE;
        __atomic_store_n(&best, b, __ATOMIC_RELAXED);
    }
    return b;
}

const char *kvg_codec_isa_name(kvg_isa isa)
{
    return (unsigned)isa < sizeof variants / sizeof variants[0] ? variants[isa].name : "unknown";
}

/* The format's table entry for the lanes, or NULL where the reference
 * must run (a lossless format, or anything the reference refuses). */
static const kvarc_format_info *lanes_format(const kvg_codec *c)
{
    if (!c || !c->rot || kvarc_head_dim_check(c->rot->head_dim))
        return NULL;
    const kvarc_format_info *fi = kvarc_format_get(c->format);
    return fi && fi->rotated ? fi : NULL;
}

int kvg_encode_isa(kvg_isa isa, const kvg_codec *c, kvarc_dtype dt, const void *k, const void *v, size_t n,
                   uint8_t *records, uint8_t *sig_bits, uint16_t *sig_scale, size_t *bad_token)
{
    if (!kvg_codec_isa_supported(isa))
        return -ENOTSUP;
    const kvarc_format_info *fi = lanes_format(c);
    if (isa == KVG_ISA_REF || !fi || !kvarc_dtype_size(dt) || n == 0 || !k || !v || !records || !sig_bits ||
        !sig_scale)
        return kvg_encode_ref(c, dt, k, v, n, records, sig_bits, sig_scale, bad_token);
    size_t t0 = 0;
    if (!variants[isa].encode(c, fi, dt, k, v, n, records, sig_bits, sig_scale, &t0))
        return 0;
    /* the batch at t0 holds the first fault: the reference finds it */
    int d = c->rot->head_dim, half = kvarc_record_half_bytes(fi->id, d);
    size_t es = kvarc_dtype_size(dt) * (size_t)d, bt = 0;
    int rc = kvg_encode_ref(c, dt, (const uint8_t *)k + t0 * es, (const uint8_t *)v + t0 * es, n - t0,
                            records + t0 * (size_t)(2 * half), sig_bits + t0 * (size_t)(d / 8), sig_scale + t0,
                            &bt);
    if (rc && bad_token)
        *bad_token = t0 + bt;
    return rc;
}

/* The build for n tokens: below a batch of 4 the lanes would mostly
 * compute zeros, so the reference runs (the same bits either way). */
static kvg_isa isa_for(size_t n) { return n < 4 ? KVG_ISA_REF : kvg_codec_isa_best(); }

int kvg_encode(const kvg_codec *c, kvarc_dtype dt, const void *k, const void *v, size_t n, uint8_t *records,
               uint8_t *sig_bits, uint16_t *sig_scale, size_t *bad_token)
{
    return kvg_encode_isa(isa_for(n), c, dt, k, v, n, records, sig_bits, sig_scale, bad_token);
}

int kvg_signatures_isa(kvg_isa isa, const kvarc_rotation *rot, const float *x, size_t n, uint8_t *bits,
                       uint16_t *scales, size_t *bad)
{
    if (!kvg_codec_isa_supported(isa))
        return -ENOTSUP;
    if (!rot || kvarc_head_dim_check(rot->head_dim) || (n && (!x || !bits || !scales)))
        return -EINVAL;
    int d = rot->head_dim;
    size_t t = 0;
    if (isa != KVG_ISA_REF && !variants[isa].signatures(rot, x, n, bits, scales, &t))
        return 0;
    /* the reference, token by token, from the batch holding the first fault */
    for (; t < n; t++) {
        int rc = kvg_signature_ref(rot, x + t * (size_t)d, bits + t * (size_t)(d / 8), &scales[t]);
        if (rc) {
            if (bad)
                *bad = t;
            return rc;
        }
    }
    return 0;
}

int kvg_signatures(const kvarc_rotation *rot, const float *x, size_t n, uint8_t *bits, uint16_t *scales, size_t *bad)
{
    return kvg_signatures_isa(isa_for(n), rot, x, n, bits, scales, bad);
}

int kvg_decode_isa(kvg_isa isa, const kvg_codec *c, const uint8_t *records, size_t n, float *k_out, float *v_out)
{
    if (!kvg_codec_isa_supported(isa))
        return -ENOTSUP;
    const kvarc_format_info *fi = lanes_format(c);
    if (isa == KVG_ISA_REF || !fi || n == 0 || !records)
        return kvg_decode_ref(c, records, n, k_out, v_out);
    variants[isa].decode(c, fi, records, n, k_out, v_out);
    return 0;
}

int kvg_decode(const kvg_codec *c, const uint8_t *records, size_t n, float *k_out, float *v_out)
{
    return kvg_decode_isa(isa_for(n), c, records, n, k_out, v_out);
}

int kvg_key_scores_isa(kvg_isa isa, const kvg_codec *c, const float *q, int n_q, const uint8_t *records, size_t n,
                       float *scores)
{
    if (!kvg_codec_isa_supported(isa))
        return -ENOTSUP;
    const kvarc_format_info *fi = lanes_format(c);
    if (isa == KVG_ISA_REF || !fi || !q || n_q < 1 || n_q > 64 || n == 0 || !records || !scores)
        return kvg_key_scores_ref(c, q, n_q, records, n, scores);
    /* the queries prepared as the reference prepares them */
    int d = c->rot->head_dim;
    float r[64 * KVARC_HEAD_DIM_MAX], bias[64];
    int rc = kvg_key_query_prep(c, q, n_q, r, bias);
    if (rc)
        return rc;
    variants[isa].key_scores(fi, d, r, bias, n_q, records, n, scores);
    return 0;
}

int kvg_key_scores(const kvg_codec *c, const float *q, int n_q, const uint8_t *records, size_t n, float *scores)
{
    return kvg_key_scores_isa(isa_for(n), c, q, n_q, records, n, scores);
}

int kvg_key_scores_pos_isa(kvg_isa isa, const kvg_codec *c, const kvg_rope *r, const kvg_rope_table *tb,
                           const float *q_r, int n_q, const uint8_t *records, const uint64_t *pos, size_t n,
                           float *scores)
{
    if (!kvg_codec_isa_supported(isa))
        return -ENOTSUP;
    const kvarc_format_info *fi = lanes_format(c);
    if (isa == KVG_ISA_REF || !fi || !r || r->d != c->rot->head_dim || !q_r || n_q < 1 || n_q > 64 || n == 0 ||
        !records || !pos || !scores)
        return kvg_key_scores_pos_ref(c, r, tb, q_r, n_q, records, pos, n, scores);
    for (size_t i = 0; i < (size_t)n_q * (size_t)r->d; i++)
        if (!isfinite(q_r[i]))
            return KVARC_ENONFINITE;
    variants[isa].scores_pos(c, fi, r, tb, q_r, n_q, records, pos, n, scores);
    return 0;
}

int kvg_key_scores_pos(const kvg_codec *c, const kvg_rope *r, const kvg_rope_table *tb, const float *q_r, int n_q,
                       const uint8_t *records, const uint64_t *pos, size_t n, float *scores)
{
    return kvg_key_scores_pos_isa(isa_for(n), c, r, tb, q_r, n_q, records, pos, n, scores);
}

int kvg_summary_isa(kvg_isa isa, const kvarc_rotation *rot, const float *x, const uint8_t *bits,
                    const uint16_t *scales, size_t n, uint8_t *sum_bits, uint16_t *sum_scales)
{
    if (!kvg_codec_isa_supported(isa))
        return -ENOTSUP;
    if (isa == KVG_ISA_REF || !rot || kvarc_head_dim_check(rot->head_dim) || !x || !bits || !scales || !sum_bits ||
        !sum_scales || n < 1 || n > KVG_SIG_BLOCK ||
        variants[isa].summary(rot, x, bits, scales, n, sum_bits, sum_scales))
        return kvg_summary_ref(rot, x, bits, scales, n, sum_bits, sum_scales);
    return 0;
}

int kvg_summary(const kvarc_rotation *rot, const float *x, const uint8_t *bits, const uint16_t *scales, size_t n,
                uint8_t *sum_bits, uint16_t *sum_scales)
{
    return kvg_summary_isa(kvg_codec_isa_best(), rot, x, bits, scales, n, sum_bits, sum_scales);
}
