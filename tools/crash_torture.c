/* crash-torture: kill -9 of kvarcd (and of its writers) at moments chosen
 * from events, hundreds of times, checking after each restart that every
 * acknowledged append is there, bit-exact, that verify is clean and that a
 * new worker continues each conversation (issue 18, item 3).
 *
 * Processes (this executable in four roles, children exec'ed from it):
 *   torture   the parent: starts kvarcd (--segment-mb 1, so that segments
 *             seal and compaction has victims), the writers and the job
 *             runner; reads their events; kills; restarts; checks.
 *   raw       a writer on raw RPCs (client/kvarc_rpc.h) to t/raw (4 layers,
 *             2 KV heads, q3): Append, AppendMany (1..4 blocks, any
 *             layers) and AppendStream (1..6 blocks of one layer), drawn
 *             from its seed; it starts from the layer lengths Open reports.
 *   lib       a libkvarc worker (client/kvarc.h) on t/lib (2 layers, 2 KV
 *             heads, head_dim 64, f16, remapped, no RoPE): attaches (or
 *             creates), appends token after token to every layer and syncs
 *             every 1..12 tokens; batch and append_together (0, 1, 2) are
 *             drawn per worker. Attach continues at the common length and
 *             re-feeds what a longer layer holds (kvarc.h's takeover).
 *   job       Compact (threshold 0.9) and Verify through the daemon, in
 *             turn, reporting each progress event.
 * Content is a pure function of (conversation, layer, head, position):
 * eu_fill's bytes for t/raw; for t/lib, K and V whose fp16 values come from
 * eu_byte, so the stored records and signatures are kvg_encode_ref's of
 * them. So the parent checks every stored position, acknowledged or not:
 * nothing below a layer's durable length may read other bytes.
 *
 * Events, one line each on the child's fd 3 (shorter than PIPE_BUF):
 *   C who len...           a worker started: the lengths it continues from
 *   B who                  a call that appends is about to start
 *   S who                  an AppendStream block was sent (mid-stream)
 *   A who layer first n    an append acknowledged (durable in kvarcd)
 *   P kind done total      a job's progress event (kind c Compact, v Verify);
 *                          J kind problems: its end
 *   E who message          a violation the child saw (a refusal no crash
 *                          explains: -EILSEQ, DATA_LOSS, a bad status)
 * Connection errors (UNAVAILABLE, a deadline, CANCELLED) end a child
 * quietly: the daemon is gone.
 *
 * A cycle (all its choices drawn from --seed and the cycle number):
 *   1. start kvarcd, check (below), sometimes write and delete a scratch
 *      conversation (garbage for compaction), start the raw and lib writers;
 *   2. sometimes kill -9 one writer after k1 acknowledgements (at the ack,
 *      or as its next call starts), check through the live daemon, start a
 *      new worker of that kind (it must attach and continue);
 *   3. after k acknowledgements since the start: kill -9 kvarcd at once, at
 *      the next call start, at the next AppendStream block (mid-stream), or
 *      start a Verify/Compact job and kill at its first progress event;
 *      sometimes kill a writer at the same moment, first;
 *   4. kill -9 every child left, read what the pipes still hold.
 * The check: Open gives each layer's durable length, which must be at least
 * what was acknowledged (else: lost); Fetch of every position of every
 * (layer, head) and LoadSignatures of every layer must give the expected
 * bytes (else: wrong); Verify through the daemon: 0 problems. After the last
 * cycle, a new pair of workers must continue both conversations, kvarcd
 * stops on SIGTERM (exit 0), and a last restart is checked.
 * Time is used only as a failure guard: a child silent for GUARD_MS is hung.
 * Seeded: the plan of every cycle and each writer's calls repeat with
 * --seed; how the two writers' events interleave is the scheduler's, so a
 * failing seed may take a few runs to fail again (the data is kept).
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>

#include "kvarcd_util.h"
#include "kvarc.h"
#include "kvg.h"

#define GUARD_MS   120000
#define RAW_TAG    1801
#define LIB_TAG    1802
#define RAW_L      4
#define LIB_L      2
#define LIB_H      2
#define LIB_D      64
#define LIB_SEED   0x18c0ffeeull
#define FETCH_N    512

/* ---- content ------------------------------------------------------------- */

/* t/lib's K and V of (layer, head, pos): fp16, finite, |x| < 3.2. */
static void lib_kv(uint32_t l, uint32_t h, uint64_t p, uint16_t *k, uint16_t *v)
{
    for (int i = 0; i < LIB_D; i++) {
        k[i] = kvarc_f32_to_f16(((int)eu_byte(LIB_TAG, l, h, p, (size_t)i) - 128) / 40.0f);
        v[i] = kvarc_f32_to_f16(((int)eu_byte(LIB_TAG, l, h, p, 200 + (size_t)i) - 128) / 40.0f);
    }
}

static kvarc_rotation lib_rot;

/* What kvarcd must hold for t/lib at (layer, head, pos): the record (256 B),
 * signature bits (8 B) and scale. */
static void lib_expect(uint32_t l, uint32_t h, uint64_t p, uint8_t *rec, uint8_t *bits, uint16_t *scale)
{
    uint16_t k[LIB_D], v[LIB_D];
    lib_kv(l, h, p, k, v);
    kvg_codec codec = { KVARC_FMT_F16, &lib_rot, NULL, NULL };
    if (kvg_encode_ref(&codec, KVARC_DTYPE_F16, k, v, 1, rec, bits, scale, NULL))
        abort();
}

/* The same for t/raw (eu_fill's bytes): record 104 B, bits 16 B. */
static void raw_expect(uint32_t l, uint32_t h, uint64_t p, uint8_t *rec, uint8_t *bits, uint16_t *scale)
{
    for (size_t b = 0; b < 104; b++)
        rec[b] = eu_byte(RAW_TAG, l, h, p, b);
    for (size_t b = 0; b < 16; b++)
        bits[b] = eu_byte(RAW_TAG, l, h, p, 1000 + b);
    *scale = (uint16_t)(eu_byte(RAW_TAG, l, h, p, 2000) | eu_byte(RAW_TAG, l, h, p, 2001) << 8);
}

static const kvarc_model lib_model = { LIB_L, LIB_H, 4, LIB_D, KVARC_DTYPE_F16, 10000.0f, 0, 0, "torture-lib" };

/* ---- children -------------------------------------------------------------- */

static void ev(const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0 || n > (int)sizeof line - 2)
        n = (int)sizeof line - 2;
    line[n++] = '\n';
    if (write(3, line, (size_t)n) != n)
        _exit(0);                     /* the parent is gone */
}

/* A status that a dying daemon explains: the child ends quietly. */
static int gone(int st)
{
    return st == GRPC_STATUS_UNAVAILABLE || st == GRPC_STATUS_DEADLINE_EXCEEDED || st == GRPC_STATUS_CANCELLED;
}

static int continue_at_end(const char *msg)
{
    return strstr(msg, "continue at the end") != NULL;
}

/* t/raw's id and layer lengths. The gRPC status. */
static int raw_open(kvc_conn *c, uint64_t *id, uint64_t len[RAW_L], char *msg)
{
    return kd_layer_lengths(c, "t", "raw", id, len, RAW_L, msg);
}

static int raw_writer(uint64_t seed)
{
    kvc_conn *c;
    char msg[256];
    uint64_t id, len[RAW_L], rng = seed;
    if (kvc_connect(dir, &c))
        return 2;
    int st = raw_open(c, &id, len, msg);
    if (st) {
        if (!gone(st))
            ev("E r open t/raw: %s: %s", kvc_status_name(st), msg);
        return 0;
    }
    ev("C r %llu %llu %llu %llu", (unsigned long long)len[0], (unsigned long long)len[1],
       (unsigned long long)len[2], (unsigned long long)len[3]);
    for (;;) {
        int op = (int)(kvarc_splitmix64(&rng) % 3);
        kd_block b[6];
        int nb = 0;
        uint64_t end[RAW_L];
        memcpy(end, len, sizeof end);
        if (op == 0) {
            uint32_t l = (uint32_t)(kvarc_splitmix64(&rng) % RAW_L);
            nb = 1;
            kd_block_make(&b[0], id, l, end[l], 1 + (uint32_t)(kvarc_splitmix64(&rng) % 24), RAW_TAG);
        } else if (op == 1) {
            nb = 1 + (int)(kvarc_splitmix64(&rng) % 4);
            for (int i = 0; i < nb; i++) {
                uint32_t l = (uint32_t)(kvarc_splitmix64(&rng) % RAW_L);
                uint32_t n = 1 + (uint32_t)(kvarc_splitmix64(&rng) % 24);
                kd_block_make(&b[i], id, l, end[l], n, RAW_TAG);
                end[l] += n;
            }
        } else {
            uint32_t l = (uint32_t)(kvarc_splitmix64(&rng) % RAW_L);
            nb = 1 + (int)(kvarc_splitmix64(&rng) % 6);
            for (int i = 0; i < nb; i++) {
                uint32_t n = 1 + (uint32_t)(kvarc_splitmix64(&rng) % 24);
                kd_block_make(&b[i], id, l, end[l], n, RAW_TAG);
                end[l] += n;
            }
        }
        ev("B r");
        int stored = 0;                /* blocks acknowledged, in order */
        msg[0] = 0;
        if (op == 0) {
            ProtobufCMessage *rep = NULL;
            st = kvc_call(c, "Append", &b[0].r.base, &kvarc__v1__append_reply__descriptor, &rep, 0, msg, 256);
            if (!st) {
                stored = 1;
                protobuf_c_message_free_unpacked(rep, NULL);
            }
        } else if (op == 1) {
            Kvarc__V1__AppendManyRequest r = KVARC__V1__APPEND_MANY_REQUEST__INIT;
            Kvarc__V1__AppendRequest *bp[6];
            for (int i = 0; i < nb; i++)
                bp[i] = &b[i].r;
            r.conv = id;
            r.blocks = bp;
            r.n_blocks = (size_t)nb;
            ProtobufCMessage *rep = NULL;
            st = kvc_call(c, "AppendMany", &r.base, &kvarc__v1__append_many_reply__descriptor, &rep, 0, msg, 256);
            if (!st) {
                Kvarc__V1__AppendManyReply *m = (Kvarc__V1__AppendManyReply *)rep;
                if (m->n_results != (size_t)nb) {
                    ev("E r AppendMany answered %zu results for %d blocks", m->n_results, nb);
                    return 3;
                }
                for (int i = 0; i < nb; i++) {
                    if (m->results[i]->status) {
                        st = (int)m->results[i]->status;
                        snprintf(msg, 256, "%s", m->results[i]->message);
                        break;
                    }
                    stored = i + 1;
                }
                protobuf_c_message_free_unpacked(rep, NULL);
            }
        } else {
            kvc_stream *s;
            st = kvc_stream_open(c, "AppendStream", 30000, &s);
            if (!st) {
                for (int i = 0; i < nb; i++) {
                    if (kvc_stream_send(s, &b[i].r.base))
                        break;
                    ev("S r");
                }
                ProtobufCMessage *rep = NULL;
                st = kvc_stream_finish(s, &kvarc__v1__append_reply__descriptor, &rep, msg, 256);
                if (!st) {
                    Kvarc__V1__AppendReply *a = (Kvarc__V1__AppendReply *)rep;
                    if (a->blocks != (uint64_t)nb) {
                        ev("E r AppendStream stored %llu of %d blocks and answered OK",
                           (unsigned long long)a->blocks, nb);
                        return 3;
                    }
                    stored = nb;
                    protobuf_c_message_free_unpacked(rep, NULL);
                }
            } else {
                snprintf(msg, 256, "could not open the stream");
            }
        }
        for (int i = 0; i < stored; i++) {
            ev("A r %u %llu %u", b[i].r.layer, (unsigned long long)b[i].r.first_pos, b[i].r.count);
            len[b[i].r.layer] = b[i].r.first_pos + b[i].r.count;
        }
        for (int i = 0; i < nb; i++)
            kd_block_free(&b[i]);
        if (st) {
            if (gone(st))
                break;
            if (st == GRPC_STATUS_INVALID_ARGUMENT && continue_at_end(msg)) {
                /* a killed writer's call that kvarcd finished after it died:
                 * the positions are taken; start again from the lengths */
                if ((st = raw_open(c, &id, len, msg))) {
                    if (!gone(st))
                        ev("E r open t/raw: %s: %s", kvc_status_name(st), msg);
                    break;
                }
                continue;
            }
            ev("E r %s %s: %s", op == 0 ? "Append" : op == 1 ? "AppendMany" : "AppendStream", kvc_status_name(st),
               msg);
            kvc_close(c);
            return 3;
        }
    }
    kvc_close(c);
    return 0;
}

/* A libkvarc code a dying daemon explains. */
static int lib_gone(int rc)
{
    return rc == -ECONNREFUSED;
}

static int lib_writer(uint64_t seed)
{
    uint64_t rng = seed;
    kvarc_client *cl;
    kvarc_conv *cv = NULL;
    kvarc_options o;
    kvarc_options_default(&o);
    o.format = KVARC_FMT_F16;
    o.pos_mode = 1;
    o.seed = LIB_SEED;
    o.sinks = 4;
    o.hot_window = 32;
    o.batch = 4u << (kvarc_splitmix64(&rng) % 3);             /* 4, 8, 16 */
    o.append_together = (int)(kvarc_splitmix64(&rng) % 3);    /* 0, 1, 2 */
    o.use_gpu = 0;
    if (kvarc_client_open(dir, NULL, NULL, &cl))
        return 2;
    int rc = 0;
    for (int attempt = 0;; attempt++) {
        if (!cv) {
            rc = kvarc_conv_attach(cl, "t", "lib", &lib_model, &o, &cv);
            if (rc == -ENOENT)
                rc = kvarc_conv_create(cl, "t", "lib", &lib_model, &o, NULL, &cv);
            if (rc == -EEXIST)            /* a create whose answer a kill took */
                continue;
            if (rc) {
                if (!lib_gone(rc))
                    ev("E l attach t/lib: %s: %s", kvarc_strerror(rc), kvarc_client_errmsg(cl));
                break;
            }
            ev("C l %llu %llu", (unsigned long long)kvarc_length(cv, 0), (unsigned long long)kvarc_length(cv, 1));
        }
        uint64_t t = kvarc_length(cv, 0);
        uint32_t until_sync = 1 + (uint32_t)(kvarc_splitmix64(&rng) % 12);
        for (;; t++) {
            for (uint32_t l = 0; l < LIB_L && !rc; l++) {
                uint16_t k[LIB_H][LIB_D], v[LIB_H][LIB_D];
                for (uint32_t h = 0; h < LIB_H; h++)
                    lib_kv(l, h, t, k[h], v[h]);
                rc = kvarc_append(cv, l, KVARC_DTYPE_F16, k, v, 1);
            }
            if (!rc && --until_sync == 0) {
                ev("B l");
                rc = kvarc_conv_sync(cv);
                if (!rc)
                    for (uint32_t l = 0; l < LIB_L; l++)
                        ev("A l %u 0 %llu", l, (unsigned long long)kvarc_length(cv, l));
                until_sync = 1 + (uint32_t)(kvarc_splitmix64(&rng) % 12);
            }
            if (rc)
                break;
        }
        if (lib_gone(rc))
            break;
        if (rc == -EINVAL && continue_at_end(kvarc_errmsg(cv)) && attempt < 100) {
            kvarc_conv_close(cv);     /* fails the same way; the handle is freed */
            cv = NULL;
            rc = 0;
            continue;
        }
        ev("E l append/sync at %llu: %s: %s", (unsigned long long)t, kvarc_strerror(rc), kvarc_errmsg(cv));
        return 3;
    }
    if (cv)
        kvarc_conv_close(cv);
    kvarc_client_close(cl);
    return 0;
}

static void job_progress(void *arg, uint64_t done, uint64_t total)
{
    ev("P %c %llu %llu", *(const char *)arg, (unsigned long long)done, (unsigned long long)total);
}

/* Jobs one after the other, first Compact (first_compact) or Verify, then
 * the other, and so on: a Compact with no victim ends without a progress
 * event, a Verify always sends one. */
static int job_runner(int first_compact)
{
    kvc_conn *c;
    char msg[256];
    if (kvc_connect(dir, &c))
        return 2;
    for (int i = 0;; i++) {
        int compact = (first_compact + i) % 2;
        Kvarc__V1__Empty e = KVARC__V1__EMPTY__INIT;
        Kvarc__V1__CompactRequest cr = KVARC__V1__COMPACT_REQUEST__INIT;
        cr.threshold = 0.9f;
        Kvarc__V1__JobEvent *last = NULL;
        int st = kvc_job(c, compact ? "Compact" : "Verify", compact ? &cr.base : &e.base, 120000, job_progress,
                         compact ? "c" : "v", &last, msg, sizeof msg);
        if (st) {
            if (!gone(st))
                ev("E j %s: %s: %s", compact ? "Compact" : "Verify", kvc_status_name(st), msg);
            break;
        }
        uint64_t problems = last && last->verify ? last->verify->problems : 0;
        if (problems)
            ev("E j a Verify beside the writers found %llu problem(s): %s", (unsigned long long)problems,
               last->verify->n_lines ? last->verify->lines[0] : "");
        ev("J %c %llu", compact ? 'c' : 'v', (unsigned long long)problems);
        protobuf_c_message_free_unpacked(&last->base, NULL);
    }
    kvc_close(c);
    return 0;
}

/* ---- the parent ------------------------------------------------------------ */

typedef struct child {
    pid_t pid;                 /* 0: none */
    int   fd;
    char  who;                 /* 'r', 'l', 'j' */
    char  buf[8192];
    size_t n;
} child;

static struct {
    uint64_t acked[2][RAW_L];  /* [raw, lib][layer]: end of the acknowledged prefix */
    uint64_t pending;          /* acknowledgements not checked after a kill yet */
    uint64_t kills_d, kills_w, mid_stream, in_job, in_compact, at_start, at_ack;
    uint64_t durable[2][RAW_L];  /* the lengths the last check saw */
    int      expect_c[2];      /* the next worker must continue from durable[] */
    uint64_t cont_bad;         /* workers that continued elsewhere */
    uint64_t acks_checked, bytes_checked, lost, wrong, verify_problems, child_errors, continuations, checks;
    uint64_t since_start;      /* acknowledgements since kvarcd started */
    int      lib_exists;
} T;

static pid_t kvarcd_pid;
static uint64_t seed = 18;
static uint64_t spawn_n;

static void spawn(child *ch, char who, uint64_t arg)
{
    int p[2];
    if (pipe(p)) {
        perror("pipe");
        exit(1);
    }
    pid_t pid = fork();
    if (pid == 0) {
        dup2(p[1], 3);
        close(p[0]);
        if (p[1] != 3)
            close(p[1]);
        char a[32], role[16];
        snprintf(a, sizeof a, "%llu", (unsigned long long)arg);
        snprintf(role, sizeof role, "--child-%c", who);
        execl("/proc/self/exe", "crash-torture", role, dir, a, (char *)NULL);
        _exit(127);
    }
    close(p[1]);
    fcntl(p[0], F_SETFD, FD_CLOEXEC);
    ch->pid = pid;
    ch->fd = p[0];
    ch->who = who;
    ch->n = 0;
}

static void kill_child(child *ch)
{
    if (!ch->pid)
        return;
    kill(ch->pid, SIGKILL);
    waitpid(ch->pid, NULL, 0);
    ch->pid = 0;
}

static void violation(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "VIOLATION: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
}

/* What one event line means to the parent's books. Returns the event's
 * kind letter. */
static char account(const char *line)
{
    char kind = line[0], who = line[2];
    if (kind == 'A') {
        unsigned l;
        unsigned long long first, n;
        if (sscanf(line + 4, "%u %llu %llu", &l, &first, &n) == 3 && l < RAW_L) {
            int w = who == 'l';
            if (first + n > T.acked[w][l])
                T.acked[w][l] = first + n;
            if (w)
                T.lib_exists = 1;
            T.pending++;
            T.since_start++;
        }
    } else if (kind == 'E') {
        violation("child %c: %s", who, line + 4);
        T.child_errors++;
    } else if (kind == 'C') {
        int w = who == 'l';
        unsigned long long v[RAW_L] = { 0 };
        int n = sscanf(line + 4, "%llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3]);
        T.continuations++;
        if (w)
            T.lib_exists = 1;
        if (T.expect_c[w]) {
            /* t/raw continues at each layer's durable length; libkvarc's
             * attach at the common (shortest) one and re-feeds the rest */
            uint64_t common = T.durable[1][0] < T.durable[1][1] ? T.durable[1][0] : T.durable[1][1];
            int bad = n != (w ? LIB_L : RAW_L);
            for (int l = 0; !bad && l < n; l++)
                bad = v[l] != (w ? common : T.durable[0][l]);
            if (bad) {
                violation("the new %s worker continued at %s, kvarcd's durable lengths are %llu %llu %llu %llu",
                          w ? "libkvarc" : "raw", line + 4, (unsigned long long)T.durable[w][0],
                          (unsigned long long)T.durable[w][1], (unsigned long long)T.durable[w][2],
                          (unsigned long long)T.durable[w][3]);
                T.cont_bad++;
            }
            T.expect_c[w] = 0;
        }
    }
    return kind;
}

/* Read what ch's pipe holds now (or, blocking, to EOF once the child is
 * dead); each line goes to account(), and to *on_line (may be NULL) which
 * returns nonzero to stop at that line. Returns 1 when stopped by on_line,
 * -1 at EOF, 0 otherwise. */
static int read_events(child *ch, int (*on_line)(child *, const char *, char), int to_eof)
{
    for (;;) {
        ssize_t r = read(ch->fd, ch->buf + ch->n, sizeof ch->buf - ch->n - 1);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        ch->n += (size_t)r;
        char *s = ch->buf, *nl;
        int stop = 0;
        while ((nl = memchr(s, '\n', ch->buf + ch->n - s))) {
            *nl = 0;
            char kind = account(s);
            if (on_line && !stop && on_line(ch, s, kind))
                stop = 1;
            s = nl + 1;
        }
        ch->n -= (size_t)(s - ch->buf);
        memmove(ch->buf, s, ch->n);
        if (stop)
            return 1;
        if (!to_eof)
            return 0;
    }
}

/* The child is dead (killed, or it ended): read its pipe to the end. */
static void reap(child *ch)
{
    if (ch->fd < 0)
        return;
    if (ch->pid)
        kill_child(ch);
    read_events(ch, NULL, 1);
    close(ch->fd);
    ch->fd = -1;
}

/* ---- checks ---- */

static int conv_lengths(kvc_conn *c, const char *name, uint64_t *id, uint64_t *len, size_t nl)
{
    char msg[256];
    int st = kd_layer_lengths(c, "t", name, id, len, nl, msg);
    if (st && st != GRPC_STATUS_NOT_FOUND)
        violation("Open t/%s: %s: %s", name, kvc_status_name(st), msg);
    return st;
}

/* Check one layer of a conversation: every record by Fetch, every
 * signature by LoadSignatures, against the content function, up to len.
 * With live writers (live) the layer may grow meanwhile; without them, one
 * position past len must be refused. */
static void check_layer(kvc_conn *c, int lib, uint64_t id, uint32_t l, uint64_t len, int live)
{
    const uint32_t H = lib ? LIB_H : 2, rb = lib ? 256 : 104, sb = lib ? LIB_D / 8 : 16;
    const char *name = lib ? "lib" : "raw";
    char msg[256];
    uint8_t rec[256], bits[32];
    uint16_t sc;
    uint64_t *pos = malloc(FETCH_N * sizeof *pos), bad = 0;
    for (uint32_t h = 0; h < H; h++)
        for (uint64_t p = 0; p < len; p += FETCH_N) {
            size_t n = 0;
            for (uint64_t q = p; q < len && n < FETCH_N; q++)
                pos[n++] = q;
            Kvarc__V1__FetchReply *f = NULL;
            int st = rpc_fetch(c, id, l, h, pos, n, &f, msg);
            if (st) {
                violation("Fetch t/%s layer %u head %u [%llu, +%zu): %s: %s", name, l, h, (unsigned long long)p, n,
                          kvc_status_name(st), msg);
                T.wrong += n;
                continue;
            }
            if (f->record_bytes != rb || f->records.len != n * rb) {
                violation("Fetch t/%s layer %u head %u: %zu bytes of %u-byte records for %zu positions", name, l, h,
                          f->records.len, f->record_bytes, n);
                T.wrong += n;
            } else {
                for (size_t i = 0; i < n; i++) {
                    if (lib)
                        lib_expect(l, h, pos[i], rec, bits, &sc);
                    else
                        raw_expect(l, h, pos[i], rec, bits, &sc);
                    if (memcmp(rec, f->records.data + i * rb, rb)) {
                        if (bad++ < 5)
                            violation("t/%s layer %u head %u position %llu reads other bytes", name, l, h,
                                      (unsigned long long)pos[i]);
                        T.wrong++;
                    }
                }
                T.bytes_checked += n * rb;
            }
            protobuf_c_message_free_unpacked(&f->base, NULL);
        }
    free(pos);
    /* one position past the end is refused, not served */
    uint64_t past = len;
    Kvarc__V1__FetchReply *f = NULL;
    int st = live ? -1 : rpc_fetch(c, id, l, 0, &past, 1, &f, msg);
    if (!st) {
        violation("t/%s layer %u: position %llu past the durable length was served", name, l,
                  (unsigned long long)len);
        T.wrong++;
        protobuf_c_message_free_unpacked(&f->base, NULL);
    }
    if (!len)
        return;
    Kvarc__V1__LoadSignaturesRequest r = KVARC__V1__LOAD_SIGNATURES_REQUEST__INIT;
    r.conv = id;
    r.layer = l;
    r.count = len;
    kvc_stream *s;
    if ((st = kvc_sstream_open(c, "LoadSignatures", &r.base, 60000, &s))) {
        violation("LoadSignatures t/%s layer %u: %s", name, l, kvc_status_name(st));
        T.wrong++;
        return;
    }
    uint64_t seen = 0;
    ProtobufCMessage *m;
    while (kvc_sstream_next(s, &kvarc__v1__sig_chunk__descriptor, &m) == 1) {
        Kvarc__V1__SigChunk *ch = (Kvarc__V1__SigChunk *)m;
        if (ch->bits.len != (size_t)ch->count * sb || ch->scales.len != (size_t)ch->count * 2 || ch->head >= H) {
            violation("LoadSignatures t/%s layer %u: a malformed chunk", name, l);
            T.wrong++;
        } else {
            for (uint32_t i = 0; i < ch->count; i++) {
                uint16_t got;
                memcpy(&got, ch->scales.data + 2 * i, 2);
                if (lib)
                    lib_expect(l, ch->head, ch->first_pos + i, rec, bits, &sc);
                else
                    raw_expect(l, ch->head, ch->first_pos + i, rec, bits, &sc);
                if (memcmp(bits, ch->bits.data + (size_t)i * sb, sb) || got != sc) {
                    if (bad++ < 5)
                        violation("t/%s layer %u head %u position %llu: its signature differs", name, l, ch->head,
                                  (unsigned long long)(ch->first_pos + i));
                    T.wrong++;
                }
            }
            seen += ch->count;
            T.bytes_checked += ch->bits.len + ch->scales.len;
        }
        protobuf_c_message_free_unpacked(m, NULL);
    }
    if ((st = kvc_stream_finish(s, &kvarc__v1__empty__descriptor, NULL, msg, sizeof msg)) || seen != len * H) {
        violation("LoadSignatures t/%s layer %u: %s, %llu signatures of %llu", name, l, kvc_status_name(st),
                  (unsigned long long)seen, (unsigned long long)(len * H));
        T.wrong++;
    }
}

/* Verify through the daemon; the problems found (a failed call counts 1). */
static uint64_t verify_now(kvc_conn *c)
{
    Kvarc__V1__Empty e = KVARC__V1__EMPTY__INIT;
    Kvarc__V1__JobEvent *last = NULL;
    char msg[256];
    int st = kvc_job(c, "Verify", &e.base, 120000, NULL, NULL, &last, msg, sizeof msg);
    if (st || !last || !last->verify) {
        violation("Verify: %s: %s", kvc_status_name(st), msg);
        if (last)
            protobuf_c_message_free_unpacked(&last->base, NULL);
        return 1;
    }
    uint64_t p = last->verify->problems;
    for (size_t i = 0; i < last->verify->n_lines && i < 5; i++)
        violation("verify: %s", last->verify->lines[i]);
    protobuf_c_message_free_unpacked(&last->base, NULL);
    return p;
}

/* The whole check, through a live kvarcd: after a restart with_verify
 * (no writers yet), else beside the writers that still run. */
static void check_all(int with_verify)
{
    kvc_conn *c;
    if (kvc_connect(dir, &c)) {
        violation("cannot connect to check");
        T.wrong++;
        return;
    }
    if (wait_ready(c) != 1) {
        violation("kvarcd did not come back (see %s.log)", dir);
        T.wrong++;
        kvc_close(c);
        return;
    }
    for (int lib = 0; lib < 2; lib++) {
        uint64_t id = 0, len[RAW_L] = { 0 };
        size_t nl = lib ? LIB_L : RAW_L;
        int st = conv_lengths(c, lib ? "lib" : "raw", &id, len, nl);
        memcpy(T.durable[lib], len, sizeof len);
        T.expect_c[lib] = with_verify;
        if (st) {
            int any = 0;
            for (size_t l = 0; l < nl; l++)
                any |= T.acked[lib][l] > 0;
            if (any || (!lib && st == GRPC_STATUS_NOT_FOUND)) {
                violation("t/%s is gone: %s", lib ? "lib" : "raw", kvc_status_name(st));
                T.lost++;
            }
            continue;
        }
        for (uint32_t l = 0; l < nl; l++) {
            if (len[l] < T.acked[lib][l]) {
                violation("t/%s layer %u: durable length %llu, but [0, %llu) was acknowledged", lib ? "lib" : "raw", l,
                          (unsigned long long)len[l], (unsigned long long)T.acked[lib][l]);
                T.lost++;
            }
            check_layer(c, lib, id, l, len[l], !with_verify);
        }
    }
    if (with_verify)
        T.verify_problems += verify_now(c);
    T.acks_checked += T.pending;
    T.pending = 0;
    T.checks++;
    kvc_close(c);
}

/* A conversation written and deleted: garbage in the segments for compaction. */
static void scratch(int cycle, uint64_t *rng)
{
    kvc_conn *c;
    char name[32], msg[256];
    uint64_t id;
    if (kvc_connect(dir, &c))
        return;
    snprintf(name, sizeof name, "scratch-%d", cycle);
    if (!create(c, "t", name, 128, msg, &id)) {
        int blocks = 10 + (int)(kvarc_splitmix64(rng) % 30);
        for (int b = 0; b < blocks; b++)
            if (rpc_append(c, id, 0, (uint64_t)b * 24, 24, 7, 0, NULL, msg))
                break;
        Kvarc__V1__DeleteRequest d = KVARC__V1__DELETE_REQUEST__INIT;
        d.ns = "t";
        d.name = name;
        ProtobufCMessage *rep = NULL;
        if (!kvc_call(c, "Delete", &d.base, &kvarc__v1__empty__descriptor, &rep, 0, msg, sizeof msg))
            protobuf_c_message_free_unpacked(rep, NULL);
    }
    kvc_close(c);
}

static const char *const daemon_args[] = { "--segment-mb", "1", NULL };

static void start_kvarcd(void)
{
    kvarcd_pid = start_daemon_args(daemon_args);
    T.since_start = 0;
}

/* ---- the kill plan of a cycle ---- */

enum { AT_ACK, AT_START, MID_STREAM, IN_JOB };

typedef struct plan {
    uint64_t k;                /* acknowledgements since the start before arming */
    int      mode;             /* AT_ACK .. IN_JOB */
    int      compact;          /* IN_JOB: Compact, else Verify */
    char     also_writer;      /* 0, or 'r' / 'l': killed first, at the same moment */
    uint64_t wk;               /* a writer-only kill after wk acks (0: none) */
    char     wwho;             /* which writer */
    int      wmode;            /* AT_ACK or AT_START */
} plan;

static child kids[3];          /* raw, lib, job */
static plan P;
static int fired, wfired;
static char last_p;            /* the job of the last progress event */

static child *kid(char who)
{
    return &kids[who == 'r' ? 0 : who == 'l' ? 1 : 2];
}

/* Each event: fire the writer-only kill or the daemon kill when due. */
static int on_event(child *ch, const char *line, char kind)
{
    if (P.wk && !wfired && T.since_start >= P.wk && ch->who == P.wwho &&
        ((P.wmode == AT_ACK && kind == 'A') || (P.wmode == AT_START && kind == 'B'))) {
        wfired = 1;
        return 1;                  /* the caller kills it */
    }
    if (fired || T.since_start < P.k)
        return 0;
    int due = 0;
    switch (P.mode) {
    case AT_ACK:     due = kind == 'A'; break;
    case AT_START:   due = kind == 'B'; break;
    case MID_STREAM: due = kind == 'S'; break;
    case IN_JOB:
        if (!kids[2].pid && kids[2].fd < 0)
            spawn(&kids[2], 'j', (uint64_t)P.compact);
        due = kind == 'P';
        last_p = line[2];
        break;
    }
    if (due) {
        fired = 1;
        return 1;
    }
    return 0;
}

static void fire_daemon_kill(void)
{
    if (P.also_writer) {
        kill(kid(P.also_writer)->pid, SIGKILL);
        T.kills_w++;
    }
    kill(kvarcd_pid, SIGKILL);
    waitpid(kvarcd_pid, NULL, 0);
    kvarcd_pid = 0;
    T.kills_d++;
    switch (P.mode) {
    case AT_ACK: T.at_ack++; break;
    case AT_START: T.at_start++; break;
    case MID_STREAM: T.mid_stream++; break;
    case IN_JOB: T.in_job++; T.in_compact += last_p == 'c'; break;
    }
}

/* Poll the children until the daemon kill has fired; a writer-only kill on
 * the way. 0, or -1 when nothing arrived within the guard. */
static int run_until_kill(void)
{
    while (!fired) {
        struct pollfd pf[3];
        int map[3], n = 0;
        for (int i = 0; i < 3; i++)
            if (kids[i].fd >= 0) {
                pf[n] = (struct pollfd){ kids[i].fd, POLLIN, 0 };
                map[n++] = i;
            }
        int pr = poll(pf, (nfds_t)n, GUARD_MS);
        if (pr < 0 && errno == EINTR)
            continue;
        if (pr <= 0) {
            violation("no event from any child for %d s (%llu acknowledgements since the start)", GUARD_MS / 1000,
                      (unsigned long long)T.since_start);
            return -1;
        }
        for (int j = 0; j < n && !fired; j++) {
            if (!pf[j].revents)
                continue;
            child *ch = &kids[map[j]];
            int was_w = wfired;
            int r = read_events(ch, on_event, 0);
            if (r == 1 && fired) {
                fire_daemon_kill();
            } else if (r == 1 && wfired && !was_w) {
                /* a writer killed under a live kvarcd: check, and a new worker */
                reap(ch);
                T.kills_w++;
                check_all(0);
                spawn(ch, ch->who, seed * 1000003 + ++spawn_n);
            } else if (r == -1) {
                /* a child ended on its own: the job loops, writers run until killed */
                int st = 0;
                waitpid(ch->pid, &st, 0);
                ch->pid = 0;
                close(ch->fd);
                ch->fd = -1;
                violation("child %c ended while kvarcd ran (status %d)", ch->who, st);
                T.child_errors++;
                if (ch->who != 'j')
                    spawn(ch, ch->who, seed * 1000003 + ++spawn_n);
            }
        }
    }
    return 0;
}

static uint64_t violations(void)
{
    return T.lost + T.wrong + T.verify_problems + T.child_errors + T.cont_bad;
}

static void summary(const char *what, int cycle, int cycles, long t0)
{
    printf("%s %d/%d: kills %llu (kvarcd %llu: at an ack %llu, at a call's start %llu, mid-stream %llu, "
           "in a job %llu of which Compact %llu; writers %llu), acked appends checked %llu, bytes checked %llu, "
           "continuations %llu (elsewhere %llu), lost %llu, wrong %llu, verify problems %llu, child errors %llu, "
           "%.1f s\n",
           what, cycle, cycles, (unsigned long long)(T.kills_d + T.kills_w), (unsigned long long)T.kills_d,
           (unsigned long long)T.at_ack, (unsigned long long)T.at_start, (unsigned long long)T.mid_stream,
           (unsigned long long)T.in_job, (unsigned long long)T.in_compact, (unsigned long long)T.kills_w,
           (unsigned long long)T.acks_checked, (unsigned long long)T.bytes_checked,
           (unsigned long long)T.continuations, (unsigned long long)T.cont_bad, (unsigned long long)T.lost,
           (unsigned long long)T.wrong, (unsigned long long)T.verify_problems, (unsigned long long)T.child_errors,
           (kd_now_ms() - t0) / 1000.0);
    fflush(stdout);
}

static void usage(FILE *f)
{
    fprintf(f, "usage: crash-torture [--cycles N] [--seed S] [--data DIR] [--kvarcd PATH] [--keep]\n"
               "  kill -9 kvarcd (and its writers) N times (default 300) at moments drawn from S,\n"
               "  chosen from events; after each restart every acknowledged append must read back\n"
               "  bit-exact, verify must be clean and new workers must continue. DIR: a new or empty\n"
               "  directory (default: a temporary one, removed when all passed unless --keep).\n"
               "  kvarcd: PATH, else $KVARCD_PATH, else the build's. Exit 0 clean, 1 a violation, 2 usage.\n");
}

int main(int argc, char **argv)
{
    if (argc == 4 && !strncmp(argv[1], "--child-", 8)) {
        snprintf(dir, sizeof dir, "%s", argv[2]);
        signal(SIGPIPE, SIG_IGN);
        uint64_t a = strtoull(argv[3], NULL, 10);
        switch (argv[1][8]) {
        case 'r': return raw_writer(a);
        case 'l': return lib_writer(a);
        case 'j': return job_runner((int)a);
        }
        return 2;
    }
    int cycles = 300, keep = 0;
    const char *data = NULL;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--cycles") && i + 1 < argc)
            cycles = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--seed") && i + 1 < argc)
            seed = strtoull(argv[++i], NULL, 0);
        else if (!strcmp(argv[i], "--data") && i + 1 < argc)
            data = argv[++i];
        else if (!strcmp(argv[i], "--kvarcd") && i + 1 < argc)
            setenv("KVARCD_PATH", argv[++i], 1);
        else if (!strcmp(argv[i], "--keep"))
            keep = 1;
        else if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            usage(stdout);
            return 0;
        } else {
            usage(stderr);
            return 2;
        }
    }
    if (cycles < 1) {
        usage(stderr);
        return 2;
    }
    if (data) {
        snprintf(dir, sizeof dir, "%s", data);
        if (mkdir(dir, 0700) && errno != EEXIST) {
            fprintf(stderr, "crash-torture: cannot make %s: %s\n", dir, strerror(errno));
            return 2;
        }
    } else {
        eu_tmpdir(dir, sizeof dir, "torture");
    }
    signal(SIGPIPE, SIG_IGN);
    kvarc_rotation_init(&lib_rot, LIB_D, LIB_SEED);
    for (int i = 0; i < 3; i++)
        kids[i].fd = -1;
    printf("crash-torture: seed %llu, %d cycles, data %s, kvarcd %s\n", (unsigned long long)seed, cycles, dir,
           KD_KVARCD);
    long t0 = kd_now_ms();

    /* the raw conversation exists from the start (the lib worker creates its own) */
    start_kvarcd();
    {
        kvc_conn *c;
        char msg[256];
        if (kvc_connect(dir, &c) || wait_ready(c) != 1) {
            fprintf(stderr, "crash-torture: kvarcd (%s) did not start; see %s.log\n", KD_KVARCD, dir);
            return 1;
        }
        if (create(c, "t", "raw", 128, msg, NULL) && !strstr(msg, "exists")) {
            fprintf(stderr, "crash-torture: create t/raw: %s\n", msg);
            return 1;
        }
        kvc_close(c);
    }
    int every = cycles >= 10 ? cycles / 10 : 1, cycle;
    for (cycle = 0; cycle < cycles; cycle++) {
        uint64_t rng = seed * 0x9e3779b97f4a7c15ull + (uint64_t)cycle;
        if (!kvarcd_pid) {
            start_kvarcd();
            check_all(1);
            if (violations()) {
                fprintf(stderr, "crash-torture: violation after the restart of cycle %d (seed %llu); data kept in %s\n",
                        cycle, (unsigned long long)seed, dir);
                break;
            }
        }
        if (kvarc_splitmix64(&rng) % 2)
            scratch(cycle, &rng);
        memset(&P, 0, sizeof P);
        P.k = 1 + kvarc_splitmix64(&rng) % 24;
        P.mode = (int)(kvarc_splitmix64(&rng) % 4);
        P.compact = (int)(kvarc_splitmix64(&rng) % 2);
        uint64_t x = kvarc_splitmix64(&rng) % 8;
        P.also_writer = x == 0 ? 'r' : x == 1 ? 'l' : 0;
        if (kvarc_splitmix64(&rng) % 4 == 0) {
            P.wk = 1 + kvarc_splitmix64(&rng) % P.k;
            P.k += P.wk;
            P.wwho = kvarc_splitmix64(&rng) % 2 ? 'r' : 'l';
            P.wmode = kvarc_splitmix64(&rng) % 2 ? AT_ACK : AT_START;
        }
        fired = wfired = 0;
        spawn(&kids[0], 'r', seed * 1000003 + ++spawn_n);
        spawn(&kids[1], 'l', seed * 1000003 + ++spawn_n);
        int rc = run_until_kill();
        for (int i = 0; i < 3; i++)
            reap(&kids[i]);
        if (rc) {
            if (kvarcd_pid) {
                kill(kvarcd_pid, SIGKILL);
                waitpid(kvarcd_pid, NULL, 0);
            }
            fprintf(stderr, "crash-torture: cycle %d hung (seed %llu); data kept in %s\n", cycle,
                    (unsigned long long)seed, dir);
            summary("stopped at cycle", cycle + 1, cycles, t0);
            return 1;
        }
        if (violations()) {
            fprintf(stderr, "crash-torture: violation in cycle %d (seed %llu); data kept in %s\n", cycle,
                    (unsigned long long)seed, dir);
            break;
        }
        if ((cycle + 1) % every == 0)
            summary("cycle", cycle + 1, cycles, t0);
    }
    if (!violations()) {
        /* the end: restart and check, new workers continue both conversations
         * (each gets an append through), SIGTERM, a last restart and check */
        start_kvarcd();
        check_all(1);
        uint64_t before[2] = { T.acked[0][0] + T.acked[0][1] + T.acked[0][2] + T.acked[0][3],
                               T.acked[1][0] + T.acked[1][1] };
        spawn(&kids[0], 'r', seed * 1000003 + ++spawn_n);
        spawn(&kids[1], 'l', seed * 1000003 + ++spawn_n);
        for (;;) {
            uint64_t now[2] = { T.acked[0][0] + T.acked[0][1] + T.acked[0][2] + T.acked[0][3],
                                T.acked[1][0] + T.acked[1][1] };
            if (now[0] > before[0] && now[1] > before[1])
                break;
            struct pollfd pf[2] = { { kids[0].fd, POLLIN, 0 }, { kids[1].fd, POLLIN, 0 } };
            int pr = poll(pf, 2, GUARD_MS);
            if (pr <= 0 || read_events(&kids[pf[0].revents ? 0 : 1], NULL, 0) < 0) {
                violation("the final workers did not both get an append through");
                T.child_errors++;
                break;
            }
        }
        for (int i = 0; i < 3; i++)     /* a call cut by SIGTERM's grace is no violation */
            reap(&kids[i]);
        kill(kvarcd_pid, SIGTERM);
        int code = wait_exit(kvarcd_pid, 60000);
        if (code != 0) {
            violation("kvarcd exited %d on SIGTERM", code);
            T.child_errors++;
            if (code == -1) {
                kill(kvarcd_pid, SIGKILL);
                waitpid(kvarcd_pid, NULL, 0);
            }
        }
        start_kvarcd();
        check_all(1);
        kill(kvarcd_pid, SIGTERM);
        wait_exit(kvarcd_pid, 60000);
    } else if (kvarcd_pid) {
        kill(kvarcd_pid, SIGKILL);
        waitpid(kvarcd_pid, NULL, 0);
    }
    summary("done", cycle, cycles, t0);
    printf("crash-torture: seed %llu: kills %llu (kvarcd %llu, writers %llu), acked appends checked %llu, bytes "
           "checked %llu, lost %llu, wrong %llu, verify problems %llu, continued elsewhere %llu, %s\n",
           (unsigned long long)seed, (unsigned long long)(T.kills_d + T.kills_w), (unsigned long long)T.kills_d,
           (unsigned long long)T.kills_w, (unsigned long long)T.acks_checked, (unsigned long long)T.bytes_checked,
           (unsigned long long)T.lost, (unsigned long long)T.wrong, (unsigned long long)T.verify_problems,
           (unsigned long long)T.cont_bad, violations() ? "FAILED" : "ok");
    if (!violations() && !keep && !data)
        kd_remove_dir();
    return violations() ? 1 : 0;
}
