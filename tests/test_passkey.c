/* test_passkey.c - kvarc end to end on the trained passkey model
 * (tests/fixtures/passkey, made by tools/passkey/train.py).
 *
 * 1. The C forward pass equals torch's (reference.bin, every logit of a
 *    256-token prompt, |diff| <= 2e-3).
 * 2. Inside the trained window, full attention answers the passkey.
 * 3. At 8x the trained window: kvarc (remapped) answers; a sliding window
 *    of the same token budget does not; kvarc with cold retrieval cut off
 *    (top_k 0) does not: the ablation, a hard assert.
 * 4. The equivalence gate: f16 records, true positions, top_k >= every
 *    cold token -> greedy decoding token for token as full attention.
 * 5. The weights file's SHA-256 is unchanged by all of it.
 * 6. kvarc-passkey writes a receipt that `kvarc-passkey check` accepts,
 *    and rejects once a byte of the weights it names has changed.
 * 7. Bad input is refused with a message that names it: a truncated model,
 *    a file that is no model, a broken receipt, bad command lines.
 * The prompts are fixed by their seeds, so the outcome is deterministic;
 * the full grid (32x, 20 prompts per cell) is the report tool's job.
 *
 * `test_passkey retrieval` runs 3 and 4, `test_passkey baselines` the rest
 * (ctest runs the halves side by side); no argument runs all. 3 prompts
 * per mode, 1 in the sanitizer build (PASSKEY_TRIALS): there the point is
 * every code path under ASan/UBSan, and the release build asserts the
 * counts.
 */
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "engine_util.h"
#include "kvarcd_util.h"
#include "receipt.h"
#include "testutil.h"
#include "trial.h"

#define FIX KVARC_SOURCE_DIR "/tests/fixtures/passkey"
#ifdef PASSKEY_TRIALS
#define TRIALS PASSKEY_TRIALS
#else
#define TRIALS 3
#endif

static int run_cmd(const char *cmd)
{
    int st = system(cmd);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static void forward_parity(const pk_model *m)
{
    FILE *f = fopen(FIX "/reference.bin", "rb");
    CHECK(f != NULL, "open reference.bin");
    if (!f)
        return;
    char magic[8];
    uint32_t h[4];
    int ok = fread(magic, 1, 8, f) == 8 && !memcmp(magic, "KVARCREF", 8) && fread(h, 4, 4, f) == 4 && h[0] == 1 &&
             h[3] == m->vocab && h[1] >= 64 && h[1] <= 4096;
    CHECK(ok, "reference.bin header");
    if (!ok) {
        fclose(f);
        return;
    }
    const uint32_t n = h[1], V = m->vocab;
    float *want = malloc((size_t)n * V * 4), *got = malloc((size_t)n * V * 4);
    int32_t *prompt = malloc((n + PK_KEY_DIGITS) * sizeof *prompt), key[PK_KEY_DIGITS];
    uint32_t needle;
    CHECK(fread(want, 4, (size_t)n * V, f) == (size_t)n * V, "reference.bin logits");
    fclose(f);
    pk_prompt(n + PK_KEY_DIGITS, h[2], prompt, key, &needle);
    pk_attn a;
    char err[512];
    CHECK_RC(pk_attn_exact_init(&a, m, n, 0, 0, 0), 0);
    for (uint32_t at = 0; at < n; at += 64) {   /* in chunks: each chunk attends to the earlier ones */
        uint32_t c = n - at < 64 ? n - at : 64;
        CHECK(pk_forward(m, &a, prompt + at, c, got + (size_t)at * V, 0, err, sizeof err) == 0, "%s", err);
    }
    double maxd = 0;
    int same_top1 = 1;
    for (size_t i = 0; i < (size_t)n * V; i++)
        maxd = fmax(maxd, fabs((double)got[i] - want[i]));
    for (uint32_t t = 0; t < n; t++)
        same_top1 &= pk_argmax(got + (size_t)t * V, V) == pk_argmax(want + (size_t)t * V, V);
    printf("forward pass vs torch: %u positions x %u logits, max |diff| %.2e\n", n, V, maxd);
    CHECK(maxd <= 2e-3, "C logits within 2e-3 of torch's (max %.3g)", maxd);
    CHECK(same_top1, "same arg max at every position");
    pk_attn_free(&a);
    free(want), free(got), free(prompt);
}

static int count_correct(const pk_setup *s, pk_mode mode, uint32_t length, int *retrieved)
{
    int ok = 0;
    char err[1024];
    if (retrieved)
        *retrieved = 0;
    for (uint64_t t = 0; t < TRIALS; t++) {
        pk_result r;
        int rc = pk_trial(s, mode, length, 1 + t, &r, err, sizeof err);
        CHECK(rc == 0, "%s at %u: %s", pk_mode_name(mode), length, err);
        ok += rc == 0 && r.correct;
        if (retrieved && r.retrieved > 0)
            ++*retrieved;
    }
    printf("%-12s at %5u tokens: %d/%d answered\n", pk_mode_name(mode), length, ok, TRIALS);
    return ok;
}

/* Receipts (written, checked, a changed weights file caught) and bad
 * input (refused with a message naming the file and what is wrong, nothing
 * written), in rdir. */
static void receipts_and_refusals(const char *rdir)
{
    char cmd[4096], rec[400], err[1024];
    snprintf(rec, sizeof rec, "%s/receipt.json", rdir);
    snprintf(cmd, sizeof cmd, "mkdir -p %s && cp " FIX "/model.bin " FIX "/vocab.txt %s/", rdir, rdir);
    CHECK(run_cmd(cmd) == 0, "%s", cmd);
    snprintf(cmd, sizeof cmd, "%s run --model %s --lengths 512 --trials 1 --modes full,kvarc --gate 0 --agree 1 "
             "--receipt %s --kvarcd %s > %s/run.out 2>&1", KVARC_PASSKEY_PATH, rdir, rec, KD_KVARCD, rdir);
    CHECK(run_cmd(cmd) == 0, "%s", cmd);
    snprintf(cmd, sizeof cmd, "%s check %s > %s/check.out", KVARC_PASSKEY_PATH, rec, rdir);
    CHECK(run_cmd(cmd) == 0, "a fresh receipt checks out: %s", cmd);
    snprintf(cmd, sizeof cmd, "printf '\\001' | dd of=%s/model.bin bs=1 seek=4096 conv=notrunc status=none", rdir);
    CHECK(run_cmd(cmd) == 0, "%s", cmd);
    snprintf(cmd, sizeof cmd, "%s check %s > %s/check2.out", KVARC_PASSKEY_PATH, rec, rdir);
    CHECK(run_cmd(cmd) == 1, "a changed weights file fails the check");
    cJSON *r = rc_read(rec, err, sizeof err);
    CHECK(r != NULL, "%s", err);
    if (r) {
        const char *rev = cJSON_GetStringValue(cJSON_GetObjectItem(r, "git_revision"));
        CHECK(rev && strlen(rev) >= 7, "the receipt names a git revision");
        CHECK(cJSON_IsObject(cJSON_GetObjectItem(r, "environment")), "and an environment");
        CHECK(cJSON_IsArray(cJSON_GetObjectItem(cJSON_GetObjectItem(r, "figures"), "passkey")), "and figures");
        cJSON_Delete(r);
    }

    pk_model bad;
    char path[400];
    snprintf(cmd, sizeof cmd, "head -c 100000 " FIX "/model.bin > %s/trunc.bin && cp " FIX "/vocab.txt %s/notmodel.bin",
             rdir, rdir);
    CHECK(run_cmd(cmd) == 0, "%s", cmd);
    snprintf(path, sizeof path, "%s/trunc.bin", rdir);
    CHECK(pk_model_load(path, &bad, err, sizeof err) == -1 && strstr(err, "trunc.bin") &&
          strstr(err, "does not match its header"), "a truncated model is refused: %s", err);
    snprintf(path, sizeof path, "%s/notmodel.bin", rdir);
    CHECK(pk_model_load(path, &bad, err, sizeof err) == -1 && strstr(err, "not a KVARCMDL"),
          "a file that is no model is refused: %s", err);
    snprintf(path, sizeof path, "%s/notjson.json", rdir);
    FILE *nj = fopen(path, "w");
    if (nj) {
        fputs("{\"inputs\": [", nj);
        fclose(nj);
    }
    CHECK(rc_read(path, err, sizeof err) == NULL && strstr(err, "not JSON"), "a broken receipt is refused: %s", err);
    snprintf(cmd, sizeof cmd, "%s check %s > /dev/null 2>&1", KVARC_PASSKEY_PATH, path);
    CHECK(run_cmd(cmd) == 1, "check of a broken receipt exits 1");
    snprintf(cmd, sizeof cmd, "echo '{\"command\": \"x\"}' > %s/empty.json && %s check %s/empty.json > /dev/null",
             rdir, KVARC_PASSKEY_PATH, rdir);
    CHECK(run_cmd(cmd) == 1, "check of a receipt naming no inputs exits 1");
    const char *usage_errs[] = { "--lengths 5", "--lengths 512,x", "--modes full,bogus", "--format q9", "--chunk 0",
                                 "--frobnicate" };
    for (size_t i = 0; i < sizeof usage_errs / sizeof *usage_errs; i++) {
        snprintf(cmd, sizeof cmd, "%s run %s --receipt %s/never.json > /dev/null 2>&1", KVARC_PASSKEY_PATH,
                 usage_errs[i], rdir);
        CHECK(run_cmd(cmd) == 2, "run %s is a usage error (exit 2)", usage_errs[i]);
    }
    snprintf(path, sizeof path, "%s/never.json", rdir);
    CHECK(access(path, F_OK) != 0, "no receipt written by a refused run");
}

int main(int argc, char **argv)
{
    const char *part = argc > 1 ? argv[1] : "all";
    if (argc > 2 || (strcmp(part, "all") && strcmp(part, "retrieval") && strcmp(part, "baselines"))) {
        fprintf(stderr, "usage: test_passkey [all|retrieval|baselines]\n");
        return 2;
    }
    const int retrieval = strcmp(part, "baselines") != 0, baselines = strcmp(part, "retrieval") != 0;
    char before[65], after[65], err[1024];
    CHECK(rc_sha256_file(FIX "/model.bin", before, err, sizeof err) == 0, "%s", err);
    pk_model m;
    if (pk_model_load(FIX "/model.bin", &m, err, sizeof err)) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    if (baselines)
        forward_parity(&m);

    eu_tmpdir(dir, sizeof dir, "passkey");
    pid_t pid = start_daemon();
    kvc_conn *probe;
    CHECK_RC(kvc_connect(dir, &probe), 0);
    CHECK(wait_ready(probe), "kvarcd ready");
    kvc_close(probe);
    kvarc_client *cl = NULL;
    CHECK_RC(kvarc_client_open(dir, NULL, NULL, &cl), 0);
    if (tu_failures) {
        kill(pid, SIGKILL);
        return tu_finish("test_passkey");
    }
    float *means = malloc((size_t)m.n_layers * m.n_kv_heads * 2 * m.head_dim * sizeof *means);
    CHECK(pk_calibrate(&m, m.train_len, 0xCA11B8A7Eull, means, err, sizeof err) == 0, "%s", err);
    pk_setup s = { .m = &m, .cl = cl, .ns = "test", .means = means, .format = KVARC_FMT_Q3, .top_k = 64,
                   .hot = 256, .sinks = 4, .chunk = 64 };

    /* sanity: inside the trained window */
    if (baselines)
        CHECK(count_correct(&s, PK_FULL, m.train_len, NULL) == TRIALS,
              "full attention answers inside the trained window");
    /* 8x: kvarc answers, the window and the ablation do not */
    const uint32_t far = 8 * m.train_len;
    if (retrieval) {
        int found;
        int kv = count_correct(&s, PK_KVARC, far, &found);
        CHECK(kv >= (TRIALS > 1 ? TRIALS - 1 : 1), "kvarc answers at 8x the trained window (%d/%d)", kv, TRIALS);
        printf("  (the last layer retrieved a needle token at the question in %d/%d)\n", found, TRIALS);
    }
    if (baselines) {
        CHECK(count_correct(&s, PK_WINDOW, far, NULL) == 0, "a sliding window of the same budget does not answer");
        CHECK(count_correct(&s, PK_ABLATION, far, NULL) == 0, "with cold retrieval cut off kvarc does not answer");
    }

    /* the equivalence gate */
    if (retrieval) {
        int same, same32;
        double diff;
        CHECK(pk_gate(&s, 600, 8, 5, &same, &diff, &same32, err, sizeof err) == 0, "gate: %s", err);
        printf("equivalence gate: %s, max |logit diff| %.2e\n", same ? "identical" : "DIFFERENT", diff);
        CHECK(same, "f16 + true positions + top_k >= cold decodes as full attention");
    }

    kvarc_client_close(cl);
    free(means);
    kill(pid, SIGTERM);
    CHECK(wait_exit(pid, 10000) == 0, "kvarcd exits 0");

    char rdir[300];
    snprintf(rdir, sizeof rdir, "%s-fix", dir);
    if (baselines)
        receipts_and_refusals(rdir);

    CHECK(rc_sha256_file(FIX "/model.bin", after, err, sizeof err) == 0, "%s", err);
    CHECK(!strcmp(before, after), "the fixture's weights are unchanged (sha256 %.16s...)", after);
    pk_model_free(&m);
    if (!tu_failures) {
        char log[300];
        snprintf(log, sizeof log, "%s.log", dir);
        unlink(log);
        eu_rmrf(dir);
        eu_rmrf(rdir);
    }
    return tu_finish("test_passkey");
}
