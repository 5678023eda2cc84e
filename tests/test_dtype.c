/* test_dtype: fp16/bf16 conversions are exact and round to nearest even.
 * fp16 is checked against the compiler's own _Float16 conversion, bf16
 * against a nearest-value search in double; every 16-bit pattern round-trips. */
#include <string.h>

#include "testutil.h"

static uint32_t bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static float from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* Nearest bf16 by search: the two bf16 values bracketing f, ties to even. */
static uint16_t bf16_nearest(float f)
{
    uint32_t u = bits(f);
    uint16_t lo = (uint16_t)(u >> 16), hi = (uint16_t)(lo + 1);
    if ((u & 0xffff) == 0)
        return lo;
    double vh = kvarc_bf16_to_f32(hi);
    if (isinf(vh))                    /* IEEE: overflow compares with 2^128 */
        vh = copysign(0x1p128, (double)f);
    double dl = fabs((double)f - kvarc_bf16_to_f32(lo));
    double dh = fabs((double)f - vh);
    if (dl < dh)
        return lo;
    if (dh < dl)
        return hi;
    return (lo & 1) ? hi : lo;
}

int main(void)
{
    /* every fp16 / bf16 pattern survives the round trip (NaN stays NaN) */
    for (uint32_t h = 0; h < 65536; h++) {
        float f = kvarc_f16_to_f32((uint16_t)h);
        _Float16 ref;
        uint16_t hb = (uint16_t)h;
        memcpy(&ref, &hb, 2);
        if (isnan(f)) {
            CHECK(isnan((float)ref), "f16 %04x: NaN mismatch", h);
            CHECK(isnan(kvarc_f16_to_f32(kvarc_f32_to_f16(f))), "f16 %04x NaN lost", h);
            continue;
        }
        CHECK(bits(f) == bits((float)ref), "f16 %04x widens to %a, compiler says %a", h, f,
              (double)(float)ref);
        CHECK(kvarc_f32_to_f16(f) == h, "f16 %04x round trip gave %04x", h, kvarc_f32_to_f16(f));
        float b = kvarc_bf16_to_f32((uint16_t)h);
        if (!isnan(b))
            CHECK(kvarc_f32_to_bf16(b) == h, "bf16 %04x round trip", h);
    }

    /* narrowing of random fp32 patterns and of the rounding edges */
    tu_rng r = { 42 };
    for (int i = 0; i < 2000000; i++) {
        uint32_t u = (uint32_t)kvarc_splitmix64(&r.s);
        if (i % 4 == 0)               /* concentrate on fp16's range */
            u = (u & 0x80000000u) | (0x33000000u + (u & 0x0fffffffu) % 0x15000000u);
        float f = from_bits(u);
        if (isnan(f))
            continue;
        _Float16 ref = (_Float16)f;
        uint16_t rb;
        memcpy(&rb, &ref, 2);
        uint16_t got = kvarc_f32_to_f16(f);
        CHECK(got == rb, "f32 %a -> f16 %04x, compiler says %04x", (double)f, got, rb);
        uint16_t gb = kvarc_f32_to_bf16(f), wb = bf16_nearest(f);
        CHECK(gb == wb, "f32 %a -> bf16 %04x, nearest is %04x", (double)f, gb, wb);
        if (tu_failures > 20)
            break;
    }
    CHECK(kvarc_f32_to_f16(65520.0f) == 0x7c00, "65520 must round to Inf");
    CHECK(kvarc_f32_to_f16(65519.0f) == 0x7bff, "65519 must round to 65504");
    CHECK(kvarc_f32_to_f16(0x1p-25f) == 0, "2^-25 ties to even (0)");
    CHECK(kvarc_f32_to_f16(0x1.8p-25f) == 1, "1.5*2^-25 rounds up");

    CHECK(kvarc_dtype_size(KVARC_DTYPE_F32) == 4 && kvarc_dtype_size(KVARC_DTYPE_F16) == 2 &&
          kvarc_dtype_size(KVARC_DTYPE_BF16) == 2 && kvarc_dtype_size((kvarc_dtype)9) == 0,
          "dtype sizes");
    CHECK(strcmp(kvarc_strerror(KVARC_EHEADDIM), "unknown error") != 0, "strerror names codes");
    CHECK(strcmp(kvarc_strerror(-2), "No such file or directory") == 0, "strerror names errno");
    return tu_finish("test_dtype");
}
