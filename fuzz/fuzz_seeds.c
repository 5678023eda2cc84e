/* fuzz_seeds - writes the seed corpora (fuzz/corpus/<target>/) from real
 * data: requests packed with protobuf-c for every method, segment files
 * and export files made by the engine, records and signatures made by the
 * encoder, token files in the documented format. Deterministic: running it
 * again gives the same files. Usage: fuzz_seeds SRC_DIR (the repository
 * root; tools/dev fuzz-seeds runs it). */
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz_util.h"
#include "kvarc.pb-c.h"
#include "kvg.h"
#include "rpc_call.h"
#include "transfer.h"

static char root[1024];

static void seed(const char *target, const char *name, uint8_t flag, const uint8_t *b, size_t n, int with_flag)
{
    char p[2048];
    snprintf(p, sizeof p, "%s/fuzz/corpus/%s", root, target);
    mkdir(p, 0755);
    snprintf(p, sizeof p, "%s/fuzz/corpus/%s/%s", root, target, name);
    uint8_t *o = malloc(n + 1);
    size_t k = 0;
    if (with_flag)
        o[k++] = flag;
    memcpy(o + k, b, n);
    if (fz_write_file(p, o, n + k, 0644))
        fz_die("write", p);
    free(o);
}

/* ---- fuzz_rpc: a request per method ------------------------------------- */

static int method_index(const char *name)
{
    for (size_t i = 0; i < rpc_nmethods; i++)
        if (!strcmp(rpc_methods[i].name, name))
            return (int)i;
    fz_die("no method", name);
    return -1;
}

static void rpc_seed(const char *method, const char *tag, const ProtobufCMessage *m)
{
    size_t n = m ? protobuf_c_message_get_packed_size(m) : 0;
    uint8_t *b = malloc(n + 1);
    if (m)
        protobuf_c_message_pack(m, b);
    char name[128];
    snprintf(name, sizeof name, "%s%s%s", method, tag ? "-" : "", tag ? tag : "");
    seed("fuzz_rpc", name, (uint8_t)method_index(method), b, n, 1);
    free(b);
}

static void rpc_seeds(void)
{
    static float q[4 * 64];
    uint64_t st = 7;
    for (size_t i = 0; i < sizeof q / sizeof q[0]; i++)
        q[i] = (float)(kvarc_splitmix64(&st) % 2001) / 1000.0f - 1.0f;
    Kvarc__V1__Empty empty = KVARC__V1__EMPTY__INIT;
    rpc_seed("Health", NULL, &empty.base);
    rpc_seed("Stats", NULL, &empty.base);
    rpc_seed("Metrics", NULL, &empty.base);
    rpc_seed("Verify", NULL, &empty.base);

    Kvarc__V1__Shape sh = KVARC__V1__SHAPE__INIT;
    sh.n_layers = 2, sh.n_kv_heads = 2, sh.n_q_heads = 4, sh.head_dim = 64, sh.format = 1, sh.pos_mode = 2;
    sh.dtype = 1, sh.rotary_dims = 64, sh.rope_theta = 10000.0f, sh.seed = 99, sh.fingerprint = "fuzz-model";
    Kvarc__V1__CreateRequest cr = KVARC__V1__CREATE_REQUEST__INIT;
    cr.ns = "fz", cr.name = "new", cr.shape = &sh;
    rpc_seed("Create", NULL, &cr.base);
    static float means[2 * 2 * 2 * 64];
    cr.n_means = sizeof means / sizeof means[0], cr.means = means;
    rpc_seed("Create", "means", &cr.base);

    Kvarc__V1__OpenRequest op = KVARC__V1__OPEN_REQUEST__INIT;
    op.ns = "fz", op.name = "a", op.with_means = 1;
    rpc_seed("Open", NULL, &op.base);
    Kvarc__V1__StatRequest sr = KVARC__V1__STAT_REQUEST__INIT;
    sr.id = 1;
    rpc_seed("Stat", NULL, &sr.base);
    Kvarc__V1__ListRequest lr = KVARC__V1__LIST_REQUEST__INIT;
    lr.ns = "fz", lr.after = "a", lr.limit = 2;
    rpc_seed("List", NULL, &lr.base);
    Kvarc__V1__DeleteRequest dr = KVARC__V1__DELETE_REQUEST__INIT;
    dr.ns = "fz", dr.name = "c";
    rpc_seed("Delete", NULL, &dr.base);
    Kvarc__V1__ForkRequest fr = KVARC__V1__FORK_REQUEST__INIT;
    fr.src_ns = "fz", fr.src_name = "a", fr.at_len = 40, fr.has_at_len = 1, fr.dst_ns = "fz", fr.dst_name = "d";
    rpc_seed("Fork", NULL, &fr.base);
    fr.has_at_len = 0, fr.dst_name = "snap";
    rpc_seed("Snapshot", NULL, &fr.base);
    fr.src_name = "snap", fr.dst_name = "back";
    rpc_seed("Restore", NULL, &fr.base);

    /* fz/c: q4, 2 heads of 64: 4 tokens at 0 */
    int rb = kvarc_record_bytes(KVARC_FMT_Q4, 64);
    static uint8_t bits[2 * 70 * 8], recs[2 * 70 * 200], scales[2 * 70 * 2], sbits[2 * 2 * 8], sscale[2 * 2 * 2];
    for (size_t i = 0; i < sizeof bits; i++)
        bits[i] = (uint8_t)kvarc_splitmix64(&st);
    for (size_t i = 0; i < sizeof recs; i++)
        recs[i] = (uint8_t)kvarc_splitmix64(&st);
    for (size_t i = 0; i < sizeof scales; i += 2)
        scales[i] = 0, scales[i + 1] = 0x3c;              /* fp16 1.0 */
    Kvarc__V1__AppendRequest ap = KVARC__V1__APPEND_REQUEST__INIT;
    ap.conv = 3, ap.layer = 0, ap.first_pos = 0, ap.count = 4;
    ap.sig_bits = (ProtobufCBinaryData){ 2 * 4 * 8, bits };
    ap.sig_scale = (ProtobufCBinaryData){ 2 * 4 * 2, scales };
    ap.records = (ProtobufCBinaryData){ 2 * 4 * (size_t)rb, recs };
    rpc_seed("Append", NULL, &ap.base);
    rpc_seed("AppendStream", NULL, &ap.base);
    /* fz/a at 80 (q3): 4 tokens completing no block; fz/b at 62..66 would need 70: summaries at 64 */
    Kvarc__V1__AppendRequest ap2 = ap;
    ap2.conv = 1, ap2.first_pos = 80, ap2.count = 50;
    rb = kvarc_record_bytes(KVARC_FMT_Q3, 64);
    ap2.sig_bits = (ProtobufCBinaryData){ 2 * 50 * 8, bits };
    ap2.sig_scale = (ProtobufCBinaryData){ 2 * 50 * 2, scales };
    ap2.records = (ProtobufCBinaryData){ 2 * 50 * (size_t)rb, recs };
    ap2.sum_bits = (ProtobufCBinaryData){ 2 * 1 * 2 * 8, sbits };
    ap2.sum_scale = (ProtobufCBinaryData){ 2 * 1 * 2 * 2, sscale };
    rpc_seed("Append", "sums", &ap2.base);
    Kvarc__V1__AppendManyRequest am = KVARC__V1__APPEND_MANY_REQUEST__INIT;
    Kvarc__V1__AppendRequest ap3 = ap;
    ap3.layer = 1;
    Kvarc__V1__AppendRequest *blocks[2] = { &ap, &ap3 };
    am.conv = 3, am.n_blocks = 2, am.blocks = blocks;
    rpc_seed("AppendMany", NULL, &am.base);

    uint64_t pos[5] = { 0, 5, 63, 64, 79 };
    Kvarc__V1__FetchRequest fe = KVARC__V1__FETCH_REQUEST__INIT;
    fe.conv = 1, fe.layer = 0, fe.head = 1, fe.n_positions = 5, fe.positions = pos;
    rpc_seed("Fetch", NULL, &fe.base);
    uint64_t sl[12] = { 0, 1, 2, 3, 10, 20, 30, 40, 50, 60, 64, 69 };
    Kvarc__V1__RerankRequest rr = KVARC__V1__RERANK_REQUEST__INIT;
    rr.conv = 1, rr.layer = 0, rr.head = 0, rr.n_queries = 2, rr.n_query = 128, rr.query = q;
    rr.n_shortlist = 12, rr.shortlist = sl, rr.top_k = 4;
    rpc_seed("Rerank", NULL, &rr.base);
    rr.conv = 2, rr.layer = 1, rr.head = 1;
    rpc_seed("Rerank", "truepos", &rr.base);
    Kvarc__V1__RerankItem it = KVARC__V1__RERANK_ITEM__INIT, it2 = KVARC__V1__RERANK_ITEM__INIT;
    it.head = 0, it.n_queries = 2, it.n_query = 128, it.query = q, it.n_shortlist = 12, it.shortlist = sl;
    it.top_k = 3, it.n_have = 2, it.have = sl;
    uint64_t runs[4] = { 0, 32, 40, 30 };
    float rbias[4] = { 0.5f, -0.25f, 0.0f, 1.0f };
    it2.head = 1, it2.n_queries = 2, it2.n_query = 128, it2.query = q, it2.top_k = 2, it2.n_runs = 4, it2.runs = runs;
    it2.shortlist_len = 8, it2.n_run_bias = 4, it2.run_bias = rbias;
    Kvarc__V1__RerankItem *items[2] = { &it, &it2 };
    Kvarc__V1__RerankLayerRequest rl = KVARC__V1__RERANK_LAYER_REQUEST__INIT;
    rl.conv = 1, rl.layer = 1, rl.n_items = 1, rl.items = items;
    rpc_seed("RerankLayer", NULL, &rl.base);
    rl.n_items = 2;
    rpc_seed("RerankLayer", "runs", &rl.base);
    rl.conv = 2, rl.stage1_mode = 1, rl.stage1_combine = 1;
    rpc_seed("RerankLayer", "truepos", &rl.base);
    Kvarc__V1__SearchRequest se = KVARC__V1__SEARCH_REQUEST__INIT;
    se.conv = 1, se.layer = 0, se.head = 1, se.n_queries = 2, se.n_query = 128, se.query = q, se.k = 8;
    rpc_seed("Search", NULL, &se.base);
    se.conv = 2, se.mode = 1, se.combine = 1;
    rpc_seed("Search", "truepos", &se.base);
    Kvarc__V1__LoadSummariesRequest ls = KVARC__V1__LOAD_SUMMARIES_REQUEST__INIT;
    ls.conv = 1, ls.layer = 0, ls.head = 1;
    rpc_seed("LoadSummaries", NULL, &ls.base);
    Kvarc__V1__LoadSignaturesRequest lg = KVARC__V1__LOAD_SIGNATURES_REQUEST__INIT;
    lg.conv = 2, lg.layer = 1, lg.first = 3, lg.chunk_tokens = 16;
    rpc_seed("LoadSignatures", NULL, &lg.base);
    Kvarc__V1__ExportRequest ex = KVARC__V1__EXPORT_REQUEST__INIT;
    ex.ns = "fz", ex.name = "b", ex.section_bytes = 4096;
    rpc_seed("Export", NULL, &ex.base);
    Kvarc__V1__CompactRequest co = KVARC__V1__COMPACT_REQUEST__INIT;
    co.threshold = 0.9f;
    rpc_seed("Compact", NULL, &co.base);
}

/* ---- engine-made files: a segment, export files --------------------------- */

static uint8_t *slurp(const char *p, size_t *n)
{
    FILE *f = fopen(p, "rb");
    if (!f)
        fz_die("open", p);
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *b = malloc((size_t)len + 1);
    if (fread(b, 1, (size_t)len, f) != (size_t)len)
        fz_die("read", p);
    fclose(f);
    *n = (size_t)len;
    return b;
}

static void engine_seeds(void)
{
    char dir[256], p[512];
    fz_tmpdir(dir, sizeof dir, "seeds");
    kvd_options o = { .dir = dir, .map_size = 64u << 20, .segment_bytes = 1u << 20 };
    kvd_engine *e;
    kvd_err err;
    kvd_conv_info a, b, f;
    if (kvd_open(&o, &e, &err))
        fz_die("kvd_open", err.msg);
    /* small: a q3 conversation of 6 tokens in two blocks, an f16 one of 3, a
     * fork, a deleted conversation, and a block with summaries (62..66) */
    kvd_shape s = fz_shape(KVARC_FMT_Q3, KVARC_POS_REMAPPED);
    s.n_layers = 1;
    if (kvd_conv_create(e, "fz", "a", &s, NULL, &a, &err) || fz_append(e, &a, 0, 4, &err) ||
        fz_append(e, &a, 4, 2, &err))
        fz_die("a", err.msg);
    s = fz_shape(KVARC_FMT_F16, KVARC_POS_TRUE);
    s.n_layers = 1;
    s.n_kv_heads = 1;
    s.n_q_heads = 2;
    if (kvd_conv_create(e, "fz", "b", &s, NULL, &b, &err) || fz_append(e, &b, 0, 3, &err))
        fz_die("b", err.msg);
    if (kvd_conv_fork(e, "fz", "a", 4, "fz", "fork", 0, &f, &err) ||
        kvd_conv_create(e, "fz", "gone", &s, NULL, &f, &err) || kvd_conv_delete(e, "fz", "gone", &err))
        fz_die("fork/delete", err.msg);
    kvd_shape s2 = fz_shape(KVARC_FMT_I8, KVARC_POS_REMAPPED);
    s2.n_layers = 1;
    s2.n_kv_heads = 1;
    kvd_conv_info c;
    if (kvd_conv_create(e, "fz", "sums", &s2, NULL, &c, &err) || fz_append(e, &c, 0, 62, &err))
        fz_die("sums", err.msg);
    {
        int rb = kvarc_record_bytes(KVARC_FMT_I8, 64);
        uint8_t bits[4 * 8] = { 1, 2, 3 }, recs[4 * 200] = { 0 }, sb[2 * 8] = { 9, 8, 7 };
        uint16_t sc[4] = { 0x3c00, 0x3c00, 0x3c00, 0x3c00 }, ss[2] = { 0x3c00, 0x4000 };
        (void)rb;
        if (kvd_append_sums(e, c.id, 0, 62, 4, bits, sc, recs, sb, ss, &err))
            fz_die("append_sums", err.msg);
    }
    /* export files of a and b: small sections so there are several */
    kvd_reader *r;
    if (kvd_reader_open(e, &r, &err))
        fz_die("reader", err.msg);
    const kvd_conv_info *xs[2] = { &a, &b };
    for (int i = 0; i < 2; i++) {
        kvd_export *x;
        uint8_t *file = NULL;
        size_t n = 0;
        if (kvd_export_open(e, r, xs[i]->id, 4096, &x, &err))
            fz_die("export", err.msg);
        for (;;) {
            const uint8_t *piece;
            size_t len;
            if (kvd_export_next(x, &piece, &len, &err))
                fz_die("export_next", err.msg);
            if (!len)
                break;
            file = realloc(file, n + len);
            memcpy(file + n, piece, len);
            n += len;
        }
        kvd_export_close(x);
        char name[32];
        snprintf(name, sizeof name, "export-%s", i ? "b" : "a");
        seed("fuzz_export", name, 0, file, n, 1);
        snprintf(name, sizeof name, "export-%s-cut", i ? "b" : "a");
        seed("fuzz_export", name, 6, file, n, 1);          /* three pieces */
        if (!i) {           /* the first message of an Import stream, for fuzz_rpc */
            Kvarc__V1__ImportRequest im = KVARC__V1__IMPORT_REQUEST__INIT;
            im.ns = "fz", im.name = "imp", im.data = (ProtobufCBinaryData){ n, file };
            size_t pn = protobuf_c_message_get_packed_size(&im.base);
            uint8_t *pk = malloc(pn);
            protobuf_c_message_pack(&im.base, pk);
            seed("fuzz_rpc", "Import", (uint8_t)method_index("Import"), pk, pn, 1);
            free(pk);
        }
        free(file);
    }
    kvd_reader_close(r);
    kvd_close(e);
    /* the segment file(s) */
    snprintf(p, sizeof p, "%s/segments", dir);
    DIR *d = opendir(p);
    struct dirent *de;
    int k = 0;
    while (d && (de = readdir(d))) {
        if (!strstr(de->d_name, ".seg"))
            continue;
        char f2[1024];
        snprintf(f2, sizeof f2, "%s/segments/%s", dir, de->d_name);
        size_t n;
        uint8_t *bytes = slurp(f2, &n);
        char name[32];
        snprintf(name, sizeof name, "segment-%d", k++);
        seed("fuzz_segment", name, 0, bytes, n, 1);
        seed("fuzz_block", name, 0, bytes, n, 1);
        snprintf(name, sizeof name, "segment-%d-open", k - 1);
        seed("fuzz_segment", name, 4 | 8, bytes, n, 1);
        /* the first block alone */
        kvarc_block_header h;
        if (n >= KVARC_BLOCK_HEADER && !kvarc_block_header_decode(bytes, &h)) {
            snprintf(name, sizeof name, "block-%d", k - 1);
            seed("fuzz_block", name, 0, bytes, KVARC_BLOCK_HEADER + h.payload_bytes, 1);
        }
        free(bytes);
    }
    if (d)
        closedir(d);
    fz_rmrf(dir);
}

/* ---- fuzz_codec: records and signatures from the encoder --------------------- */

static void codec_seeds(void)
{
    static const int dims[] = { 64, 128, 256 };
    static float k[8 * 256], v[8 * 256];
    static uint8_t in[11 + 8 * 1100], bits[8 * 32];
    uint16_t sc[8];
    uint64_t st = 3;
    for (size_t i = 0; i < sizeof k / sizeof k[0]; i++) {
        k[i] = (float)(kvarc_splitmix64(&st) % 2001) / 500.0f - 2.0f;
        v[i] = (float)(kvarc_splitmix64(&st) % 2001) / 500.0f - 2.0f;
    }
    for (int fmt = 1; fmt <= 5; fmt++)
        for (int di = 0; di < 3; di++) {
            int d = dims[di], rb = kvarc_record_bytes(fmt, d);
            kvarc_rotation rot;
            kvarc_rotation_init(&rot, d, 77);
            kvg_codec c = { fmt, &rot, NULL, NULL };
            size_t n = d == 256 ? 3 : 6;
            if (kvg_encode_ref(&c, KVARC_DTYPE_F32, k, v, n, in + 11, bits, sc, NULL))
                fz_die("encode", "codec seed");
            in[0] = (uint8_t)(fmt - 1), in[1] = (uint8_t)di, in[2] = (uint8_t)(fmt * 37 + di * 5);
            memset(in + 3, 0, 8);
            in[3] = 77;                 /* the same rotation seed: the records decode to k, v */
            char name[32];
            snprintf(name, sizeof name, "rec-f%d-d%d", fmt, d);
            seed("fuzz_codec", name, 0, in, 11 + n * (size_t)rb, 0);
            if (fmt == 1) {             /* signatures of the same keys */
                size_t per = (size_t)d / 8 + 2;
                for (size_t j = 0; j < n; j++) {
                    memcpy(in + 11 + j * per, bits + j * (size_t)d / 8, (size_t)d / 8);
                    in[11 + j * per + (size_t)d / 8] = (uint8_t)sc[j];
                    in[11 + j * per + (size_t)d / 8 + 1] = (uint8_t)(sc[j] >> 8);
                }
                in[1] = (uint8_t)(0x80 | di);
                snprintf(name, sizeof name, "sig-d%d", d);
                seed("fuzz_codec", name, 0, in, 11 + n * per, 0);
            }
        }
}

static void token_seeds(void)
{
    static const char *files[] = {
        "# TOKEN                          NAMESPACES (comma-separated) or *\n"
        "4f1c0e8a9b2d47e6a1c3b5d7e9f01234  team-a,shared\n"
        "9a8b7c6d5e4f30211203f4e5d6c7b8a9  *\n",
        "\n   # indented comment\r\nabcdefghijklmnop\tns1\r\n",
        "0123456789abcdef0123456789abcdef a,b,c,d,e,f,g,h\n0123456789abcdef0123456789abcdee *",
    };
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        char name[16];
        snprintf(name, sizeof name, "tokens-%zu", i);
        seed("fuzz_tokens", name, 0, (const uint8_t *)files[i], strlen(files[i]), 0);
    }
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: fuzz_seeds SRC_DIR\n");
        return 2;
    }
    snprintf(root, sizeof root, "%s", argv[1]);
    char p[1100];
    snprintf(p, sizeof p, "%s/fuzz/corpus", root);
    mkdir(p, 0755);
    rpc_seeds();
    engine_seeds();
    codec_seeds();
    token_seeds();
    return 0;
}
