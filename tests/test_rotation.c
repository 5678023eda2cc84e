/* test_rotation: the randomized Hadamard rotation is orthogonal (dot
 * products and norms preserved to fp32 tolerance, R^T R = I), its signs
 * depend on the seed and nothing else, and the tree sum has its order. */
#include <string.h>

#include "kvg.h"
#include "testutil.h"

int main(void)
{
    tu_rng r = { 11 };
    static const int dims[] = { 64, 128, 256 };
    for (int di = 0; di < 3; di++) {
        int d = dims[di];
        kvarc_rotation rot, rot2, rot3;
        CHECK_RC(kvarc_rotation_init(&rot, d, 1234), 0);
        CHECK_RC(kvarc_rotation_init(&rot2, d, 1234), 0);
        CHECK_RC(kvarc_rotation_init(&rot3, d, 1235), 0);
        CHECK(memcmp(&rot, &rot2, sizeof rot) == 0, "d%d: same seed, different rotation", d);
        CHECK(memcmp(rot.signs, rot3.signs, sizeof rot.signs) != 0, "d%d: seed ignored", d);
        int neg = 0;
        for (int i = 0; i < d; i++)
            neg += rot.signs[i] < 0;
        CHECK(neg > d / 4 && neg < 3 * d / 4, "d%d: %d of %d signs negative", d, neg, d);

        double worst_dot = 0, worst_inv = 0;
        for (int trial = 0; trial < 200; trial++) {
            float q[KVARC_HEAD_DIM_MAX], k[KVARC_HEAD_DIM_MAX];
            float rq[KVARC_HEAD_DIM_MAX], rk[KVARC_HEAD_DIM_MAX], back[KVARC_HEAD_DIM_MAX];
            for (int i = 0; i < d; i++) {
                q[i] = tu_gauss(&r);
                k[i] = (i % 17 == 0 ? 20.0f : 1.0f) * tu_gauss(&r);
            }
            kvg_rotate_ref(&rot, q, rq);
            kvg_rotate_ref(&rot, k, rk);
            double a = 0, b = 0, nq = 0, nk = 0;
            for (int i = 0; i < d; i++) {
                a += (double)q[i] * k[i];
                b += (double)rq[i] * rk[i];
                nq += (double)q[i] * q[i];
                nk += (double)k[i] * k[i];
            }
            worst_dot = fmax(worst_dot, fabs(a - b) / sqrt(nq * nk));
            kvg_unrotate_ref(&rot, rk, back);
            worst_inv = fmax(worst_inv, tu_rel_err(back, k, NULL, d));
            /* aliasing in place gives the same bytes */
            memcpy(back, k, sizeof back);
            kvg_rotate_ref(&rot, back, back);
            CHECK(memcmp(back, rk, (size_t)d * 4) == 0, "d%d: in-place rotation differs", d);
        }
        CHECK(worst_dot < 1e-5, "d%d: q.k changed by %g of |q||k|", d, worst_dot);
        CHECK(worst_inv < 1e-5, "d%d: R^T R x differs from x by %g", d, worst_inv);
        /* outliers are spread: a one-hot vector rotates to all +-1/sqrt(d) */
        float e[KVARC_HEAD_DIM_MAX] = { 0 }, re[KVARC_HEAD_DIM_MAX];
        e[5] = 1.0f;
        kvg_rotate_ref(&rot, e, re);
        double dev = 0;
        for (int i = 0; i < d; i++)
            dev = fmax(dev, fabs(fabs(re[i]) - 1.0 / sqrt(d)));
        CHECK(dev < 1e-7, "d%d: one-hot does not spread evenly (%g)", d, dev);
    }
    /* the tree-sum order: ((a0+a2)+(a1+a3)) for d=4 style, here d=64 */
    float x[64];
    for (int i = 0; i < 64; i++)
        x[i] = (i == 0) ? 1e8f : (i == 32 ? -1e8f : 1.0f);
    CHECK(kvarc_tree_sum(x, 64) == 62.0f, "tree sum pairs i with i+32 first: got %g",
          kvarc_tree_sum(x, 64));
    return tu_finish("test_rotation");
}
