/* test_kvarcd: a real kvarcd process on a unix socket, driven through the
 * client transport: every conversation RPC end to end, each error with its
 * gRPC status and message (malformed bytes, oversized message, unknown
 * method, wrong shape, unknown ids, name clashes) with the daemon staying
 * up; several client processes at once, each appending to its own fork of
 * one shared prefix while reading that prefix back bit-exact; a second daemon on the same
 * directory refused; kill -9 and restart keep what was acknowledged;
 * SIGTERM exits 0. */
#include "kvarcd_util.h"
#include "kvg.h"

/* Stream blocks [from, to) of 20 tokens each into layer 0 of conv; with
 * bad_at >= 0 the block at that index has wrong sizes. */
static int rpc_stream(kvc_conn *c, uint64_t conv, int from, int to, int bad_at, int cancel_at,
                      uint64_t *len, uint64_t *blocks, char *msg)
{
    kvc_stream *st;
    if (kvc_stream_open(c, "AppendStream", 0, &st))
        return -1;
    for (int b = from; b < to; b++) {
        if (b == cancel_at) {
            kvc_stream_cancel(st);
            return GRPC_STATUS_CANCELLED;
        }
        if (stream_block(st, conv, b, 77, b == bad_at))
            break;                   /* the server ended the call: finish says why */
    }
    return stream_end(st, len, blocks, msg);
}

/* LoadSignatures of layer 0 of conv; checks every chunk against tag's
 * signatures; returns the status (100: content differs), chunks counted. */
static int rpc_load_sigs(kvc_conn *c, uint64_t conv, uint64_t first, uint64_t count, uint32_t chunk,
                         uint64_t tag, int *chunks, uint64_t *tokens, char *msg)
{
    Kvarc__V1__LoadSignaturesRequest r = KVARC__V1__LOAD_SIGNATURES_REQUEST__INIT;
    r.conv = conv;
    r.first = first;
    r.count = count;
    r.chunk_tokens = chunk;
    kvc_stream *st;
    if (kvc_sstream_open(c, "LoadSignatures", &r.base, 0, &st))
        return -1;
    ProtobufCMessage *m;
    int bad = 0;
    *chunks = 0;
    *tokens = 0;
    while (kvc_sstream_next(st, &kvarc__v1__sig_chunk__descriptor, &m) == 1) {
        Kvarc__V1__SigChunk *ch = (Kvarc__V1__SigChunk *)m;
        bad |= ch->bits.len != ch->count * 16u || ch->scales.len != ch->count * 2u;
        for (uint32_t t = 0; !bad && t < ch->count; t++) {
            uint64_t p = ch->first_pos + t;
            for (int b = 0; b < 16; b++)
                bad |= ch->bits.data[t * 16 + b] != eu_byte(tag, 0, ch->head, p, 1000 + (size_t)b);
            bad |= ch->scales.data[2 * t] != eu_byte(tag, 0, ch->head, p, 2000);
        }
        (*chunks)++;
        *tokens += ch->count;
        protobuf_c_message_free_unpacked(m, NULL);
    }
    int status = kvc_stream_finish(st, &kvarc__v1__empty__descriptor, NULL, msg, 256);
    return status ? status : bad ? 100 : 0;
}

static void count_progress(void *arg, uint64_t done, uint64_t total)
{
    uint64_t *p = arg;
    p[0]++;
    p[1] = done;
    p[2] = total;
}

/* A client process: 25 creates and opens in namespace "many"; then it
 * forks shared/base (200 tokens of tag 50 in every layer) into shared/pP,
 * appends 10 blocks of its own (tag 60 + P) and, between appends, reads
 * both the shared prefix and its own tokens back, bit-exact. */
static int client_main(int p, const char *d)
{
    kvc_conn *cc;
    char m[256], name[32];
    if (kvc_connect(d, &cc))
        return 2;
    for (int i = 0; i < 25; i++) {
        snprintf(name, sizeof name, "p%d-%d", p, i);
        if (create(cc, "many", name, 128, m, NULL) || open_conv(cc, "many", name, NULL, m)) {
            fprintf(stderr, "client %d: %s: %s\n", p, name, m);
            return 3;
        }
    }
    Kvarc__V1__ForkRequest fr = KVARC__V1__FORK_REQUEST__INIT;
    fr.src_ns = fr.dst_ns = "shared";
    fr.src_name = "base";
    snprintf(name, sizeof name, "p%d", p);
    fr.dst_name = name;
    ProtobufCMessage *rep = NULL;
    if (kvc_call(cc, "Fork", &fr.base, &kvarc__v1__conv_reply__descriptor, &rep, 0, m, sizeof m)) {
        fprintf(stderr, "client %d: fork: %s\n", p, m);
        return 4;
    }
    uint64_t id = ((Kvarc__V1__ConvReply *)rep)->info->id, len = 0;
    protobuf_c_message_free_unpacked(rep, NULL);
    for (int b = 0; b < 10; b++) {
        uint64_t shared[3] = { (uint64_t)b, 100 + (uint64_t)b * 7, 199 }, own[2] = { 200, 200 + (uint64_t)b * 20 + 19 };
        int st = rpc_append(cc, id, 0, 200 + (uint64_t)b * 20, 20, 60 + (uint64_t)p, 0, &len, m);
        if (st || len != 220 + (uint64_t)b * 20 || rpc_fetch_check(cc, id, 0, (uint32_t)b % 2, shared, 3, 50, m) ||
            rpc_fetch_check(cc, id, 0, (uint32_t)b % 2, own, 2, 60 + (uint64_t)p, m)) {
            fprintf(stderr, "client %d: block %d: status %d, length %llu: %s\n", p, b, st, (unsigned long long)len, m);
            return 5;
        }
    }
    kvc_close(cc);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 4 && !strcmp(argv[1], "--client"))
        return client_main(atoi(argv[2]), argv[3]);
    const char *self = argv[0];
    eu_tmpdir(dir, sizeof dir, "kvarcd");
    pid_t pid = start_daemon();
    kvc_conn *c;
    CHECK_RC(kvc_connect(dir, &c), 0);
    CHECK(wait_ready(c), "kvarcd did not become ready");
    if (tu_failures) {
        kill(pid, SIGKILL);
        return tu_finish("test_kvarcd");
    }
    char msg[256];
    uint64_t id = 0;

    /* conversations and their errors */
    CHECK_RC(create(c, "t", "alpha", 128, msg, &id), GRPC_STATUS_OK);
    CHECK_RC(create(c, "t", "alpha", 128, msg, NULL), GRPC_STATUS_ALREADY_EXISTS);
    CHECK_RC(create(c, "t", "bad96", 96, msg, NULL), GRPC_STATUS_INVALID_ARGUMENT);
    CHECK(strstr(msg, "head_dim 96") != NULL, "bad head_dim message: %s", msg);
    CHECK_RC(create(c, "t", "bad/name", 128, msg, NULL), GRPC_STATUS_INVALID_ARGUMENT);
    Kvarc__V1__Shape other = shape_pb(64);
    CHECK_RC(open_conv(c, "t", "alpha", &other, msg), GRPC_STATUS_FAILED_PRECONDITION);
    CHECK(strstr(msg, "head_dim 128") && strstr(msg, "sends 64"), "mismatch message: %s", msg);
    Kvarc__V1__Shape same = shape_pb(128);
    CHECK_RC(open_conv(c, "t", "alpha", &same, msg), GRPC_STATUS_OK);
    CHECK_RC(open_conv(c, "t", "ghost", NULL, msg), GRPC_STATUS_NOT_FOUND);
    CHECK(strstr(msg, "t/ghost") != NULL, "not-found message: %s", msg);
    {
        Kvarc__V1__CreateRequest r = KVARC__V1__CREATE_REQUEST__INIT;
        Kvarc__V1__Shape s = shape_pb(128);
        float means[3] = { 0, 0, 0 };
        r.ns = "t";
        r.name = "m";
        r.shape = &s;
        r.means = means;
        r.n_means = 3;
        CHECK_RC(kvc_call(c, "Create", &r.base, &kvarc__v1__conv_reply__descriptor, NULL, 0, msg, sizeof msg),
                 GRPC_STATUS_INVALID_ARGUMENT);
        CHECK(strstr(msg, "means has 3 values") != NULL, "means message: %s", msg);
    }
    {
        Kvarc__V1__StatRequest r = KVARC__V1__STAT_REQUEST__INIT;
        r.id = id;
        ProtobufCMessage *rep = NULL;
        CHECK_RC(kvc_call(c, "Stat", &r.base, &kvarc__v1__conv_reply__descriptor, &rep, 0, msg, sizeof msg), 0);
        if (rep) {
            Kvarc__V1__ConvReply *cr = (Kvarc__V1__ConvReply *)rep;
            CHECK(!strcmp(cr->info->name, "alpha") && cr->info->shape->head_dim == 128 &&
                  !strcmp(cr->info->shape->fingerprint, "tiny-llama"), "stat reply");
            protobuf_c_message_free_unpacked(rep, NULL);
        }
        r.id = 999999;
        CHECK_RC(kvc_call(c, "Stat", &r.base, &kvarc__v1__conv_reply__descriptor, NULL, 0, msg, sizeof msg),
                 GRPC_STATUS_NOT_FOUND);
    }
    /* records: append, fetch, rerank, stats, verify, compact */
    {
        uint64_t len = 0, pos[200];
        for (int b = 0; b < 10; b++)
            CHECK_RC(rpc_append(c, id, 1, (uint64_t)b * 50, 50, 5, 0, &len, msg), 0);
        CHECK(len == 500, "durable length %llu", (unsigned long long)len);
        CHECK_RC(rpc_append(c, id, 1, 500, 10, 5, 1, NULL, msg), GRPC_STATUS_INVALID_ARGUMENT);
        CHECK(strstr(msg, "needs") != NULL, "size message: %s", msg);
        CHECK_RC(rpc_append(c, id, 1, 777, 10, 5, 0, NULL, msg), GRPC_STATUS_INVALID_ARGUMENT);
        CHECK(strstr(msg, "500 tokens") != NULL, "gap message: %s", msg);
        CHECK_RC(rpc_append(c, id, 9, 0, 10, 5, 0, NULL, msg), GRPC_STATUS_INVALID_ARGUMENT);
        CHECK_RC(rpc_append(c, 987654, 0, 0, 10, 5, 0, NULL, msg), GRPC_STATUS_NOT_FOUND);
        for (int i = 0; i < 200; i++)
            pos[i] = (uint64_t)(i * 37 % 500);
        CHECK_RC(rpc_fetch_check(c, id, 1, 1, pos, 200, 5, msg), 0);
        CHECK_RC(rpc_fetch_check(c, id, 1, 0, pos, 0, 5, msg), 0);
        pos[3] = 500;
        CHECK_RC(rpc_fetch_check(c, id, 1, 0, pos, 5, 5, msg), GRPC_STATUS_INVALID_ARGUMENT);
        CHECK(strstr(msg, "past the end") != NULL, "past-end message: %s", msg);
        CHECK_RC(rpc_fetch_check(c, id, 1, 2, pos, 2, 5, msg), GRPC_STATUS_INVALID_ARGUMENT);
        uint64_t *many = calloc(100000, sizeof *many);
        CHECK_RC(rpc_fetch_check(c, id, 1, 0, many, 100000, 5, msg), GRPC_STATUS_RESOURCE_EXHAUSTED);
        free(many);

        Kvarc__V1__RerankRequest rr = KVARC__V1__RERANK_REQUEST__INIT;
        float q[128];
        for (int i = 0; i < 128; i++)
            q[i] = (float)((i * 7) % 11) - 5.0f;
        uint64_t sl[64];
        for (int i = 0; i < 64; i++)
            sl[i] = (uint64_t)(i * 7);
        rr.conv = id;
        rr.layer = 1;
        rr.head = 0;
        rr.n_queries = 1;
        rr.query = q;
        rr.n_query = 128;
        rr.shortlist = sl;
        rr.n_shortlist = 64;
        rr.top_k = 8;
        ProtobufCMessage *rep = NULL;
        CHECK_RC(kvc_call(c, "Rerank", &rr.base, &kvarc__v1__rerank_reply__descriptor, &rep, 0, msg, sizeof msg), 0);
        if (rep) {
            Kvarc__V1__RerankReply *rk = (Kvarc__V1__RerankReply *)rep;
            CHECK(rk->n_positions == 8 && rk->records.len == 8 * 104, "rerank reply sizes");
            int same = 1;
            for (size_t i = 0; i < rk->n_positions && same; i++)
                for (int b = 0; b < 104; b++)
                    same &= rk->records.data[i * 104 + b] == eu_byte(5, 1, 0, rk->positions[i], (size_t)b);
            CHECK(same, "reranked records are the records of their positions");
            protobuf_c_message_free_unpacked(rep, NULL);
        }
        rr.n_query = 100;
        CHECK_RC(kvc_call(c, "Rerank", &rr.base, &kvarc__v1__rerank_reply__descriptor, NULL, 0, msg, sizeof msg),
                 GRPC_STATUS_INVALID_ARGUMENT);

        Kvarc__V1__Empty e0 = KVARC__V1__EMPTY__INIT;
        rep = NULL;
        CHECK_RC(kvc_call(c, "Stats", &e0.base, &kvarc__v1__stats_reply__descriptor, &rep, 0, msg, sizeof msg), 0);
        if (rep) {
            CHECK(((Kvarc__V1__StatsReply *)rep)->tokens == 500, "stats tokens %llu",
                  (unsigned long long)((Kvarc__V1__StatsReply *)rep)->tokens);
            protobuf_c_message_free_unpacked(rep, NULL);
        }
        Kvarc__V1__JobEvent *ev = NULL;
        uint64_t prog[3] = { 0, 0, 0 };      /* events, last done, last total */
        CHECK_RC(kvc_job(c, "Verify", &e0.base, 0, count_progress, prog, &ev, msg, sizeof msg), 0);
        CHECK(prog[0] >= 1 && prog[1] <= prog[2] && prog[2] > 0, "verify streams progress: %llu events, %llu of %llu",
              (unsigned long long)prog[0], (unsigned long long)prog[1], (unsigned long long)prog[2]);
        if (ev) {
            CHECK(ev->verify && ev->verify->problems == 0 && ev->verify->records == 1000, "verify over the service");
            protobuf_c_message_free_unpacked(&ev->base, NULL);
        }
        Kvarc__V1__CompactRequest cr = KVARC__V1__COMPACT_REQUEST__INIT;
        cr.threshold = 2.0f;
        CHECK_RC(kvc_job(c, "Compact", &cr.base, 0, NULL, NULL, &ev, msg, sizeof msg), GRPC_STATUS_INVALID_ARGUMENT);
        cr.threshold = 0.5f;
        CHECK_RC(kvc_job(c, "Compact", &cr.base, 0, NULL, NULL, &ev, msg, sizeof msg), 0);
        if (ev) {
            CHECK(ev->compact != NULL, "compact's last event carries its result");
            protobuf_c_message_free_unpacked(&ev->base, NULL);
        }
    }
    /* AppendStream: 0, 1 and many messages, a bad block mid-stream, a cancel */
    {
        uint64_t sid = 0, len = 99, blocks = 99, pos[4] = { 0, 19, 250, 399 };
        CHECK_RC(create(c, "t", "streamed", 128, msg, &sid), 0);
        CHECK_RC(rpc_stream(c, sid, 0, 0, -1, -1, &len, &blocks, msg), 0);
        CHECK(blocks == 0 && len == 0, "empty stream: %llu blocks, length %llu", (unsigned long long)blocks,
              (unsigned long long)len);
        CHECK_RC(rpc_stream(c, sid, 0, 1, -1, -1, &len, &blocks, msg), 0);
        CHECK(blocks == 1 && len == 20, "one-message stream");
        CHECK_RC(rpc_stream(c, sid, 1, 20, -1, -1, &len, &blocks, msg), 0);
        CHECK(blocks == 19 && len == 400, "19-message stream: %llu blocks, length %llu",
              (unsigned long long)blocks, (unsigned long long)len);
        CHECK_RC(rpc_fetch_check(c, sid, 0, 1, pos, 4, 77, msg), 0);
        CHECK_RC(rpc_stream(c, sid, 20, 30, 24, -1, &len, &blocks, msg), GRPC_STATUS_INVALID_ARGUMENT);
        CHECK(strstr(msg, "4 earlier block(s)") != NULL, "mid-stream error message: %s", msg);
        uint64_t after[1] = { 24 * 20 - 1 }, past[1] = { 24 * 20 };
        CHECK_RC(rpc_fetch_check(c, sid, 0, 0, after, 1, 77, msg), 0);
        CHECK_RC(rpc_fetch_check(c, sid, 0, 0, past, 1, 77, msg), GRPC_STATUS_INVALID_ARGUMENT);
        CHECK_RC(rpc_stream(c, sid, 24, 40, -1, 30, &len, &blocks, msg), GRPC_STATUS_CANCELLED);
        CHECK(wait_ready(c), "daemon down after a cancelled stream");
        /* LoadSignatures of what the streams stored: 480 tokens x 2 heads */
        int chunks;
        uint64_t toks;
        CHECK_RC(rpc_load_sigs(c, sid, 0, 0, 0, 77, &chunks, &toks, msg), 0);
        /* 480 tokens, plus whatever blocks the cancelled stream delivered before
         * its cancel (each durable on receipt) */
        CHECK(chunks == 2 && toks >= 960 && toks <= 1200 && toks % 40 == 0, "whole layer: %d chunks, %llu tokens",
              chunks, (unsigned long long)toks);
        CHECK_RC(rpc_load_sigs(c, sid, 15, 300, 64, 77, &chunks, &toks, msg), 0);
        CHECK(chunks == 10 && toks == 600, "range in chunks of 64: %d chunks, %llu tokens", chunks,
              (unsigned long long)toks);
        CHECK_RC(rpc_load_sigs(c, sid, 400, 5000, 0, 77, &chunks, &toks, msg), GRPC_STATUS_INVALID_ARGUMENT);
        CHECK(strstr(msg, "past the end") != NULL, "LoadSignatures past the end: %s", msg);
        CHECK_RC(rpc_load_sigs(c, 424242, 0, 0, 0, 77, &chunks, &toks, msg), GRPC_STATUS_NOT_FOUND);
        CHECK_RC(rpc_load_sigs(c, id, 0, 0, 0, 77, &chunks, &toks, msg), 0);
        CHECK(chunks == 0 && toks == 0, "an empty layer streams no message");
        Kvarc__V1__Empty e0 = KVARC__V1__EMPTY__INIT;
        Kvarc__V1__JobEvent *ev = NULL;
        CHECK_RC(kvc_job(c, "Verify", &e0.base, 0, NULL, NULL, &ev, msg, sizeof msg), 0);
        if (ev) {
            CHECK(ev->verify && ev->verify->problems == 0, "verify after streams");
            protobuf_c_message_free_unpacked(&ev->base, NULL);
        }
    }
    /* Search: stage 1 inside kvarcd equals the same scan done here, and finds a needle */
    {
        uint64_t nid = 0;
        CHECK_RC(create(c, "t", "needle", 128, msg, &nid), 0);
        enum { NT = 2048 };
        tu_rng rng = { 5150 };
        float *k = malloc(sizeof(float) * 2 * NT * 128), *v = calloc(2 * NT * 128, sizeof(float)), q[2 * 128];
        tu_keys_outliers(&rng, k, 2 * NT, 128);
        for (int i = 0; i < 2 * 128; i++)
            q[i] = tu_gauss(&rng);
        for (int i = 0; i < 128; i++)           /* head 1, token 1234 */
            k[((size_t)NT + 1234) * 128 + i] = 4.0f * q[128 + i];
        kvarc_rotation rot;
        kvarc_rotation_init(&rot, 128, 42);
        kvg_codec cd = { KVARC_FMT_Q3, &rot, NULL, NULL };
        uint8_t *recs = malloc((size_t)2 * NT * 104), *bits = malloc((size_t)2 * NT * 16);
        uint16_t *ss = malloc((size_t)2 * NT * 2);
        CHECK_RC(kvg_encode_ref(&cd, KVARC_DTYPE_F32, k, v, 2 * NT, recs, bits, ss, NULL), 0);
        Kvarc__V1__AppendRequest ar = KVARC__V1__APPEND_REQUEST__INIT;
        ar.conv = nid;
        ar.count = NT;
        ar.sig_bits.data = bits;
        ar.sig_bits.len = (size_t)2 * NT * 16;
        ar.sig_scale.data = (uint8_t *)ss;
        ar.sig_scale.len = (size_t)2 * NT * 2;
        ar.records.data = recs;
        ar.records.len = (size_t)2 * NT * 104;
        CHECK_RC(kvc_call(c, "Append", &ar.base, &kvarc__v1__append_reply__descriptor, NULL, 0, msg, sizeof msg), 0);
        Kvarc__V1__SearchRequest sr = KVARC__V1__SEARCH_REQUEST__INIT;
        sr.conv = nid;
        sr.head = 1;
        sr.n_queries = 2;
        sr.query = q;
        sr.n_query = 256;
        sr.k = 32;
        ProtobufCMessage *rep = NULL;
        CHECK_RC(kvc_call(c, "Search", &sr.base, &kvarc__v1__search_reply__descriptor, &rep, 0, msg, sizeof msg), 0);
        if (rep) {
            Kvarc__V1__SearchReply *sp = (Kvarc__V1__SearchReply *)rep;
            kvg_query qq[2];
            kvg_query_prep_ref(&rot, NULL, KVARC_DTYPE_F32, q, &qq[0]);
            kvg_query_prep_ref(&rot, NULL, KVARC_DTYPE_F32, q + 128, &qq[1]);
            float *scores = malloc(NT * 4), best[32];
            uint32_t idx[32];
            kvg_score_ref(KVG_SCORE_ASYM, KVG_COMBINE_MAX, qq, 2, bits + (size_t)NT * 16, ss + NT, NT, scores);
            kvg_topk_ref(scores, NT, 32, idx, best, NULL);
            int same = sp->n_positions == 32;
            for (int i = 0; same && i < 32; i++)
                same = sp->positions[i] == idx[i] && sp->scores[i] == best[i];
            CHECK(same, "Search differs from the local scan");
            CHECK(sp->n_positions && sp->positions[0] == 1234, "the needle must lead the shortlist");
            free(scores);
            protobuf_c_message_free_unpacked(rep, NULL);
        }
        sr.n_query = 100;
        CHECK_RC(kvc_call(c, "Search", &sr.base, &kvarc__v1__search_reply__descriptor, NULL, 0, msg, sizeof msg),
                 GRPC_STATUS_INVALID_ARGUMENT);
        free(k); free(v); free(recs); free(bits); free(ss);
    }
    /* fork, snapshot, restore */
    CHECK_RC(fork_call(c, "Fork", "alpha", "beta", msg), 0);
    CHECK_RC(fork_call(c, "Restore", "alpha", "gamma", msg), GRPC_STATUS_FAILED_PRECONDITION);
    CHECK_RC(fork_call(c, "Snapshot", "alpha", "snap", msg), 0);
    CHECK_RC(fork_call(c, "Restore", "snap", "restored", msg), 0);
    {
        Kvarc__V1__OpenRequest orq = KVARC__V1__OPEN_REQUEST__INIT;
        orq.ns = "t";
        orq.name = "snap";
        ProtobufCMessage *rep = NULL;
        uint64_t snap_id = 0;
        CHECK_RC(kvc_call(c, "Open", &orq.base, &kvarc__v1__conv_reply__descriptor, &rep, 0, msg, sizeof msg), 0);
        if (rep) {
            snap_id = ((Kvarc__V1__ConvReply *)rep)->info->id;
            protobuf_c_message_free_unpacked(rep, NULL);
        }
        CHECK_RC(rpc_append(c, snap_id, 0, 0, 5, 5, 0, NULL, msg), GRPC_STATUS_FAILED_PRECONDITION);
    }
    CHECK_RC(fork_call(c, "Fork", "nope", "x", msg), GRPC_STATUS_NOT_FOUND);

    /* malformed protobuf bytes, an unknown method, an oversized message */
    uint8_t junk[5] = { 0xff, 0xff, 0xff, 0xff, 0x0f };
    CHECK_RC(kvc_call_raw(c, "Create", junk, sizeof junk, NULL, NULL, 0, msg, sizeof msg), GRPC_STATUS_INVALID_ARGUMENT);
    CHECK(strstr(msg, "not a valid") != NULL, "malformed message: %s", msg);
    CHECK_RC(kvc_call_raw(c, "Frobnicate", "", 0, NULL, NULL, 0, msg, sizeof msg), GRPC_STATUS_UNIMPLEMENTED);
    size_t big = (16u << 20) + 1024;
    uint8_t *huge = calloc(1, big);
    int st = kvc_call_raw(c, "Create", huge, big, NULL, NULL, 0, msg, sizeof msg);
    CHECK(st == GRPC_STATUS_RESOURCE_EXHAUSTED, "oversized message: %s (%s)", kvc_status_name(st), msg);
    free(huge);
    CHECK(wait_ready(c), "daemon down after bad requests");

    /* several client processes at once (fork + exec: gRPC must not be used
     * across a fork), appending to their own forks of one shared prefix */
    uint64_t base = 0;
    CHECK_RC(create(c, "shared", "base", 128, msg, &base), 0);
    for (uint32_t l = 0; l < 4; l++)         /* a fork shares the length every layer has */
        for (uint64_t b = 0; b < 10; b++)
            CHECK_RC(rpc_append(c, base, l, b * 20, 20, 50, 0, NULL, msg), 0);
    for (int p = 0; p < 4; p++)
        if (fork() == 0) {
            char pn[16];
            snprintf(pn, sizeof pn, "%d", p);
            execl(self, self, "--client", pn, dir, (char *)NULL);
            _exit(127);
        }
    int all_ok = 1;
    for (int p = 0; p < 4; p++) {
        int status;
        wait(&status);
        all_ok &= WIFEXITED(status) && WEXITSTATUS(status) == 0;
    }
    CHECK(all_ok, "a concurrent client process failed");
    int pages;
    CHECK(list_all(c, "many", 7, &pages) == 100 && pages == 15, "paged list of 100 in pages of 7: %d pages", pages);
    CHECK(list_all(c, "", 1000, &pages) == 111 && pages == 1,
          "list of every namespace (alpha, streamed, needle, snap, restored, beta, base, 4 forks + 100)");
    {   /* the shared prefix is unchanged by its forks' appends */
        uint64_t pos[3] = { 0, 99, 199 };
        CHECK_RC(rpc_fetch_check(c, base, 0, 1, pos, 3, 50, msg), 0);
        CHECK(list_all(c, "shared", 2, &pages) == 5 && pages == 3, "shared: base and 4 forks");
    }

    /* delete */
    Kvarc__V1__DeleteRequest dr = KVARC__V1__DELETE_REQUEST__INIT;
    dr.ns = "t";
    dr.name = "beta";
    CHECK_RC(kvc_call(c, "Delete", &dr.base, &kvarc__v1__empty__descriptor, NULL, 0, msg, sizeof msg), 0);
    CHECK_RC(kvc_call(c, "Delete", &dr.base, &kvarc__v1__empty__descriptor, NULL, 0, msg, sizeof msg), GRPC_STATUS_NOT_FOUND);

    /* the admin CLI over the same socket */
    {
        static char out[65536];
        CHECK(cli(out, sizeof out, "ls t --json") == 0 && strstr(out, "\"name\":\"alpha\"") &&
              strstr(out, "\"name\":\"snap\",\"id\"") && strstr(out, "\"snapshot\":true"), "kvarc ls --json: %s", out);
        CHECK(cli(out, sizeof out, "stat shared/base --json") == 0 &&
                  strstr(out, "\"layer_lengths\":[200,200,200,200]"), "kvarc stat --json shows layer lengths: %s", out);
        CHECK(cli(out, sizeof out, "inspect t/alpha") == 0 && strstr(out, "length        0 tokens") &&
              strstr(out, "tiny-llama") && strstr(out, "positions     remapped (kind-1"), "kvarc inspect: %s", out);
        CHECK(cli(out, sizeof out, "stat t/alpha --json") == 0 && strstr(out, "\"pos_mode\":\"remapped\""),
              "kvarc stat --json names the position mode: %s", out);
        CHECK(cli(out, sizeof out, "stat t/ghost") == 1, "kvarc stat of an unknown conversation exits 1");
        CHECK(cli(out, sizeof out, "stat nonsense") == 2, "kvarc stat without NS/NAME exits 2");
        CHECK(cli(out, sizeof out, "snapshot t/alpha t/cli-snap --json") == 0 && strstr(out, "cli-snap"),
              "kvarc snapshot: %s", out);
        CHECK(cli(out, sizeof out, "verify --json") == 0 && strstr(out, "\"problems\":0"), "kvarc verify: %s", out);
        CHECK(cli(out, sizeof out, "stats") == 0 && strstr(out, "conversations"), "kvarc stats: %s", out);
        CHECK(cli(out, sizeof out, "delete t/cli-snap") == 0, "kvarc delete");
        CHECK(cli(out, sizeof out, "compact --threshold 0.9") == 0 && strstr(out, "reclaimed"), "kvarc compact: %s", out);
    }

    /* a second daemon on the same directory is refused */
    pid_t second = start_daemon();
    int status;
    waitpid(second, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 1, "second kvarcd must exit 1");

    /* kill -9, restart: everything acknowledged is there */
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
    /* a long grace, so that the SIGTERM check below tells an idle client
     * holding the shutdown (60 s) from a prompt exit on any machine */
    const char *long_grace[] = { "--grace-ms", "60000", NULL };
    pid = start_daemon_args(long_grace);
    CHECK(wait_ready(c), "restart after kill -9");
    CHECK(list_all(c, "many", 1000, &pages) == 100, "conversations lost across kill -9");
    CHECK_RC(open_conv(c, "t", "restored", &same, msg), 0);
    {
        uint64_t pos[3] = { 0, 250, 499 };
        CHECK_RC(rpc_fetch_check(c, id, 1, 1, pos, 3, 5, msg), 0);
    }
    CHECK_RC(open_conv(c, "t", "beta", NULL, msg), GRPC_STATUS_NOT_FOUND);

    /* SIGTERM: clean exit, not held by the idle client c */
    kill(pid, SIGTERM);
    int code = wait_exit(pid, 30000);
    CHECK(code == 0, "SIGTERM must exit 0 at once with only an idle client connected, not after the 60 s "
          "grace (code %d, -1: still running after 30 s)", code);
    if (code == -1) {
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
    }
    {
        char out[256];
        CHECK(cli(out, sizeof out, "health") == 3, "kvarc health with no daemon exits 3");
    }
    kvc_close(c);
    char log[300];
    snprintf(log, sizeof log, "%s.log", dir);
    if (tu_failures) {
        char cmd[400];
        snprintf(cmd, sizeof cmd, "tail -20 %s >&2", log);
        if (system(cmd))
            fprintf(stderr, "(no log)\n");
    }
    unlink(log);
    eu_rmrf(dir);
    return tu_finish("test_kvarcd");
}
