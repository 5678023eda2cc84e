/* schema.c - format table, dtype conversions, rotation, codebooks.
 * Pure functions of their arguments; see kvarc_schema.h and SCHEMA.md. */
#include "kvarc_schema.h"

#include <errno.h>
#include <math.h>
#include <string.h>

_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
               "kvarc's formats are little-endian and so must the host be");
_Static_assert(sizeof(float) == 4, "fp32 must be IEEE binary32");

const char *kvarc_strerror(int err)
{
    switch (err) {
    case 0:                return "success";
    case KVARC_EHEADDIM:   return "unsupported head_dim (kvarc supports 64, 128 and 256)";
    case KVARC_EFORMAT:    return "unknown record format";
    case KVARC_EVERSION:   return "unsupported record format version";
    case KVARC_EDTYPE:     return "unknown element dtype (f32, f16, bf16)";
    case KVARC_ENONFINITE: return "NaN or Inf in input vector";
    case KVARC_ECORRUPT:   return "data corrupt: checksum or structure mismatch";
    case KVARC_ESHAPE:     return "shape mismatch";
    case KVARC_ELOCKED:    return "written by another kvarcd (its writer lock is held)";
    default: break;
    }
    if (err < 0 && err > KVARC_ERR_FIRST)
        return strerror(-err);
    return "unknown error";
}

/* ---- dtypes ----------------------------------------------------------- */

size_t kvarc_dtype_size(kvarc_dtype dt)
{
    switch (dt) {
    case KVARC_DTYPE_F32:  return 4;
    case KVARC_DTYPE_F16:  return 2;
    case KVARC_DTYPE_BF16: return 2;
    }
    return 0;
}

const char *kvarc_dtype_name(kvarc_dtype dt)
{
    switch (dt) {
    case KVARC_DTYPE_F32:  return "f32";
    case KVARC_DTYPE_F16:  return "f16";
    case KVARC_DTYPE_BF16: return "bf16";
    }
    return "?";
}

static uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

float kvarc_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ff;
    if (exp == 0x1f)                               /* Inf / NaN */
        return bits_f32(sign | 0x7f800000u | (man << 13));
    if (exp == 0) {
        if (man == 0)
            return bits_f32(sign);
        /* subnormal: man * 2^-24, exact in fp32 */
        float v = (float)man * 0x1p-24f;
        return sign ? -v : v;
    }
    return bits_f32(sign | ((exp + 112) << 23) | (man << 13));
}

uint16_t kvarc_f32_to_f16(float f)
{
    uint32_t u = f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    uint32_t a = u & 0x7fffffffu;
    if (a >= 0x7f800000u)                          /* Inf / NaN */
        return sign | (a > 0x7f800000u ? 0x7e00 : 0x7c00);
    if (a >= 0x477ff000u)                          /* rounds to >= 2^16 */
        return sign | 0x7c00;
    if (a < 0x38800000u) {                         /* below fp16 normal */
        /* value = a_float; fp16 subnormal unit is 2^-24 */
        uint32_t exp = a >> 23;
        if (exp < 102)                             /* < 2^-25: rounds to 0 */
            return sign;
        uint32_t man = (a & 0x7fffff) | 0x800000;
        uint32_t shift = 126 - exp;                /* 14..24 */
        uint32_t q = man >> shift;
        uint32_t rem = man & ((1u << shift) - 1);
        uint32_t half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1)))
            q++;
        return sign | (uint16_t)q;
    }
    uint32_t q = (a - 0x38000000u) >> 13;          /* rebias 127 -> 15 */
    uint32_t rem = a & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (q & 1)))
        q++;
    return sign | (uint16_t)q;
}

float kvarc_bf16_to_f32(uint16_t b) { return bits_f32((uint32_t)b << 16); }

uint16_t kvarc_f32_to_bf16(float f)
{
    uint32_t u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u)           /* NaN stays quiet NaN */
        return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

float kvarc_load_f32(kvarc_dtype dt, const void *base, size_t i)
{
    switch (dt) {
    case KVARC_DTYPE_F32:  return ((const float *)base)[i];
    case KVARC_DTYPE_F16:  return kvarc_f16_to_f32(((const uint16_t *)base)[i]);
    case KVARC_DTYPE_BF16: return kvarc_bf16_to_f32(((const uint16_t *)base)[i]);
    }
    return NAN;
}

void kvarc_store_f32(kvarc_dtype dt, void *base, size_t i, float x)
{
    switch (dt) {
    case KVARC_DTYPE_F32:  ((float *)base)[i] = x; break;
    case KVARC_DTYPE_F16:  ((uint16_t *)base)[i] = kvarc_f32_to_f16(x); break;
    case KVARC_DTYPE_BF16: ((uint16_t *)base)[i] = kvarc_f32_to_bf16(x); break;
    }
}

/* ---- formats ---------------------------------------------------------- */

static const kvarc_format_info formats[] = {
    { KVARC_FMT_Q3,   KVARC_FORMAT_VERSION, "q3",   3,  1, 0 },
    { KVARC_FMT_Q4,   KVARC_FORMAT_VERSION, "q4",   4,  1, 0 },
    { KVARC_FMT_I8,   KVARC_FORMAT_VERSION, "i8",   8,  1, 0 },
    { KVARC_FMT_F16,  KVARC_FORMAT_VERSION, "f16",  16, 0, 1 },
    { KVARC_FMT_BF16, KVARC_FORMAT_VERSION, "bf16", 16, 0, 1 },
};

const kvarc_format_info *kvarc_format_get(int fmt)
{
    for (size_t i = 0; i < sizeof formats / sizeof formats[0]; i++)
        if ((int)formats[i].id == fmt)
            return &formats[i];
    return NULL;
}

const kvarc_format_info *kvarc_format_by_name(const char *name)
{
    if (!name)
        return NULL;
    for (size_t i = 0; i < sizeof formats / sizeof formats[0]; i++)
        if (strcmp(formats[i].name, name) == 0)
            return &formats[i];
    return NULL;
}

int kvarc_head_dim_check(int head_dim)
{
    return (head_dim == 64 || head_dim == 128 || head_dim == 256) ? 0 : KVARC_EHEADDIM;
}

int kvarc_record_half_bytes(int fmt, int head_dim)
{
    const kvarc_format_info *fi = kvarc_format_get(fmt);
    if (!fi)
        return KVARC_EFORMAT;
    if (kvarc_head_dim_check(head_dim))
        return KVARC_EHEADDIM;
    int code_bytes = head_dim * fi->code_bits / 8;
    return fi->rotated ? 4 + code_bytes : code_bytes;
}

int kvarc_record_bytes(int fmt, int head_dim)
{
    int h = kvarc_record_half_bytes(fmt, head_dim);
    return h < 0 ? h : 2 * h;
}

/* ---- rotation --------------------------------------------------------- */

uint64_t kvarc_splitmix64(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

int kvarc_rotation_init(kvarc_rotation *rot, int head_dim, uint64_t seed)
{
    if (!rot)
        return -EINVAL;
    if (kvarc_head_dim_check(head_dim))
        return KVARC_EHEADDIM;
    memset(rot, 0, sizeof *rot);
    rot->head_dim = head_dim;
    rot->seed = seed;
    rot->inv_sqrt_d = (float)(1.0 / sqrt((double)head_dim));
    uint64_t st = seed, word = 0;
    for (int i = 0; i < head_dim; i++) {
        if (i % 64 == 0)
            word = kvarc_splitmix64(&st);
        rot->signs[i] = ((word >> (i % 64)) & 1) ? -1.0f : 1.0f;
    }
    return 0;
}

void kvarc_fwht(float *x, int d)
{
    for (int h = 1; h < d; h *= 2)
        for (int i = 0; i < d; i += 2 * h)
            for (int j = i; j < i + h; j++) {
                float a = x[j], b = x[j + h];
                x[j] = a + b;
                x[j + h] = a - b;
            }
}

float kvarc_tree_sum(const float *x, int d)
{
    float t[KVARC_HEAD_DIM_MAX];
    memcpy(t, x, (size_t)d * sizeof(float));
    for (int h = d / 2; h >= 1; h /= 2)
        for (int i = 0; i < h; i++)
            t[i] += t[i + h];
    return t[0];
}

/* ---- codebooks -------------------------------------------------------- */

/* Lloyd-Max reconstruction levels of N(0,1) (Max 1960), boundaries at the
 * midpoints of adjacent levels (the Lloyd-Max condition). */
const float kvarc_q3_levels[8] = {
    -2.1520f, -1.3440f, -0.7560f, -0.2451f, 0.2451f, 0.7560f, 1.3440f, 2.1520f,
};
const float kvarc_q3_bounds[7] = {
    -1.7480f, -1.0500f, -0.50055f, 0.0f, 0.50055f, 1.0500f, 1.7480f,
};
const float kvarc_q4_levels[16] = {
    -2.7326f, -2.0691f, -1.6181f, -1.2562f, -0.9424f, -0.6568f, -0.3881f, -0.1284f,
     0.1284f,  0.3881f,  0.6568f,  0.9424f,  1.2562f,  1.6181f,  2.0691f,  2.7326f,
};
const float kvarc_q4_bounds[15] = {
    -2.40085f, -1.8436f, -1.43715f, -1.0993f, -0.7996f, -0.52245f, -0.25825f, 0.0f,
     0.25825f,  0.52245f, 0.7996f,   1.0993f,  1.43715f, 1.8436f,   2.40085f,
};
