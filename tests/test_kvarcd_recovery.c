/* test_kvarcd_recovery: a real kvarcd whose stopped data directory was
 * damaged the ways disks and bugs damage it, then restarted.
 *  1. LMDB's older meta page made newest (its txnid raised): LMDB opens
 *     the previous transaction; nothing acknowledged may be lost.
 *  2. A segment's committed size lowered by one bit: the same.
 *  3. Index damage: an extent cut inside a layer, an extent past its
 *     segment's end, a conversation's means gone: reads answer DATA_LOSS,
 *     verify reports each.
 *  4. A flipped byte in a block header: verify resynchronises, reports
 *     the skipped bytes and still checks every later block.
 *  5. A truncated segment: kvarcd refuses to start naming the commands;
 *     offline `kvarc verify DIR` reports it, `kvarc rebuild-index DIR`
 *     repairs it, and kvarcd serves everything the segments still hold.
 *  6. A name with a NUL byte is refused, not cut at the NUL.
 * Each scenario waits for what it checks (a socket, an exit, an answer),
 * never for a time. */
#include <fcntl.h>
#include <lmdb.h>

#include "kvarcd_util.h"
#include "kvd_internal.h"     /* the index layout the test damages */

#define TAG    91
#define COUNT  10           /* tokens per append */
#define BLOCKS 6            /* appends per layer */
#define LAYERS 4            /* shape_pb's */
#define LEN    (COUNT * BLOCKS)

static uint64_t conv_id;

static void stop_kill(pid_t pid)
{
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
}

/* kvarcd on dir until it answers: its pid (and *c), or -1 with it stopped
 * and a failed check naming `when`. */
static pid_t restart(kvc_conn **c, const char *when)
{
    pid_t pid = start_daemon();
    if (kvc_connect(dir, c))
        goto fail;
    if (!wait_ready(*c)) {
        kvc_close(*c);
        goto fail;
    }
    return pid;
fail:
    stop_kill(pid);
    CHECK(0, "kvarcd did not start (%s; log %s.log)", when, dir);
    return -1;
}

/* A fresh directory holding t/c: BLOCKS acknowledged appends per layer,
 * then kvarcd killed -9 (nothing written after the last acknowledgement). */
static int populate(const char *tag)
{
    eu_tmpdir(dir, sizeof dir, tag);
    kvc_conn *c;
    pid_t pid = restart(&c, "on a new directory");
    if (pid < 0)
        return -1;
    char msg[256];
    int rc = create(c, "t", "c", 128, msg, &conv_id);
    for (int b = 0; b < BLOCKS && !rc; b++)
        for (uint32_t l = 0; l < LAYERS && !rc; l++)
            rc = rpc_append(c, conv_id, l, (uint64_t)b * COUNT, COUNT, TAG, 0, NULL, msg);
    if (rc)
        fprintf(stderr, "populate: %s\n", msg);
    kvc_close(c);
    stop_kill(pid);
    return rc;
}

/* Every layer's positions [0, len[l]) read back bit-exact. */
static int check_served(kvc_conn *c, const uint64_t *len)
{
    uint64_t pos[LEN];
    char msg[256];
    for (uint32_t l = 0; l < LAYERS; l++) {
        for (uint64_t i = 0; i < len[l]; i++)
            pos[i] = i;
        for (uint32_t h = 0; h < 2; h++) {
            int st = rpc_fetch_check(c, conv_id, l, h, pos, len[l], TAG, msg);
            if (st) {
                fprintf(stderr, "layer %u head %u: status %d %s\n", l, h, st, msg);
                return -1;
            }
        }
    }
    return 0;
}

static uint64_t json_u64(const char *out, const char *key)
{
    char k[64];
    snprintf(k, sizeof k, "\"%s\":", key);
    const char *p = strstr(out, k);
    return p ? strtoull(p + strlen(k), NULL, 10) : UINT64_MAX;
}

/* Run the CLI with args (no --data added); its exit code, stdout+stderr in out. */
static int run_cli(char *out, size_t len, const char *args)
{
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "%s %s 2>&1", KD_CLI, args);
    return kd_run(out, len, cmd);
}

static MDB_env *index_open(MDB_txn **txn)
{
    char p[400];
    MDB_env *env;
    snprintf(p, sizeof p, "%s/index", dir);
    if (mdb_env_create(&env) || mdb_env_set_maxdbs(env, 8) || mdb_env_set_mapsize(env, 64ull << 30) ||
        mdb_env_open(env, p, MDB_NOTLS, 0600) || mdb_txn_begin(env, NULL, 0, txn))
        return NULL;
    return env;
}

static char *segment_file(char *p, size_t len)
{
    char d[400];
    snprintf(d, sizeof d, "%s/segments", dir);
    DIR *dp = opendir(d);
    struct dirent *de;
    p[0] = 0;
    while (dp && (de = readdir(dp)))
        if (strstr(de->d_name, ".seg"))
            snprintf(p, len, "%.300s/%.40s", d, de->d_name);
    if (dp)
        closedir(dp);
    return p;
}

static const uint64_t full[LAYERS] = { LEN, LEN, LEN, LEN };

/* Restart kvarcd on the damaged directory: it must serve len[] of every
 * layer bit-exact and verify clean; then stop it and remove the directory. */
static void expect_intact(const char *after, const uint64_t *len)
{
    kvc_conn *c;
    pid_t pid = restart(&c, after);
    if (pid < 0)
        return;
    CHECK(check_served(c, len) == 0, "acknowledged appends lost after %s", after);
    char out[8192];
    CHECK_RC(cli(out, sizeof out, "verify --json"), 0);
    CHECK(json_u64(out, "problems") == 0, "verify after %s: %s", after, out);
    kvc_close(c);
    stop_kill(pid);
    kd_remove_dir();
}

static void scenario_meta_page(void)
{
    int f0 = tu_failures;         /* this scenario's own checks decide its early exits */
    CHECK_RC(populate("rec-meta"), 0);
    char p[400];
    snprintf(p, sizeof p, "%s/index/data.mdb", dir);
    int fd = open(p, O_RDWR);
    uint8_t m0[160], m1[160];
    uint32_t magic, psize;
    CHECK(fd >= 0 && pread(fd, m0, sizeof m0, 0) == (ssize_t)sizeof m0, "read meta 0");
    memcpy(&magic, m0 + 16, 4);
    memcpy(&psize, m0 + 40, 4);         /* the free DB's md_pad: the page size */
    CHECK(magic == 0xBEEFC0DEu && psize >= 4096 && psize <= 65536, "not an LMDB meta page (magic %x, page %u)",
          magic, psize);
    if (tu_failures > f0)
        return;
    CHECK(pread(fd, m1, sizeof m1, psize) == (ssize_t)sizeof m1, "read meta 1");
    uint64_t t0, t1;
    memcpy(&t0, m0 + 144, 8);
    memcpy(&t1, m1 + 144, 8);
    /* the older meta page (the previous transaction) claims to be newest */
    uint64_t raised = (t0 > t1 ? t0 : t1) + 1;
    CHECK(pwrite(fd, &raised, 8, (t0 < t1 ? 0 : psize) + 144) == 8, "write txnid");
    fsync(fd);
    close(fd);
    expect_intact("LMDB opened its previous transaction", full);
}

static void scenario_committed_size(void)
{
    CHECK_RC(populate("rec-size"), 0);
    MDB_txn *txn;
    MDB_env *env = index_open(&txn);
    CHECK(env != NULL, "open the index");
    if (!env)
        return;
    MDB_dbi segs;
    MDB_cursor *cur;
    MDB_val k, v;
    CHECK_RC(mdb_dbi_open(txn, "segs", 0, &segs), 0);
    CHECK_RC(mdb_cursor_open(txn, segs, &cur), 0);
    int lowered = 0;
    for (int op = MDB_FIRST; !mdb_cursor_get(cur, &k, &v, op); op = MDB_NEXT) {
        uint8_t val[16];
        uint64_t bytes;
        memcpy(val, v.mv_data, 16);
        memcpy(&bytes, val + 8, 8);
        if (bytes & (bytes - 1)) {
            bytes &= bytes - 1;                  /* one bit lower */
            memcpy(val + 8, &bytes, 8);
            MDB_val nv = { 16, val };
            CHECK_RC(mdb_cursor_put(cur, &k, &nv, MDB_CURRENT), 0);
            lowered++;
        }
    }
    mdb_cursor_close(cur);
    CHECK_RC(mdb_txn_commit(txn), 0);
    mdb_env_close(env);
    CHECK(lowered == 1, "lowered %d committed sizes", lowered);
    expect_intact("the committed size was lowered", full);
}

static void scenario_index_damage(void)
{
    int f0 = tu_failures;         /* this scenario's own checks decide its early exits */
    CHECK_RC(populate("rec-index"), 0);
    char sp[400];
    struct stat st;
    CHECK(segment_file(sp, sizeof sp)[0] && stat(sp, &st) == 0, "no segment file");
    MDB_txn *txn;
    MDB_env *env = index_open(&txn);
    CHECK(env != NULL, "open the index");
    if (!env || tu_failures > f0)
        return;
    MDB_dbi extents, means;
    CHECK_RC(mdb_dbi_open(txn, "extents", 0, &extents), 0);
    CHECK_RC(mdb_dbi_open(txn, "means", 0, &means), 0);
    uint8_t kb[20];
    extent_key(kb, conv_id, 1, 20);
    MDB_val k = { 20, kb }, v;
    uint8_t cut[8] = { 0 };                      /* layer 1's extent at 20: its value cut short */
    MDB_val cv = { sizeof cut, cut };
    CHECK_RC(mdb_put(txn, extents, &k, &cv, 0), 0);
    extent_key(kb, conv_id, 2, 30);              /* layer 2's extent at 30: past the segment's end */
    CHECK_RC(mdb_get(txn, extents, &k, &v), 0);
    extent_val ev;
    memcpy(&ev, v.mv_data, sizeof ev);
    ev.off = (uint64_t)st.st_size + 4096;
    MDB_val nv = { sizeof ev, &ev };
    CHECK_RC(mdb_put(txn, extents, &k, &nv, 0), 0);
    uint8_t ck[8];
    key_u64(ck, conv_id);
    MDB_val mk = { 8, ck };
    CHECK_RC(mdb_del(txn, means, &mk, NULL), 0);
    CHECK_RC(mdb_txn_commit(txn), 0);
    mdb_env_close(env);

    kvc_conn *c;
    pid_t pid = restart(&c, "on the damaged directory");
    if (pid < 0)
        return;
    char msg[256];
    uint64_t p = 25;
    int s1 = rpc_fetch_check(c, conv_id, 1, 0, &p, 1, TAG, msg);
    CHECK(s1 == GRPC_STATUS_DATA_LOSS, "an extent cut inside a layer: status %d (%s), want DATA_LOSS", s1, msg);
    p = 35;
    int s2 = rpc_fetch_check(c, conv_id, 2, 0, &p, 1, TAG, msg);
    CHECK(s2 == GRPC_STATUS_DATA_LOSS, "an extent past the segment's end: status %d (%s), want DATA_LOSS", s2, msg);
    p = LEN;
    int s3 = rpc_fetch_check(c, conv_id, 0, 0, &p, 1, TAG, msg);
    CHECK(s3 == GRPC_STATUS_INVALID_ARGUMENT, "past the end is still the caller's error: status %d", s3);
    uint64_t ok_len[LAYERS] = { LEN, 20, 30, LEN };
    CHECK(check_served(c, ok_len) == 0, "undamaged positions must still be served");
    char out[16384];
    int vrc = cli(out, sizeof out, "verify");
    CHECK(vrc == 1, "verify must fail on a damaged index (exit %d): %s", vrc, out);
    CHECK(strstr(out, "layer 1") && strstr(out, "layer 2") && strstr(out, "means"),
          "verify must name each damage: %s", out);
    kvc_close(c);
    stop_kill(pid);
    /* offline, the same findings */
    char args[600];
    snprintf(args, sizeof args, "verify %s", dir);
    vrc = run_cli(out, sizeof out, args);
    CHECK(vrc == 1 && strstr(out, "layer 1") && strstr(out, "means"), "offline verify (exit %d): %s", vrc, out);
    kd_remove_dir();
}

static void scenario_header_flip(void)
{
    int f0 = tu_failures;         /* this scenario's own checks decide its early exits */
    CHECK_RC(populate("rec-header"), 0);
    char sp[400];
    CHECK(segment_file(sp, sizeof sp)[0], "no segment file");
    int fd = open(sp, O_RDWR);
    struct stat st;
    CHECK(fd >= 0 && fstat(fd, &st) == 0, "open %s", sp);
    if (tu_failures > f0)
        return;
    uint8_t *buf = malloc((size_t)st.st_size);
    CHECK(pread(fd, buf, (size_t)st.st_size, 0) == st.st_size, "read segment");
    int seen = 0;
    for (off_t i = 0; i + 4 <= st.st_size; i++)
        if (!memcmp(buf + i, "KVB1", 4) && ++seen == 3) {      /* the third block's header */
            uint8_t b = buf[i + 8] ^ 0x10;
            CHECK(pwrite(fd, &b, 1, i + 8) == 1, "flip");
            break;
        }
    close(fd);
    free(buf);
    CHECK(seen == 3, "found %d block headers", seen);
    kvc_conn *c;
    pid_t pid = restart(&c, "on the damaged directory");
    if (pid < 0)
        return;
    char out[16384];
    int vrc = cli(out, sizeof out, "verify --json");
    /* 1 creation block + LAYERS x BLOCKS data blocks, one of them damaged */
    uint64_t blocks = json_u64(out, "blocks");
    /* two problems: the damaged header, and the extent that points at it */
    CHECK(vrc == 1 && json_u64(out, "problems") == 2 && blocks == LAYERS * BLOCKS,
          "verify must report the damaged header once and check every later block (exit %d, %llu blocks): %s",
          vrc, (unsigned long long)blocks, out);
    CHECK(strstr(out, "block header") && strstr(out, "skipped"), "verify line: %s", out);
    kvc_close(c);
    stop_kill(pid);
    kd_remove_dir();
}

static void scenario_truncated(void)
{
    int f0 = tu_failures;         /* this scenario's own checks decide its early exits */
    CHECK_RC(populate("rec-trunc"), 0);
    char sp[400], out[16384], args[600], log[300];
    struct stat st;
    CHECK(segment_file(sp, sizeof sp)[0] && stat(sp, &st) == 0, "no segment file");
    if (tu_failures > f0)
        return;
    CHECK(truncate(sp, st.st_size - 100) == 0, "truncate");   /* into the last block: layer 3, 50..59 */
    pid_t pid = start_daemon();
    int ex = wait_exit(pid, 60000);
    CHECK(ex > 0, "kvarcd must refuse a segment shorter than its committed size (exit %d)", ex);
    if (ex == -1)
        stop_kill(pid);
    snprintf(log, sizeof log, "%s.log", dir);
    FILE *f = fopen(log, "r");
    size_t n = f ? fread(out, 1, sizeof out - 1, f) : 0;
    out[n] = 0;
    if (f)
        fclose(f);
    snprintf(args, sizeof args, "kvarc rebuild-index %s", dir);
    CHECK(strstr(out, args) && strstr(out, "kvarc verify"), "kvarcd's refusal must name the commands: %s", out);

    snprintf(args, sizeof args, "verify %s", dir);
    int vrc = run_cli(out, sizeof out, args);
    CHECK(vrc == 1 && strstr(out, "shorter than its committed"), "offline verify (exit %d): %s", vrc, out);
    snprintf(args, sizeof args, "rebuild-index %s", dir);
    int rrc = run_cli(out, sizeof out, args);
    CHECK(rrc == 0, "rebuild-index (exit %d): %s", rrc, out);
    snprintf(args, sizeof args, "verify %s", dir);
    vrc = run_cli(out, sizeof out, args);
    /* the torn block's bytes are still in the file; the index no longer
     * claims them and kvarcd cuts them at start */
    CHECK(vrc == 0 || (vrc == 1 && !strstr(out, "shorter")), "offline verify after the rebuild (exit %d): %s", vrc, out);

    kvc_conn *c;
    pid = restart(&c, "after rebuild-index");
    if (pid < 0)
        return;
    uint64_t left[LAYERS] = { LEN, LEN, LEN, LEN - COUNT };
    CHECK(check_served(c, left) == 0, "what the segments still held must be served after the rebuild");
    char msg[256];
    uint64_t p = LEN - COUNT;
    CHECK_RC(rpc_fetch_check(c, conv_id, 3, 0, &p, 1, TAG, msg), GRPC_STATUS_INVALID_ARGUMENT);
    CHECK_RC(cli(out, sizeof out, "verify --json"), 0);
    CHECK(json_u64(out, "problems") == 0, "verify after the rebuild: %s", out);
    /* offline commands refuse a directory kvarcd runs on */
    snprintf(args, sizeof args, "verify %s", dir);
    vrc = run_cli(out, sizeof out, args);
    CHECK(vrc == 2 && strstr(out, "in use"), "offline verify on a running kvarcd's directory (exit %d): %s", vrc, out);
    snprintf(args, sizeof args, "rebuild-index %s", dir);
    vrc = run_cli(out, sizeof out, args);
    CHECK(vrc == 2 && strstr(out, "in use"), "rebuild-index on a running kvarcd's directory (exit %d): %s", vrc, out);
    kvc_close(c);
    stop_kill(pid);
    snprintf(args, sizeof args, "verify %s", dir);
    vrc = run_cli(out, sizeof out, args);
    CHECK(vrc == 0, "offline verify of the repaired directory (exit %d): %s", vrc, out);
    kd_remove_dir();
}

static void scenario_nul_name(void)
{
    eu_tmpdir(dir, sizeof dir, "rec-nul");
    kvc_conn *c;
    pid_t pid = restart(&c, "on a new directory");
    if (pid < 0)
        return;
    Kvarc__V1__CreateRequest r = KVARC__V1__CREATE_REQUEST__INIT;
    Kvarc__V1__Shape s = shape_pb(128);
    r.ns = "team-aXteam-b";
    r.name = "chat";
    r.shape = &s;
    size_t len = kvarc__v1__create_request__get_packed_size(&r);
    uint8_t *buf = malloc(len);
    kvarc__v1__create_request__pack(&r, buf);
    uint8_t *x = memmem(buf, len, "team-aX", 7);
    CHECK(x != NULL, "packed name");
    if (x)
        x[6] = 0;                                 /* "team-a\0team-b" on the wire */
    char msg[256];
    uint8_t *out = NULL;
    size_t olen = 0;
    int st = kvc_call_raw(c, "Create", buf, len, &out, &olen, 0, msg, sizeof msg);
    CHECK(st == GRPC_STATUS_INVALID_ARGUMENT && strstr(msg, "NUL"), "a NUL in a namespace: status %d (%s)", st, msg);
    free(out);
    free(buf);
    int pages;
    CHECK(list_all(c, "team-a", 100, &pages) == 0, "nothing may be created under the cut name");
    CHECK_RC(open_conv(c, "team-a", "chat", NULL, msg), GRPC_STATUS_NOT_FOUND);
    kvc_close(c);
    stop_kill(pid);
    kd_remove_dir();
}

int main(void)
{
    static const struct { const char *name; void (*fn)(void); } sc[] = {
        { "meta page", scenario_meta_page }, { "committed size", scenario_committed_size },
        { "index damage", scenario_index_damage }, { "header flip", scenario_header_flip },
        { "truncated segment", scenario_truncated }, { "NUL in a name", scenario_nul_name },
    };
    for (size_t i = 0; i < sizeof sc / sizeof sc[0]; i++) {
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        int before = tu_failures;
        sc[i].fn();
        clock_gettime(CLOCK_MONOTONIC, &t1);
        printf("  %-18s %s (%.2f s)\n", sc[i].name, tu_failures == before ? "ok" : "FAILED",
               (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec));
    }
    return tu_finish("test_kvarcd_recovery");
}
