/* rope_ref.c - rotary position embedding (RoPE), the CPU reference.
 *
 * Pairs of dimensions turn by pos x theta^(-2i / rotary_dims). Layout 0
 * pairs (i, i + rotary_dims/2) (NeoX, Llama in HF), layout 1 pairs
 * (2i, 2i + 1) (GPT-J, Meta's original Llama). Angles are computed in
 * double, so a key at position 1e6 turns as accurately as one at 10.
 * Dimensions from rotary_dims on are left as they are.
 */
#include <math.h>

#include "kvg.h"

void kvg_rope_freqs(double *inv_freq, int d, int rotary_dims, float theta)
{
    int half = (rotary_dims < d ? rotary_dims : d) / 2;
    for (int i = 0; i < half; i++)
        inv_freq[i] = pow((double)theta, -2.0 * i / (double)(2 * half));
}

void kvg_rope_angles(double *cs, int d, int rotary_dims, const double *inv_freq, double pos)
{
    int half = (rotary_dims < d ? rotary_dims : d) / 2;
    for (int i = 0; i < half; i++) {
        double ang = pos * inv_freq[i];
        cs[2 * i] = cos(ang);
        cs[2 * i + 1] = sin(ang);
    }
}

/* Built for AVX-512 and AVX2 as well (the same IEEE double operations in
 * the same order, -ffp-contract=off: the same bits), picked at load time. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
void kvg_rope_turn(float *x, int d, int rotary_dims, int layout, const double *cs)
{
    int half = (rotary_dims < d ? rotary_dims : d) / 2;
    for (int i = 0; i < half; i++) {
        double c = cs[2 * i], s = cs[2 * i + 1];
        int a = layout ? 2 * i : i, b = layout ? 2 * i + 1 : i + half;
        double xa = x[a], xb = x[b];
        x[a] = (float)(xa * c - xb * s);
        x[b] = (float)(xa * s + xb * c);
    }
}

void kvg_rope_apply(float *x, int d, int rotary_dims, int layout, const double *inv_freq, double pos)
{
    double cs[KVARC_HEAD_DIM_MAX];
    kvg_rope_angles(cs, d, rotary_dims, inv_freq, pos);
    kvg_rope_turn(x, d, rotary_dims, layout, cs);
}

void kvg_rope_ref(float *x, int d, int rotary_dims, int layout, float theta, double pos)
{
    double inv_freq[KVARC_HEAD_DIM_MAX / 2];
    kvg_rope_freqs(inv_freq, d, rotary_dims, theta);
    kvg_rope_apply(x, d, rotary_dims, layout, inv_freq, pos);
}
