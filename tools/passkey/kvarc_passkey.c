/* kvarc_passkey.c - `kvarc-passkey`: kvarc end to end on a real trained
 * model, with a JSON receipt for every number.
 *
 *   kvarc-passkey run [options]     the passkey grid (modes x lengths),
 *                                   the equivalence gate, next-token
 *                                   agreement (formats x hot windows x
 *                                   kvarc, kvarc-true); prints tables,
 *                                   writes a receipt
 *   kvarc-passkey check RECEIPT     re-hash what a receipt names (weights,
 *                                   vocabulary, the task sequences)
 *
 * The model is tests/fixtures/passkey (tools/passkey/train.py made it);
 * the forward pass is model.c, attention per mode is trial.c. A kvarcd is
 * started on a fresh temporary data directory unless --data names one.
 * Exit codes: 0 done (check: every hash matches), 1 failed (check: a
 * mismatch), 2 usage.
 */
#include <errno.h>
#include <ftw.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "daemon.h"
#include "receipt.h"
#include "trial.h"
#include "toolutil.h"

#ifndef KVARC_SOURCE_DIR
#define KVARC_SOURCE_DIR "."
#endif
#define MAX_LENGTHS 16
#define MAX_AGREE   8            /* formats, and hot windows, in one agreement table */

static void usage(FILE *f)
{
    fprintf(f,
            "usage: kvarc-passkey run [options] | check RECEIPT [--root DIR]\n"
            "\n"
            "run: passkey retrieval by a small trained model (trained on <= 512 tokens) whose\n"
            "attention goes through libkvarc and a kvarcd, against full attention, a sliding\n"
            "window of the same token budget, and kvarc with cold retrieval cut off.\n"
            "  --model DIR        model.bin + vocab.txt (default: the source tree's\n"
            "                     tests/fixtures/passkey)\n"
            "  --lengths L,...    prompt lengths in tokens (default 512,4096,16384)\n"
            "  --trials N         prompts per length (default 20); trial t uses seed S+t\n"
            "  --seed S           (default 1)\n"
            "  --modes M,...      of full,window,kvarc,kvarc-true,no-retrieval (default all)\n"
            "  --full-max L       full attention only up to this length (default 4096: it is\n"
            "                     quadratic and past the trained window anyway)\n"
            "  --format F         record format q3|q4|i8|f16|bf16 (default q3)\n"
            "  --top-k K --hot H --sinks S --chunk C   (defaults 64, 256, 4, 64)\n"
            "  --coarse B         the coarse tier: stage 1 scans the B best 64-token blocks\n"
            "                     (default 0: every cold token)\n"
            "  --prefill-coarse B the same for a prefill chunk's queries but its last\n"
            "                     (default 0: as --coarse)\n"
            "  --prefill-shortlist F  those queries' shortlist, in top_k (default 0: 8)\n"
            "  --decode-steps N   after the answer, N more greedy decode steps per trial, timed with\n"
            "                     the answer's (decode_ms_per_step in the receipt; default 0)\n"
            "  --no-means         do not center keys with means calibrated on one prompt\n"
            "  --gate N           equivalence gate: N greedy tokens (default 16; 0 skips)\n"
            "  --gate-length L    its prompt length (default 1024)\n"
            "  --agree N          next-token agreement with full attention over N prompts of the\n"
            "                     trained length (default 8; 0 skips): median, mean, p90, max KL\n"
            "                     and top-1 agreement, kvarc and kvarc-true, at positions >=\n"
            "                     sinks + hot + chunk\n"
            "  --agree-hots H,... its hot windows (default 64, so most tokens are cold);\n"
            "                     --agree-hot H is the same with one\n"
            "  --agree-formats F,...  its record formats (default: --format's)\n"
            "  --receipt FILE     (default kvarc-passkey-receipt.json)\n"
            "  --data DIR         use (or start) the kvarcd of DIR instead of a temporary one\n"
            "  --kvarcd PATH      the kvarcd to start\n"
            "check: re-hash the weights, vocabulary and task sequences a receipt names;\n"
            "  relative paths are taken from the source tree (or --root DIR).\n");
}

static int parse_list(const char *s, uint32_t *out, int max, unsigned long min)
{
    int n = 0;
    char *end;
    while (*s && n < max) {
        unsigned long v = strtoul(s, &end, 10);
        if (end == s || v < min || v > (1u << 24))
            return -1;
        out[n++] = (uint32_t)v;
        s = *end == ',' ? end + 1 : end;
        if (*end && *end != ',')
            return -1;
    }
    return *s ? -1 : n;
}

/* SHA-256 of every prompt of the grid, in (length, trial) order. */
static void sequences_hash(const uint32_t *lengths, int nl, uint32_t trials, uint64_t seed, char hex[65])
{
    size_t total = 0;
    for (int i = 0; i < nl; i++)
        total += (size_t)trials * (lengths[i] - PK_KEY_DIGITS);
    int32_t *all = malloc((total + 1) * sizeof *all), key[PK_KEY_DIGITS];
    uint32_t needle;
    size_t at = 0;
    for (int i = 0; all && i < nl; i++)
        for (uint32_t t = 0; t < trials; t++) {
            pk_prompt(lengths[i], seed + t, all + at, key, &needle);
            at += lengths[i] - PK_KEY_DIGITS;
        }
    rc_sha256_buf(all, all ? total * sizeof *all : 0, hex);   /* int32 little-endian (x86-64) */
    free(all);
}

static int rm_entry(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb, (void)flag, (void)ftw;
    return remove(p);
}

static int cmd_check(int argc, char **argv)
{
    const char *path = NULL, *root = NULL;
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--root") && i + 1 < argc)
            root = argv[++i];
        else if (!path && argv[i][0] != '-')
            path = argv[i];
        else {
            fprintf(stderr, "kvarc-passkey check: unknown argument '%s'\n", argv[i]);
            return 2;
        }
    }
    if (!path) {
        usage(stderr);
        return 2;
    }
    char err[1024];
    cJSON *r = rc_read(path, err, sizeof err);
    if (!r) {
        fprintf(stderr, "kvarc-passkey check: %s\n", err);
        return 1;
    }
    printf("receipt %s: %s at %s\n", path, cJSON_GetStringValue(cJSON_GetObjectItem(r, "command")),
           cJSON_GetStringValue(cJSON_GetObjectItem(r, "git_revision")));
    int bad = rc_check_inputs(r, root, stdout);
    if (bad < 0) {
        printf("BAD   the receipt names no inputs\n");
        bad = 1;
    }
    /* the weights were not changed by the run */
    const char *before = cJSON_GetStringValue(cJSON_GetObjectItem(r, "weights_sha256_before"));
    const char *after = cJSON_GetStringValue(cJSON_GetObjectItem(r, "weights_sha256_after"));
    if (!before || !after || strcmp(before, after)) {
        printf("BAD   weights_sha256_before/after missing or different\n");
        bad++;
    } else {
        printf("ok    weights unchanged by the run (%.16s...)\n", after);
    }
    /* the task sequences regenerate to the same hash */
    const cJSON *task = cJSON_GetObjectItem(cJSON_GetObjectItem(r, "figures"), "task");
    const cJSON *ls = cJSON_GetObjectItem(task, "lengths"), *x;
    const char *want = cJSON_GetStringValue(cJSON_GetObjectItem(task, "sequences_sha256"));
    uint32_t lengths[MAX_LENGTHS];
    int nl = 0;
    cJSON_ArrayForEach(x, ls) {
        if (nl < MAX_LENGTHS && cJSON_IsNumber(x) && x->valuedouble >= 16 && x->valuedouble <= (1 << 24))
            lengths[nl++] = (uint32_t)x->valuedouble;
    }
    const cJSON *tr = cJSON_GetObjectItem(task, "trials"), *sd = cJSON_GetObjectItem(task, "seed");
    if (!want || !nl || !cJSON_IsNumber(tr) || !cJSON_IsNumber(sd)) {
        printf("BAD   figures.task lacks lengths, trials, seed or sequences_sha256\n");
        bad++;
    } else {
        char hex[65];
        sequences_hash(lengths, nl, (uint32_t)tr->valuedouble, (uint64_t)sd->valuedouble, hex);
        if (strcmp(hex, want)) {
            printf("BAD   task sequences hash to %s, the receipt says %s\n", hex, want);
            bad++;
        } else {
            printf("ok    task sequences (%d lengths x %d trials) sha256 %.16s...\n", nl, (int)tr->valuedouble, hex);
        }
    }
    cJSON_Delete(r);
    printf("%s\n", bad ? "receipt does NOT check out" : "receipt checks out");
    return bad ? 1 : 0;
}

typedef struct run_opts {
    const char *model_dir, *receipt, *data, *kvarcd;
    uint32_t    lengths[MAX_LENGTHS];
    int         nl, modes[PK_MODES], means, format;
    uint32_t    trials, full_max, top_k, hot, sinks, chunk, gate, gate_len, agree, coarse;
    uint32_t    prefill_coarse, prefill_shortlist, decode_steps;
    uint32_t    agree_hots[MAX_AGREE];      /* the agreement table's hot windows */
    int         n_agree_hots, agree_formats[MAX_AGREE], n_agree_formats;   /* 0 formats: --format's */
    uint64_t    seed;
} run_opts;

/* KVARC_FMT_* of a format name, -1 if none */
static int format_parse(const char *name)
{
    for (int f = KVARC_FMT_Q3; f <= KVARC_FMT_BF16; f++)
        if (!strcmp(kvarc_format_get(f)->name, name))
            return f;
    return -1;
}

static int parse_run(int argc, char **argv, run_opts *o)
{
    memset(o, 0, sizeof *o);
    o->model_dir = KVARC_SOURCE_DIR "/tests/fixtures/passkey";
    o->receipt = "kvarc-passkey-receipt.json";
    o->nl = 3, o->lengths[0] = 512, o->lengths[1] = 4096, o->lengths[2] = 16384;
    for (int m = 0; m < PK_MODES; m++)
        o->modes[m] = 1;
    o->means = 1, o->format = KVARC_FMT_Q3, o->trials = 20, o->full_max = 4096, o->top_k = 64, o->hot = 256;
    o->sinks = 4, o->chunk = 64, o->gate = 16, o->gate_len = 1024, o->agree = 8, o->seed = 1;
    o->n_agree_hots = 1, o->agree_hots[0] = 64;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int used = 1;
#define U32(flag, field) else if (!strcmp(a, flag) && v) o->field = (uint32_t)strtoul(v, NULL, 10)
        if (!strcmp(a, "--model") && v)
            o->model_dir = v;
        else if (!strcmp(a, "--receipt") && v)
            o->receipt = v;
        else if (!strcmp(a, "--data") && v)
            o->data = v;
        else if (!strcmp(a, "--kvarcd") && v)
            o->kvarcd = v;
        else if (!strcmp(a, "--seed") && v)
            o->seed = strtoull(v, NULL, 10);
        U32("--trials", trials); U32("--full-max", full_max); U32("--top-k", top_k); U32("--hot", hot);
        U32("--sinks", sinks); U32("--chunk", chunk); U32("--gate", gate); U32("--gate-length", gate_len);
        U32("--agree", agree); U32("--coarse", coarse); U32("--prefill-coarse", prefill_coarse);
        U32("--prefill-shortlist", prefill_shortlist); U32("--decode-steps", decode_steps);
        else if ((!strcmp(a, "--agree-hot") || !strcmp(a, "--agree-hots")) && v) {
            if ((o->n_agree_hots = parse_list(v, o->agree_hots, MAX_AGREE, 1)) < 1 ||
                (!strcmp(a, "--agree-hot") && o->n_agree_hots != 1)) {
                if (strcmp(a, "--agree-hot"))
                    fprintf(stderr, "kvarc-passkey: --agree-hots wants up to %d hot windows >= 1 separated by "
                            "commas, not '%s'\n", MAX_AGREE, v);
                else
                    fprintf(stderr, "kvarc-passkey: --agree-hot wants one hot window >= 1, not '%s' (--agree-hots "
                            "takes a list)\n", v);
                return 2;
            }
        } else if (!strcmp(a, "--agree-formats") && v) {
            char buf[256];
            snprintf(buf, sizeof buf, "%s", v);
            o->n_agree_formats = 0;
            for (char *f = strtok(buf, ","); f; f = strtok(NULL, ",")) {
                int fmt = format_parse(f);
                if (fmt < 0) {
                    fprintf(stderr, "kvarc-passkey: unknown format '%s' in --agree-formats (kvarc formats lists "
                            "them)\n", f);
                    return 2;
                }
                if (o->n_agree_formats == MAX_AGREE) {
                    fprintf(stderr, "kvarc-passkey: more than %d formats in --agree-formats\n", MAX_AGREE);
                    return 2;
                }
                o->agree_formats[o->n_agree_formats++] = fmt;
            }
            if (!o->n_agree_formats) {
                fprintf(stderr, "kvarc-passkey: --agree-formats names no format\n");
                return 2;
            }
        } else if (!strcmp(a, "--lengths") && v) {
            if ((o->nl = parse_list(v, o->lengths, MAX_LENGTHS, 16)) < 1) {
                fprintf(stderr, "kvarc-passkey: --lengths wants lengths 16..16M separated by commas, not '%s'\n", v);
                return 2;
            }
        } else if (!strcmp(a, "--modes") && v) {
            memset(o->modes, 0, sizeof o->modes);
            char buf[256];
            snprintf(buf, sizeof buf, "%s", v);
            for (char *s = strtok(buf, ","); s; s = strtok(NULL, ",")) {
                int m = pk_mode_parse(s);
                if (m < 0) {
                    fprintf(stderr, "kvarc-passkey: unknown mode '%s' (full, window, kvarc, kvarc-true, "
                            "no-retrieval)\n", s);
                    return 2;
                }
                o->modes[m] = 1;
            }
        } else if (!strcmp(a, "--format") && v) {
            if ((o->format = format_parse(v)) < 0) {
                fprintf(stderr, "kvarc-passkey: unknown format '%s' (kvarc formats lists them)\n", v);
                return 2;
            }
        } else if (!strcmp(a, "--no-means")) {
            o->means = 0, used = 0;
        } else if (!strcmp(a, "--help") || !strcmp(a, "-h")) {
            usage(stdout);
            exit(0);
        } else {
            fprintf(stderr, "kvarc-passkey run: unknown argument '%s' (or it lacks its value)\n", a);
            return 2;
        }
#undef U32
        i += used;
    }
    if (!o->trials || !o->chunk || o->chunk > 512 || !o->hot || o->gate_len < 64) {
        fprintf(stderr, "kvarc-passkey: --trials, --hot >= 1; --chunk 1..512; --gate-length >= 64\n");
        return 2;
    }
    if (!o->n_agree_formats)
        o->n_agree_formats = 1, o->agree_formats[0] = o->format;
    return 0;
}

static cJSON *settings_json(const run_opts *o, const pk_setup *s)
{
    kvarc_options ko;
    pk_setup_options(s, PK_KVARC, &ko);
    cJSON *j = cJSON_CreateObject();
    cJSON_AddStringToObject(j, "format", kvarc_format_get(o->format)->name);
    cJSON_AddNumberToObject(j, "top_k", o->top_k);
    cJSON_AddNumberToObject(j, "hot_window", o->hot);
    cJSON_AddNumberToObject(j, "sinks", o->sinks);
    cJSON_AddNumberToObject(j, "shortlist", ko.shortlist);
    cJSON_AddNumberToObject(j, "prefill_chunk", o->chunk);
    cJSON_AddNumberToObject(j, "coarse_blocks", o->coarse);
    cJSON_AddNumberToObject(j, "prefill_coarse_blocks", o->prefill_coarse);
    cJSON_AddNumberToObject(j, "prefill_shortlist", o->prefill_shortlist);
    cJSON_AddNumberToObject(j, "window_budget", o->sinks + o->hot + o->top_k);
    cJSON_AddBoolToObject(j, "means_calibrated", o->means);
    return j;
}

/* Next-token agreement with full attention, the table: every hot window x
 * format x (kvarc, kvarc-true), o->agree prompts of the trained length
 * each (seeds S+1000..), printed and added to fig as "agreement". 0, or -1
 * after printing what failed (err is scratch). */
static int agreement(const run_opts *o, const pk_setup *s, cJSON *fig, char *err, size_t len)
{
    const uint32_t L = s->m->train_len;
    cJSON *ag = cJSON_AddArrayToObject(fig, "agreement");
    /* InfiniteKV's reported figures, the bar the issue compares against */
    const double bar_median = 0.002, bar_top1 = 0.95;
    char reached[1024] = "";
    size_t rat = 0;
    printf("\nnext-token agreement with full attention: %u prompts of %u tokens, top_k %u, %u sinks, KL(full || "
           "kvarc) in nats,\nat positions >= sinks + hot + chunk (chunk %u), where kvarc has cold tokens to retrieve:\n",
           o->agree, L, o->top_k, o->sinks, o->chunk);
    printf("%-6s %5s %5s %9s  %-11s %10s %10s %10s %8s %7s %6s\n", "format", "hot", "from", "positions", "mode",
           "median KL", "mean KL", "p90 KL", "max KL", "top-1", "s");
    for (int hi = 0; hi < o->n_agree_hots; hi++)
        for (int fi = 0; fi < o->n_agree_formats; fi++)
            for (int md = PK_KVARC; md <= PK_KVARC_TRUE; md++) {
                pk_setup sa = *s;
                sa.hot = o->agree_hots[hi];
                sa.format = o->agree_formats[fi];
                const char *fname = kvarc_format_get(sa.format)->name;
                const uint32_t from = o->sinks + sa.hot + o->chunk;
                pk_agree acc = { 0 };
                double t0 = tu_now_s();
                for (uint32_t t = 0; t < o->agree; t++) {
                    fprintf(stderr, "\ragreement %s hot %u %s %u/%u ...", fname, sa.hot, pk_mode_name(md), t + 1,
                            o->agree);
                    if (pk_agreement(&sa, (pk_mode)md, L, o->seed + 1000 + t, from, &acc, err, len)) {
                        fprintf(stderr, "\nkvarc-passkey: agreement, %s hot %u %s prompt %u: %s\n", fname, sa.hot,
                                pk_mode_name(md), t, err);
                        pk_agree_free(&acc);
                        return -1;
                    }
                }
                double secs = tu_now_s() - t0;
                fprintf(stderr, "\r%50s\r", "");
                double kl = acc.n ? acc.kl_sum / (double)acc.n : 0, t1 = acc.n ? (double)acc.top1_same / acc.n : 0;
                double median = pk_agree_quantile(&acc, 0.5), p90 = pk_agree_quantile(&acc, 0.9);
                pk_agree_free(&acc);
                printf("%-6s %5u %5u %9llu  %-11s %10.5f %10.5f %10.4f %8.3f %7.4f %6.1f\n", fname, sa.hot, from,
                       (unsigned long long)acc.n, pk_mode_name(md), median, kl, p90, acc.kl_max, t1, secs);
                fflush(stdout);
                if (acc.n && median <= bar_median && t1 >= bar_top1 && rat < sizeof reached)
                    rat += (size_t)snprintf(reached + rat, sizeof reached - rat, "%s%s hot %u %s", rat ? ", " : "",
                                            fname, sa.hot, pk_mode_name(md));
                cJSON *e = cJSON_CreateObject();
                cJSON_AddStringToObject(e, "mode", pk_mode_name(md));
                cJSON_AddStringToObject(e, "format", fname);
                cJSON_AddNumberToObject(e, "hot_window", sa.hot);
                cJSON_AddNumberToObject(e, "top_k", o->top_k);
                cJSON_AddNumberToObject(e, "prompts", o->agree);
                cJSON_AddNumberToObject(e, "prompt_length", L);
                cJSON_AddNumberToObject(e, "from_position", from);
                cJSON_AddNumberToObject(e, "positions", (double)acc.n);
                cJSON_AddNumberToObject(e, "median_kl_nats", median);
                cJSON_AddNumberToObject(e, "mean_kl_nats", kl);
                cJSON_AddNumberToObject(e, "p90_kl_nats", p90);
                cJSON_AddNumberToObject(e, "max_kl_nats", acc.kl_max);
                cJSON_AddNumberToObject(e, "top1_agreement", t1);
                cJSON_AddNumberToObject(e, "seconds", round(secs * 100) / 100);
                cJSON_AddItemToArray(ag, e);
            }
    printf("median KL <= %g and top-1 >= %g (InfiniteKV's reported figures): %s\n", bar_median, bar_top1,
           rat ? reached : "none");
    return 0;
}

static int cmd_run(int argc, char **argv, int full_argc, char **full_argv)
{
    run_opts o;
    int rc = parse_run(argc, argv, &o);
    if (rc)
        return rc;
    char err[1024], mpath[4096], vpath[4096], tpath[4096], before[65], after[65];
    snprintf(mpath, sizeof mpath, "%s/model.bin", o.model_dir);
    snprintf(vpath, sizeof vpath, "%s/vocab.txt", o.model_dir);
    snprintf(tpath, sizeof tpath, "%s/train.json", o.model_dir);
    pk_model m;
    if (rc_sha256_file(mpath, before, err, sizeof err) || pk_model_load(mpath, &m, err, sizeof err)) {
        fprintf(stderr, "kvarc-passkey: %s\n", err);
        return 1;
    }
    printf("model %s: %u layers, d%u, %u query / %u kv heads of %u, trained on <= %u tokens, sha256 %.16s...\n",
           mpath, m.n_layers, m.d, m.n_heads, m.n_kv_heads, m.head_dim, m.train_len, before);

    /* the daemon: the caller's, or a temporary one of our own */
    char tmpdir[] = "/tmp/kvarc-passkey-XXXXXX", kbuf[4096], log[4200], msg[512];
    const char *data = o.data;
    pid_t pid = 0;
    int started = 0, ret = 1;
    kvarc_client *cl = NULL;
    cJSON *receipt = NULL;
    float *means = NULL;
    if (!data) {
        if (!mkdtemp(tmpdir)) {
            fprintf(stderr, "kvarc-passkey: mkdtemp: %s\n", strerror(errno));
            goto out;
        }
        data = tmpdir;
    }
    if (!kd_alive(data, 300)) {
        snprintf(log, sizeof log, "%s/kvarcd.log", data);
        if (kd_spawn(kd_find_kvarcd(o.kvarcd, kbuf, sizeof kbuf), data, log, &pid, msg, sizeof msg)) {
            fprintf(stderr, "kvarc-passkey: %s\n", msg);
            goto out;
        }
        started = 1;
    }
    if (kvarc_client_open(data, NULL, NULL, &cl)) {
        fprintf(stderr, "kvarc-passkey: cannot reach kvarcd at %s\n", data);
        goto out;
    }
    printf("kvarcd: %s (%s)\n", data, started ? "started for this run" : "already running");

    pk_setup s = { .m = &m, .cl = cl, .ns = "passkey", .format = o.format, .top_k = o.top_k, .coarse = o.coarse,
                   .prefill_coarse = o.prefill_coarse, .prefill_shortlist = o.prefill_shortlist, .hot = o.hot,
                   .sinks = o.sinks, .chunk = o.chunk, .decode_steps = o.decode_steps };
    if (o.means) {
        means = malloc((size_t)m.n_layers * m.n_kv_heads * 2 * m.head_dim * sizeof *means);
        if (!means || pk_calibrate(&m, m.train_len, 0xCA11B8A7Eull, means, err, sizeof err)) {
            fprintf(stderr, "kvarc-passkey: calibration: %s\n", means ? err : "out of memory");
            goto out;
        }
        s.means = means;
    }

    receipt = rc_new(full_argc, full_argv);
    if (!receipt || rc_add_input(receipt, "weights", mpath, err, sizeof err) ||
        rc_add_input(receipt, "vocabulary", vpath, err, sizeof err) ||
        (access(tpath, R_OK) == 0 && rc_add_input(receipt, "training record", tpath, err, sizeof err))) {
        fprintf(stderr, "kvarc-passkey: %s\n", receipt ? err : "out of memory");
        goto out;
    }
    cJSON *fig = cJSON_AddObjectToObject(receipt, "figures"), *task = cJSON_AddObjectToObject(fig, "task");
    char seqhex[65];
    sequences_hash(o.lengths, o.nl, o.trials, o.seed, seqhex);
    cJSON_AddNumberToObject(task, "seed", (double)o.seed);
    cJSON_AddNumberToObject(task, "trials", o.trials);
    cJSON_AddItemToObject(task, "lengths", cJSON_CreateIntArray((const int *)o.lengths, o.nl));
    cJSON_AddNumberToObject(task, "train_len", m.train_len);
    cJSON_AddStringToObject(task, "sequences_sha256", seqhex);
    cJSON_AddItemToObject(fig, "settings", settings_json(&o, &s));
    cJSON *grid = cJSON_AddArrayToObject(fig, "passkey");

    /* the grid */
    printf("\npasskey: %u prompts per length, answer = 5 greedy tokens, all must match\n", o.trials);
    printf("%-8s %-7s", "length", "x train");
    for (int md = 0; md < PK_MODES; md++)
        if (o.modes[md])
            printf(" %13s", pk_mode_name(md));
    printf("\n");
    for (int li = 0; li < o.nl; li++) {
        uint32_t L = o.lengths[li];
        char row[512];
        int at = snprintf(row, sizeof row, "%-8u %-7.3g", L, (double)L / m.train_len);
        for (int md = 0; md < PK_MODES; md++) {
            if (!o.modes[md])
                continue;
            if (md == PK_FULL && L > o.full_max) {
                at += snprintf(row + at, sizeof row - (size_t)at, " %13s", "-");
                continue;
            }
            uint32_t ok = 0, found = 0;
            int has_found = 0;
            double secs = 0, stage[5] = { 0 }, decode = 0, decode_kvarc = 0;
            cJSON *answers = cJSON_CreateArray();   /* each trial's 5 greedy tokens, as digits ('?' else) */
            for (uint32_t t = 0; t < o.trials; t++) {
                pk_result r;
                fprintf(stderr, "\r%-12s length %-6u trial %u/%u ...", pk_mode_name(md), L, t + 1, o.trials);
                if (pk_trial(&s, (pk_mode)md, L, o.seed + t, &r, err, sizeof err)) {
                    fprintf(stderr, "\nkvarc-passkey: %s length %u trial %u: %s\n", pk_mode_name(md), L, t, err);
                    cJSON_Delete(answers);
                    goto out;
                }
                ok += (uint32_t)r.correct;
                char ans[PK_KEY_DIGITS + 1];
                for (int i = 0; i < PK_KEY_DIGITS; i++)
                    ans[i] = r.answer[i] >= PK_DIGIT0 && r.answer[i] < PK_DIGIT0 + 10 ? (char)('0' + r.answer[i] - PK_DIGIT0)
                                                                                      : '?';
                ans[PK_KEY_DIGITS] = 0;
                cJSON_AddItemToArray(answers, cJSON_CreateString(ans));
                if (r.retrieved >= 0)
                    has_found = 1, found += (uint32_t)r.retrieved;
                secs += r.seconds;
                decode += r.decode_s;
                decode_kvarc += r.decode_kvarc_s;
                for (int i = 0; i < 5; i++)
                    stage[i] += r.stage_s[i];
            }
            fprintf(stderr, "\r%60s\r", "");
            at += snprintf(row + at, sizeof row - (size_t)at, " %7u/%-5u", ok, o.trials);
            cJSON *e = cJSON_CreateObject();
            cJSON_AddNumberToObject(e, "length", L);
            cJSON_AddNumberToObject(e, "x_train", (double)L / m.train_len);
            cJSON_AddStringToObject(e, "mode", pk_mode_name(md));
            cJSON_AddNumberToObject(e, "correct", ok);
            cJSON_AddNumberToObject(e, "trials", o.trials);
            if (has_found)
                cJSON_AddNumberToObject(e, "needle_retrieved", found);
            cJSON_AddNumberToObject(e, "seconds_per_trial", round(secs / o.trials * 1000) / 1000);
            const double steps = (double)o.trials * (PK_KEY_DIGITS - 1 + o.decode_steps);   /* decode steps timed */
            cJSON_AddNumberToObject(e, "decode_ms_per_step", round(decode / steps * 1e6) / 1e3);
            cJSON_AddItemToObject(e, "answers", answers);   /* trial t: seed + t */
            if (md >= PK_KVARC) {         /* libkvarc's own time by stage, per trial */
                cJSON_AddNumberToObject(e, "decode_kvarc_ms_per_step", round(decode_kvarc / steps * 1e6) / 1e3);
                static const char *const sn[5] = { "stage1", "stage2", "decode", "attention", "archive" };
                cJSON *st = cJSON_AddObjectToObject(e, "libkvarc_seconds_per_trial");
                for (int i = 0; i < 5; i++)
                    cJSON_AddNumberToObject(st, sn[i], round(stage[i] / o.trials * 1000) / 1000);
            }
            cJSON_AddItemToArray(grid, e);
        }
        /* which prompts a window could answer at all: the needle's first digit within its reach */
        uint32_t reach_w = 0, reach_h = 0, needle;
        int32_t *pr = malloc(L * sizeof *pr), key[PK_KEY_DIGITS];
        for (uint32_t t = 0; pr && t < o.trials; t++) {
            pk_prompt(L, o.seed + t, pr, key, &needle);
            uint32_t last = L - PK_KEY_DIGITS - 1;        /* the question's last token */
            reach_w += needle + o.hot + o.top_k > last;
            reach_h += needle + o.hot >= last;
        }
        free(pr);
        printf("%s   (needle within the window's reach in %u, the hot window's in %u)\n", row, reach_w, reach_h);
        cJSON *reach = cJSON_CreateObject();
        cJSON_AddNumberToObject(reach, "length", L);
        cJSON_AddNumberToObject(reach, "needle_within_window", reach_w);
        cJSON_AddNumberToObject(reach, "needle_within_hot_window", reach_h);
        cJSON_AddItemToArray(cJSON_GetObjectItem(task, "reach") ? cJSON_GetObjectItem(task, "reach")
                                                                 : cJSON_AddArrayToObject(task, "reach"), reach);
        fflush(stdout);
    }

    if (o.gate) {
        int same, same32;
        double diff;
        fprintf(stderr, "equivalence gate ...");
        if (pk_gate(&s, o.gate_len, o.gate, o.seed, &same, &diff, &same32, err, sizeof err)) {
            fprintf(stderr, "\nkvarc-passkey: gate: %s\n", err);
            goto out;
        }
        fprintf(stderr, "\r%30s\r", "");
        printf("\nequivalence gate (f16 records, true positions, top_k >= cold, prompt %u): %u greedy tokens %s "
               "full attention over the same fp16 K/V (max |logit diff| %.3g); %s with fp32 K/V\n", o.gate_len, o.gate,
               same ? "IDENTICAL to" : "DIFFER from", diff, same32 ? "also identical" : "not identical");
        cJSON *g = cJSON_AddObjectToObject(fig, "equivalence_gate");
        cJSON_AddNumberToObject(g, "prompt_length", o.gate_len);
        cJSON_AddNumberToObject(g, "tokens", o.gate);
        cJSON_AddBoolToObject(g, "identical", same);
        cJSON_AddBoolToObject(g, "identical_to_fp32_full_attention", same32);
        cJSON_AddNumberToObject(g, "max_abs_logit_diff", diff);
    }

    if (o.agree && agreement(&o, &s, fig, err, sizeof err))
        goto out;

    if (rc_sha256_file(mpath, after, err, sizeof err)) {
        fprintf(stderr, "kvarc-passkey: %s\n", err);
        goto out;
    }
    cJSON_AddStringToObject(receipt, "weights_sha256_before", before);
    cJSON_AddStringToObject(receipt, "weights_sha256_after", after);
    cJSON_AddBoolToObject(receipt, "weights_unchanged", !strcmp(before, after));
    printf("\nweights sha256 %s the run (%.16s...)\n", strcmp(before, after) ? "CHANGED by" : "unchanged by", after);
    if (rc_write(receipt, o.receipt, err, sizeof err)) {
        fprintf(stderr, "kvarc-passkey: %s\n", err);
        goto out;
    }
    printf("receipt: %s (kvarc-passkey check %s)\n", o.receipt, o.receipt);
    ret = strcmp(before, after) ? 1 : 0;
out:
    cJSON_Delete(receipt);
    free(means);
    if (cl)
        kvarc_client_close(cl);
    if (started)
        kd_stop(pid);
    if (data == tmpdir)
        nftw(tmpdir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    pk_model_free(&m);
    return ret;
}

int main(int argc, char **argv)
{
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (!strcmp(argv[1], "run"))
        return cmd_run(argc - 2, argv + 2, argc, argv);
    if (!strcmp(argv[1], "check"))
        return cmd_check(argc - 2, argv + 2);
    fprintf(stderr, "kvarc-passkey: unknown command '%s'\n", argv[1]);
    usage(stderr);
    return 2;
}
