/* test_engine: conversations, durable appends read back bit-exact through
 * io_uring, signature ranges, fork/snapshot/restore copy-on-write, delete,
 * list paging, reopen, the lock against a second engine, and bad input
 * (unknown ids, positions past the end, layer/head out of range, wrong
 * shapes, gaps, snapshots) with their errors and no change to stored data. */
#include <errno.h>

#include "engine_util.h"

static void check_sigs(kvd_reader *r, const kvd_conv_info *ci, uint64_t tag_lo, uint64_t split,
                       uint64_t tag_hi, uint32_t layer, uint32_t head, uint64_t first, uint64_t n)
{
    uint8_t *bits = malloc(n * 16);
    uint16_t *sc = malloc(n * 2);
    kvd_err err = { 0 };
    int rc = kvd_read_sigs(r, ci->id, layer, head, first, n, bits, sc, &err);
    CHECK(rc == 0, "read_sigs [%llu,+%llu): %s", (unsigned long long)first, (unsigned long long)n, err.msg);
    size_t bad = 0;
    for (uint64_t i = 0; rc == 0 && i < n; i++) {
        uint64_t p = first + i, tag = p < split ? tag_lo : tag_hi;
        for (int b = 0; b < 16; b++)
            bad += bits[i * 16 + b] != eu_byte(tag, layer, head, p, 1000 + (size_t)b);
        bad += sc[i] != (uint16_t)(eu_byte(tag, layer, head, p, 2000) | eu_byte(tag, layer, head, p, 2001) << 8);
    }
    CHECK(bad == 0, "signatures differ in %zu places", bad);
    free(bits);
    free(sc);
}

int main(void)
{
    char dir[256];
    eu_tmpdir(dir, sizeof dir, "engine");
    kvd_options o = { .dir = dir, .segment_bytes = 1 << 20 };   /* small: exercise rolls */
    kvd_engine *e;
    kvd_err err = { 0 };
    CHECK_RC(kvd_open(&o, &e, &err), 0);
    kvd_engine *e2;
    CHECK_RC(kvd_open(&o, &e2, &err), -EBUSY);
    CHECK(strstr(err.msg, "in use") != NULL, "second open message: %s", err.msg);

    kvd_shape s = eu_shape(2, 4, KVARC_FMT_Q3);
    kvd_conv_info a, b, snap, rest, info;
    CHECK_RC(kvd_conv_create(e, "team", "alpha", &s, NULL, &a, &err), 0);
    CHECK_RC(kvd_conv_create(e, "team", "alpha", &s, NULL, NULL, &err), -EEXIST);
    CHECK_RC(kvd_conv_create(e, "team", "bad/name", &s, NULL, NULL, &err), -EINVAL);
    CHECK_RC(kvd_conv_create(e, "", "x", &s, NULL, NULL, &err), -EINVAL);
    kvd_shape bad = s;
    bad.head_dim = 96;
    CHECK_RC(kvd_conv_create(e, "team", "b96", &bad, NULL, NULL, &err), KVARC_EHEADDIM);
    bad = s;
    bad.n_q_heads = 6;
    CHECK_RC(kvd_conv_create(e, "team", "bq", &bad, NULL, NULL, &err), -EINVAL);

    /* open with another shape: refused, naming both sides */
    bad = s;
    bad.head_dim = 64;
    CHECK_RC(kvd_conv_open(e, "team", "alpha", &bad, &info, &err), KVARC_ESHAPE);
    CHECK(strstr(err.msg, "head_dim 128") && strstr(err.msg, "sends 64"), "mismatch message: %s", err.msg);
    bad = s;
    snprintf(bad.fingerprint, sizeof bad.fingerprint, "other-model");
    CHECK_RC(kvd_conv_open(e, "team", "alpha", &bad, &info, &err), KVARC_ESHAPE);
    CHECK_RC(kvd_conv_open(e, "team", "alpha", &s, &info, &err), 0);
    CHECK_RC(kvd_conv_open(e, "team", "nope", NULL, &info, &err), -ENOENT);
    CHECK(strstr(err.msg, "team/nope") != NULL, "not-found message names it: %s", err.msg);

    /* appends: 20 blocks of 64 per layer across segment rolls */
    for (uint32_t l = 0; l < 2; l++)
        for (int blk = 0; blk < 20; blk++)
            CHECK_RC(eu_append(e, &a, 1, l, (uint64_t)blk * 64, 64, &err), 0);
    CHECK_RC(kvd_conv_stat(e, a.id, &info, &err), 0);
    CHECK(info.length == 1280, "length %llu", (unsigned long long)info.length);
    /* gaps, overlaps, bad layers are refused and change nothing */
    CHECK_RC(eu_append(e, &a, 1, 0, 1300, 8, &err), -ERANGE);
    CHECK(strstr(err.msg, "1280 tokens") != NULL, "gap message: %s", err.msg);
    CHECK_RC(eu_append(e, &a, 1, 0, 64, 8, &err), -ERANGE);
    CHECK_RC(eu_append(e, &a, 1, 2, 0, 8, &err), -EINVAL);
    CHECK_RC(kvd_append(e, 999, 0, 0, 1, (uint8_t[16]){ 0 }, (uint16_t[1]){ 0 }, (uint8_t[104]){ 0 }, &err), -ENOENT);

    kvd_reader *r;
    CHECK_RC(kvd_reader_open(e, &r, &err), 0);
    uint64_t pos[300];
    for (int i = 0; i < 300; i++)
        pos[i] = (uint64_t)((i * 7919) % 1280);
    for (uint32_t l = 0; l < 2; l++)
        for (uint32_t h = 0; h < 4; h++)
            CHECK(eu_check_records(r, &a, 1, l, h, pos, 300, &err) == 0, "records l%u h%u: %s", l, h, err.msg);
    check_sigs(r, &a, 1, 0, 1, 1, 3, 0, 1280);
    check_sigs(r, &a, 1, 0, 1, 0, 2, 100, 333);
    uint64_t past[2] = { 5, 1280 };
    uint8_t rec[2 * 104];
    CHECK_RC(kvd_read_records(r, a.id, 0, 0, past, 2, rec, &err), -ERANGE);
    CHECK(strstr(err.msg, "past the end") != NULL, "past-end message: %s", err.msg);
    CHECK_RC(kvd_read_records(r, a.id, 2, 0, past, 1, rec, &err), -EINVAL);
    CHECK_RC(kvd_read_records(r, a.id, 0, 4, past, 1, rec, &err), -EINVAL);
    CHECK_RC(kvd_read_records(r, 4242, 0, 0, past, 1, rec, &err), -ENOENT);
    uint8_t bits[16];
    uint16_t sc[1];
    CHECK_RC(kvd_read_sigs(r, a.id, 0, 0, 1280, 1, bits, sc, &err), -ERANGE);

    /* fork at 700, snapshot at 1000, restore of the snapshot */
    CHECK_RC(kvd_conv_fork(e, "team", "alpha", 700, "team", "beta", 0, &b, &err), 0);
    CHECK(b.length == 700 && b.parent == a.id && b.fork_len == 700, "fork info");
    CHECK_RC(kvd_conv_fork(e, "team", "alpha", 5000, "team", "gamma", 0, NULL, &err), -ERANGE);
    CHECK_RC(kvd_conv_fork(e, "team", "alpha", 1000, "team", "snap1", KVD_CONV_SNAPSHOT, &snap, &err), 0);
    CHECK_RC(eu_append(e, &snap, 9, 0, 1000, 8, &err), -EPERM);
    for (uint32_t l = 0; l < 2; l++)         /* beta diverges: its own tokens from 700 */
        for (int blk = 0; blk < 5; blk++)
            CHECK_RC(eu_append(e, &b, 2, l, 700 + (uint64_t)blk * 50, 50, &err), 0);
    CHECK_RC(kvd_conv_fork(e, "team", "snap1", UINT64_MAX, "other", "restored", 0, &rest, &err), 0);
    CHECK(rest.length == 1000, "restore length %llu", (unsigned long long)rest.length);
    CHECK_RC(eu_append(e, &rest, 3, 0, 1000, 10, &err), 0);
    uint64_t lo[3] = { 0, 350, 699 }, hi[3] = { 700, 849, 949 }, mid[2] = { 999, 1000 };
    CHECK(eu_check_records(r, &b, 1, 1, 2, lo, 3, &err) == 0, "beta shares alpha's prefix: %s", err.msg);
    CHECK(eu_check_records(r, &b, 2, 1, 2, hi, 3, &err) == 0, "beta's own tokens: %s", err.msg);
    CHECK(eu_check_records(r, &a, 1, 1, 2, hi, 3, &err) == 0, "alpha unchanged by beta: %s", err.msg);
    CHECK(eu_check_records(r, &rest, 1, 0, 0, mid, 1, &err) == 0, "restored prefix: %s", err.msg);
    CHECK(eu_check_records(r, &rest, 3, 0, 0, mid + 1, 1, &err) == 0, "restored's own: %s", err.msg);
    check_sigs(r, &b, 1, 700, 2, 0, 1, 650, 100);   /* straddles the fork point */

    /* a fork of a fork, cut before its parent's own tokens */
    kvd_conv_info c2;
    CHECK_RC(kvd_conv_fork(e, "team", "beta", 720, "team", "beta2", 0, &c2, &err), 0);
    CHECK_RC(eu_append(e, &c2, 4, 0, 720, 30, &err), 0);
    check_sigs(r, &c2, 1, 700, 2, 0, 1, 690, 20);
    uint64_t c2p[3] = { 10, 710, 730 };
    CHECK(eu_check_records(r, &c2, 1, 0, 0, c2p, 1, &err) == 0, "beta2 from alpha");
    CHECK(eu_check_records(r, &c2, 2, 0, 0, c2p + 1, 1, &err) == 0, "beta2 from beta");
    CHECK(eu_check_records(r, &c2, 4, 0, 0, c2p + 2, 1, &err) == 0, "beta2 own");

    /* list, paged */
    kvd_conv_info list[8];
    long n = kvd_conv_list(e, "team", NULL, list, 2, &err);
    CHECK(n == 2 && !strcmp(list[0].name, "alpha") && !strcmp(list[1].name, "beta"), "page 1: %ld", n);
    n = kvd_conv_list(e, "team", "beta", list, 8, &err);
    CHECK(n == 2 && !strcmp(list[0].name, "beta2") && !strcmp(list[1].name, "snap1"), "page 2: %ld", n);
    CHECK(kvd_conv_list(e, NULL, NULL, list, 8, &err) == 5, "all namespaces");
    {   /* paged across namespaces: "NS/NAME" of the last one; each conversation once */
        char after[KVD_NS_MAX + KVD_NAME_MAX], seen[8][KVD_NS_MAX + KVD_NAME_MAX];
        long total = 0, got;
        const char *a = NULL;
        while ((got = kvd_conv_list(e, NULL, a, list, 2, &err)) > 0) {
            for (long i = 0; i < got && total < 8; i++, total++) {
                memcpy(seen[total], list[i].ns, KVD_NS_MAX);
                strcat(seen[total], "/");
                strncat(seen[total], list[i].name, KVD_NAME_MAX - 1);
            }
            memcpy(after, seen[total - 1], sizeof after);
            a = after;
        }
        CHECK(total == 5, "all namespaces, 2 per page: %ld", total);
        for (long i = 1; i < total; i++)
            CHECK(strcmp(seen[i - 1], seen[i]) < 0, "pages in order: %s then %s", seen[i - 1], seen[i]);
        CHECK(kvd_conv_list(e, NULL, "no-slash", list, 2, &err) == -EINVAL, "after without NS/");
    }

    /* delete alpha: gone by name, but beta and the snapshot still read its prefix */
    CHECK_RC(kvd_conv_delete(e, "team", "alpha", &err), 0);
    CHECK_RC(kvd_conv_open(e, "team", "alpha", NULL, &info, &err), -ENOENT);
    CHECK_RC(kvd_conv_delete(e, "team", "alpha", &err), -ENOENT);
    CHECK(eu_check_records(r, &b, 1, 1, 2, lo, 3, &err) == 0, "beta after alpha's delete: %s", err.msg);
    CHECK(eu_check_records(r, &snap, 1, 0, 3, mid, 1, &err) == 0, "snapshot after delete: %s", err.msg);
    kvd_reader_close(r);

    /* reopen: everything acknowledged is there */
    kvd_close(e);
    CHECK_RC(kvd_open(&o, &e, &err), 0);
    CHECK_RC(kvd_reader_open(e, &r, &err), 0);
    CHECK_RC(kvd_conv_open(e, "team", "beta", &s, &info, &err), 0);
    CHECK(info.length == 950, "beta length after reopen %llu", (unsigned long long)info.length);
    CHECK(eu_check_records(r, &b, 2, 0, 3, hi, 3, &err) == 0, "beta after reopen: %s", err.msg);
    CHECK(eu_check_records(r, &b, 1, 0, 3, lo, 3, &err) == 0, "beta prefix after reopen: %s", err.msg);
    kvd_stats st;
    CHECK_RC(kvd_stats_get(e, &st, &err), 0);
    CHECK(st.conversations == 4 && st.deleted == 1 && st.segments >= 2, "stats %llu convs %llu deleted %llu segs",
          (unsigned long long)st.conversations, (unsigned long long)st.deleted, (unsigned long long)st.segments);
    kvd_reader_close(r);
    kvd_close(e);
    eu_rmrf(dir);
    return tu_finish("test_engine");
}
