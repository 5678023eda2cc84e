/* test_cluster: two kvarcd on one Ceph RADOS pool (issue 19), through
 * libkvarc and real daemons: test_cluster.sh starts the cluster and passes
 * its settings in CEPH_CONF, CEPH_KEYRING, CEPH_USER, CEPH_POOL (and the
 * pid file of one OSD in CEPH_OSD_PIDFILE); without them this exits 77.
 *  1. share: a worker on kvarcd-1 writes t/talk; a worker on kvarcd-2
 *     attaches it and attends bit for bit as the writer does; both
 *     kvarcd export byte-identical files;
 *  2. fork: taken on kvarcd-2 and continued there; kvarcd-1 attaches it
 *     at its new length;
 *  3. race: while kvarcd-1 writes t/talk, kvarcd-2's append is refused
 *     (KVARC_ELOCKED naming node n1); once kvarcd-1 is idle its lock is
 *     released, kvarcd-2's retry of the same position is refused as held
 *     ("continue at the end": one winner per position), its next one wins
 *     and kvarcd-1 is refused naming n2;
 *  3b. fence: a writer frozen (SIGSTOP) past its lock is taken over; thawed,
 *     its append is refused and a fresh cache has only the new writer's;
 *  4. OSD: one OSD killed -9 during appends: no error, nothing lost; once
 *     it is started again the cluster recovers (every PG active+clean)
 *     and appends go on;
 *  5. kill: kvarcd-1 killed -9 while a writer process appends t/kill
 *     token after token; on kvarcd-2 every acknowledged token is there
 *     (attention over them equals exact attention), appends are refused
 *     while the dead kvarcd's lock holds and succeed once it lapses (the
 *     failover time is printed); a restarted kvarcd-1 sees them;
 *  6. collection: compaction removes a deleted conversation's objects
 *     from the pool, keeps those of a deleted one a live fork shares
 *     until the fork is deleted too, and every live one's;
 *  7. timeout: every OSD stopped, an append through a kvarcd with a 3-s
 *     Ceph timeout fails UNAVAILABLE naming it; the conversation goes on
 *     once they run again;
 *  8. verify: a byte flipped in a segment object in the pool is reported by
 *     kvarc verify, and a fresh cache refuses the conversation.
 * Waits are on events (acknowledged appends, a refusal turning into
 * success), each bounded by a deadline far past the lock's 3 s. */
#include <math.h>
#include <sys/wait.h>

#include "kvarcd_util.h"
#include "kvarc.h"
#include "kvg.h"

#define L 2
#define H 2
#define QH 4
#define D 64
#define T 200           /* tokens a conversation may reach here */
#define LOCK_S "3"

static float Kd[T][L][H][D], Vd[T][L][H][D], Qd[T][L][QH][D];
static char dir1[256], dir2[256];
static char NS[32];     /* t<pid>: a pool may outlive a run */
static const kvarc_model model = { L, H, QH, D, KVARC_DTYPE_F32, 10000.0f, D, 0, "toy-cluster" };

static void gen(void)
{
    tu_rng r = { 1919 };
    for (int t = 0; t < T; t++)
        for (int l = 0; l < L; l++) {
            for (int h = 0; h < H; h++)
                for (int i = 0; i < D; i++) {   /* f16 values: f16 records keep them exactly */
                    Kd[t][l][h][i] = kvarc_f16_to_f32(kvarc_f32_to_f16(tu_gauss(&r)));
                    Vd[t][l][h][i] = kvarc_f16_to_f32(kvarc_f32_to_f16(tu_gauss(&r)));
                }
            for (int h = 0; h < QH; h++)
                for (int i = 0; i < D; i++)
                    Qd[t][l][h][i] = 0.4f * tu_gauss(&r);
        }
}

static kvarc_options opts(void)
{
    kvarc_options o;
    kvarc_options_default(&o);
    o.format = KVARC_FMT_F16;
    o.sinks = 4;
    o.hot_window = 16;
    o.batch = 8;
    o.top_k = 4096;         /* every cold token: retrieval is exhaustive */
    o.shortlist = 1;
    return o;
}

/* kvarcd on data directory d, on the pool, as node `node`, with a Ceph
 * timeout of timeout_s seconds; waits until it answers. */
static pid_t start_node(const char *d, const char *node, const char *timeout_s)
{
    snprintf(dir, sizeof dir, "%s", d);
    const char *extra[] = { "--rados-pool", getenv("CEPH_POOL"), "--rados-conf", getenv("CEPH_CONF"),
                            "--rados-user", getenv("CEPH_USER"), "--rados-keyring", getenv("CEPH_KEYRING"),
                            "--rados-lock-s", LOCK_S, "--rados-timeout-s", timeout_s, "--rados-gc-grace-s", "1",
                            "--rados-segment-kb", "64",     /* a conversation here spans many segments */
                            "--node", node, NULL };
    pid_t pid = start_daemon_args(extra);
    kvc_conn *c;
    if (kvc_connect(d, &c) == 0) {
        CHECK(wait_ready(c), "kvarcd %s ready", node);
        kvc_close(c);
    }
    return pid;
}

/* kvarcd pid (on data directory d, as node) stopped: it must exit 0; its
 * directory and log go unless a check failed (kept for the post-mortem). */
static void stop_node(pid_t pid, const char *d, const char *node)
{
    kill(pid, SIGTERM);
    CHECK(wait_exit(pid, 20000) == 0, "kvarcd %s exits 0", node);
    if (!tu_failures) {
        char p[300];
        snprintf(p, sizeof p, "%s.log", d);
        unlink(p);
        eu_rmrf(d);
    }
}

/* Append token t to every layer of cv. */
static int put(kvarc_conv *cv, int t)
{
    for (int l = 0; l < L; l++) {
        float k[H * D], v[H * D];
        for (int h = 0; h < H; h++) {
            memcpy(k + h * D, Kd[t][l][h], sizeof(float) * D);
            memcpy(v + h * D, Vd[t][l][h], sizeof(float) * D);
        }
        int rc = kvarc_append(cv, (uint32_t)l, KVARC_DTYPE_F32, k, v, 1);
        if (rc)
            return rc;
    }
    return 0;
}

/* Relative error of cv's attention for token t (its last) on layer l
 * against exact causal attention over tokens [0, t]. */
static double exact_err(kvarc_conv *cv, int l, int t, float *out)
{
    float q[QH * D];
    for (int h = 0; h < QH; h++)
        memcpy(q + h * D, Qd[t][l][h], sizeof(float) * D);
    if (kvarc_attend(cv, (uint32_t)l, q, 1, out)) {
        fprintf(stderr, "attend: %s\n", kvarc_errmsg(cv));
        return 1e9;
    }
    double num = 0, den = 0;
    for (int hq = 0; hq < QH; hq++) {
        int h = hq / (QH / H);
        float qr[D];
        memcpy(qr, Qd[t][l][hq], sizeof qr);
        kvg_rope_ref(qr, D, D, 0, 10000.0f, (uint64_t)t);
        double w[T], mx = -INFINITY, z = 0;
        for (int j = 0; j <= t; j++) {
            float kr[D];
            memcpy(kr, Kd[j][l][h], sizeof kr);
            kvg_rope_ref(kr, D, D, 0, 10000.0f, (uint64_t)j);
            double s = 0;
            for (int i = 0; i < D; i++)
                s += (double)qr[i] * kr[i];
            w[j] = s / sqrt((double)D);
            mx = fmax(mx, w[j]);
        }
        for (int j = 0; j <= t; j++)
            z += (w[j] = exp(w[j] - mx));
        for (int i = 0; i < D; i++) {
            double a = 0;
            for (int j = 0; j <= t; j++)
                a += w[j] * Vd[j][l][h][i];
            a /= z;
            num += (a - out[hq * D + i]) * (a - out[hq * D + i]);
            den += a * a;
        }
    }
    return sqrt(num / den);
}

/* The kvarc CLI against data directory d (kvarcd_util's cli runs it on dir). */
static int cli_on(const char *d, const char *args)
{
    char out[4096];
    snprintf(dir, sizeof dir, "%s", d);
    return cli(out, sizeof out, args);
}

static kvarc_client *cl1, *cl2;

static void test_share_and_fork(void)
{
    kvarc_options o = opts();
    kvarc_conv *a, *b;
    CHECK_RC(kvarc_conv_create(cl1, NS, "talk", &model, &o, NULL, &a), 0);
    if (tu_failures) {
        fprintf(stderr, "create on kvarcd-1: %s\n", kvarc_client_errmsg(cl1));
        return;
    }
    for (int t = 0; t < 100; t++)
        CHECK_RC(put(a, t), 0);
    CHECK_RC(kvarc_conv_sync(a), 0);
    CHECK_RC(kvarc_conv_attach(cl2, NS, "talk", &model, &o, &b), 0);
    if (tu_failures) {
        fprintf(stderr, "attach on kvarcd-2: %s\n", kvarc_client_errmsg(cl2));
        return;
    }
    CHECK(kvarc_length(b, 0) == 100 && kvarc_length(b, 1) == 100, "kvarcd-2 sees 100 tokens (%llu)",
          (unsigned long long)kvarc_length(b, 0));
    for (int l = 0; l < L; l++) {
        float oa[QH * D], ob[QH * D];
        double ea = exact_err(a, l, 99, oa), eb = exact_err(b, l, 99, ob);
        CHECK(!memcmp(oa, ob, sizeof oa), "layer %d: kvarcd-2's attention equals kvarcd-1's bit for bit", l);
        CHECK(ea < 1e-3 && eb < 1e-3, "layer %d: exact attention (%.2e, %.2e)", l, ea, eb);
    }
    char a1[600], a2[600];
    snprintf(a1, sizeof a1, "export %s/talk %s.talk1", NS, dir1);
    snprintf(a2, sizeof a2, "export %s/talk %s.talk2", NS, dir1);
    CHECK_RC(cli_on(dir1, a1), 0);
    CHECK_RC(cli_on(dir2, a2), 0);
    snprintf(a1, sizeof a1, "cmp -s %s.talk1 %s.talk2", dir1, dir1);
    CHECK(system(a1) == 0, "both kvarcd export t/talk byte for byte alike");

    /* a fork on kvarcd-2, continued there, seen from kvarcd-1 */
    CHECK_RC(kvarc_fork(b, NS, "branch", 0), 0);
    kvarc_conv *f, *f1;
    CHECK_RC(kvarc_conv_attach(cl2, NS, "branch", &model, &o, &f), 0);
    for (int t = 100; t < 120 && !tu_failures; t++)
        CHECK_RC(put(f, t), 0);
    CHECK_RC(kvarc_conv_sync(f), 0);
    CHECK_RC(kvarc_conv_attach(cl1, NS, "branch", &model, &o, &f1), 0);
    if (!tu_failures) {
        CHECK(kvarc_length(f1, 0) == 120, "kvarcd-1 attaches the fork at 120 (%llu)",
              (unsigned long long)kvarc_length(f1, 0));
        float out[QH * D];
        double ef = exact_err(f1, 1, 119, out);
        CHECK(ef < 1e-3, "the fork's attention on kvarcd-1 is exact (%.2e)", ef);
    }
    kvarc_conv_close(f1);
    kvarc_conv_close(f);
    kvarc_conv_close(b);
    kvarc_conv_close(a);
}

static void test_race(void)
{
    kvarc_options o = opts();
    kvarc_conv *a, *b;
    CHECK_RC(kvarc_conv_attach(cl1, NS, "talk", &model, &o, &a), 0);
    if (tu_failures)
        return;
    CHECK_RC(put(a, 100), 0);
    CHECK_RC(kvarc_conv_sync(a), 0);        /* kvarcd-1 holds the lock now */
    CHECK_RC(kvarc_conv_attach(cl2, NS, "talk", &model, &o, &b), 0);
    if (tu_failures)
        return;
    CHECK(kvarc_length(b, 0) == 101, "kvarcd-2 sees kvarcd-1's append");
    CHECK_RC(put(b, 101), 0);
    int rc = kvarc_conv_sync(b);
    CHECK(rc == KVARC_ELOCKED && strstr(kvarc_errmsg(b), "kvarcd on n1"),
          "kvarcd-2's append while kvarcd-1 writes: KVARC_ELOCKED naming n1 (%d: %s)", rc, kvarc_errmsg(b));
    CHECK_RC(put(a, 101), 0);               /* kvarcd-1 takes position 101 */
    CHECK_RC(kvarc_conv_sync(a), 0);
    /* kvarcd-1 idle: it releases the lock; kvarcd-2's retry of 101 is then refused as held */
    long end = kd_now_ms() + 60000;
    while ((rc = kvarc_conv_sync(b)) == KVARC_ELOCKED && kd_now_ms() < end)
        kd_sleep_ms(100);
    CHECK(rc == -EINVAL && strstr(kvarc_errmsg(b), "continue at the end"),
          "once released, kvarcd-2's append of position 101 is refused: kvarcd-1 has it (%d: %s)", rc,
          kvarc_errmsg(b));
    kvarc_conv_close(b);
    CHECK_RC(kvarc_conv_attach(cl2, NS, "talk", &model, &o, &b), 0);
    if (tu_failures)
        return;
    CHECK(kvarc_length(b, 0) == 102, "kvarcd-2 attaches at 102");
    CHECK_RC(put(b, 102), 0);
    CHECK_RC(kvarc_conv_sync(b), 0);        /* kvarcd-2 wins 102 and holds the lock */
    CHECK_RC(put(a, 102), 0);
    rc = kvarc_conv_sync(a);
    CHECK(rc == KVARC_ELOCKED && strstr(kvarc_errmsg(a), "kvarcd on n2"),
          "kvarcd-1's append now: KVARC_ELOCKED naming n2 (%d: %s)", rc, kvarc_errmsg(a));
    kvarc_conv_close(a);
    float out[QH * D];
    double e = exact_err(b, 0, 102, out);
    CHECK(e < 1e-3, "t/talk after the race is exact attention over every winner's tokens (%.2e)", e);
    kvarc_conv_close(b);
}

/* A writer frozen (SIGSTOP) while it holds the lock: kvarcd-2 takes the
 * conversation over once the lock lapses; thawed, the old writer's next
 * append is refused (its lock gone, or its segment sealed by the
 * takeover), never logged beside kvarcd-2's. */
static void test_fence(pid_t k1)
{
    kvarc_options o = opts();
    kvarc_conv *a, *b;
    CHECK_RC(kvarc_conv_create(cl1, NS, "fence", &model, &o, NULL, &a), 0);
    if (tu_failures)
        return;
    for (int t = 0; t < 10 && !tu_failures; t++)
        CHECK_RC(put(a, t), 0);
    CHECK_RC(kvarc_conv_sync(a), 0);        /* kvarcd-1 writes it: lock held, its segment open */
    CHECK_RC(kill(k1, SIGSTOP), 0);
    CHECK_RC(kvarc_conv_attach(cl2, NS, "fence", &model, &o, &b), 0);
    if (!tu_failures) {
        CHECK_RC(put(b, 10), 0);
        int rc;
        long end = kd_now_ms() + 60000;
        while ((rc = kvarc_conv_sync(b)) == KVARC_ELOCKED && kd_now_ms() < end)
            kd_sleep_ms(100);
        CHECK(rc == 0, "kvarcd-2 takes over the frozen writer's conversation (%d: %s)", rc, kvarc_errmsg(b));
        kvarc_conv_close(b);
    }
    CHECK_RC(kill(k1, SIGCONT), 0);
    if (tu_failures)
        return;
    CHECK_RC(put(a, 10), 0);
    int rc = kvarc_conv_sync(a);
    CHECK(rc == KVARC_ELOCKED, "the thawed writer's append of the same position is refused (%d: %s)", rc,
          kvarc_errmsg(a));
    kvarc_conv_close(a);
    char d5[256];
    eu_tmpdir(d5, sizeof d5, "cluster5");
    pid_t k5 = start_node(d5, "n5", "60");
    kvarc_client *c5;
    CHECK_RC(kvarc_client_open(d5, NULL, NULL, &c5), 0);
    CHECK_RC(kvarc_conv_attach(c5, NS, "fence", &model, &o, &b), 0);
    if (!tu_failures) {
        float out[QH * D];
        double e = exact_err(b, 0, 10, out);
        CHECK(kvarc_length(b, 0) == 11 && e < 1e-3, "a fresh cache has kvarcd-2's token and no other (%llu, %.2e)",
              (unsigned long long)kvarc_length(b, 0), e);
        kvarc_conv_close(b);
    }
    kvarc_client_close(c5);
    stop_node(k5, d5, "n5");
}

/* An OSD killed -9 while kvarcd-2 appends: no error, nothing lost. */
static void test_osd_kill(void)
{
    const char *pf = getenv("CEPH_OSD_PIDFILE");
    FILE *f = pf ? fopen(pf, "r") : NULL;
    int osd = 0;
    if (!f || fscanf(f, "%d", &osd) != 1) {
        CHECK(0, "the OSD's pid file %s", pf ? pf : "(CEPH_OSD_PIDFILE unset)");
        if (f)
            fclose(f);
        return;
    }
    fclose(f);
    kvarc_options o = opts();
    kvarc_conv *b;
    CHECK_RC(kvarc_conv_create(cl2, NS, "osd", &model, &o, NULL, &b), 0);
    if (tu_failures)
        return;
    long worst = 0;
    for (int t = 0; t < 60 && !tu_failures; t++) {
        if (t == 20)
            CHECK_RC(kill(osd, SIGKILL), 0);
        long t0 = kd_now_ms();
        CHECK_RC(put(b, t), 0);
        CHECK_RC(kvarc_conv_sync(b), 0);
        if (t >= 20 && kd_now_ms() - t0 > worst)
            worst = kd_now_ms() - t0;
    }
    printf("test_cluster: an OSD killed -9 mid-appends: longest append after it %ld ms, no error\n", worst);
    /* the OSD back: the cluster recovers (every placement group active+clean), nothing lost */
    if (getenv("CEPH_CLUSTER_DIR") && getenv("KVARC_CEPH_TOOL")) {
        char cmd[1024], out[512];
        snprintf(cmd, sizeof cmd, "bash '%s' start-osd '%s' 2 2>&1", getenv("KVARC_CEPH_TOOL"),
                 getenv("CEPH_CLUSTER_DIR"));
        long t0 = kd_now_ms();
        int rc = kd_run(out, sizeof out, cmd);
        CHECK(rc == 0, "the OSD restarts and the cluster is clean again (%d: %s)", rc, out);
        printf("test_cluster: the killed OSD back, every placement group active+clean after %ld ms\n",
               kd_now_ms() - t0);
        for (int t = 60; t < 70 && !tu_failures; t++)
            CHECK_RC(put(b, t), 0);
        CHECK_RC(kvarc_conv_sync(b), 0);
    }
    kvarc_conv *r;
    CHECK_RC(kvarc_conv_attach(cl1, NS, "osd", &model, &o, &r), 0);
    if (!tu_failures) {
        float out[QH * D];
        uint64_t n = kvarc_length(r, 1);
        CHECK(n == 60 || n == 70, "kvarcd-1 sees every token (%llu)", (unsigned long long)n);
        double e = exact_err(r, 1, (int)n - 1, out);
        CHECK(e < 1e-3, "exact attention over them (%.2e)", e);
        kvarc_conv_close(r);
    }
    kvarc_conv_close(b);
}

/* The writer process: t/kill on kvarcd-1, token after token, the count
 * acknowledged written to fd after each sync. */
static int writer(int fd)
{
    kvarc_client *c;
    kvarc_conv *cv;
    kvarc_options o = opts();
    if (kvarc_client_open(dir1, NULL, NULL, &c) || kvarc_conv_create(c, NS, "kill", &model, &o, NULL, &cv))
        return 2;
    for (int t = 0; t < T; t++) {
        if (put(cv, t) || kvarc_conv_sync(cv))
            return 0;
        int n = t + 1;
        if (write(fd, &n, sizeof n) != sizeof n)
            return 2;
    }
    return 0;
}

static void test_kill(pid_t *k1)
{
    int p[2];
    CHECK_RC(pipe(p), 0);
    pid_t w = fork();
    if (w == 0) {
        close(p[0]);
        _exit(writer(p[1]));
    }
    close(p[1]);
    int n, acked = 0;
    long t_kill = 0;
    while (read(p[0], &n, sizeof n) == sizeof n) {
        acked = n;
        if (n == 40 && !t_kill) {           /* mid-appends: the writer goes on */
            kill(*k1, SIGKILL);
            t_kill = kd_now_ms();
        }
    }
    close(p[0]);
    int st;
    waitpid(w, &st, 0);
    waitpid(*k1, NULL, 0);
    CHECK(t_kill && acked >= 40, "kvarcd-1 killed after %d acknowledged tokens", acked);
    kvarc_options o = opts();
    kvarc_conv *b;
    CHECK_RC(kvarc_conv_attach(cl2, NS, "kill", &model, &o, &b), 0);
    if (tu_failures)
        return;
    uint64_t len = kvarc_length(b, 0);
    CHECK(len >= (uint64_t)acked && len <= (uint64_t)acked + 1 && kvarc_length(b, 1) == len,
          "kvarcd-2 has every acknowledged token (%llu of %d)", (unsigned long long)len, acked);
    float out[QH * D];
    double e = exact_err(b, 1, (int)len - 1, out);
    CHECK(e < 1e-3, "their attention is exact (%.2e)", e);
    /* the dead kvarcd's lock holds until it lapses; then kvarcd-2 continues */
    CHECK_RC(put(b, (int)len), 0);
    int rc, refused = 0;
    long end = kd_now_ms() + 60000;
    while ((rc = kvarc_conv_sync(b)) == KVARC_ELOCKED && kd_now_ms() < end) {
        refused++;
        kd_sleep_ms(50);
    }
    long t_ok = kd_now_ms();
    CHECK(rc == 0, "kvarcd-2 appends once the lock lapses (%d: %s)", rc, kvarc_errmsg(b));
    printf("test_cluster: failover after kill -9 of the writing kvarcd: %ld ms (lock %s s; %d refusals "
           "first)\n", t_ok - t_kill, LOCK_S, refused);
    kvarc_conv_close(b);
    /* kvarcd-1 again: its cache catches up on open */
    *k1 = start_node(dir1, "n1", "60");
    kvarc_client_close(cl1);
    CHECK_RC(kvarc_client_open(dir1, NULL, NULL, &cl1), 0);
    kvarc_conv *a;
    CHECK_RC(kvarc_conv_attach(cl1, NS, "kill", &model, &o, &a), 0);
    if (!tu_failures) {
        CHECK(kvarc_length(a, 0) == len + 1, "the restarted kvarcd-1 sees kvarcd-2's token");
        kvarc_conv_close(a);
    }
}

/* The id kvarcd on d gives ns/name (0 if none), from `kvarc stat --json`. */
static uint64_t conv_id(const char *d, const char *name)
{
    char out[4096], args[256];
    snprintf(dir, sizeof dir, "%s", d);
    snprintf(args, sizeof args, "stat %s/%s --json", NS, name);
    const char *p = cli(out, sizeof out, args) == 0 ? strstr(out, "\"id\":") : NULL;
    return p ? strtoull(p + 5, NULL, 10) : 0;
}

/* How many objects of conversation id the pool holds (its head and data). */
static int pool_objects(uint64_t id)
{
    char cmd[1024], out[64];
    snprintf(cmd, sizeof cmd, "rados -c '%s' -k '%s' --id '%s' -p '%s' ls 2>/dev/null | grep -c '^kvarc\\.[a-z]*\\.%016llx'",
             getenv("CEPH_CONF"), getenv("CEPH_KEYRING"), getenv("CEPH_USER"), getenv("CEPH_POOL"),
             (unsigned long long)id);
    if (kd_run(out, sizeof out, cmd) > 1)
        return -1;
    return atoi(out);
}

/* Compaction collects the pool: a deleted conversation's objects go once
 * unchanged for the grace (1 s here), a deleted one that a live fork
 * shares stays until the fork is deleted too, live ones keep theirs. */
static void test_gc(void)
{
    kvarc_options o = opts();
    kvarc_conv *cv;
    const char *names[] = { "gc-parent", "gc-alone" };
    for (int i = 0; i < 2 && !tu_failures; i++) {
        CHECK_RC(kvarc_conv_create(cl2, NS, names[i], &model, &o, NULL, &cv), 0);
        for (int t = 0; t < 30 && !tu_failures; t++)
            CHECK_RC(put(cv, t), 0);
        if (i == 0)
            CHECK_RC(kvarc_fork(cv, NS, "gc-fork", 0), 0);
        CHECK_RC(kvarc_conv_close(cv), 0);
    }
    uint64_t parent = conv_id(dir2, "gc-parent"), alone = conv_id(dir2, "gc-alone"), fork = conv_id(dir2, "gc-fork");
    CHECK(parent && alone && fork, "ids %llu %llu %llu", (unsigned long long)parent, (unsigned long long)alone,
          (unsigned long long)fork);
    CHECK(pool_objects(parent) >= 2 && pool_objects(alone) >= 2 && pool_objects(fork) >= 1,
          "their objects are in the pool (%d %d %d)", pool_objects(parent), pool_objects(alone), pool_objects(fork));
    char args[256];
    snprintf(args, sizeof args, "delete %s/gc-parent", NS);
    CHECK_RC(cli_on(dir2, args), 0);
    snprintf(args, sizeof args, "delete %s/gc-alone", NS);
    CHECK_RC(cli_on(dir2, args), 0);
    int talk = pool_objects(conv_id(dir2, "talk"));
    CHECK(talk >= 4, "t/talk spans several segment objects (64-KiB segments, takeovers): %d objects", talk);
    long end = kd_now_ms() + 60000;
    while (!tu_failures && pool_objects(alone) > 0 && kd_now_ms() < end) {   /* until its grace is over */
        CHECK_RC(cli_on(dir2, "compact"), 0);
        kd_sleep_ms(200);
    }
    CHECK(pool_objects(alone) == 0, "compaction removed the deleted conversation's objects");
    CHECK(pool_objects(parent) >= 2, "and kept the deleted one its live fork shares (%d)", pool_objects(parent));
    CHECK(pool_objects(conv_id(dir2, "talk")) == talk, "and every object of a live one (%d)", talk);
    kvarc_conv *f;
    CHECK_RC(kvarc_conv_attach(cl1, NS, "gc-fork", &model, &o, &f), 0);
    if (!tu_failures) {
        float out[QH * D];
        double e = exact_err(f, 0, 29, out);
        CHECK(e < 1e-3, "the fork attaches on kvarcd-1 and attends exactly over the parent's tokens (%.2e)", e);
        kvarc_conv_close(f);
    }
    snprintf(args, sizeof args, "delete %s/gc-fork", NS);
    CHECK_RC(cli_on(dir2, args), 0);       /* its writer (kvarcd-2 made the fork) */
    while (!tu_failures && (pool_objects(parent) > 0 || pool_objects(fork) > 0) && kd_now_ms() < end) {
        CHECK_RC(cli_on(dir2, "compact"), 0);
        kd_sleep_ms(200);
    }
    CHECK(pool_objects(parent) == 0 && pool_objects(fork) == 0, "with the fork deleted both go (%d %d)",
          pool_objects(parent), pool_objects(fork));
}

/* Every OSD stopped (SIGSTOP): an append through a kvarcd with a 3-s Ceph
 * timeout fails UNAVAILABLE (-ECONNREFUSED here) saying so, instead of
 * hanging; once the OSDs run again the conversation continues. */
static void test_timeout(void)
{
    char d3[256], p[512];
    eu_tmpdir(d3, sizeof d3, "cluster3");
    pid_t k3 = start_node(d3, "n3", "3");
    kvarc_client *c3;
    kvarc_conv *cv = NULL;
    kvarc_options o = opts();
    CHECK_RC(kvarc_client_open(d3, NULL, NULL, &c3), 0);
    CHECK_RC(kvarc_conv_attach(c3, NS, "talk", &model, &o, &cv), 0);     /* a fresh cache, after the collection */
    if (!tu_failures) {
        float out[QH * D];
        double e = exact_err(cv, 1, 102, out);
        CHECK(kvarc_length(cv, 1) == 103 && e < 1e-3, "a third kvarcd attaches t/talk whole (%.2e)", e);
        kvarc_conv_close(cv);
    }
    CHECK_RC(kvarc_conv_create(c3, NS, "slow", &model, &o, NULL, &cv), 0);
    for (int t = 0; t < 10 && !tu_failures; t++)
        CHECK_RC(put(cv, t), 0);
    CHECK_RC(kvarc_conv_sync(cv), 0);
    pid_t osd[8];
    int nosd = 0;
    for (int i = 0; i < 8 && getenv("CEPH_RUN_DIR"); i++) {
        snprintf(p, sizeof p, "%s/osd.%d.pid", getenv("CEPH_RUN_DIR"), i);
        FILE *f = fopen(p, "r");
        int pid;
        if (f && fscanf(f, "%d", &pid) == 1 && kill(pid, 0) == 0)
            osd[nosd++] = pid;
        if (f)
            fclose(f);
    }
    CHECK(nosd >= 2, "the OSDs' pids (%d, CEPH_RUN_DIR)", nosd);
    for (int i = 0; i < nosd; i++)
        kill(osd[i], SIGSTOP);
    int rc = tu_failures ? 0 : put(cv, 10);
    if (!rc && !tu_failures)
        rc = kvarc_conv_sync(cv);
    CHECK(rc == -ECONNREFUSED && strstr(kvarc_errmsg(cv), "did not answer in time"),
          "an append with every OSD stopped fails UNAVAILABLE naming the timeout (%d: %s)", rc,
          cv ? kvarc_errmsg(cv) : "");
    for (int i = 0; i < nosd; i++)
        kill(osd[i], SIGCONT);
    kvarc_conv_close(cv);
    cv = NULL;
    /* the cluster answers again: attach (the timed-out append may or may not have landed) and go on */
    long end = kd_now_ms() + 60000;
    while ((rc = kvarc_conv_attach(c3, NS, "slow", &model, &o, &cv)) && kd_now_ms() < end)
        kd_sleep_ms(200);
    CHECK(rc == 0, "attach after the OSDs resume (%s)", kvarc_client_errmsg(c3));
    if (!rc) {
        uint64_t len = kvarc_length(cv, 0);
        CHECK(len == 10 || len == 11, "10 or 11 tokens after the timeout (%llu)", (unsigned long long)len);
        CHECK_RC(put(cv, (int)len), 0);
        CHECK_RC(kvarc_conv_sync(cv), 0);
        kvarc_conv_close(cv);
    }
    kvarc_client_close(c3);
    stop_node(k3, d3, "n3");
}

/* A byte flipped in a segment object in the pool: kvarc verify reports the
 * log entry, and a cache that syncs the conversation refuses it
 * (KVARC_ECORRUPT) rather than serve it. */
static void test_verify_pool(void)
{
    kvarc_options o = opts();
    kvarc_conv *cv;
    CHECK_RC(kvarc_conv_create(cl2, NS, "flip", &model, &o, NULL, &cv), 0);
    for (int t = 0; t < 20 && !tu_failures; t++)
        CHECK_RC(put(cv, t), 0);
    CHECK_RC(kvarc_conv_close(cv), 0);
    char out[8192], cmd[2048], obj[128] = "";
    snprintf(dir, sizeof dir, "%s", dir2);
    CHECK_RC(cli(out, sizeof out, "verify"), 0);
    uint64_t id = conv_id(dir2, "flip");
    const char *r = "rados -c \"$CEPH_CONF\" -k \"$CEPH_KEYRING\" --id \"$CEPH_USER\" -p \"$CEPH_POOL\"";
    snprintf(cmd, sizeof cmd, "%s ls 2>/dev/null | grep '^kvarc\\.seg\\.%016llx\\.' | head -n 1", r, (unsigned long long)id);
    CHECK(kd_run(obj, sizeof obj, cmd) == 0 && obj[0], "its segment object in the pool");
    obj[strcspn(obj, "\n")] = 0;
    snprintf(cmd, sizeof cmd, "%s get %s %s.obj 2>/dev/null && printf '\\377' | dd of=%s.obj bs=1 seek=300 "
             "conv=notrunc status=none && %s put %s %s.obj 2>/dev/null", r, obj, dir2, dir2, r, obj, dir2);
    CHECK(system(cmd) == 0, "a byte of %s flipped", obj);
    int rc = cli(out, sizeof out, "verify");
    CHECK(rc == 1 && strstr(out, "pool: kvarc.seg.") && strstr(out, "fails its check"),
          "verify reports the damaged log entry (%d: %.300s)", rc, out);
    char d4[256];
    eu_tmpdir(d4, sizeof d4, "cluster4");
    pid_t k4 = start_node(d4, "n4", "60");
    kvarc_client *c4;
    CHECK_RC(kvarc_client_open(d4, NULL, NULL, &c4), 0);
    rc = kvarc_conv_attach(c4, NS, "flip", &model, &o, &cv);
    CHECK(rc == KVARC_ECORRUPT, "a fresh cache refuses to serve it (%d: %s)", rc, kvarc_client_errmsg(c4));
    if (!rc)
        kvarc_conv_close(cv);
    kvarc_client_close(c4);
    stop_node(k4, d4, "n4");
    snprintf(cmd, sizeof cmd, "%s.obj", dir2);
    unlink(cmd);
}

int main(void)
{
    if (!getenv("CEPH_POOL") || !getenv("CEPH_CONF") || !getenv("CEPH_KEYRING") || !getenv("CEPH_USER")) {
        printf("test_cluster: no Ceph cluster given (run test_cluster.sh): skipped\n");
        return 77;
    }
    gen();
    snprintf(NS, sizeof NS, "t%d", (int)getpid());
    eu_tmpdir(dir1, sizeof dir1, "cluster1");
    eu_tmpdir(dir2, sizeof dir2, "cluster2");
    pid_t k1 = start_node(dir1, "n1", "60"), k2 = start_node(dir2, "n2", "60");
    CHECK_RC(kvarc_client_open(dir1, NULL, NULL, &cl1), 0);
    CHECK_RC(kvarc_client_open(dir2, NULL, NULL, &cl2), 0);
    if (!tu_failures)
        test_share_and_fork();
    if (!tu_failures)
        test_race();
    if (!tu_failures)
        test_fence(k1);
    if (!tu_failures)
        test_osd_kill();
    if (!tu_failures)
        test_kill(&k1);
    if (!tu_failures)
        test_gc();
    if (!tu_failures)
        test_timeout();
    if (!tu_failures)
        test_verify_pool();
    kvarc_client_close(cl1);
    kvarc_client_close(cl2);
    stop_node(k1, dir1, "n1");
    stop_node(k2, dir2, "n2");
    if (!tu_failures) {
        char p[300];
        snprintf(p, sizeof p, "%s.talk1", dir1);
        unlink(p);
        snprintf(p, sizeof p, "%s.talk2", dir1);
        unlink(p);
    }
    return tu_finish("test_cluster");
}
