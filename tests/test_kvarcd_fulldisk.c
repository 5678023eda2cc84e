/* test_kvarcd_fulldisk: a real full disk (issue 18, item 4). kvarcd runs on
 * a 24 MiB tmpfs (root only: exit 77 where it cannot be mounted) with
 * 1 MiB segments; two conversations are appended to in turn until an
 * append fails. Then:
 *  1. the failure is RESOURCE_EXHAUSTED and its message says the disk is
 *     full; Append, AppendMany and AppendStream all fail so, none of them
 *     keeps anything; kvarcd still answers Health; every acknowledged
 *     append reads back bit-exact and the layers hold exactly what was
 *     acknowledged; verify is clean;
 *  2. kill -9 and a restart on the full disk: kvarcd comes up, nothing
 *     acknowledged is lost;
 *  3. Delete of one conversation on the full disk succeeds or fails
 *     cleanly (then 1 MiB more and it must succeed); Compact on the nearly
 *     full disk completes or fails cleanly, the data intact, verify clean,
 *     kvarcd alive; with room again (a remount to 64 MiB) it completes and
 *     reclaims space;
 *  4. appends resume and read back; a last restart loses nothing.
 * Every wait is for an answer or an exit; milliseconds are failure guards. */
#include <sys/mount.h>
#include <sys/statvfs.h>

#include "kvarcd_util.h"

#define BLOCK 64           /* tokens per append: 2 x 64 x 122 B = 15.6 KB */
#define LAYERS 4

static char base[200];
static int mounted;
static pid_t pid;

static uint64_t acked[2][LAYERS];    /* [a, b][layer] */
static uint64_t ids[2];
static const char *names[2] = { "a", "b" };
static const uint64_t tags[2] = { 41, 42 };

static void cleanup(void)
{
    if (pid > 0) {
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
        pid = 0;
    }
    if (mounted)
        umount2(dir, MNT_DETACH);
    mounted = 0;
}

static const char *const daemon_args[] = { "--segment-mb", "1", NULL };

static kvc_conn *restart(const char *why)
{
    kvc_conn *c;
    pid = start_daemon_args(daemon_args);
    CHECK_RC(kvc_connect(dir, &c), 0);
    CHECK(wait_ready(c) == 1, "kvarcd ready (%s)", why);
    return c;
}

static uint64_t free_kib(void)
{
    struct statvfs v;
    return statvfs(dir, &v) ? 0 : (uint64_t)v.f_bavail * v.f_frsize / 1024;
}

/* Every acknowledged record of conversation i (b only while it lives):
 * the layer lengths are exactly what was acknowledged, the bytes exact. */
static void check_conv(kvc_conn *c, int i, const char *when)
{
    char msg[256];
    uint64_t len[LAYERS], pos[256];
    CHECK_RC(kd_layer_lengths(c, "t", names[i], NULL, len, LAYERS, msg), 0);
    for (uint32_t l = 0; l < LAYERS; l++) {
        CHECK(len[l] == acked[i][l], "%s: t/%s layer %u holds %llu, %llu acknowledged", when, names[i], l,
              (unsigned long long)len[l], (unsigned long long)acked[i][l]);
        int bad = 0;
        for (uint64_t p = 0; p < acked[i][l] && !bad; p += 256) {
            size_t n = 0;
            for (uint64_t q = p; q < acked[i][l] && n < 256; q++)
                pos[n++] = q;
            for (uint32_t h = 0; h < 2 && !bad; h++)
                bad = rpc_fetch_check(c, ids[i], l, h, pos, n, tags[i], msg);
        }
        CHECK(!bad, "%s: t/%s layer %u reads back bit-exact (%d: %s)", when, names[i], l, bad, bad == 100 ? "" : msg);
    }
}

static uint64_t verify_problems(kvc_conn *c, const char *when)
{
    Kvarc__V1__Empty e = KVARC__V1__EMPTY__INIT;
    Kvarc__V1__JobEvent *last = NULL;
    char msg[256];
    int st = kvc_job(c, "Verify", &e.base, 120000, NULL, NULL, &last, msg, sizeof msg);
    CHECK(st == 0 && last && last->verify, "%s: verify answered: %s %s", when, kvc_status_name(st), msg);
    uint64_t p = last && last->verify ? last->verify->problems : 1;
    for (size_t i = 0; last && last->verify && i < last->verify->n_lines && i < 5; i++)
        fprintf(stderr, "  verify: %s\n", last->verify->lines[i]);
    if (last)
        protobuf_c_message_free_unpacked(&last->base, NULL);
    CHECK(p == 0, "%s: verify found %llu problem(s)", when, (unsigned long long)p);
    return p;
}

/* Compact; its status, *reclaimed on OK, the message in msg. */
static int compact(kvc_conn *c, uint64_t *reclaimed, char *msg)
{
    Kvarc__V1__CompactRequest r = KVARC__V1__COMPACT_REQUEST__INIT;
    r.threshold = 0.99f;
    Kvarc__V1__JobEvent *last = NULL;
    int st = kvc_job(c, "Compact", &r.base, 120000, NULL, NULL, &last, msg, 256);
    *reclaimed = last && last->compact ? last->compact->reclaimed : 0;
    if (last)
        protobuf_c_message_free_unpacked(&last->base, NULL);
    return st;
}

static int delete_conv(kvc_conn *c, const char *name, char *msg)
{
    Kvarc__V1__DeleteRequest d = KVARC__V1__DELETE_REQUEST__INIT;
    d.ns = "t";
    d.name = (char *)name;
    ProtobufCMessage *rep = NULL;
    int st = kvc_call(c, "Delete", &d.base, &kvarc__v1__empty__descriptor, &rep, 0, msg, 256);
    if (rep)
        protobuf_c_message_free_unpacked(rep, NULL);
    return st;
}

static int full_message(const char *msg)
{
    return strstr(msg, "No space left") || strstr(msg, "full");
}

int main(void)
{
    char msg[256];
    if (geteuid() != 0) {
        fprintf(stderr, "test_kvarcd_fulldisk: skipped: mounting a tmpfs needs root\n");
        return 77;
    }
    eu_tmpdir(base, sizeof base, "fulldisk");
    snprintf(dir, sizeof dir, "%s/mnt", base);   /* kvarcd's log, DIR.log, stays off the tmpfs */
    if (mkdir(dir, 0700) || mount("tmpfs", dir, "tmpfs", 0, "size=24m,mode=0700")) {
        fprintf(stderr, "test_kvarcd_fulldisk: skipped: cannot mount a tmpfs on %s: %s\n", dir, strerror(errno));
        rmdir(dir);
        rmdir(base);
        return 77;
    }
    mounted = 1;

    kvc_conn *c = restart("on a 24 MiB tmpfs");
    for (int i = 0; i < 2; i++)
        CHECK_RC(create(c, "t", names[i], 128, msg, &ids[i]), 0);
    if (tu_failures) {
        cleanup();
        return tu_finish("test_kvarcd_fulldisk");
    }

    /* 1. fill: a and b in turn, layer after layer, until an append fails */
    int st = 0, n = 0;
    for (; n < 100000; n++) {
        int i = n % 2;
        uint32_t l = (uint32_t)(n / 2) % LAYERS;
        st = rpc_append(c, ids[i], l, acked[i][l], BLOCK, tags[i], 0, NULL, msg);
        if (st)
            break;
        acked[i][l] += BLOCK;
    }
    fprintf(stderr, "full after %d appends (%llu KiB free): %s: %s\n", n, (unsigned long long)free_kib(),
            kvc_status_name(st), msg);
    CHECK(st == GRPC_STATUS_RESOURCE_EXHAUSTED, "the append on a full disk: RESOURCE_EXHAUSTED, not %s",
          kvc_status_name(st));
    CHECK(full_message(msg), "its message says the disk is full: %s", msg);
    CHECK(kd_health(c, 10000) == 1, "kvarcd serves on after the full disk");
    /* then single tokens, which may still fit a segment's last page, until
     * they fail too (the index may be what cannot grow then) */
    for (n = 0; n < 100000; n++) {
        int i = n % 2;
        uint32_t l = (uint32_t)(n / 2) % LAYERS;
        st = rpc_append(c, ids[i], l, acked[i][l], 1, tags[i], 0, NULL, msg);
        if (st)
            break;
        acked[i][l] += 1;
    }
    fprintf(stderr, "full for single tokens after %d more (%llu KiB free): %s: %s\n", n,
            (unsigned long long)free_kib(), kvc_status_name(st), msg);
    CHECK(st == GRPC_STATUS_RESOURCE_EXHAUSTED && full_message(msg), "a single token on a full disk: %s: %s",
          kvc_status_name(st), msg);
    CHECK(kd_health(c, 10000) == 1, "kvarcd serves on after single tokens found the disk full");
    /* the other ways to append fail the same way and keep nothing */
    st = rpc_append(c, ids[0], 0, acked[0][0], BLOCK, tags[0], 0, NULL, msg);
    CHECK(st == GRPC_STATUS_RESOURCE_EXHAUSTED && full_message(msg), "Append again: %s: %s", kvc_status_name(st), msg);
    {
        kd_block b[2];
        kd_block_make(&b[0], ids[0], 1, acked[0][1], BLOCK, tags[0]);
        kd_block_make(&b[1], ids[0], 2, acked[0][2], BLOCK, tags[0]);
        Kvarc__V1__AppendRequest *bp[2] = { &b[0].r, &b[1].r };
        Kvarc__V1__AppendManyRequest r = KVARC__V1__APPEND_MANY_REQUEST__INIT;
        r.conv = ids[0];
        r.blocks = bp;
        r.n_blocks = 2;
        ProtobufCMessage *rep = NULL;
        st = kvc_call(c, "AppendMany", &r.base, &kvarc__v1__append_many_reply__descriptor, &rep, 0, msg, sizeof msg);
        CHECK_RC(st, 0);
        if (!st) {
            Kvarc__V1__AppendManyReply *m = (Kvarc__V1__AppendManyReply *)rep;
            CHECK(m->n_results == 2, "AppendMany: a result per block");
            for (size_t k = 0; k < m->n_results; k++)
                CHECK(m->results[k]->status == GRPC_STATUS_RESOURCE_EXHAUSTED && full_message(m->results[k]->message),
                      "AppendMany block %zu on a full disk: %u: %s", k, m->results[k]->status,
                      m->results[k]->message);
            protobuf_c_message_free_unpacked(rep, NULL);
        }
        kd_block_free(&b[0]);
        kd_block_free(&b[1]);
        kvc_stream *s;
        kd_block_make(&b[0], ids[0], 3, acked[0][3], BLOCK, tags[0]);
        CHECK_RC(kvc_stream_open(c, "AppendStream", 30000, &s), 0);
        kvc_stream_send(s, &b[0].r.base);
        rep = NULL;
        st = kvc_stream_finish(s, &kvarc__v1__append_reply__descriptor, &rep, msg, sizeof msg);
        if (rep)
            protobuf_c_message_free_unpacked(rep, NULL);
        CHECK(st == GRPC_STATUS_RESOURCE_EXHAUSTED && full_message(msg), "AppendStream on a full disk: %s: %s",
              kvc_status_name(st), msg);
        kd_block_free(&b[0]);
    }
    CHECK(kd_health(c, 10000) == 1, "kvarcd serves on after every kind of append failed");
    check_conv(c, 0, "full disk");
    check_conv(c, 1, "full disk");
    verify_problems(c, "full disk");

    /* 2. kill -9 and restart on the full disk */
    kvc_close(c);
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    c = restart("after kill -9 on the full disk");
    check_conv(c, 0, "restarted on the full disk");
    check_conv(c, 1, "restarted on the full disk");
    verify_problems(c, "restarted on the full disk");

    /* 3. delete b, then compact on a nearly full disk */
    st = delete_conv(c, "b", msg);
    fprintf(stderr, "Delete on the full disk: %s %s\n", kvc_status_name(st), msg);
    CHECK(st == 0 || (st == GRPC_STATUS_RESOURCE_EXHAUSTED && full_message(msg)),
          "Delete on the full disk succeeds or fails for the disk: %s: %s", kvc_status_name(st), msg);
    if (st) {
        CHECK(kd_health(c, 10000) == 1, "kvarcd serves on after a Delete the disk refused");
        CHECK(mount("tmpfs", dir, "tmpfs", MS_REMOUNT, "size=25m,mode=0700") == 0, "remount to 25 MiB: %s",
              strerror(errno));
        CHECK_RC(delete_conv(c, "b", msg), 0);
    }
    uint64_t reclaimed = 0, before = free_kib();
    st = compact(c, &reclaimed, msg);
    fprintf(stderr, "Compact on a nearly full disk (%llu KiB free): %s, reclaimed %llu %s\n",
            (unsigned long long)before, kvc_status_name(st), (unsigned long long)reclaimed, msg);
    CHECK(st == 0 || st == GRPC_STATUS_RESOURCE_EXHAUSTED, "Compact on a nearly full disk completes or fails for "
          "the disk: %s: %s", kvc_status_name(st), msg);
    if (st)      /* what it wrote of its new segment is gone again */
        CHECK(free_kib() >= before, "a failed compaction leaves no partial segment behind: %llu KiB free, %llu "
              "before", (unsigned long long)free_kib(), (unsigned long long)before);
    CHECK(kd_health(c, 10000) == 1, "kvarcd serves on after compaction on a nearly full disk");
    check_conv(c, 0, "compaction on a nearly full disk");
    verify_problems(c, "compaction on a nearly full disk");
    CHECK(mount("tmpfs", dir, "tmpfs", MS_REMOUNT, "size=64m,mode=0700") == 0, "remount to 64 MiB: %s",
          strerror(errno));
    if (st) {
        st = compact(c, &reclaimed, msg);
        CHECK(st == 0, "Compact with room again: %s: %s", kvc_status_name(st), msg);
    }
    CHECK(reclaimed > 0, "compaction reclaimed b's space (%llu bytes)", (unsigned long long)reclaimed);
    check_conv(c, 0, "after compaction");
    verify_problems(c, "after compaction");

    /* 4. appends resume */
    for (int k = 0; k < 40; k++) {
        uint32_t l = (uint32_t)k % LAYERS;
        st = rpc_append(c, ids[0], l, acked[0][l], BLOCK, tags[0], 0, NULL, msg);
        CHECK(st == 0, "append %d with room again: %s: %s", k, kvc_status_name(st), msg);
        if (st)
            break;
        acked[0][l] += BLOCK;
    }
    check_conv(c, 0, "appends resumed");
    kvc_close(c);
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    c = restart("the last restart");
    check_conv(c, 0, "the last restart");
    verify_problems(c, "the last restart");
    kvc_close(c);
    kill(pid, SIGTERM);
    CHECK(wait_exit(pid, 30000) == 0, "kvarcd exits 0 on SIGTERM");
    pid = 0;
    cleanup();
    if (!tu_failures) {
        kd_remove_dir();
        rmdir(base);
    }
    return tu_finish("test_kvarcd_fulldisk");
}
