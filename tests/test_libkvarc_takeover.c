/* test_libkvarc_takeover: a libkvarc writer killed between the per-layer
 * Appends of an archive leaves a conversation another process attaches
 * and continues (issue 13, item 5). Against a real kvarcd:
 *  - a writer process (this executable, "writer") appends token after
 *    token to every layer, as an engine does; when the batch that ends at
 *    KILL_AT has been acknowledged for layers 0 and 1 (kvarc_append
 *    returned) but not yet sent for layers 2 and 3, it tells the parent on
 *    a pipe and waits; the parent checks the layer lengths are unequal,
 *    keeps every stored record's bytes and SIGKILLs it;
 *  - a taker attaches (not -EAGAIN): every layer at the common length;
 *    a fork taken right after attach is at that length; re-fed tokens that
 *    differ from the stored ones are refused (-EILSEQ) and nothing changes;
 *  - fast-tier takers (block summaries only in the client) do the same:
 *    the right tokens pass unsent and attend equal to full attention, a
 *    wrong one is refused, nothing changes;
 *  - a second taker re-feeds the same tokens from the common length on,
 *    attends (equal to full attention: f16 records, top_k >= the cold
 *    tokens) and syncs: every layer at the same length, the positions held
 *    before the takeover not sent again, every record stored before the
 *    kill bit-exact, and a fresh attach attends over all of it equal to
 *    full attention. */
#include <math.h>
#include <poll.h>

#include "kvarcd_util.h"
#include "kvarc.h"
#include "kvg.h"

#define L 4
#define H 2
#define QH 4
#define D 64
#define N 130            /* tokens at the end of the takeover */
#define BATCH 16
#define KILL_AT 80       /* layers 0, 1 hold [0, 80) when the writer dies; layers 2, 3 [0, 64) */
#define COMMON 64

static float K[L][H][N][D], V[L][H][N][D], Q[L][QH][N][D];

static void gen_data(void)
{
    tu_rng rng = { 1313 };
    for (int l = 0; l < L; l++) {      /* f16-representable values: f16 records hold them exactly */
        for (int h = 0; h < H; h++)
            for (int t = 0; t < N; t++)
                for (int i = 0; i < D; i++) {
                    K[l][h][t][i] = kvarc_f16_to_f32(kvarc_f32_to_f16(tu_gauss(&rng) + (i == 5 ? 1.5f : 0.0f)));
                    V[l][h][t][i] = kvarc_f16_to_f32(kvarc_f32_to_f16(tu_gauss(&rng)));
                }
        for (int hq = 0; hq < QH; hq++)
            for (int t = 0; t < N; t++)
                for (int i = 0; i < D; i++)
                    Q[l][hq][t][i] = 0.5f * tu_gauss(&rng);
    }
}

static const kvarc_model model = { L, H, QH, D, KVARC_DTYPE_F32, 10000.0f, D, 0, "toy-takeover" };

static kvarc_options options(void)
{
    kvarc_options o;
    kvarc_options_default(&o);
    o.format = KVARC_FMT_F16;
    o.sinks = 4;
    o.hot_window = 32;
    o.batch = BATCH;
    o.top_k = 4096;            /* >= every cold token: retrieval is exhaustive */
    o.shortlist = 1;
    o.max_chunk = 32;
    return o;
}

/* Append token t of layer l to cv; with `shift`, token t + shift's K/V
 * instead (a wrong transcript). */
static int append_token(kvarc_conv *cv, int l, int t, int shift)
{
    float kb[H * D], vb[H * D];
    for (int h = 0; h < H; h++) {
        memcpy(kb + h * D, K[l][h][t + shift], D * 4);
        memcpy(vb + h * D, V[l][h][t + shift], D * 4);
    }
    return kvarc_append(cv, (uint32_t)l, KVARC_DTYPE_F32, kb, vb, 1);
}

/* Full causal attention of query t of layer l over tokens [0, t]. */
static void full_attention(int l, int t, float *out)
{
    for (int hq = 0; hq < QH; hq++) {
        int h = hq / (QH / H);
        float qv[D], kr[D];
        memcpy(qv, Q[l][hq][t], sizeof qv);
        kvg_rope_ref(qv, D, D, 0, 10000.0f, t);
        double lg[N], m = -INFINITY, sum = 0, acc[D] = { 0 };
        for (int j = 0; j <= t; j++) {
            memcpy(kr, K[l][h][j], sizeof kr);
            kvg_rope_ref(kr, D, D, 0, 10000.0f, j);
            double s = 0;
            for (int i = 0; i < D; i++)
                s += (double)qv[i] * kr[i];
            lg[j] = s / sqrt((double)D);
            m = lg[j] > m ? lg[j] : m;
        }
        for (int j = 0; j <= t; j++) {
            double w = exp(lg[j] - m);
            sum += w;
            for (int i = 0; i < D; i++)
                acc[i] += w * V[l][h][j][i];
        }
        for (int i = 0; i < D; i++)
            out[hq * D + i] = (float)(acc[i] / sum);
    }
}

static float rel_err(const float *a, const float *b, size_t n)
{
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        num += (double)(a[i] - b[i]) * (a[i] - b[i]);
        den += (double)b[i] * b[i];
    }
    return (float)sqrt(num / (den + 1e-30));
}

/* The relative error of cv's attention of token t (the last appended) on
 * layer l against full attention; 1e9 if the call fails. */
static float attend_err(kvarc_conv *cv, int l, int t)
{
    float qb[QH * D], out[QH * D], ref[QH * D];
    for (int hq = 0; hq < QH; hq++)
        memcpy(qb + hq * D, Q[l][hq][t], D * 4);
    int rc = kvarc_attend(cv, (uint32_t)l, qb, 1, out);
    if (rc) {
        fprintf(stderr, "attend layer %d token %d: %s\n", l, t, kvarc_errmsg(cv));
        return 1e9f;
    }
    full_attention(l, t, ref);
    return rel_err(out, ref, QH * D);
}

/* The writer: create t/talk and append token after token to every layer;
 * once the batch ending at KILL_AT is acknowledged for layers 0 and 1,
 * write one byte to fd and wait to be killed. */
static int writer(const char *data_dir, int fd)
{
    kvarc_client *cl;
    kvarc_conv *cv;
    kvarc_options o = options();
    o.append_together = 0;     /* an Append per layer: the writer can die between them */
    if (kvarc_client_open(data_dir, NULL, NULL, &cl))
        return 2;
    if (kvarc_conv_create(cl, "t", "talk", &model, &o, NULL, &cv)) {
        fprintf(stderr, "writer: create: %s\n", kvarc_client_errmsg(cl));
        return 2;
    }
    for (int t = 0; t < KILL_AT; t++)
        for (int l = 0; l < L; l++) {
            if (append_token(cv, l, t, 0)) {
                fprintf(stderr, "writer: append layer %d token %d: %s\n", l, t, kvarc_errmsg(cv));
                return 2;
            }
            if (t == KILL_AT - 1 && l == 1) {      /* layers 0, 1 at 80 in kvarcd, 2, 3 at 64 */
                if (write(fd, "k", 1) != 1)
                    return 2;
                for (;;)
                    pause();
            }
        }
    return 2;
}

/* Every layer's length in kvarcd (and the conversation's id when id is
 * not NULL); 0 on success. */
static int layer_lengths(kvc_conn *c, const char *name, uint64_t *len, uint64_t *id)
{
    Kvarc__V1__OpenRequest r = KVARC__V1__OPEN_REQUEST__INIT;
    r.ns = "t";
    r.name = (char *)name;
    ProtobufCMessage *rep = NULL;
    char msg[256];
    int st = kvc_call(c, "Open", &r.base, &kvarc__v1__conv_reply__descriptor, &rep, 0, msg, sizeof msg);
    if (st) {
        fprintf(stderr, "Open %s: %s\n", name, msg);
        return st;
    }
    Kvarc__V1__ConvInfo *info = ((Kvarc__V1__ConvReply *)rep)->info;
    int bad = info->n_layer_lengths != L;
    for (size_t l = 0; !bad && l < L; l++)
        len[l] = info->layer_lengths[l];
    if (id)
        *id = info->id;
    protobuf_c_message_free_unpacked(rep, NULL);
    return bad;
}

/* The stored bytes of records [0, n) of (layer, head) into out (malloc'd,
 * *bytes long); 0 on success. */
static int fetch_records(kvc_conn *c, uint64_t conv, uint32_t layer, uint32_t head, uint64_t n, uint8_t **out,
                         size_t *bytes)
{
    uint64_t pos[N];
    for (uint64_t i = 0; i < n; i++)
        pos[i] = i;
    Kvarc__V1__FetchReply *f = NULL;
    char msg[256];
    int st = rpc_fetch(c, conv, layer, head, pos, n, &f, msg);
    if (st) {
        fprintf(stderr, "Fetch layer %u head %u: %s\n", layer, head, msg);
        return st;
    }
    *bytes = f->records.len;
    *out = malloc(f->records.len);
    if (*out)
        memcpy(*out, f->records.data, f->records.len);
    protobuf_c_message_free_unpacked(&f->base, NULL);
    return *out ? 0 : -ENOMEM;
}

static int test_takeover(kvc_conn *probe)
{
    /* the writer: this executable again, so no gRPC state crosses fork() */
    int pfd[2];
    CHECK_RC(pipe(pfd), 0);
    pid_t w = fork();
    if (w == 0) {
        char fds[16];
        close(pfd[0]);
        snprintf(fds, sizeof fds, "%d", pfd[1]);
        execl("/proc/self/exe", "test_libkvarc_takeover", "writer", dir, fds, (char *)NULL);
        _exit(127);
    }
    close(pfd[1]);
    struct pollfd pf = { pfd[0], POLLIN, 0 };
    char b = 0;
    int ready = poll(&pf, 1, 120000) == 1 && read(pfd[0], &b, 1) == 1 && b == 'k';   /* a failure guard */
    close(pfd[0]);
    CHECK(ready, "the writer reached the point between layers (see its messages above)");
    if (!ready) {
        kill(w, SIGKILL);
        waitpid(w, NULL, 0);
        return 1;
    }
    uint64_t len[L] = { 0 }, want[L] = { KILL_AT, KILL_AT, COMMON, COMMON }, conv_id = 0;
    CHECK_RC(layer_lengths(probe, "talk", len, &conv_id), 0);
    CHECK(!memcmp(len, want, sizeof len), "the writer is between layers: lengths %llu %llu %llu %llu",
          (unsigned long long)len[0], (unsigned long long)len[1], (unsigned long long)len[2],
          (unsigned long long)len[3]);
    /* what kvarcd acknowledged, as first written */
    static uint8_t *first[L][H];
    static size_t first_bytes[L][H];
    for (int l = 0; l < L; l++)
        for (int h = 0; h < H; h++)
            CHECK_RC(fetch_records(probe, conv_id, (uint32_t)l, (uint32_t)h, want[l], &first[l][h],
                                   &first_bytes[l][h]), 0);
    CHECK_RC(kill(w, SIGKILL), 0);
    int st = 0;
    CHECK(waitpid(w, &st, 0) == w && WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL, "the writer died of SIGKILL");
    if (tu_failures)
        return 1;

    kvarc_client *cl;
    CHECK_RC(kvarc_client_open(dir, NULL, NULL, &cl), 0);
    kvarc_options o = options();

    /* a taker with a wrong transcript: attached at the common length, its
     * fork is there too, and its tokens are refused where layers hold others */
    kvarc_conv *bad = NULL;
    int rc = kvarc_conv_attach(cl, "t", "talk", &model, &o, &bad);
    CHECK(rc == 0, "attach after the writer died between layers: %d %s", rc, kvarc_client_errmsg(cl));
    if (rc)
        goto out;
    for (int l = 0; l < L; l++)
        CHECK(kvarc_length(bad, (uint32_t)l) == COMMON, "layer %d attached at %llu, the common length %d", l,
              (unsigned long long)kvarc_length(bad, (uint32_t)l), COMMON);
    CHECK_RC(kvarc_fork(bad, "t", "talk-fork", 0), 0);
    uint64_t flen[L];
    CHECK_RC(layer_lengths(probe, "talk-fork", flen, NULL), 0);
    for (int l = 0; l < L; l++)
        CHECK(flen[l] == COMMON, "the fork taken right after attach has layer %d at %llu", l,
              (unsigned long long)flen[l]);
    rc = 0;
    for (int t = COMMON; t < KILL_AT && !rc; t++)
        rc = append_token(bad, 0, t, 1);
    CHECK(rc == -EILSEQ && strstr(kvarc_errmsg(bad), "differs from the one a previous writer archived"),
          "a different token where layer 0 holds one is refused: %d %s", rc, kvarc_errmsg(bad));
    CHECK(kvarc_conv_close(bad) == -EILSEQ, "closing the refused taker fails the same way");
    CHECK_RC(layer_lengths(probe, "talk", len, NULL), 0);
    CHECK(!memcmp(len, want, sizeof len), "the refused taker changed nothing");

    /* fast-tier takers (kvarc_options.fast_tier: block summaries only; the signatures loaded are
     * the unfinished block's and the re-fed range's): the right tokens pass the check without an
     * Append and attend equal to full attention (stage 1b in kvarcd over the whole cold range), a
     * wrong one is refused */
    {
        kvarc_options of = o;
        of.fast_tier = 1;
        kvarc_conv *ft = NULL, *fb = NULL;
        CHECK_RC(kvarc_conv_attach(cl, "t", "talk", &model, &of, &ft), 0);
        int frc = ft ? 0 : -1;
        for (int t = COMMON; t < KILL_AT && !frc; t++)
            for (int l = 0; l < 2 && !frc; l++)
                frc = append_token(ft, l, t, 0);
        CHECK(frc == 0, "fast-tier taker: re-fed tokens of layers 0 and 1 pass: %d %s", frc,
              ft ? kvarc_errmsg(ft) : "");
        if (ft && !frc) {
            CHECK_RC(kvarc_conv_sync(ft), 0);
            kvarc_stats fs;
            kvarc_conv_stats(ft, &fs);
            CHECK(fs.archived == 0, "fast-tier taker: what layers held was checked, not sent (%llu sent)",
                  (unsigned long long)fs.archived);
            for (int l = 0; l < 2; l++) {
                float e = attend_err(ft, l, KILL_AT - 1);
                CHECK(e < 2e-5f, "fast-tier taker: layer %d relative error %.3g vs full attention", l, e);
            }
        }
        if (ft)
            kvarc_conv_close(ft);
        CHECK_RC(kvarc_conv_attach(cl, "t", "talk", &model, &of, &fb), 0);
        frc = fb ? 0 : -1;
        for (int t = COMMON; t < KILL_AT && !frc; t++)
            frc = append_token(fb, 0, t, 1);
        CHECK(frc == -EILSEQ, "fast-tier taker: a different token where layer 0 holds one is refused: %d %s", frc,
              fb ? kvarc_errmsg(fb) : "");
        if (fb)
            kvarc_conv_close(fb);
        CHECK_RC(layer_lengths(probe, "talk", len, NULL), 0);
        CHECK(!memcmp(len, want, sizeof len), "the fast-tier takers changed nothing");
    }

    /* the real taker: the same tokens from the common length on */
    kvarc_conv *tk = NULL;
    rc = kvarc_conv_attach(cl, "t", "talk", &model, &o, &tk);
    CHECK(rc == 0, "second attach: %s", kvarc_client_errmsg(cl));
    if (rc)
        goto out;
    float worst = 0;
    for (int t = COMMON; t < N; t++)
        for (int l = 0; l < L; l++) {
            rc = append_token(tk, l, t, 0);
            CHECK(rc == 0, "taker append layer %d token %d: %s", l, t, kvarc_errmsg(tk));
            if (t == COMMON || t == KILL_AT - 1 || t == KILL_AT + 7 || t == N - 1) {
                float e = attend_err(tk, l, t);
                worst = e > worst ? e : worst;
                CHECK(e < 2e-5f, "taker: token %d layer %d relative error %.3g vs full attention", t, l, e);
            }
        }
    CHECK_RC(kvarc_conv_sync(tk), 0);
    kvarc_stats s;
    kvarc_conv_stats(tk, &s);
    uint64_t sent = 2 * (N - KILL_AT) + 2 * (N - COMMON);
    CHECK(s.archived == sent, "the taker sent %llu (token, layer) records, want %llu: what layers held was not "
          "sent again", (unsigned long long)s.archived, (unsigned long long)sent);
    CHECK_RC(layer_lengths(probe, "talk", len, NULL), 0);
    for (int l = 0; l < L; l++)
        CHECK(len[l] == N, "after the taker's sync layer %d holds %llu, want %d", l, (unsigned long long)len[l], N);
    CHECK_RC(kvarc_conv_close(tk), 0);
    for (int l = 0; l < L; l++)
        for (int h = 0; h < H; h++) {
            uint8_t *now = NULL;
            size_t nb = 0;
            CHECK_RC(fetch_records(probe, conv_id, (uint32_t)l, (uint32_t)h, want[l], &now, &nb), 0);
            CHECK(now && nb == first_bytes[l][h] && !memcmp(now, first[l][h], nb),
                  "layer %d head %d: the %llu records stored before the kill are unchanged", l, h,
                  (unsigned long long)want[l]);
            free(now);
        }

    /* a fresh attach reads all of it back: sinks, cold records, hot window */
    kvarc_conv *rd = NULL;
    CHECK_RC(kvarc_conv_attach(cl, "t", "talk", &model, &o, &rd), 0);
    if (rd) {
        for (int l = 0; l < L; l++) {
            CHECK(kvarc_length(rd, (uint32_t)l) == N, "reattached layer %d at %llu", l,
                  (unsigned long long)kvarc_length(rd, (uint32_t)l));
            float e = attend_err(rd, l, N - 1);
            CHECK(e < 2e-5f, "reattached: layer %d relative error %.3g vs full attention", l, e);
        }
        CHECK_RC(kvarc_conv_close(rd), 0);
    }
    printf("  takeover at %d (layers held %d %d %d %d): worst relative error %.3g, %llu records sent\n", COMMON,
           KILL_AT, KILL_AT, COMMON, COMMON, worst, (unsigned long long)s.archived);
out:
    for (int l = 0; l < L; l++)
        for (int h = 0; h < H; h++)
            free(first[l][h]);
    kvarc_client_close(cl);
    return tu_failures != 0;
}

int main(int argc, char **argv)
{
    gen_data();
    if (argc == 4 && !strcmp(argv[1], "writer"))
        return writer(argv[2], atoi(argv[3]));
    eu_tmpdir(dir, sizeof dir, "takeover");
    pid_t pid = start_daemon();
    kvc_conn *probe;
    CHECK_RC(kvc_connect(dir, &probe), 0);
    CHECK(wait_ready(probe), "kvarcd ready");
    if (!tu_failures)
        test_takeover(probe);
    kvc_close(probe);
    kill(pid, SIGTERM);
    CHECK(wait_exit(pid, 10000) == 0, "kvarcd exits 0");
    if (!tu_failures) {
        char log[300];
        snprintf(log, sizeof log, "%s.log", dir);
        unlink(log);
        eu_rmrf(dir);
    }
    return tu_finish("test_libkvarc_takeover");
}
