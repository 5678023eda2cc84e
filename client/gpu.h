/* gpu.h - libkvarc's device backend, as the rest of the library sees it.
 *
 * One interface, two builds: gpu.c (CUDA) and gpu_none.c (built without
 * CUDA: kl_gpu_init never sets cv->gpu, the copies answer -ENOTSUP). The
 * backend is picked once, when the conversation is made (kl_gpu_init);
 * callers test cv->gpu and need no #ifdef. Any device failure frees it
 * (kl_gpu_free) and the conversation goes on on the CPU path for good.
 * The backend calls only util.c's helpers, coarse.c's plan and runs
 * (kl_coarse_plan_of, kl_coarse_runs) and kvg's kernels: never conv.c or
 * attend.c. */
#ifndef KVARC_GPU_H
#define KVARC_GPU_H

#include "kvarc_internal.h"

/* Set cv->gpu when a device is there and the options allow it (0 also
 * when there is none; an error only when one is there and failed). */
int  kl_gpu_init(kvarc_conv *cv);
void kl_gpu_free(kvarc_conv *cv);
/* Signatures of positions [first, first + n) of (layer, head) into VRAM. */
int  kl_gpu_put_sigs(kvarc_conv *cv, uint32_t layer, uint32_t head, uint64_t first, const uint8_t *bits,
                     const uint16_t *scales, uint64_t n);
/* Stage 1 over positions [first, first + n): the best r indices (relative
 * to first) into idx_out, as kvg_topk_ref would (blk_bias: kind-2 block
 * biases [n_q][nblk] as kvg_score_pos_ref takes them, or NULL); through
 * the coarse tier when `blocks` is set and it pays (kl_stage1_coarse's
 * answer, x its work space), else the full scan; -ENOTSUP when the device
 * cannot (r above its top-k limit): run the CPU path. */
long kl_gpu_stage1(kvarc_conv *cv, uint32_t layer, uint32_t head, const kvg_query *qs, int n_q, uint64_t first,
                   uint64_t n, const float *blk_bias, size_t nblk, size_t r, uint32_t blocks, kl_coarse_scratch *x,
                   uint32_t *idx_out);
/* Bring the layer's VRAM hot window up to its length (once per attend). */
int  kl_gpu_ring_sync(kvarc_conv *cv, uint32_t layer);
/* One query's attention on the GPU: qi [n_q_heads][d] turned; sinks
 * [H][ns][d], retrieved [H][kstride][d] (kn per head), all turned, host
 * memory; the hot window is positions [hot_lo, hot_lo + n_hot) from VRAM.
 * out [n_q_heads][d] host. Equal to kvg_attend_ref to 1e-5 relative. */
int  kl_gpu_attend(kvarc_conv *cv, uint32_t layer, const float *qi, const float *sink_k, const float *sink_v,
                   size_t ns, const float *rk, const float *rv, size_t kstride, size_t kn, uint64_t hot_lo,
                   size_t n_hot, float scale, float *out);
/* bytes between the caller's device memory and host memory (device.c):
 * 0, -EINVAL (not that much device memory there), -ENOTSUP (built
 * without CUDA). */
int  kl_gpu_to_host(void *dst, const void *d_src, size_t bytes);
int  kl_gpu_to_device(void *d_dst, const void *src, size_t bytes);

#endif
