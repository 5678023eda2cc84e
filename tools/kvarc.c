/* kvarc - the admin CLI. Subcommands grow with the project:
 *   kvarc demo       the main job: a long conversation through libkvarc and
 *                    kvarcd, decoded with retrieval (tools/kvarc_demo.c)
 *   kvarc selfcheck  the record formats and one retrieval step on the CPU
 *                    references, no daemon
 *   kvarc formats    the record formats and their sizes
 *   kvarc health, ls, stat, ...  ask a running kvarcd (tools/kvarc_admin.c)
 * Grammar, as git and kubectl have it: connection options (--data,
 * --socket, --connect, --token-file, --tls-ca, --tls-name, --json) go
 * before or after the command; `kvarc help COMMAND` and `kvarc COMMAND
 * --help` explain one command (the docs table below).
 * Exit codes: 0 success, 1 a check or operation failed, 2 usage error. */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kvarc_admin.h"
#include "kvarc_version.h"
#include "kvg.h"

static void usage(FILE *f)
{
    fprintf(f,
            "usage: kvarc [--version] [--help] [CONNECTION OPTIONS] COMMAND [ARGS]\n"
            "       kvarc help COMMAND | kvarc COMMAND --help    (one command, in full)\n"
            "\n"
            "commands:\n"
            "  demo [--data DIR] [--kvarcd PATH] [--tokens N] [--layers L] [--steps S]\n"
            "       [--format F] [--top-k K] [--keep]\n"
            "                 the main job: a long synthetic conversation through libkvarc and a\n"
            "                 kvarcd (started on DIR if none serves it), decoded with retrieval:\n"
            "                 needles found vs a sliding window, attention error, time, memory\n"
            "  selfcheck [--tokens N] [--top-k K] [--seed S]\n"
            "                 archive a synthetic layer in every record format in memory,\n"
            "                 retrieve a planted needle, compare attention with full attention\n"
            "  formats [--head-dim D]\n"
            "                 list the record formats and their bytes per token\n"
            "\n"
            "commands that talk to a running kvarcd (--data DIR, --socket PATH, or\n"
            "--connect HOST:PORT with --token-file FILE (or $KVARC_TOKEN_FILE) and, for TLS,\n"
            "--tls-ca PEM [--tls-name NAME]; default $KVARC_DATA, else ~/.local/share/kvarc;\n"
            "add --json for scripts):\n"
            "  health | stats | ls [NAMESPACE] | stat NS/NAME | inspect NS/NAME\n"
            "  fork SRC DST [--at N] | snapshot SRC DST [--at N] | restore SNAPSHOT DST\n"
            "  delete NS/NAME | verify | compact [--threshold 0..1]\n"
            "  top [--interval SECONDS] [--count N]\n"
            "  export NS/NAME FILE | import FILE NS/NAME\n"
            "\n"
            "commands on a stopped data directory (kvarcd not running on it):\n"
            "  verify DIR [--json]\n"
            "                 check every block, the index against the segments and the\n"
            "                 segments against the index, changing nothing\n"
            "  rebuild-index DIR [--json]\n"
            "                 rebuild the index from the segments alone (the old one is kept\n"
            "                 as DIR/index.old)\n"
            "exit codes: 0 ok, 1 refused by kvarcd (or verify found problems), 2 usage (or\n"
            "the directory is in use), 3 no kvarcd answering (offline: DIR cannot be read)\n");
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int cmd_formats(int argc, char **argv)
{
    int d = 128;
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--head-dim") && i + 1 < argc) {
            d = atoi(argv[++i]);
        } else {
            fprintf(stderr, "kvarc formats: unknown argument '%s'\n", argv[i]);
            return 2;
        }
    }
    if (kvarc_head_dim_check(d)) {
        fprintf(stderr, "kvarc formats: head_dim %d: %s\n", d, kvarc_strerror(KVARC_EHEADDIM));
        return 2;
    }
    printf("%-5s %3s %7s  %-9s %13s %9s %14s\n", "name", "id", "version", "kind",
           "record bytes", "vs fp16", "signature");
    for (int f = KVARC_FMT_Q3; f <= KVARC_FMT_BF16; f++) {
        const kvarc_format_info *fi = kvarc_format_get(f);
        int rb = kvarc_record_bytes(f, d);
        printf("%-5s %3d %7d  %-9s %13d %8.2fx %11d+2 B%s\n", fi->name, f, fi->version,
               fi->lossless ? "lossless" : "rotated", rb, (double)(4 * d) / rb,
               kvarc_sig_bytes(d), f == KVARC_FMT_DEFAULT ? "  (default)" : "");
    }
    return 0;
}

/* ---- demo ------------------------------------------------------------------ */

#define SINKS 4
#define HOT 256

typedef struct demo_data {
    int d, n;            /* head_dim, cold tokens */
    float *k, *v;        /* [SINKS + n + HOT][d] */
    float mu_k[KVARC_HEAD_DIM_MAX], mu_v[KVARC_HEAD_DIM_MAX];
    float q[KVARC_HEAD_DIM_MAX];
    int needle;          /* cold index of the planted needle */
} demo_data;

static float gauss(uint64_t *st)
{
    double u1 = ((double)(kvarc_splitmix64(st) >> 11) + 0.5) * 0x1p-53;
    double u2 = ((double)(kvarc_splitmix64(st) >> 11) + 0.5) * 0x1p-53;
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

/* Keys with a shared mean direction and outlier channels, smooth values,
 * and one needle: a cold key aligned with the query, with a distinctive
 * value, at 37% depth. */
static void demo_make(demo_data *dd, uint64_t seed)
{
    int d = dd->d, total = SINKS + dd->n + HOT;
    uint64_t st = seed;
    for (int i = 0; i < d; i++) {
        dd->mu_k[i] = 0.0f;
        dd->mu_v[i] = 0.0f;
    }
    float dir[KVARC_HEAD_DIM_MAX], prev[KVARC_HEAD_DIM_MAX] = { 0 };
    for (int i = 0; i < d; i++)
        dir[i] = 2.0f * gauss(&st);
    for (int t = 0; t < total; t++)
        for (int i = 0; i < d; i++) {
            float amp = (i % 29 == 3) ? 6.0f : 1.0f;
            dd->k[(size_t)t * d + i] = dir[i] + amp * gauss(&st);
            prev[i] = 0.8f * prev[i] + 0.6f * gauss(&st);      /* local smoothness */
            dd->v[(size_t)t * d + i] = prev[i];
        }
    for (int t = 0; t < total; t++)
        for (int i = 0; i < d; i++) {
            dd->mu_k[i] += dd->k[(size_t)t * d + i] / (float)total;
            dd->mu_v[i] += dd->v[(size_t)t * d + i] / (float)total;
        }
    dd->needle = (int)(0.37 * dd->n);
    float *nk = dd->k + (size_t)(SINKS + dd->needle) * d, *nv = dd->v + (size_t)(SINKS + dd->needle) * d;
    double qn = 0;
    for (int i = 0; i < d; i++) {
        dd->q[i] = gauss(&st);
        qn += (double)dd->q[i] * dd->q[i];
    }
    for (int i = 0; i < d; i++) {
        nk[i] = dd->mu_k[i] + 3.0f * dd->q[i] * (float)sqrt(d / qn) * 1.5f;
        nv[i] = (i % 2) ? 4.0f : -4.0f;
    }
}

/* Full attention of q over all tokens: the reference answer. */
static void demo_full(const demo_data *dd, float *out)
{
    int total = SINKS + dd->n + HOT;
    kvg_attn_part p = { dd->k, dd->v, (size_t)total, (size_t)total, NULL };
    kvg_attend_ref(dd->q, 1, 1, dd->d, 1.0f / sqrtf((float)dd->d), &p, 1, out);
}

static double rel_err(const float *a, const float *b, int d)
{
    double num = 0, den = 0;
    for (int i = 0; i < d; i++) {
        num += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
        den += (double)b[i] * b[i];
    }
    return sqrt(num / (den > 0 ? den : 1));
}

typedef struct demo_row {
    double err, kerr, ms_encode, ms_step;
    int found;
} demo_row;

/* Archive the cold tokens in format fmt, run one retrieval step (stage 1:
 * asymmetric scan -> shortlist of 8 top_k; stage 2: exact rerank of the
 * shortlist on decoded keys -> top_k; attention over sinks + hot + the
 * retrieved records) and compare with full attention. */
static int demo_format(const demo_data *dd, int fmt, int top_k, const float *full, demo_row *row)
{
    int d = dd->d, n = dd->n, rb = kvarc_record_bytes(fmt, d), sl = 8 * top_k;
    if (sl > n)
        sl = n;
    if (top_k > sl)
        top_k = sl;
    kvarc_rotation rot;
    kvarc_rotation_init(&rot, d, 0xc0ffee);
    kvg_codec c = { fmt, &rot, dd->mu_k, dd->mu_v };
    uint8_t *rec = malloc((size_t)n * rb), *bits = malloc((size_t)n * d / 8);
    uint16_t *ss = malloc((size_t)n * 2);
    float *scores = malloc((size_t)n * 4), *rk = malloc((size_t)sl * d * 4);
    float *sk = malloc((size_t)top_k * d * 4), *sv = malloc((size_t)top_k * d * 4);
    float *rscore = malloc((size_t)sl * 4), out[KVARC_HEAD_DIM_MAX];
    uint32_t *short_idx = malloc((size_t)sl * 4), *final = malloc((size_t)top_k * 4);
    int rc = -ENOMEM;
    if (!rec || !bits || !ss || !scores || !rk || !sk || !sv || !rscore || !short_idx || !final)
        goto out;
    const float *cold_k = dd->k + (size_t)SINKS * d, *cold_v = dd->v + (size_t)SINKS * d;
    double t0 = now();
    rc = kvg_encode(&c, KVARC_DTYPE_F32, cold_k, cold_v, (size_t)n, rec, bits, ss, NULL);
    if (rc)
        goto out;
    row->ms_encode = (now() - t0) * 1e3;
    /* key reconstruction error over a sample */
    double ke = 0;
    for (int t = 0; t < 256 && t < n; t++) {
        float kd[KVARC_HEAD_DIM_MAX];
        kvg_decode_ref(&c, rec + (size_t)t * rb, 1, kd, NULL);
        double num = 0, den = 0;
        for (int i = 0; i < d; i++) {
            double e = (double)kd[i] - cold_k[(size_t)t * d + i], x = (double)cold_k[(size_t)t * d + i] - dd->mu_k[i];
            num += e * e;
            den += x * x;
        }
        ke += sqrt(num / den) / 256.0;
    }
    row->kerr = ke;

    t0 = now();
    kvg_query qp;
    rc = kvg_query_prep_ref(&rot, dd->mu_k, KVARC_DTYPE_F32, dd->q, &qp);
    if (!rc)
        rc = kvg_score_ref(KVG_SCORE_ASYM, KVG_COMBINE_MAX, &qp, 1, bits, ss, (size_t)n, scores);
    long got = rc ? rc : kvg_topk_ref(scores, (size_t)n, (size_t)sl, short_idx, NULL, NULL);
    if (got < 0) {
        rc = (int)got;
        goto out;
    }
    for (int i = 0; i < sl; i++) {               /* stage 2: exact rerank */
        kvg_decode_ref(&c, rec + (size_t)short_idx[i] * rb, 1, rk + (size_t)i * d, NULL);
        float s = 0;
        for (int j = 0; j < d; j++)
            s += dd->q[j] * rk[(size_t)i * d + j];
        rscore[i] = s;
    }
    got = kvg_topk_ref(rscore, (size_t)sl, (size_t)top_k, final, NULL, NULL);
    if (got < 0) {
        rc = (int)got;
        goto out;
    }
    row->found = 0;
    for (int i = 0; i < top_k; i++) {
        uint32_t tok = short_idx[final[i]];
        row->found |= (int)tok == dd->needle;
        kvg_decode_ref(&c, rec + (size_t)tok * rb, 1, sk + (size_t)i * d, sv + (size_t)i * d);
    }
    kvg_attn_part parts[3] = {
        { dd->k, dd->v, SINKS, SINKS, NULL },
        { dd->k + (size_t)(SINKS + n) * d, dd->v + (size_t)(SINKS + n) * d, HOT, HOT, NULL },
        { sk, sv, (size_t)top_k, (size_t)top_k, NULL },
    };
    rc = kvg_attend_ref(dd->q, 1, 1, d, 1.0f / sqrtf((float)d), parts, 3, out);
    row->ms_step = (now() - t0) * 1e3;
    row->err = rel_err(out, full, d);
out:
    free(rec); free(bits); free(ss); free(scores); free(rk); free(sk); free(sv);
    free(rscore); free(short_idx); free(final);
    return rc;
}

static int cmd_selfcheck(int argc, char **argv)
{
    int n = 32768, top_k = 64;
    uint64_t seed = 2026;
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--tokens") && i + 1 < argc)
            n = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--top-k") && i + 1 < argc)
            top_k = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--seed") && i + 1 < argc)
            seed = strtoull(argv[++i], NULL, 0);
        else {
            fprintf(stderr, "kvarc selfcheck: unknown argument '%s' (see kvarc --help)\n", argv[i]);
            return 2;
        }
    }
    if (n < 16 || n > 4 * 1024 * 1024 || top_k < 1 || top_k > n) {
        fprintf(stderr, "kvarc selfcheck: need 16 <= --tokens <= 4194304 and 1 <= --top-k <= tokens\n");
        return 2;
    }
    demo_data dd = { .d = 128, .n = n };
    size_t total = (size_t)(SINKS + n + HOT);
    dd.k = malloc(total * dd.d * 4);
    dd.v = malloc(total * dd.d * 4);
    if (!dd.k || !dd.v) {
        fprintf(stderr, "kvarc selfcheck: out of memory for %d tokens\n", n);
        return 1;
    }
    demo_make(&dd, seed);
    float full[KVARC_HEAD_DIM_MAX], win[KVARC_HEAD_DIM_MAX];
    demo_full(&dd, full);
    /* the baseline that forgets: a sliding window of the same budget */
    size_t wn = (size_t)HOT + (size_t)top_k;
    kvg_attn_part wp[2] = {
        { dd.k, dd.v, SINKS, SINKS, NULL },
        { dd.k + (total - wn) * dd.d, dd.v + (total - wn) * dd.d, wn, wn, NULL },
    };
    kvg_attend_ref(dd.q, 1, 1, dd.d, 1.0f / sqrtf((float)dd.d), wp, 2, win);

    printf("kvarc selfcheck: one layer, one KV head, head_dim %d, %d cold tokens + %d sinks + %d hot;\n"
           "a needle at cold position %d; retrieval: asym scan -> shortlist %d -> exact rerank -> top_k %d\n"
           "(CPU reference kernels; kvarcd and libkvarc arrive with issues 3-5)\n\n",
           dd.d, n, SINKS, HOT, dd.needle, 8 * top_k, top_k);
    printf("%-6s %10s %9s %10s %7s %12s %10s %10s\n", "format", "B/token", "vs fp16", "K rel err",
           "needle", "attn rel err", "encode ms", "step ms");
    int fails = 0;
    for (int f = KVARC_FMT_Q3; f <= KVARC_FMT_BF16; f++) {
        demo_row row = { 0 };
        int rc = demo_format(&dd, f, top_k, full, &row);
        const kvarc_format_info *fi = kvarc_format_get(f);
        if (rc) {
            printf("%-6s failed: %s\n", fi->name, kvarc_strerror(rc));
            fails++;
            continue;
        }
        int rb = kvarc_record_bytes(f, dd.d);
        printf("%-6s %10d %8.2fx %10.4f %7s %12.4f %10.1f %10.2f\n", fi->name, rb,
               (double)(4 * dd.d) / rb, row.kerr, row.found ? "found" : "LOST", row.err,
               row.ms_encode, row.ms_step);
        fails += !row.found;
    }
    printf("%-6s %10s %9s %10s %7s %12.4f   (sinks + last %zu tokens: the same budget)\n",
           "window", "-", "-", "-", "LOST", rel_err(win, full, dd.d), wn);
    double fp16 = (double)total * 4 * dd.d, q3 = (double)n * (kvarc_record_bytes(KVARC_FMT_Q3, dd.d) + dd.d / 8 + 2);
    printf("\nmemory bill for this head: fp16 K/V %.1f MiB; kvarc q3 records + signatures %.1f MiB "
           "(%.1fx smaller), of which signatures %.1f MiB stay in RAM/VRAM\n",
           fp16 / 1048576, q3 / 1048576, fp16 / q3, (double)n * (dd.d / 8 + 2) / 1048576);
    free(dd.k);
    free(dd.v);
    if (fails) {
        printf("kvarc selfcheck: %d format(s) failed the self-check\n", fails);
        return 1;
    }
    printf("kvarc selfcheck: self-check passed\n");
    return 0;
}

/* One command's help: its synopsis and what it does. connects: which options given before the
 * command it takes: 1 every connection option (it talks to a running kvarcd), 2 only --data (demo
 * starts its own kvarcd there), 3 only --json (offline on a data directory), 0 none. */
typedef struct cmd_doc {
    const char *name, *synopsis, *text;
    int         connects;
} cmd_doc;

static const cmd_doc docs[] = {
    { "demo", "demo [--data DIR] [--kvarcd PATH] [--tokens N] [--layers L] [--steps S] [--format F] [--top-k K]\n"
              "     [--keep]",
      "The main job: a long synthetic conversation (default 65536 tokens x 4 layers) through libkvarc\n"
      "and the kvarcd serving DIR (started for the run if none does), decoded with retrieval; prints\n"
      "needles found against a sliding window of the same budget, attention error, time per step and\n"
      "memory. --keep keeps the conversation. Exit 0 when every needle was found.", 2 },
    { "selfcheck", "selfcheck [--tokens N] [--top-k K] [--seed S]",
      "Archives a synthetic layer in every record format in memory (no kvarcd), retrieves a planted\n"
      "needle and compares attention with full attention. Exit 0 when every format finds it.", 0 },
    { "formats", "formats [--head-dim D]", "Lists the record formats and their bytes per token at head_dim D.", 0 },
    { "health", "health", "Asks kvarcd whether it serves: its status, version, uptime and conversations.", 1 },
    { "stats", "stats", "kvarcd's counters: conversations (and deleted ones awaiting compaction), segments\n"
                        "and their bytes, extents, tokens, appends and group commits since it started.", 1 },
    { "ls", "ls [NAMESPACE]", "Lists the conversations (of NAMESPACE): id, tokens, layers, shape, and which are\n"
                               "snapshots or forks of which.", 1 },
    { "stat", "stat NS/NAME", "One conversation: model shape, format, position mode, length in every layer,\n"
                               "fork parent, bytes on disk against fp16 K/V.", 1 },
    { "inspect", "inspect NS/NAME", "The same as stat.", 1 },
    { "fork", "fork SRC DST [--at N]",
      "A new conversation DST sharing SRC's first N tokens (default: all) without copying them.", 1 },
    { "snapshot", "snapshot SRC DST [--at N]",
      "A read-only DST of SRC's first N tokens (default: all); restore it to continue.", 1 },
    { "restore", "restore SNAPSHOT DST", "A new writable conversation DST from the snapshot SNAPSHOT.", 1 },
    { "delete", "delete NS/NAME", "Deletes a conversation (its blocks go at the next compaction).", 1 },
    { "verify", "verify | verify DIR [--json]",
      "Checks every block's checksum and the index against the segments and back, changing nothing:\n"
      "through the running kvarcd, or offline on DIR (kvarcd stopped). Exit 1 when it finds problems.", 1 },
    { "compact", "compact [--threshold 0..1]",
      "Rewrites segments whose live share is under the threshold (default 0.5) and frees the rest.", 1 },
    { "top", "top [--interval SECONDS] [--count N]",
      "A live view of kvarcd from its metrics (the counters /metrics serves): calls, errors, mean and\n"
      "99th-percentile latency, bytes in and out per method and in total; records appended and served,\n"
      "group commits and fdatasync time; conversations, segments and bytes on disk, calls in flight.\n"
      "The first view counts from kvarcd's start, each next one the last interval (default 1 s).\n"
      "Redraws in place on a terminal, else prints one view after another; runs until interrupted or\n"
      "for N views. Needs the local socket or a '*' token.", 1 },
    { "export", "export NS/NAME FILE [--section-bytes N]",
      "Writes the conversation to FILE as one portable, versioned, self-checking file (schema/SCHEMA.md\n"
      "section 10): its shape, record format, rotation seed, means, and every layer's records,\n"
      "signatures and summaries, a CRC-32C per section; a fork comes out flattened. FILE appears only\n"
      "once complete (written as FILE.partial-PID, synced, renamed); an existing FILE is not\n"
      "overwritten. Progress on stderr. --section-bytes: data per section (default: as fits in 4 MiB).", 1 },
    { "import", "import FILE NS/NAME",
      "Recreates the conversation of an export FILE as NS/NAME (which must not exist), bit for bit, on\n"
      "any kvarcd. All or nothing: a truncated, damaged, foreign or newer-version file is refused with\n"
      "a message naming its first bad section (index, kind, byte offset; layer and positions), and no\n"
      "NS/NAME is left. Progress on stderr.", 1 },
    { "rebuild-index", "rebuild-index DIR [--json]",
      "Rebuilds DIR's index from its segments alone (kvarcd stopped); the old index is kept as\n"
      "DIR/index.old.", 3 },
};

static const cmd_doc *doc_of(const char *name)
{
    for (size_t i = 0; i < sizeof docs / sizeof *docs; i++)
        if (!strcmp(docs[i].name, name))
            return &docs[i];
    return NULL;
}

static void help_of(const cmd_doc *d)
{
    printf("usage: kvarc %s\n\n%s\n", d->synopsis, d->text);
    if (d->connects == 3)
        printf("\n--json (before or after the command): the answer as JSON.\n");
    if (d->connects == 1)
        printf("\nconnection (before or after the command): --data DIR (its kvarcd.sock), --socket PATH, or\n"
               "--connect HOST:PORT with --token-file FILE (or $KVARC_TOKEN_FILE) and, for TLS, --tls-ca PEM\n"
               "[--tls-name NAME]; default $KVARC_DATA, else ~/.local/share/kvarc. --json: the answer as JSON.\n");
    printf("\nexit codes: 0 ok, 1 refused or failed, 2 usage, 3 no kvarcd answering\n");
}

/* the connection options: those taking a value, and --json */
static int conn_option(const char *a)
{
    static const char *const with_value[] = { "--data", "--socket", "--connect", "--token-file", "--tls-ca",
                                              "--tls-name" };
    for (size_t i = 0; i < sizeof with_value / sizeof *with_value; i++)
        if (!strcmp(a, with_value[i]))
            return 2;
    return !strcmp(a, "--json") ? 1 : 0;
}

int main(int argc, char **argv)
{
    /* options before the command: --help, --version, or connection options, kept for the command */
    char *globals[64];
    int ng = 0, i = 1;
    for (; i < argc && argv[i][0] == '-'; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            return 0;
        }
        if (!strcmp(a, "--version")) {
            printf("kvarc %s (git %s; record format version %d)\n", KVARC_VERSION, KVARC_GIT_REVISION,
                   KVARC_FORMAT_VERSION);
            return 0;
        }
        int n = conn_option(a);
        if (!n || (n == 2 && i + 1 >= argc)) {
            fprintf(stderr, n ? "kvarc: %s needs a value\n"
                              : "kvarc: unknown option '%s' before the command (kvarc --help lists them)\n", a);
            return 2;
        }
        if (ng + n > (int)(sizeof globals / sizeof *globals)) {
            fprintf(stderr, "kvarc: too many options before the command\n");
            return 2;
        }
        globals[ng++] = argv[i];
        if (n == 2)
            globals[ng++] = argv[++i];
    }
    if (i >= argc) {
        usage(stderr);
        return 2;
    }
    const char *cmd = argv[i++];
    if (!strcmp(cmd, "help")) {
        if (i >= argc) {
            usage(stdout);
            return 0;
        }
        const cmd_doc *d = doc_of(argv[i]);
        if (!d) {
            fprintf(stderr, "kvarc help: unknown command '%s' (kvarc --help lists them)\n", argv[i]);
            return 2;
        }
        help_of(d);
        return 0;
    }
    const cmd_doc *d = doc_of(cmd);
    if (!d) {
        fprintf(stderr, "kvarc: unknown command '%s' (kvarc --help lists them)\n", cmd);
        return 2;
    }
    for (int j = i; j < argc; j++)
        if (!strcmp(argv[j], "--help") || !strcmp(argv[j], "-h")) {
            help_of(d);
            return 0;
        }
    for (int j = 0; j < ng; j += conn_option(globals[j]))
        if (!(d->connects == 1 || (d->connects == 2 && !strcmp(globals[j], "--data")) ||
              (d->connects == 3 && !strcmp(globals[j], "--json")))) {
            fprintf(stderr, "kvarc %s: %s does not apply (kvarc help %s)\n", cmd, globals[j], cmd);
            return 2;
        }
    /* the command's arguments: the options given before it first, so that its own (later) win */
    int n = ng + (argc - i);
    char **args = malloc(((size_t)n + 1) * sizeof *args);
    if (!args) {
        fprintf(stderr, "kvarc: out of memory\n");
        return 1;
    }
    memcpy(args, globals, (size_t)ng * sizeof *args);
    memcpy(args + ng, argv + i, (size_t)(argc - i) * sizeof *args);
    args[n] = NULL;
    int rc;
    if (!strcmp(cmd, "selfcheck"))
        rc = cmd_selfcheck(n, args);
    else if (!strcmp(cmd, "demo"))
        rc = kvarc_demo(n, args);
    else if (!strcmp(cmd, "formats"))
        rc = cmd_formats(n, args);
    else
        rc = kvarc_admin(cmd, n, args);
    free(args);
    return rc;
}
