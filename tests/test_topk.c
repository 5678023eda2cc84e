/* test_topk: the radix select, and kvg_topk's filters (every build this
 * CPU runs), equal a full sort's first k (score desc, index asc) on random,
 * tied, signed, NaN and tiny inputs, inputs that mislead the filter's
 * sample, for k from 0 to past n, with and without caller scratch. kvg_sort_u64 equals qsort on
 * random values, shared high bytes, duplicates, one distinct byte, n 0..2. */
#include <errno.h>
#include <string.h>

#include "kvg.h"
#include "testutil.h"

typedef struct { float s; uint32_t i; } item;

static int cmp(const void *a, const void *b)
{
    const item *x = a, *y = b;
    uint32_t kx = kvg_score_key(x->s), ky = kvg_score_key(y->s);
    if (kx != ky)
        return kx > ky ? -1 : 1;
    return (x->i > y->i) - (x->i < y->i);
}

static void check_case(const char *what, const float *s, size_t n, size_t k, int use_scratch)
{
    item *all = malloc((n ? n : 1) * sizeof *all);
    uint32_t *idx = malloc((k ? k : 1) * 4), *scratch = malloc((n ? n : 1) * 4);
    float *val = malloc((k ? k : 1) * 4);
    for (size_t j = 0; j < n; j++)
        all[j] = (item){ s[j], (uint32_t)j };
    qsort(all, n, sizeof *all, cmp);
    /* the reference, then every filter this CPU runs (topk_simd.c) */
    for (int isa = -1; isa <= KVG_ISA_V4; isa++) {
        if (isa >= 0 && !kvg_codec_isa_supported((kvg_isa)isa))
            continue;
        memset(idx, 0xee, (k ? k : 1) * 4);
        long got = isa < 0 ? kvg_topk_ref(s, n, k, idx, val, use_scratch ? scratch : NULL)
                           : kvg_topk_isa((kvg_isa)isa, s, n, k, idx, val, use_scratch ? scratch : NULL);
        size_t want = k < n ? k : n;
        CHECK(got == (long)want, "%s n=%zu k=%zu isa %d: returned %ld, want %zu", what, n, k, isa, got, want);
        size_t bad = 0;
        for (size_t j = 0; got > 0 && j < want; j++)
            bad += idx[j] != all[j].i || memcmp(&val[j], &s[idx[j]], 4) != 0;
        CHECK(bad == 0, "%s n=%zu k=%zu isa %d: %zu positions differ from the sort", what, n, k, isa, bad);
    }
    free(all); free(idx); free(scratch); free(val);
}

static int u64_cmp(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static void check_sort(const char *what, const uint64_t *in, size_t n)
{
    uint64_t *a = malloc((n + 1) * 8), *b = malloc((n + 1) * 8), *tmp = malloc((n + 1) * 8);
    memcpy(a, in, n * 8);
    memcpy(b, in, n * 8);
    qsort(a, n, 8, u64_cmp);
    kvg_sort_u64(b, n, tmp);
    CHECK(!memcmp(a, b, n * 8), "kvg_sort_u64 %s (n=%zu) differs from qsort", what, n);
    free(a); free(b); free(tmp);
}

/* what at n and at sizes around the insertion runs and the merge's limit */
static void check_sorts(const char *what, const uint64_t *in, size_t n)
{
    static const size_t sizes[] = { 3, 15, 16, 17, 31, 32, 33, 100, 128, 255, 511, 512, 513, 1000 };
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0] && sizes[i] < n; i++)
        check_sort(what, in, sizes[i]);
    check_sort(what, in, n);
}

static void sort_cases(tu_rng *r)
{
    size_t n = 5000;
    uint64_t *v = malloc(n * 8);
    for (size_t j = 0; j < n; j++)
        v[j] = kvarc_splitmix64(&r->s);
    check_sorts("random", v, n);
    for (size_t j = 0; j < n; j++)          /* positions: high bytes shared */
        v[j] = 70000 + kvarc_splitmix64(&r->s) % 9000;
    check_sorts("positions", v, n);
    for (size_t j = 0; j < n; j++)          /* packed top-k winners, many equal keys */
        v[j] = (uint64_t)~(uint32_t)(0x3f800000u + kvarc_splitmix64(&r->s) % 3) << 32 | (uint32_t)(n - j);
    check_sorts("packed", v, n);
    for (size_t j = 0; j < n; j++)          /* only one byte differs, duplicates */
        v[j] = 0x0123456789ab0000ull | (kvarc_splitmix64(&r->s) % 5) << 8;
    check_sorts("one byte", v, n);
    for (size_t j = 0; j < n; j++)
        v[j] = 42;
    check_sorts("equal", v, n);
    check_sort("two", (uint64_t[]){ 9, 3 }, 2);
    check_sort("one", v, 1);
    check_sort("empty", v, 0);
    free(v);
}

int main(void)
{
    tu_rng r = { 5 };
    size_t n = 100000;
    float *s = malloc(n * 4);
    static const size_t ks[] = { 0, 1, 2, 63, 64, 512, 4096, 99999, 100000, 100001, 1000000 };

    for (size_t j = 0; j < n; j++)
        s[j] = tu_gauss(&r) * 10.0f;
    for (size_t i = 0; i < sizeof ks / sizeof ks[0]; i++)
        check_case("gauss", s, n, ks[i], i % 2);

    for (size_t j = 0; j < n; j++)          /* heavy ties: 7 distinct values */
        s[j] = (float)(kvarc_splitmix64(&r.s) % 7) - 3.0f;
    for (size_t i = 0; i < sizeof ks / sizeof ks[0]; i++)
        check_case("ties", s, n, ks[i], i % 2);

    for (size_t j = 0; j < n; j++)          /* all equal: lowest indices win */
        s[j] = 1.5f;
    check_case("equal", s, n, 100, 1);

    for (size_t j = 0; j < n; j++)          /* signed zeros, infinities, NaN */
        switch (j % 6) {
        case 0: s[j] = -0.0f; break;
        case 1: s[j] = 0.0f; break;
        case 2: s[j] = INFINITY; break;
        case 3: s[j] = -INFINITY; break;
        case 4: s[j] = NAN; break;
        default: s[j] = tu_gauss(&r); break;
        }
    check_case("special", s, n, 50000, 0);
    check_case("special", s, 12, 12, 1);

    for (size_t j = 0; j < n; j++)          /* values that share 3 key bytes */
        s[j] = 1.0f + (float)(j % 200) * 0x1p-23f;
    check_case("close", s, n, 777, 1);

    /* the filter's threshold comes from a strided sample (every n/1024-th
     * score, from the middle of each stride): samples that see nothing
     * of the winners, and samples that see only winners */
    size_t stride = n / 1024;
    for (size_t j = 0; j < n; j++)
        s[j] = j % stride == stride / 2 ? 0.0f : 100.0f + tu_gauss(&r);
    check_case("sample-blind", s, n, 512, 1);
    for (size_t j = 0; j < n; j++)
        s[j] = j % stride == stride / 2 ? 100.0f : tu_gauss(&r);
    check_case("sample-only", s, n, 512, 0);
    check_case("sample-only", s, n, 64, 1);
    for (size_t j = 0; j < n; j++)          /* ascending: the winners at the end */
        s[j] = (float)j * 1e-3f;
    check_case("ascending", s, n, 512, 1);
    for (size_t j = 0; j < n; j++)          /* a tail past the last full vector */
        s[j] = tu_gauss(&r);
    check_case("tail", s, n - 13, 100, 1);
    check_case("tail", s, 4099, 500, 0);

    check_case("empty", s, 0, 10, 0);
    check_case("one", s, 1, 10, 1);
    CHECK(kvg_topk_ref(NULL, 10, 3, (uint32_t[3]){ 0 }, NULL, NULL) == -EINVAL, "NULL scores");
    CHECK(kvg_topk_ref(s, 10, 3, NULL, NULL, NULL) == -EINVAL, "NULL output");
    CHECK(kvg_topk(NULL, 10, 3, (uint32_t[3]){ 0 }, NULL, NULL) == -EINVAL, "NULL scores (kvg_topk)");
    CHECK(kvg_topk_isa((kvg_isa)9, s, 10, 3, (uint32_t[3]){ 0 }, NULL, NULL) == -ENOTSUP, "unknown build");
    sort_cases(&r);
    free(s);
    return tu_finish("test_topk");
}
