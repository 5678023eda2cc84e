/* test_rope: kvg_rope_ref keeps norms, makes q.k depend on the position
 * difference only (both layouts, partial rotary dims), undoes itself with
 * the negated position, and leaves dimensions past rotary_dims alone; its
 * parts (freqs + apply, freqs + angles + turn) give the same bits. */
#include <math.h>
#include <string.h>

#include "kvg.h"
#include "testutil.h"

#define D 64

static double dot(const float *a, const float *b)
{
    double s = 0;
    for (int i = 0; i < D; i++)
        s += (double)a[i] * b[i];
    return s;
}

int main(void)
{
    tu_rng rng = { 7 };
    float q[D], k[D];
    for (int i = 0; i < D; i++) {
        q[i] = tu_gauss(&rng);
        k[i] = tu_gauss(&rng);
    }
    for (int layout = 0; layout < 2; layout++)
        for (int rot = 0; rot <= D; rot += 32) {
            float a[D], b[D], c[D], e[D];
            memcpy(a, q, sizeof a);
            memcpy(b, k, sizeof b);
            kvg_rope_ref(a, D, rot, layout, 10000.0f, 1000.0);
            kvg_rope_ref(b, D, rot, layout, 10000.0f, 990.0);
            memcpy(c, q, sizeof c);
            memcpy(e, k, sizeof e);
            kvg_rope_ref(c, D, rot, layout, 10000.0f, 1000010.0);
            kvg_rope_ref(e, D, rot, layout, 10000.0f, 1000000.0);
            CHECK(fabs(dot(a, b) - dot(c, e)) < 1e-3, "layout %d rot %d: q.k depends on the distance only (%g vs %g)",
                  layout, rot, dot(a, b), dot(c, e));
            CHECK(fabs(dot(a, a) - dot(q, q)) < 1e-3, "layout %d rot %d: norm kept", layout, rot);
            kvg_rope_ref(a, D, rot, layout, 10000.0f, -1000.0);
            float worst = 0;
            for (int i = 0; i < D; i++)
                worst = fmaxf(worst, fabsf(a[i] - q[i]));
            CHECK(worst < 1e-5f, "layout %d rot %d: the negated position undoes it (%g)", layout, rot, worst);
            memcpy(a, q, sizeof a);
            kvg_rope_ref(a, D, rot, layout, 10000.0f, 77.0);
            int same = 1;
            for (int i = rot; i < D; i++)
                same &= a[i] == q[i];
            CHECK(same, "layout %d rot %d: dimensions past rotary_dims untouched", layout, rot);
            double inv[D / 2], cs[D];
            float f[D], g[D];
            memcpy(f, q, sizeof f);
            memcpy(g, q, sizeof g);
            kvg_rope_freqs(inv, D, rot, 10000.0f);
            kvg_rope_apply(f, D, rot, layout, inv, 123457.0);
            kvg_rope_angles(cs, D, rot, inv, 123457.0);
            kvg_rope_turn(g, D, rot, layout, cs);
            memcpy(a, q, sizeof a);
            kvg_rope_ref(a, D, rot, layout, 10000.0f, 123457.0);
            CHECK(!memcmp(a, f, sizeof a) && !memcmp(a, g, sizeof a), "layout %d rot %d: the parts give the same bits",
                  layout, rot);
        }
    /* position 0 is the identity; a known angle for the first pair */
    float x[D] = { 1.0f };
    kvg_rope_ref(x, D, D, 0, 10000.0f, 0.0);
    CHECK(x[0] == 1.0f && x[D / 2] == 0.0f, "position 0 is the identity");
    kvg_rope_ref(x, D, D, 0, 10000.0f, 1.0);
    CHECK(fabsf(x[0] - cosf(1.0f)) < 1e-6f && fabsf(x[D / 2] - sinf(1.0f)) < 1e-6f, "pair 0 turns by pos radians");
    return tu_finish("test_rope");
}
