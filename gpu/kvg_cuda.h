/* kvg_cuda.h - GPU versions of the kernels in kvg.h (built when CUDA is).
 *
 * Same semantics as the CPU references, bit for bit for the codec, the
 * stage-1 scores and top-k (SCHEMA.md): the .cu files build with
 * --fmad=false and use only correctly rounded operations.
 *
 * Conventions: every pointer argument named d_* is device memory; the
 * kvg_codec's rot is a host struct (passed to the kernels by value) and
 * its mu_k/mu_v are device pointers (or NULL). `stream` is a cudaStream_t
 * (NULL = the default stream). These launchers are synchronous: they
 * return after the work finished, with 0 or a negative code (kvarc codes
 * as the CPU versions; -EIO for a CUDA error, whose text goes to stderr).
 *
 * Caveats: top-k on the GPU is limited to k <= KVG_CUDA_TOPK_MAX and
 * n < 2^31. Attention matches kvg_attend_ref to a tolerance (fp32 sums in
 * another order), not bit for bit.
 */
#ifndef KVG_CUDA_H
#define KVG_CUDA_H

#include "kvg.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KVG_CUDA_TOPK_MAX 4096

/* 1 if a CUDA device is usable, 0 if not (no driver, no device). */
int kvg_cuda_available(void);
/* Name of device 0 into buf (empty string if none). */
void kvg_cuda_device_name(char *buf, size_t len);

/* kvg_encode_ref on the device. d_bad_token (device, 1 uint64) receives the
 * first failing token, as bad_token does. */
int kvg_encode_cuda(const kvg_codec *c, kvarc_dtype dt, const void *d_k, const void *d_v,
                    size_t n, uint8_t *d_records, uint8_t *d_sig_bits, uint16_t *d_sig_scale,
                    size_t *bad_token, void *stream);

/* kvg_decode_ref on the device; d_k_out or d_v_out may be NULL. */
int kvg_decode_cuda(const kvg_codec *c, const uint8_t *d_records, size_t n, float *d_k_out,
                    float *d_v_out, void *stream);

/* kvg_query_prep_ref on the device for n queries d_q [n][head_dim] of dt:
 * d_out[n] (device) byte-equal to the CPU's structs. rot is a host struct,
 * d_mu_k device memory or NULL. KVARC_ENONFINITE if any query fails. */
int kvg_query_prep_cuda(const kvarc_rotation *rot, const float *d_mu_k, kvarc_dtype dt, const void *d_q,
                        size_t n, kvg_query *d_out, void *stream);

/* kvg_score_ref on the device. qs are host structs (prepared by
 * kvg_query_prep_ref); signatures and scores live on the device. */
int kvg_score_cuda(kvg_score_mode mode, kvg_combine comb, const kvg_query *qs, int n_q,
                   const uint8_t *d_sig_bits, const uint16_t *d_sig_scale, size_t n,
                   float *d_scores, void *stream);

/* kvg_score_pos_ref on the device: d_blk_bias [n_q][nblk] in device
 * memory (the host's kvg_block_bias_ref values), or NULL. */
int kvg_score_pos_cuda(kvg_score_mode mode, kvg_combine comb, const kvg_query *qs, int n_q,
                       const uint8_t *d_sig_bits, const uint16_t *d_sig_scale, size_t n, uint64_t first_pos,
                       const float *d_blk_bias, size_t nblk, float *d_scores, void *stream);

/* kvg_score_items_ref on the device, the item biases given compactly:
 * item j of query h takes d_item_bias[h * bias_stride + j / per_bias]
 * (per_bias 1, bias_stride n: the reference's layout; per_bias
 * KVG_SUM_ITEMS: one bias per summarized block), or NULL: the query's. */
int kvg_score_items_cuda(kvg_score_mode mode, kvg_combine comb, const kvg_query *qs, int n_q,
                         const uint8_t *d_sig_bits, const uint16_t *d_sig_scale, size_t n,
                         const float *d_item_bias, size_t per_bias, size_t bias_stride, float *d_scores,
                         void *stream);

/* Stage 1b's scan on the device, over signatures scattered in VRAM: piece
 * p's n signatures (positions pos..pos + n - 1, at d_bits / d_scale) score
 * into d_scores[out..out + n), each as kvg_score_pos_ref scores it (its
 * block's bias d_blk_bias[h * nblk + position / 64 - bias_b0], or the
 * query's bias for NULL): what kvg_score_runs gives the same runs. The
 * piece table is host memory. */
typedef struct kvg_cuda_piece {
    const uint8_t  *d_bits;
    const uint16_t *d_scale;
    uint64_t        pos, n, out;
} kvg_cuda_piece;
int kvg_score_pieces_cuda(kvg_score_mode mode, kvg_combine comb, const kvg_query *qs, int n_q,
                          const kvg_cuda_piece *pieces, size_t np, uint64_t bias_b0, const float *d_blk_bias,
                          size_t nblk, float *d_scores, void *stream);

/* kvg_summary_ref on the device for nb blocks of n tokens each: d_x
 * [nb * n][d], d_bits [nb * n][d / 8], d_scales [nb * n] in,
 * d_sum_bits [nb][KVG_SUM_ITEMS][d / 8], d_sum_scales [nb][KVG_SUM_ITEMS]
 * out. KVARC_ENONFINITE when any block fails (the reference's cases). */
int kvg_summary_cuda(const kvarc_rotation *rot, const float *d_x, const uint8_t *d_bits, const uint16_t *d_scales,
                     size_t nb, size_t n, uint8_t *d_sum_bits, uint16_t *d_sum_scales, void *stream);

/* kvg_block_best_ref on the device (d_ok may be NULL). */
int kvg_block_best_cuda(const float *d_item_scores, size_t nb, int items, const uint8_t *d_ok, float *d_out,
                        void *stream);

/* kvg_topk_ref on the device: d_idx_out[min(k, n)] and optionally
 * d_val_out. Needs device scratch of kvg_topk_cuda_scratch_bytes(n).
 * Returns the count selected or a negative code (-EINVAL for k above
 * KVG_CUDA_TOPK_MAX). */
size_t kvg_topk_cuda_scratch_bytes(size_t n);
long kvg_topk_cuda(const float *d_scores, size_t n, size_t k, uint32_t *d_idx_out,
                   float *d_val_out, void *d_scratch, void *stream);

/* kvg_attend_ref on the device: d_q [n_q_heads][d] and d_out are device
 * memory, and so are every part's k and v (the kvg_attn_part structs and
 * their n_per_head arrays are host memory). Same return codes. */
int kvg_attend_cuda(const float *d_q, int n_q_heads, int n_kv_heads, int d, float scale,
                    const kvg_attn_part *parts, int n_parts, float *d_out, void *stream);

#ifdef __cplusplus
}
#endif
#endif /* KVG_CUDA_H */
