/* codec.cu - GPU versions of the record codec (CPU reference: codec_ref.c).
 *
 * Version 1: one thread block per token (grid-stride over tokens), one
 * thread per coordinate; shared-memory butterflies and tree sums in the
 * order SCHEMA.md fixes, every operation an explicit _rn intrinsic, so the
 * bytes equal the CPU reference's. Throughput is not this version's aim
 * (issue 6 owns the fast encode); parity is. */
#include <string.h>

#include "cuda_common.cuh"

struct kvg_tables {            /* the codebooks, passed by value */
    float q3l[8], q3b[7], q4l[16], q4b[15];
};

struct kvg_codec_dev {         /* what a kernel needs of a kvg_codec */
    int format, code_bits, rotated, half;
    kvarc_rotation rot;
    const float *mu_k, *mu_v;
};

static int codec_dev(const kvg_codec *c, kvg_codec_dev *out, kvg_tables *tb)
{
    if (!c || !c->rot)
        return -EINVAL;
    const kvarc_format_info *fi = kvarc_format_get(c->format);
    if (!fi)
        return KVARC_EFORMAT;
    if (kvarc_head_dim_check(c->rot->head_dim))
        return KVARC_EHEADDIM;
    out->format = fi->id;
    out->code_bits = fi->code_bits;
    out->rotated = fi->rotated;
    out->half = kvarc_record_half_bytes(fi->id, c->rot->head_dim);
    out->rot = *c->rot;
    out->mu_k = c->mu_k;
    out->mu_v = c->mu_v;
    memcpy(tb->q3l, kvarc_q3_levels, sizeof tb->q3l);
    memcpy(tb->q3b, kvarc_q3_bounds, sizeof tb->q3b);
    memcpy(tb->q4l, kvarc_q4_levels, sizeof tb->q4l);
    memcpy(tb->q4b, kvarc_q4_bounds, sizeof tb->q4b);
    return 0;
}

/* y = R x for shared x -> shared y (y may be x); returns tsum(y^2). */
__device__ static float rotate_norm(const kvarc_rotation &rot, float *x, float *y, float *red)
{
    int i = threadIdx.x, d = rot.head_dim;
    float t = __fmul_rn(x[i], rot.signs[i]);
    __syncthreads();
    y[i] = t;
    kvg_fwht(y, d);
    float yi = __fmul_rn(y[i], rot.inv_sqrt_d);
    __syncthreads();
    y[i] = yi;
    red[i] = __fmul_rn(yi, yi);
    return kvg_tree_sum(red, d);
}

/* Write byte j of the LSB-first packed stream of codes[0..d) (bits wide). */
__device__ static unsigned char pack_byte(const unsigned char *codes, int bits, int j)
{
    unsigned v = 0;
    for (int b = 0; b < 8; b++) {
        int pos = 8 * j + b;
        v |= ((codes[pos / bits] >> (pos % bits)) & 1u) << b;
    }
    return (unsigned char)v;
}

__device__ static void put_f32(unsigned char *p, float f)
{
    unsigned u = __float_as_uint(f);
    for (int b = 0; b < 4; b++)
        p[b] = (unsigned char)(u >> (8 * b));
}

__device__ static float get_f32(const unsigned char *p)
{
    return __uint_as_float((unsigned)p[0] | (unsigned)p[1] << 8 | (unsigned)p[2] << 16 |
                           (unsigned)p[3] << 24);
}

/* One half record of a rotated format from shared y (squared norm ss). */
__device__ static void encode_rotated_half(const kvg_codec_dev &c, const kvg_tables &tb,
                                           const float *y, float ss, float *red,
                                           unsigned char *codes, unsigned char *half)
{
    int i = threadIdx.x, d = c.rot.head_dim;
    float scale;
    if (c.format == KVARC_FMT_I8) {
        red[i] = fabsf(y[i]);
        for (int h = d / 2; h >= 1; h /= 2) {
            __syncthreads();
            if (i < h)
                red[i] = fmaxf(red[i], red[i + h]);
        }
        __syncthreads();
        float m = red[0];
        __syncthreads();
        scale = __fdiv_rn(m, 127.0f);
        float q = scale > 0.0f ? rintf(__fdiv_rn(y[i], scale)) : 0.0f;
        q = fminf(127.0f, fmaxf(-127.0f, q));
        codes[i] = (unsigned char)(signed char)q;
    } else {
        const float *lv = c.format == KVARC_FMT_Q3 ? tb.q3l : tb.q4l;
        const float *bd = c.format == KVARC_FMT_Q3 ? tb.q3b : tb.q4b;
        int nb = (1 << c.code_bits) - 1;
        float sigma = __fmul_rn(__fsqrt_rn(ss), c.rot.inv_sqrt_d);
        float u = sigma > 0.0f ? __fdiv_rn(y[i], sigma) : 0.0f;
        int code = 0;
        for (int j = 0; j < nb; j++)
            code += u > bd[j];
        codes[i] = (unsigned char)code;
        red[i] = __fmul_rn(y[i], lv[code]);
        float num = kvg_tree_sum(red, d);
        red[i] = __fmul_rn(lv[code], lv[code]);
        float den = kvg_tree_sum(red, d);
        scale = __fdiv_rn(num, den);
    }
    __syncthreads();
    int code_bytes = d * c.code_bits / 8;
    for (int j = i; j < code_bytes; j += d)
        half[4 + j] = c.format == KVARC_FMT_I8 ? codes[j] : pack_byte(codes, c.code_bits, j);
    if (i == 0)
        put_f32(half, scale);
    __syncthreads();
}

__global__ static void encode_kernel(kvg_codec_dev c, kvg_tables tb, int dt, const void *k,
                                     const void *v, size_t n, unsigned char *records,
                                     unsigned char *sig_bits, unsigned short *sig_scale,
                                     unsigned long long *bad)
{
    extern __shared__ float sh[];
    int d = c.rot.head_dim, i = threadIdx.x;
    float *yk = sh, *yv = sh + d, *red = sh + 2 * d;
    unsigned char *codes = (unsigned char *)(sh + 3 * d);
    for (size_t t = blockIdx.x; t < n; t += gridDim.x) {
        size_t e = t * (size_t)d + (size_t)i;
        float kx = kvg_load(dt, k, e), vx = kvg_load(dt, v, e);
        int badv = !isfinite(kx) || !isfinite(vx);
        float xk = c.mu_k ? __fsub_rn(kx, c.mu_k[i]) : kx;
        float xv = c.mu_v ? __fsub_rn(vx, c.mu_v[i]) : vx;
        badv |= !isfinite(xk) || !isfinite(xv);
        if (__syncthreads_or(badv)) {
            if (i == 0)
                atomicMin(bad, (unsigned long long)t);
            continue;
        }
        yk[i] = xk;
        yv[i] = xv;
        float ssk = rotate_norm(c.rot, yk, yk, red), ssv = 0.0f;
        if (c.rotated)
            ssv = rotate_norm(c.rot, yv, yv, red);
        if (!isfinite(ssk) || !isfinite(ssv)) {       /* uniform across the block */
            if (i == 0)
                atomicMin(bad, (unsigned long long)t);
            continue;
        }
        /* signature of the rotated, centered key */
        red[i] = fabsf(yk[i]);
        float l1 = kvg_tree_sum(red, d);
        unsigned char *bits = sig_bits + t * (size_t)(d / 8);
        if (i < d / 8) {
            unsigned b = 0;
            for (int j = 0; j < 8; j++)
                b |= (unsigned)!(yk[8 * i + j] < 0.0f) << j;
            bits[i] = (unsigned char)b;
        }
        if (i == 0) {
            float w = l1 > 0.0f ? __fdiv_rn(ssk, l1) : 0.0f;
            sig_scale[t] = __half_as_ushort(__float2half_rn(fminf(w, 65504.0f)));
        }
        unsigned char *rec = records + t * (size_t)(2 * c.half);
        if (c.rotated) {
            encode_rotated_half(c, tb, yk, ssk, red, codes, rec);
            encode_rotated_half(c, tb, yv, ssv, red, codes, rec + c.half);
        } else {
            for (int part = 0; part < 2; part++) {
                const void *src = part ? v : k;
                unsigned short h;
                if (dt != KVARC_DTYPE_F32 && (dt == KVARC_DTYPE_F16) == (c.format == KVARC_FMT_F16))
                    h = ((const unsigned short *)src)[e];          /* same dtype: the bits */
                else if (c.format == KVARC_FMT_F16)
                    h = __half_as_ushort(__float2half_rn(kvg_load(dt, src, e)));
                else
                    h = __bfloat16_as_ushort(__float2bfloat16_rn(kvg_load(dt, src, e)));
                unsigned char *o = rec + part * c.half + 2 * i;
                o[0] = (unsigned char)h;
                o[1] = (unsigned char)(h >> 8);
            }
        }
        __syncthreads();
    }
}

__global__ static void decode_kernel(kvg_codec_dev c, kvg_tables tb, const unsigned char *records,
                                     size_t n, float *k_out, float *v_out)
{
    extern __shared__ float sh[];
    int d = c.rot.head_dim, i = threadIdx.x;
    for (size_t t = blockIdx.x; t < n; t += gridDim.x) {
        const unsigned char *rec = records + t * (size_t)(2 * c.half);
        for (int part = 0; part < 2; part++) {
            float *out = part ? v_out : k_out;
            if (!out)
                continue;
            const unsigned char *half = rec + part * c.half;
            float x;
            if (!c.rotated) {
                unsigned short h = (unsigned short)(half[2 * i] | half[2 * i + 1] << 8);
                x = c.format == KVARC_FMT_F16 ? __half2float(__ushort_as_half(h))
                                              : __uint_as_float((unsigned)h << 16);
            } else {
                float scale = get_f32(half), yh;
                const unsigned char *codes = half + 4;
                if (c.format == KVARC_FMT_I8) {
                    yh = __fmul_rn(scale, (float)(signed char)codes[i]);
                } else {
                    unsigned pos = (unsigned)i * c.code_bits, code = 0;
                    for (int b = 0; b < c.code_bits; b++, pos++)
                        code |= (unsigned)((codes[pos / 8] >> (pos % 8)) & 1) << b;
                    yh = __fmul_rn(scale, (c.format == KVARC_FMT_Q3 ? tb.q3l : tb.q4l)[code]);
                }
                __syncthreads();
                sh[i] = yh;
                kvg_fwht(sh, d);
                x = __fmul_rn(__fmul_rn(sh[i], c.rot.inv_sqrt_d), c.rot.signs[i]);
                const float *mu = part ? c.mu_v : c.mu_k;
                if (mu)
                    x = __fadd_rn(x, mu[i]);
            }
            out[t * (size_t)d + (size_t)i] = x;
        }
    }
}

static unsigned grid_for(size_t n)
{
    return (unsigned)(n < 65536 ? n : 65536);
}

extern "C" int kvg_encode_cuda(const kvg_codec *c, kvarc_dtype dt, const void *d_k, const void *d_v,
                               size_t n, uint8_t *d_records, uint8_t *d_sig_bits,
                               uint16_t *d_sig_scale, size_t *bad_token, void *stream)
{
    kvg_codec_dev cd;
    kvg_tables tb;
    unsigned long long *d_bad = NULL, bad = ~0ull;
    int rc = codec_dev(c, &cd, &tb);
    if (rc)
        return rc;
    if (!kvarc_dtype_size(dt))
        return KVARC_EDTYPE;
    if (n == 0)
        return 0;
    if (!d_k || !d_v || !d_records || !d_sig_bits || !d_sig_scale)
        return -EINVAL;
    int d = cd.rot.head_dim;
    size_t shmem = 3 * (size_t)d * sizeof(float) + (size_t)d;
    KVG_CUDA_TRY(cudaMallocAsync((void **)&d_bad, sizeof bad, kvg_stream(stream)));
    KVG_CUDA_TRY(cudaMemcpyAsync(d_bad, &bad, sizeof bad, cudaMemcpyHostToDevice, kvg_stream(stream)));
    encode_kernel<<<grid_for(n), d, shmem, kvg_stream(stream)>>>(cd, tb, dt, d_k, d_v, n, d_records,
                                                                 d_sig_bits, d_sig_scale, d_bad);
    KVG_CUDA_TRY(cudaGetLastError());
    KVG_CUDA_TRY(cudaMemcpyAsync(&bad, d_bad, sizeof bad, cudaMemcpyDeviceToHost, kvg_stream(stream)));
    KVG_CUDA_TRY(cudaStreamSynchronize(kvg_stream(stream)));
    if (bad != ~0ull) {
        if (bad_token)
            *bad_token = (size_t)bad;
        rc = KVARC_ENONFINITE;
    }
fail:
    if (d_bad)
        cudaFreeAsync(d_bad, kvg_stream(stream));
    return rc;
}

extern "C" int kvg_decode_cuda(const kvg_codec *c, const uint8_t *d_records, size_t n,
                               float *d_k_out, float *d_v_out, void *stream)
{
    kvg_codec_dev cd;
    kvg_tables tb;
    int rc = codec_dev(c, &cd, &tb);
    if (rc)
        return rc;
    if (n == 0 || (!d_k_out && !d_v_out))
        return 0;
    if (!d_records)
        return -EINVAL;
    int d = cd.rot.head_dim;
    decode_kernel<<<grid_for(n), d, (size_t)d * sizeof(float), kvg_stream(stream)>>>(
        cd, tb, d_records, n, d_k_out, d_v_out);
    KVG_CUDA_TRY(cudaGetLastError());
    KVG_CUDA_TRY(cudaStreamSynchronize(kvg_stream(stream)));
fail:
    return rc;
}

extern "C" int kvg_cuda_available(void)
{
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

extern "C" void kvg_cuda_device_name(char *buf, size_t len)
{
    cudaDeviceProp p;
    if (!len)
        return;
    buf[0] = 0;
    if (kvg_cuda_available() && cudaGetDeviceProperties(&p, 0) == cudaSuccess)
        snprintf(buf, len, "%s", p.name);
}
