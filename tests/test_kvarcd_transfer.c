/* test_kvarcd_transfer: kvarc export on one kvarcd, kvarc import on another
 * (another data directory), and what comes back is the conversation bit
 * for bit: shape, means, every layer's length, and for every layer and KV
 * head every record, signature and block summary (present or not), also
 * after a compaction of the importing archive. The source is a fork of a
 * fork (flattened by the export), written in appends of uneven sizes,
 * some with summaries and some without, so that sections are cut where
 * summaries start and stop. Damaged files are refused, naming the section,
 * and leave no conversation behind: truncated at many offsets, a flipped
 * byte in every section (payload and header), a newer file version, a
 * foreign file. An import whose client goes away, and one whose kvarcd is
 * killed, leave nothing (the stage is deleted, or swept at the restart). */
#include <fcntl.h>
#include <unistd.h>

#include "kvarcd_util.h"
#include "testutil.h"
#include "xfile.h"

#define LAYERS 3
#define HEADS  2
#define D      128
#define RB     104

static char dir_a[256], dir_b[256];

/* Create ns/name with non-zero means; its id. */
static uint64_t create_means(kvc_conn *c, const char *ns, const char *name)
{
    Kvarc__V1__CreateRequest r = KVARC__V1__CREATE_REQUEST__INIT;
    Kvarc__V1__Shape s = shape_pb(D);
    s.n_layers = LAYERS;
    s.n_kv_heads = HEADS;
    s.seed = 0x5eed1234abcdULL;
    float means[LAYERS * HEADS * 2 * D];
    for (size_t i = 0; i < sizeof means / sizeof *means; i++)
        means[i] = (float)((int)(i * 37 % 101) - 50) / 64.0f;
    r.ns = (char *)ns;
    r.name = (char *)name;
    r.shape = &s;
    r.n_means = sizeof means / sizeof *means;
    r.means = means;
    ProtobufCMessage *rep = NULL;
    char msg[256];
    uint64_t id = 0;
    if (!kvc_call(c, "Create", &r.base, &kvarc__v1__conv_reply__descriptor, &rep, 0, msg, sizeof msg)) {
        id = ((Kvarc__V1__ConvReply *)rep)->info->id;
        protobuf_c_message_free_unpacked(rep, NULL);
    } else {
        fprintf(stderr, "create %s/%s: %s\n", ns, name, msg);
    }
    return id;
}

/* Append count tokens at first of layer, content tag; with summaries of the blocks it completes when sums. */
static int append_block(kvc_conn *c, uint64_t conv, uint32_t layer, uint64_t first, uint32_t count, uint64_t tag,
                        int sums)
{
    kvd_shape s = eu_shape(LAYERS, HEADS, KVARC_FMT_Q3);
    size_t n = (size_t)HEADS * count, ns = kvarc_block_n_sum(first, count);
    uint8_t *bits = malloc(n * 16), *recs = malloc(n * RB), *sb = malloc(HEADS * ns * 2 * 16 + 1);
    uint16_t *sc = malloc(n * 2), *ss = malloc(HEADS * ns * 2 * 2 + 2);
    eu_fill(&s, tag, layer, first, count, bits, sc, recs);
    for (size_t i = 0; i < HEADS * ns * 2 * 16; i++)
        sb[i] = eu_byte(tag, layer, 7, first, 3000 + i);
    for (size_t i = 0; i < HEADS * ns * 2; i++)
        ss[i] = (uint16_t)(0x3c00 + eu_byte(tag, layer, 9, first, i));      /* ~1.0: a plausible scale */
    Kvarc__V1__AppendRequest r = KVARC__V1__APPEND_REQUEST__INIT;
    r.conv = conv;
    r.layer = layer;
    r.first_pos = first;
    r.count = count;
    r.sig_bits.data = bits;
    r.sig_bits.len = n * 16;
    r.sig_scale.data = (uint8_t *)sc;
    r.sig_scale.len = n * 2;
    r.records.data = recs;
    r.records.len = n * RB;
    if (sums && ns) {
        r.sum_bits.data = sb;
        r.sum_bits.len = HEADS * ns * 2 * 16;
        r.sum_scale.data = (uint8_t *)ss;
        r.sum_scale.len = HEADS * ns * 2 * 2;
    }
    ProtobufCMessage *rep = NULL;
    char msg[256];
    int st = kvc_call(c, "Append", &r.base, &kvarc__v1__append_reply__descriptor, &rep, 0, msg, sizeof msg);
    if (st)
        fprintf(stderr, "append layer %u [%llu, +%u): %s\n", layer, (unsigned long long)first, count, msg);
    else
        protobuf_c_message_free_unpacked(rep, NULL);
    free(bits);
    free(recs);
    free(sc);
    free(sb);
    free(ss);
    return st;
}

/* Every observable byte of a conversation, in one buffer: shape and means
 * (Open), layer lengths, every record (Fetch), signature (LoadSignatures)
 * and summary with its presence (LoadSummaries). */
typedef struct dump {
    uint8_t *p;
    size_t   n, cap;
} dump;

static void put(dump *d, const void *p, size_t n)
{
    if (d->n + n > d->cap) {
        d->cap = (d->n + n) * 2;
        d->p = realloc(d->p, d->cap);
    }
    memcpy(d->p + d->n, p, n);
    d->n += n;
}

static int dump_conv(kvc_conn *c, const char *ns, const char *name, dump *d, uint64_t *length)
{
    char msg[256];
    Kvarc__V1__OpenRequest o = KVARC__V1__OPEN_REQUEST__INIT;
    o.ns = (char *)ns;
    o.name = (char *)name;
    o.with_means = 1;
    ProtobufCMessage *rep = NULL;
    if (kvc_call(c, "Open", &o.base, &kvarc__v1__conv_reply__descriptor, &rep, 0, msg, sizeof msg)) {
        fprintf(stderr, "open %s/%s: %s\n", ns, name, msg);
        return -1;
    }
    Kvarc__V1__ConvReply *cr = (Kvarc__V1__ConvReply *)rep;
    Kvarc__V1__Shape *s = cr->info->shape;
    uint64_t conv = cr->info->id, len = cr->info->length;
    *length = len;
    uint32_t f[9] = { s->n_layers, s->n_kv_heads, s->n_q_heads, s->head_dim, s->format, s->pos_mode, s->rope_layout,
                      s->dtype, s->rotary_dims };
    put(d, f, sizeof f);
    put(d, &s->rope_theta, 4);
    put(d, &s->seed, 8);
    put(d, s->fingerprint, strlen(s->fingerprint) + 1);
    put(d, &len, 8);
    put(d, cr->means, cr->n_means * 4);
    uint32_t nl = s->n_layers, nh = s->n_kv_heads;
    protobuf_c_message_free_unpacked(rep, NULL);
    int bad = 0;
    for (uint32_t l = 0; l < nl && !bad; l++)
        for (uint32_t h = 0; h < nh && !bad; h++) {
            for (uint64_t p0 = 0; p0 < len && !bad; p0 += 1000) {      /* records */
                uint64_t pos[1000];
                size_t n = len - p0 < 1000 ? (size_t)(len - p0) : 1000;
                for (size_t i = 0; i < n; i++)
                    pos[i] = p0 + i;
                Kvarc__V1__FetchReply *fr = NULL;
                if (rpc_fetch(c, conv, l, h, pos, n, &fr, msg)) {
                    fprintf(stderr, "fetch: %s\n", msg);
                    bad = 1;
                } else {
                    put(d, fr->records.data, fr->records.len);
                    protobuf_c_message_free_unpacked(&fr->base, NULL);
                }
            }
            Kvarc__V1__LoadSummariesRequest sr = KVARC__V1__LOAD_SUMMARIES_REQUEST__INIT;   /* summaries */
            sr.conv = conv;
            sr.layer = l;
            sr.head = h;
            rep = NULL;
            if (len >= 64 && kvc_call(c, "LoadSummaries", &sr.base, &kvarc__v1__load_summaries_reply__descriptor,
                                      &rep, 0, msg, sizeof msg)) {
                fprintf(stderr, "summaries: %s\n", msg);
                bad = 1;
            } else if (rep) {
                Kvarc__V1__LoadSummariesReply *s2 = (Kvarc__V1__LoadSummariesReply *)rep;
                put(d, s2->bits.data, s2->bits.len);
                put(d, s2->scales.data, s2->scales.len);
                put(d, s2->present.data, s2->present.len);
                protobuf_c_message_free_unpacked(rep, NULL);
            }
        }
    for (uint32_t l = 0; l < nl && !bad; l++) {                    /* signatures */
        Kvarc__V1__LoadSignaturesRequest lr = KVARC__V1__LOAD_SIGNATURES_REQUEST__INIT;
        lr.conv = conv;
        lr.layer = l;
        kvc_stream *st;
        if (kvc_sstream_open(c, "LoadSignatures", &lr.base, 0, &st))
            return -1;
        ProtobufCMessage *m;
        while (kvc_sstream_next(st, &kvarc__v1__sig_chunk__descriptor, &m) == 1) {
            Kvarc__V1__SigChunk *ch = (Kvarc__V1__SigChunk *)m;
            put(d, &ch->head, 4);
            put(d, &ch->first_pos, 8);
            put(d, ch->bits.data, ch->bits.len);
            put(d, ch->scales.data, ch->scales.len);
            protobuf_c_message_free_unpacked(m, NULL);
        }
        if (kvc_stream_finish(st, &kvarc__v1__empty__descriptor, NULL, msg, sizeof msg)) {
            fprintf(stderr, "signatures: %s\n", msg);
            bad = 1;
        }
    }
    return bad ? -1 : 0;
}

static int same_conv(kvc_conn *a, const char *ans, const char *aname, kvc_conn *b, const char *bns,
                     const char *bname, uint64_t *len)
{
    dump x = { 0 }, y = { 0 };
    uint64_t la = 0, lb = 0;
    int ok = !dump_conv(a, ans, aname, &x, &la) && !dump_conv(b, bns, bname, &y, &lb) && x.n == y.n &&
             !memcmp(x.p, y.p, x.n) && la == lb;
    if (!ok)
        fprintf(stderr, "%s/%s: %zu bytes (%llu tokens), %s/%s: %zu bytes (%llu tokens)\n", ans, aname, x.n,
                (unsigned long long)la, bns, bname, y.n, (unsigned long long)lb);
    *len = la;
    free(x.p);
    free(y.p);
    return ok;
}

static uint8_t *read_file(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    *n = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *p = malloc(*n + 1);
    if (fread(p, 1, *n, f) != *n) {
        free(p);
        p = NULL;
    }
    fclose(f);
    return p;
}

static void write_file(const char *path, const uint8_t *p, size_t n)
{
    FILE *f = fopen(path, "wb");
    if (f) {
        fwrite(p, 1, n, f);
        fclose(f);
    }
}

/* kvarc import FILE NS/NAME on B: exit code and stderr's text. */
static int import_cli(const char *file, const char *conv, char *err, size_t len)
{
    char cmd[1200], path[300];
    snprintf(path, sizeof path, "%s.err", dir_b);
    snprintf(cmd, sizeof cmd, "%s --data %s import %s %s >/dev/null 2>%s", KD_CLI, dir_b, file, conv, path);
    int st = system(cmd);
    size_t n = 0;
    uint8_t *e = read_file(path, &n);
    snprintf(err, len, "%.*s", e ? (int)n : 0, e ? (char *)e : "");
    free(e);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* Conversations B holds (every namespace, stages included). */
static long b_count(kvc_conn *b)
{
    int pages;
    return list_all(b, NULL, 100, &pages);
}

/* Wait until B's conversation count is n (at most 30 s); 1 if it came. */
static int b_wait_count(kvc_conn *b, long n)
{
    for (long end = kd_now_ms() + 30000; kd_now_ms() < end; kd_sleep_ms(20))
        if (b_count(b) == n)
            return 1;
    return 0;
}

int main(void)
{
    eu_tmpdir(dir_a, sizeof dir_a, "transfer-a");
    eu_tmpdir(dir_b, sizeof dir_b, "transfer-b");
    char msg[256], out[4096], file[300], bad[300], err[2048];
    snprintf(file, sizeof file, "%s.kvx", dir_a);
    snprintf(bad, sizeof bad, "%s.bad.kvx", dir_a);
    snprintf(dir, sizeof dir, "%s", dir_a);
    pid_t pa = start_daemon();
    snprintf(dir, sizeof dir, "%s", dir_b);
    pid_t pb = start_daemon();
    kvc_conn *a, *b;
    CHECK_RC(kvc_connect(dir_a, &a), 0);
    CHECK_RC(kvc_connect(dir_b, &b), 0);
    snprintf(dir, sizeof dir, "%s", dir_a);
    CHECK(wait_ready(a), "kvarcd A ready");
    snprintf(dir, sizeof dir, "%s", dir_b);
    CHECK(wait_ready(b), "kvarcd B ready");
    if (tu_failures)
        goto out;

    /* 1. the source: base, a fork of it (child), a fork of that (grand), each written on */
    uint64_t base = create_means(a, "src", "base");
    CHECK(base, "create src/base");
    static const uint32_t sizes[] = { 100, 28, 300, 64, 1, 250, 577, 190 };   /* uneven: blocks straddle */
    for (uint32_t l = 0; l < LAYERS; l++) {
        uint64_t p = 0;
        for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
            CHECK_RC(append_block(a, base, l, p, sizes[i], 1, i % 3 != 1), 0);   /* some without summaries */
            p += sizes[i];
        }
    }
    snprintf(dir, sizeof dir, "%s", dir_a);
    Kvarc__V1__ForkRequest fr = KVARC__V1__FORK_REQUEST__INIT;
    fr.src_ns = "src";
    fr.src_name = "base";
    fr.at_len = 1000;
    fr.has_at_len = 1;
    fr.dst_ns = "src";
    fr.dst_name = "child";
    ProtobufCMessage *rep = NULL;
    CHECK_RC(kvc_call(a, "Fork", &fr.base, &kvarc__v1__conv_reply__descriptor, &rep, 0, msg, sizeof msg), 0);
    uint64_t child = rep ? ((Kvarc__V1__ConvReply *)rep)->info->id : 0;
    if (rep)
        protobuf_c_message_free_unpacked(rep, NULL);
    for (uint32_t l = 0; l < LAYERS; l++)
        CHECK_RC(append_block(a, child, l, 1000, 700, 2, l != 1), 0);
    fr.src_name = "child";
    fr.at_len = 1500;
    fr.dst_name = "grand";
    rep = NULL;
    CHECK_RC(kvc_call(a, "Fork", &fr.base, &kvarc__v1__conv_reply__descriptor, &rep, 0, msg, sizeof msg), 0);
    uint64_t grand = rep ? ((Kvarc__V1__ConvReply *)rep)->info->id : 0;
    if (rep)
        protobuf_c_message_free_unpacked(rep, NULL);
    for (uint32_t l = 0; l < LAYERS; l++)
        CHECK_RC(append_block(a, grand, l, 1500, 333, 3, 1), 0);
    if (tu_failures)
        goto out;

    /* 2. export (sections of at most 20000 bytes: many), import on B, compare everything */
    char args[600];
    snprintf(args, sizeof args, "export src/grand %s --section-bytes 20000", file);
    CHECK(cli(out, sizeof out, args) == 0, "kvarc export: %s", out);
    CHECK(cli(out, sizeof out, args) == 2, "a second export to the same file is refused (it exists)");
    CHECK(import_cli(file, "dst/copy", err, sizeof err) == 0, "kvarc import: %s", err);
    uint64_t len = 0;
    CHECK(same_conv(a, "src", "grand", b, "dst", "copy", &len), "dst/copy on B is src/grand on A, every byte");
    CHECK(len == 1833, "the flattened length: %llu", (unsigned long long)len);
    CHECK(import_cli(file, "dst/copy", err, sizeof err) == 1 && strstr(err, "already exists"),
          "importing over an existing conversation is refused: %s", err);
    /* the compaction of B keeps the published conversation (a fork of its deleted stage) */
    snprintf(dir, sizeof dir, "%s", dir_b);
    CHECK(cli(out, sizeof out, "compact --threshold 1") == 0, "compact B");
    CHECK(same_conv(a, "src", "grand", b, "dst", "copy", &len), "the same after B's compaction");
    long n0 = b_count(b);
    CHECK(n0 == 1, "B holds one conversation: %ld", n0);

    /* 3. damaged files: refused, naming the section, nothing left behind */
    size_t fn = 0;
    uint8_t *orig = read_file(file, &fn), *copy = malloc(fn + 16);
    CHECK(orig && fn > 100000, "the export file: %zu bytes", fn);
    if (!orig)
        goto out;
    /* the sections' offsets, by the spec */
    size_t offs[4096], nsec = 0;
    for (size_t at = KVX_PREAMBLE; at + KVX_HEADER <= fn && nsec < 4096;) {
        kvx_header h;
        if (kvx_header_decode(orig + at, &h))
            break;
        offs[nsec++] = at;
        at += KVX_HEADER + h.payload_bytes;
    }
    CHECK(nsec > 20, "%zu sections", nsec);
    /* truncated */
    size_t cuts[] = { 0, 5, KVX_PREAMBLE, KVX_PREAMBLE + 7, offs[1] + 3, offs[nsec / 2] + KVX_HEADER + 100,
                      offs[nsec - 1], fn - 1 };
    uint64_t seed = 77;
    for (size_t i = 0; i < sizeof cuts / sizeof *cuts + 4; i++) {
        size_t cut = i < sizeof cuts / sizeof *cuts ? cuts[i] : (size_t)(kvarc_splitmix64(&seed) % fn);
        write_file(bad, orig, cut);
        int rc = import_cli(bad, "dst/trunc", err, sizeof err);
        CHECK(rc == 1 && (strstr(err, "truncated") || strstr(err, "ends at byte")),
              "a file cut at %zu of %zu is refused as truncated (exit %d): %s", cut, fn, rc, err);
        CHECK(b_wait_count(b, 1), "nothing left after the file cut at %zu", cut);
    }
    /* a flipped byte in every section's payload, and in its header */
    for (size_t s = 0; s < nsec; s++) {
        size_t end = s + 1 < nsec ? offs[s + 1] : fn;
        for (int in_header = 0; in_header < 2; in_header++) {
            memcpy(copy, orig, fn);
            size_t at = in_header ? offs[s] + 5 + s % 20 : offs[s] + KVX_HEADER + (end - offs[s] - KVX_HEADER) / 2;
            copy[at] ^= 0x10;
            write_file(bad, copy, fn);
            char want[64];
            snprintf(want, sizeof want, "section %zu ", s);
            int rc = import_cli(bad, "dst/flip", err, sizeof err);
            CHECK(rc == 1 && strstr(err, want) && strstr(err, in_header ? "header" : "checksum"),
                  "a flip at byte %zu (section %zu's %s) is refused naming it: %s", at, s,
                  in_header ? "header" : "payload", err);
        }
    }
    CHECK(b_wait_count(b, 1), "nothing left after the flipped files");
    /* a newer version, a foreign file, bytes after the end */
    memcpy(copy, orig, fn);
    copy[8] = 2;
    uint32_t crc = kvarc_crc32c(0, copy, 12);
    memcpy(copy + 12, &crc, 4);
    write_file(bad, copy, fn);
    CHECK(import_cli(bad, "dst/future", err, sizeof err) == 1 && strstr(err, "version 2"),
          "a version-2 file is refused: %s", err);
    write_file(bad, (const uint8_t *)"#!/bin/sh\necho this is not an export\n", 38);
    CHECK(import_cli(bad, "dst/foreign", err, sizeof err) == 1 && strstr(err, "not a kvarc export file"),
          "a foreign file is refused: %s", err);
    memcpy(copy, orig, fn);
    memcpy(copy + fn, orig + offs[nsec - 1], 16);
    write_file(bad, copy, fn + 16);
    CHECK(import_cli(bad, "dst/tail", err, sizeof err) == 1 && strstr(err, "after the end"),
          "bytes after the end section are refused: %s", err);
    CHECK(b_wait_count(b, 1), "nothing left after the refused files");

    /* 4. a client that goes away mid-import, and a kvarcd killed mid-import */
    for (int kill9 = 0; kill9 < 2; kill9++) {
        kvc_stream *st;
        CHECK_RC(kvc_stream_open(b, "Import", 60000, &st), 0);
        Kvarc__V1__ImportRequest r = KVARC__V1__IMPORT_REQUEST__INIT;
        r.ns = "dst";
        r.name = "half";
        r.data.data = orig;
        r.data.len = offs[nsec / 2];
        CHECK_RC(kvc_stream_send(st, &r.base), 0);
        CHECK(b_wait_count(b, 2), "the stage appears while the import runs");
        snprintf(dir, sizeof dir, "%s", dir_b);
        CHECK(cli(out, sizeof out, "ls dst") == 0 && strstr(out, ".import-") && !strstr(out, " half "),
              "it is a stage, not dst/half: %s", out);
        if (!kill9) {
            kvc_stream_cancel(st);
            CHECK(b_wait_count(b, 1), "a client gone: the stage is deleted");
        } else {
            kill(pb, SIGKILL);
            CHECK(wait_exit(pb, 30000) == -2, "kvarcd B killed");
            kvc_stream_cancel(st);
            kvc_close(b);
            pb = start_daemon();
            CHECK_RC(kvc_connect(dir_b, &b), 0);
            CHECK(wait_ready(b), "kvarcd B back");
            CHECK(b_count(b) == 1, "the stage a crash left is swept at the start: %ld", b_count(b));
            char log[300];
            snprintf(log, sizeof log, "%s.log", dir_b);
            snprintf(args, sizeof args, "grep -q 'removed 1 unfinished import' %s", log);
            CHECK(system(args) == 0, "the log says it removed one unfinished import");
        }
    }
    CHECK(same_conv(a, "src", "grand", b, "dst", "copy", &len), "dst/copy unchanged through all of it");
    free(orig);
    free(copy);
    unlink(bad);

out:
    unlink(file);
    kvc_close(a);
    kvc_close(b);
    kill(pa, SIGTERM);
    kill(pb, SIGTERM);
    CHECK(wait_exit(pa, 30000) == 0 && wait_exit(pb, 30000) == 0, "both kvarcd stop cleanly");
    if (!tu_failures) {
        snprintf(dir, sizeof dir, "%s", dir_a);
        kd_remove_dir();
        snprintf(dir, sizeof dir, "%s", dir_b);
        kd_remove_dir();
    }
    return tu_finish("test_kvarcd_transfer");
}
