/* kvarc_admin.c - the kvarc CLI's commands that talk to a running kvarcd.
 *
 * Each command connects through the client transport (client/kvarc_rpc.h)
 * to --data DIR (its DIR/kvarcd.sock), --socket PATH, or the default data
 * directory, makes one or a few calls, and prints a table (or --json).
 * Exit codes: 0 success, 1 the server refused (its message on stderr),
 * 2 usage, 3 no kvarcd answering. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kvarc_admin.h"
#include "kvd.h"
#include "kvarc_rpc.h"

typedef struct opts {
    const char *target;
    const char *token_file, *tls_ca, *tls_name;
    int json;
    const char *pos[3];
    int npos;
    double threshold;
    double interval;   /* top */
    long count;
    uint32_t section_bytes;   /* export */
    uint64_t at;
    int has_at;
} opts;

static int parse(int argc, char **argv, opts *o, char *deftarget, size_t len)
{
    memset(o, 0, sizeof *o);
    o->interval = 1.0;
    o->target = getenv("KVARC_DATA");
    for (int i = 0; i < argc; i++) {
        if ((!strcmp(argv[i], "--data") || !strcmp(argv[i], "--socket") || !strcmp(argv[i], "--connect")) &&
            i + 1 < argc)
            o->target = argv[++i];
        else if (!strcmp(argv[i], "--token-file") && i + 1 < argc)
            o->token_file = argv[++i];
        else if (!strcmp(argv[i], "--tls-ca") && i + 1 < argc)
            o->tls_ca = argv[++i];
        else if (!strcmp(argv[i], "--tls-name") && i + 1 < argc)
            o->tls_name = argv[++i];
        else if (!strcmp(argv[i], "--json"))
            o->json = 1;
        else if (!strcmp(argv[i], "--interval") && i + 1 < argc)
            o->interval = atof(argv[++i]);
        else if (!strcmp(argv[i], "--count") && i + 1 < argc)
            o->count = strtol(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--section-bytes") && i + 1 < argc)
            o->section_bytes = (uint32_t)strtoul(argv[++i], NULL, 10);
        else if (!strcmp(argv[i], "--threshold") && i + 1 < argc)
            o->threshold = atof(argv[++i]);
        else if (!strcmp(argv[i], "--at") && i + 1 < argc) {
            o->at = strtoull(argv[++i], NULL, 10);
            o->has_at = 1;
        } else if (argv[i][0] == '-') {
            fprintf(stderr, "kvarc: unknown option '%s'\n", argv[i]);
            return 2;
        } else if (o->npos < 3) {
            o->pos[o->npos++] = argv[i];
        } else {
            fprintf(stderr, "kvarc: too many arguments\n");
            return 2;
        }
    }
    if (!o->target) {
        const char *home = getenv("HOME");
        snprintf(deftarget, len, "%s/.local/share/kvarc", home ? home : ".");
        o->target = deftarget;
    }
    return 0;
}

/* Progress of Verify/Compact on stderr: a line redrawn in place on a
 * terminal, else a line per 10%. */
typedef struct progress_state {
    const char *what;
    int         last;     /* last percent shown (-1: none) */
    int         tty;
} progress_state;

static void show_progress(void *arg, uint64_t done, uint64_t total)
{
    progress_state *p = arg;
    int pct = total ? (int)(100.0 * (double)done / (double)total) : 100;
    if (pct == p->last || (!p->tty && p->last >= 0 && pct / 10 == p->last / 10))
        return;
    p->last = pct;
    fprintf(stderr, p->tty ? "\r%s: %3d%% (%.1f of %.1f MiB)" : "%s: %d%% (%.1f of %.1f MiB)\n", p->what, pct,
            (double)done / 1048576.0, (double)total / 1048576.0);
    fflush(stderr);
}

static void progress_end(progress_state *p)
{
    if (p->tty && p->last >= 0)
        fprintf(stderr, "\n");
}

/* The first word of a token file that is not a comment: a client keeps
 * its one token there (a kvarcd token file's line works too). */
static int read_token(const char *path, char *tok, size_t len)
{
    FILE *f = fopen(path, "r");
    char line[1200];
    if (!f) {
        fprintf(stderr, "kvarc: token file %s: %s\n", path, strerror(errno));
        return 2;
    }
    while (fgets(line, sizeof line, f)) {
        char *save = NULL, *w = strtok_r(line, " \t\r\n", &save);
        if (w && w[0] != '#') {
            snprintf(tok, len, "%s", w);
            break;
        }
    }
    fclose(f);
    if (!*tok) {
        fprintf(stderr, "kvarc: token file %s holds no token\n", path);
        return 2;
    }
    return 0;
}

int kvarc_split_name(const char *full, char *buf, size_t len, char **ns, char **name)
{
    snprintf(buf, len, "%s", full ? full : "");
    char *slash = strchr(buf, '/');
    if (!slash || slash == buf || !slash[1]) {
        fprintf(stderr, "kvarc: '%s' is not NAMESPACE/NAME\n", full ? full : "");
        return 2;
    }
    *slash = 0;
    *ns = buf;
    *name = slash + 1;
    return 0;
}

int kvarc_admin_fail(int status, const char *what, const char *msg, const char *target)
{
    if (status == GRPC_STATUS_UNAVAILABLE || status == GRPC_STATUS_DEADLINE_EXCEEDED) {
        fprintf(stderr, "kvarc: no kvarcd answers at %s (%s); start one with `kvarcd --data DIR`\n",
                target, msg);
        return 3;
    }
    fprintf(stderr, "kvarc %s: %s: %s\n", what, kvc_status_name(status), msg);
    return 1;
}

static void json_str(const char *s)
{
    putchar('"');
    for (; *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\')
            printf("\\%c", ch);
        else if (ch < 0x20)
            printf("\\u%04x", ch);
        else
            putchar(ch);
    }
    putchar('"');
}

/* A conversation's position mode and signature kind, in words. */
static const char *pos_kind_words(uint32_t b, int json)
{
    switch (b) {
    case KVARC_POS_TRUE:     return json ? "true" : "true (kind-2 signatures: keys scored at their own positions)";
    case KVARC_POS_REMAPPED: return json ? "remapped" : "remapped (kind-1 signatures, scored at one fixed distance)";
    case KVARC_POS_TRUE_FREE:
        return json ? "true-kind0" : "true, kind 0 (archived before kind-2 signatures): not served for retrieval; "
                                     "records read, fork and export";
    default:                 return json ? "unknown" : "unknown signature kind (a newer kvarc wrote it)";
    }
}

static void print_conv_json(const Kvarc__V1__ConvInfo *c)
{
    printf("{\"ns\":");
    json_str(c->ns);
    printf(",\"name\":");
    json_str(c->name);
    printf(",\"id\":%llu,\"parent\":%llu,\"fork_len\":%llu,\"length\":%llu,\"snapshot\":%s,"
           "\"n_layers\":%u,\"n_kv_heads\":%u,\"n_q_heads\":%u,\"head_dim\":%u,\"format\":",
           (unsigned long long)c->id, (unsigned long long)c->parent, (unsigned long long)c->fork_len,
           (unsigned long long)c->length, (c->flags & 1) ? "true" : "false", c->shape->n_layers,
           c->shape->n_kv_heads, c->shape->n_q_heads, c->shape->head_dim);
    const kvarc_format_info *fi = kvarc_format_get((int)c->shape->format);
    json_str(fi ? fi->name : "?");
    printf(",\"pos_mode\":");
    json_str(pos_kind_words(c->shape->pos_mode, 1));
    printf(",\"fingerprint\":");
    json_str(c->shape->fingerprint);
    if (c->n_layer_lengths) {
        printf(",\"layer_lengths\":[");
        for (size_t l = 0; l < c->n_layer_lengths; l++)
            printf("%s%llu", l ? "," : "", (unsigned long long)c->layer_lengths[l]);
        printf("]");
    }
    printf("}");
}

/* Bytes on disk of a conversation's own records + signatures, and what fp16
 * K/V of the same tokens would take. */
static void conv_bytes(const Kvarc__V1__ConvInfo *c, double *archived, double *fp16)
{
    const Kvarc__V1__Shape *s = c->shape;
    double per = (double)s->n_layers * s->n_kv_heads;
    int rb = kvarc_record_bytes((int)s->format, (int)s->head_dim);
    double tokens = per * (double)c->length;     /* token x layer x head; exact when layer lengths came */
    if (c->n_layer_lengths == s->n_layers) {
        tokens = 0;
        for (size_t l = 0; l < c->n_layer_lengths; l++)
            tokens += (double)c->layer_lengths[l] * s->n_kv_heads;
    }
    *archived = tokens * (rb > 0 ? rb + 4 + s->head_dim / 8.0 + 2 : 0);
    *fp16 = tokens * 4.0 * s->head_dim;
}

static int cmd_ls(kvc_conn *k, opts *o)
{
    char after[256] = "", msg[512];
    int first = 1;
    if (o->json)
        printf("[");
    else
        printf("%-20s %-28s %8s %10s %7s %5s %5s %5s %s\n", "NAMESPACE", "NAME", "ID", "TOKENS", "LAYERS",
               "KV", "DIM", "FMT", "NOTE");
    for (;;) {
        Kvarc__V1__ListRequest r = KVARC__V1__LIST_REQUEST__INIT;
        r.ns = o->npos ? (char *)o->pos[0] : "";
        r.after = after;
        r.limit = 500;
        ProtobufCMessage *rep = NULL;
        int st = kvc_call(k, "List", &r.base, &kvarc__v1__list_reply__descriptor, &rep, 0, msg, sizeof msg);
        if (st)
            return kvarc_admin_fail(st, "ls", msg, o->target);
        Kvarc__V1__ListReply *l = (Kvarc__V1__ListReply *)rep;
        for (size_t i = 0; i < l->n_convs; i++) {
            const Kvarc__V1__ConvInfo *c = l->convs[i];
            if (o->json) {
                printf(first ? "" : ",");
                print_conv_json(c);
            } else {
                const kvarc_format_info *fi = kvarc_format_get((int)c->shape->format);
                char note[64] = "";
                if (c->flags & 1)
                    snprintf(note, sizeof note, "snapshot");
                else if (c->parent)
                    snprintf(note, sizeof note, "fork of #%llu at %llu", (unsigned long long)c->parent,
                             (unsigned long long)c->fork_len);
                printf("%-20s %-28s %8llu %10llu %7u %5u %5u %5s %s\n", c->ns, c->name,
                       (unsigned long long)c->id, (unsigned long long)c->length, c->shape->n_layers,
                       c->shape->n_kv_heads, c->shape->head_dim, fi ? fi->name : "?", note);
            }
            first = 0;
        }
        int more = l->more;
        if (l->n_convs && o->npos)
            snprintf(after, sizeof after, "%s", l->convs[l->n_convs - 1]->name);
        else if (l->n_convs)        /* across namespaces a page ends at NS/NAME */
            snprintf(after, sizeof after, "%s/%s", l->convs[l->n_convs - 1]->ns, l->convs[l->n_convs - 1]->name);
        protobuf_c_message_free_unpacked(rep, NULL);
        if (!more)
            break;
    }
    if (o->json)
        printf("]\n");
    return 0;
}

static int conv_call(kvc_conn *k, opts *o, const char *what, ProtobufCMessage **rep)
{
    char buf[256], *ns, *name, msg[512];
    int rc = kvarc_split_name(o->npos ? o->pos[0] : NULL, buf, sizeof buf, &ns, &name);
    if (rc)
        return rc;
    Kvarc__V1__OpenRequest r = KVARC__V1__OPEN_REQUEST__INIT;
    r.ns = ns;
    r.name = name;
    int st = kvc_call(k, "Open", &r.base, &kvarc__v1__conv_reply__descriptor, rep, 0, msg, sizeof msg);
    return st ? kvarc_admin_fail(st, what, msg, o->target) : 0;
}

static int cmd_stat(kvc_conn *k, opts *o, int inspect)
{
    ProtobufCMessage *rep = NULL;
    int rc = conv_call(k, o, inspect ? "inspect" : "stat", &rep);
    if (rc)
        return rc;
    const Kvarc__V1__ConvInfo *c = ((Kvarc__V1__ConvReply *)rep)->info;
    double arch, fp16;
    conv_bytes(c, &arch, &fp16);
    if (o->json) {
        print_conv_json(c);
        printf("\n");
    } else {
        const kvarc_format_info *fi = kvarc_format_get((int)c->shape->format);
        printf("conversation  %s/%s (id %llu)\n", c->ns, c->name, (unsigned long long)c->id);
        printf("model         %s: %u layers, %u kv heads, %u query heads, head_dim %u\n",
               c->shape->fingerprint, c->shape->n_layers, c->shape->n_kv_heads, c->shape->n_q_heads,
               c->shape->head_dim);
        printf("format        %s (%d B per token, layer and kv head), rotation seed %llu\n",
               fi ? fi->name : "?", kvarc_record_bytes((int)c->shape->format, (int)c->shape->head_dim),
               (unsigned long long)c->shape->seed);
        printf("positions     %s\n", pos_kind_words(c->shape->pos_mode, 0));
        uint64_t lo = c->length, hi = c->length;
        for (size_t l = 0; l < c->n_layer_lengths; l++)
            hi = c->layer_lengths[l] > hi ? c->layer_lengths[l] : hi;
        if (hi == lo)
            printf("length        %llu tokens in every layer\n", (unsigned long long)c->length);
        else
            printf("length        %llu tokens in every layer, up to %llu in some (a writer has not synced "
                   "every layer)\n", (unsigned long long)lo, (unsigned long long)hi);
        if (c->parent)
            printf("parent        #%llu, sharing its first %llu tokens%s\n", (unsigned long long)c->parent,
                   (unsigned long long)c->fork_len, (c->flags & 1) ? " (snapshot: read-only)" : "");
        printf("on disk       %.1f MiB of records + signatures (with CRCs); fp16 K/V would be %.1f MiB "
               "(%.1fx)\n", arch / 1048576, fp16 / 1048576, arch > 0 ? fp16 / arch : 0.0);
    }
    protobuf_c_message_free_unpacked(rep, NULL);
    return 0;
}

static int cmd_fork(kvc_conn *k, opts *o, const char *method)
{
    char b1[256], b2[256], *sns, *sname, *dns, *dname, msg[512];
    if (o->npos != 2) {
        fprintf(stderr, "kvarc %s: needs SRC_NS/NAME DST_NS/NAME\n", method);
        return 2;
    }
    int rc = kvarc_split_name(o->pos[0], b1, sizeof b1, &sns, &sname);
    if (rc || (rc = kvarc_split_name(o->pos[1], b2, sizeof b2, &dns, &dname)))
        return rc;
    Kvarc__V1__ForkRequest r = KVARC__V1__FORK_REQUEST__INIT;
    r.src_ns = sns;
    r.src_name = sname;
    r.dst_ns = dns;
    r.dst_name = dname;
    r.has_at_len = o->has_at;
    r.at_len = o->at;
    ProtobufCMessage *rep = NULL;
    int st = kvc_call(k, method, &r.base, &kvarc__v1__conv_reply__descriptor, &rep, 0, msg, sizeof msg);
    if (st)
        return kvarc_admin_fail(st, method, msg, o->target);
    const Kvarc__V1__ConvInfo *c = ((Kvarc__V1__ConvReply *)rep)->info;
    if (o->json) {
        print_conv_json(c);
        printf("\n");
    } else {
        printf("%s/%s (id %llu): %llu tokens shared with %s\n", c->ns, c->name, (unsigned long long)c->id,
               (unsigned long long)c->fork_len, o->pos[0]);
    }
    protobuf_c_message_free_unpacked(rep, NULL);
    return 0;
}

/* Verify or Compact: the call with its progress on stderr; on OK *ev is
 * the result event (free it), else the CLI's exit code is returned. */
static int run_job(kvc_conn *k, opts *o, const char *cmd, const char *method, const ProtobufCMessage *req,
                   Kvarc__V1__JobEvent **ev)
{
    char msg[512];
    if (!o->json)
        fprintf(stderr, "%s %s ...\n", !strcmp(cmd, "verify") ? "verifying every block of" : "compacting", o->target);
    progress_state ps = { cmd, -1, isatty(2) };
    int st = kvc_job(k, method, req, 24 * 3600000, o->json ? NULL : show_progress, &ps, ev, msg, sizeof msg);
    progress_end(&ps);
    return st ? kvarc_admin_fail(st, cmd, msg, o->target) : 0;
}

static int cmd_simple(kvc_conn *k, opts *o, const char *cmd)
{
    char msg[512];
    ProtobufCMessage *rep = NULL;
    Kvarc__V1__Empty e = KVARC__V1__EMPTY__INIT;
    int st;
    if (!strcmp(cmd, "delete")) {
        char buf[256], *ns, *name;
        int rc = kvarc_split_name(o->npos ? o->pos[0] : NULL, buf, sizeof buf, &ns, &name);
        if (rc)
            return rc;
        Kvarc__V1__DeleteRequest r = KVARC__V1__DELETE_REQUEST__INIT;
        r.ns = ns;
        r.name = name;
        st = kvc_call(k, "Delete", &r.base, &kvarc__v1__empty__descriptor, &rep, 0, msg, sizeof msg);
        if (st)
            return kvarc_admin_fail(st, cmd, msg, o->target);
        printf(o->json ? "{\"deleted\":\"%s\"}\n" : "deleted %s (space returns at the next compaction)\n",
               o->pos[0]);
    } else if (!strcmp(cmd, "health")) {
        st = kvc_call(k, "Health", &e.base, &kvarc__v1__health_reply__descriptor, &rep, 5000, msg, sizeof msg);
        if (st)
            return kvarc_admin_fail(st, cmd, msg, o->target);
        Kvarc__V1__HealthReply *h = (Kvarc__V1__HealthReply *)rep;
        printf(o->json ? "{\"status\":\"%s\",\"version\":\"%s\",\"uptime_ms\":%llu,\"conversations\":%llu}\n"
                       : "%s, kvarcd %s, up %llu ms, %llu conversations\n",
               h->status, h->version, (unsigned long long)h->uptime_ms, (unsigned long long)h->conversations);
    } else if (!strcmp(cmd, "stats")) {
        st = kvc_call(k, "Stats", &e.base, &kvarc__v1__stats_reply__descriptor, &rep, 0, msg, sizeof msg);
        if (st)
            return kvarc_admin_fail(st, cmd, msg, o->target);
        Kvarc__V1__StatsReply *s = (Kvarc__V1__StatsReply *)rep;
        printf(o->json ? "{\"conversations\":%llu,\"deleted\":%llu,\"segments\":%llu,\"segment_bytes\":%llu,"
                         "\"extents\":%llu,\"tokens\":%llu,\"appends\":%llu,\"group_commits\":%llu}\n"
                       : "conversations %llu (deleted, awaiting compaction: %llu)\nsegments      %llu, %llu "
                         "bytes\nextents       %llu, %llu (token, layer) pairs\nsince start   %llu appends "
                         "in %llu group commits\n",
               (unsigned long long)s->conversations, (unsigned long long)s->deleted,
               (unsigned long long)s->segments, (unsigned long long)s->segment_bytes,
               (unsigned long long)s->extents, (unsigned long long)s->tokens, (unsigned long long)s->appends,
               (unsigned long long)s->group_commits);
    } else if (!strcmp(cmd, "verify")) {
        Kvarc__V1__JobEvent *ev;
        if ((st = run_job(k, o, cmd, "Verify", &e.base, &ev)))
            return st;
        rep = &ev->base;
        Kvarc__V1__VerifyReply *v = ev->verify;
        if (!v) {
            fprintf(stderr, "kvarc verify: kvarcd answered without a verify result\n");
            protobuf_c_message_free_unpacked(rep, NULL);
            return 1;
        }
        if (o->json) {
            printf("{\"segments\":%llu,\"blocks\":%llu,\"records\":%llu,\"extents\":%llu,\"bytes\":%llu,"
                   "\"problems\":%llu,\"lines\":[", (unsigned long long)v->segments, (unsigned long long)v->blocks,
                   (unsigned long long)v->records, (unsigned long long)v->extents, (unsigned long long)v->bytes,
                   (unsigned long long)v->problems);
            for (size_t i = 0; i < v->n_lines; i++) {
                printf(i ? "," : "");
                json_str(v->lines[i]);
            }
            printf("]}\n");
        } else {
            for (size_t i = 0; i < v->n_lines; i++)
                printf("problem: %s\n", v->lines[i]);
            printf("%llu segments, %llu blocks, %llu records, %llu extents, %llu bytes: %llu problem(s)\n",
                   (unsigned long long)v->segments, (unsigned long long)v->blocks, (unsigned long long)v->records,
                   (unsigned long long)v->extents, (unsigned long long)v->bytes, (unsigned long long)v->problems);
        }
        int bad = v->problems > 0;
        protobuf_c_message_free_unpacked(rep, NULL);
        return bad;
    } else {   /* compact */
        Kvarc__V1__CompactRequest r = KVARC__V1__COMPACT_REQUEST__INIT;
        r.threshold = (float)o->threshold;
        Kvarc__V1__JobEvent *ev;
        if ((st = run_job(k, o, cmd, "Compact", &r.base, &ev)))
            return st;
        rep = &ev->base;
        unsigned long long rec = ev->compact ? ev->compact->reclaimed : 0;
        printf(o->json ? "{\"reclaimed\":%llu}\n" : "reclaimed %llu bytes\n", rec);
    }
    if (rep)
        protobuf_c_message_free_unpacked(rep, NULL);
    return 0;
}

/* ---- offline: a stopped data directory, through the engine itself ---- */

static int offline_progress(void *arg, uint64_t done, uint64_t total)
{
    show_progress(arg, done, total);
    return 0;
}

typedef struct line_list {
    char  **v;
    size_t  n;
    int     json, echo;     /* echo: print each line as it comes (text mode) */
} line_list;

static void keep_line(void *arg, const char *line)
{
    line_list *l = arg;
    if (l->echo) {
        printf("problem: %s\n", line);
        return;
    }
    char **n = realloc(l->v, (l->n + 1) * sizeof *n);
    if (n && (n[l->n] = strdup(line))) {
        l->v = n;
        l->n++;
    } else if (n) {
        l->v = n;
    }
}

/* `kvarc verify DIR`: kvarcd stopped; the engine opened read-only with no
 * recovery, so the directory is checked as it lies on disk. */
static int offline_verify(const char *dir, int json)
{
    kvd_engine *e;
    kvd_err err = { 0, "" };
    if (kvd_open_check(dir, &e, &err)) {
        fprintf(stderr, "kvarc verify: %s\n", err.msg);
        return err.code == -EBUSY ? 2 : 3;
    }
    if (!json)
        fprintf(stderr, "verifying every block of %s (offline) ...\n", dir);
    progress_state ps = { "verify", -1, isatty(2) };
    line_list ll = { .json = json, .echo = !json };
    kvd_verify_report rep;
    int rc = kvd_verify(e, &rep, keep_line, &ll, json ? NULL : offline_progress, &ps, &err);
    progress_end(&ps);
    kvd_close(e);
    if (rc && rc != KVARC_ECORRUPT) {
        fprintf(stderr, "kvarc verify: %s\n", err.msg);
        for (size_t i = 0; i < ll.n; i++)
            free(ll.v[i]);
        free(ll.v);
        return 3;
    }
    if (json) {
        printf("{\"segments\":%llu,\"blocks\":%llu,\"records\":%llu,\"extents\":%llu,\"bytes\":%llu,"
               "\"problems\":%llu,\"lines\":[", (unsigned long long)rep.segments, (unsigned long long)rep.blocks,
               (unsigned long long)rep.records, (unsigned long long)rep.extents, (unsigned long long)rep.bytes,
               (unsigned long long)rep.problems);
        for (size_t i = 0; i < ll.n; i++) {
            printf(i ? "," : "");
            json_str(ll.v[i]);
        }
        printf("]}\n");
    } else {
        printf("%llu segments, %llu blocks, %llu records, %llu extents, %llu bytes: %llu problem(s)\n",
               (unsigned long long)rep.segments, (unsigned long long)rep.blocks, (unsigned long long)rep.records,
               (unsigned long long)rep.extents, (unsigned long long)rep.bytes, (unsigned long long)rep.problems);
        if (rep.problems)
            printf("repair: with kvarcd stopped, `kvarc rebuild-index %s` rebuilds the index from the "
                   "segments (the old one is kept as %s/index.old)\n", dir, dir);
    }
    for (size_t i = 0; i < ll.n; i++)
        free(ll.v[i]);
    free(ll.v);
    return rep.problems ? 1 : 0;
}

static void print_line(void *arg, const char *line)
{
    (void)arg;
    printf("left out: %s\n", line);
}

/* `kvarc rebuild-index DIR`: kvarcd stopped. */
static int offline_rebuild(const char *dir, int json)
{
    kvd_err err = { 0, "" };
    uint64_t dropped = 0;
    if (!json)
        fprintf(stderr, "rebuilding the index of %s from its segments ...\n", dir);
    progress_state ps = { "rebuild-index", -1, isatty(2) };
    int rc = kvd_rebuild_index(dir, json ? NULL : print_line, NULL, &dropped,
                               json ? NULL : offline_progress, &ps, &err);
    progress_end(&ps);
    if (rc) {
        fprintf(stderr, "kvarc rebuild-index: %s\n", err.msg);
        return rc == -EBUSY ? 2 : 1;
    }
    /* what the new index holds, checked as kvarcd will find it */
    kvd_engine *e;
    kvd_verify_report rep = { 0 };
    int vrc = kvd_open_check(dir, &e, &err);
    if (!vrc) {
        vrc = kvd_verify(e, &rep, NULL, NULL, NULL, NULL, &err);
        kvd_close(e);
    }
    if (vrc && vrc != KVARC_ECORRUPT) {
        fprintf(stderr, "kvarc rebuild-index: the index was rebuilt, but checking it failed: %s\n", err.msg);
        return 3;
    }
    if (json)
        printf("{\"rebuilt\":true,\"left_out\":%llu,\"extents\":%llu,\"problems\":%llu}\n",
               (unsigned long long)dropped, (unsigned long long)rep.extents, (unsigned long long)rep.problems);
    else
        printf("index of %s rebuilt: %llu extents, %llu block(s) left out, %llu problem(s) left (the old "
               "index is in %s/index.old)\n", dir, (unsigned long long)rep.extents,
               (unsigned long long)dropped, (unsigned long long)rep.problems, dir);
    if (rep.problems && !json)
        printf("`kvarc verify %s` names what is left\n", dir);
    return rep.problems ? 1 : 0;
}

int kvarc_admin(const char *cmd, int argc, char **argv)
{
    static const char *known[] = { "ls", "stat", "inspect", "delete", "fork", "snapshot", "restore",
                                   "health", "stats", "verify", "compact", "rebuild-index", "top", "export",
                                   "import" };
    int found = 0;
    for (size_t i = 0; i < sizeof known / sizeof known[0]; i++)
        found |= !strcmp(cmd, known[i]);
    if (!found)
        return -1;
    opts o;
    char def[1024];
    int rc = parse(argc, argv, &o, def, sizeof def);
    if (rc)
        return rc;
    if (!strcmp(cmd, "rebuild-index") || (!strcmp(cmd, "verify") && o.npos)) {
        if (o.npos != 1) {
            fprintf(stderr, "kvarc %s: give one data directory (kvarcd stopped): kvarc %s DIR\n", cmd, cmd);
            return 2;
        }
        return !strcmp(cmd, "verify") ? offline_verify(o.pos[0], o.json) : offline_rebuild(o.pos[0], o.json);
    }
    if (!strcmp(cmd, "top") && o.json) {
        fprintf(stderr, "kvarc top: a live view has no --json; scripts read the same counters with "
                        "kvarcd --metrics-listen (Prometheus text on /metrics)\n");
        return 2;
    }
    if ((!strcmp(cmd, "export") || !strcmp(cmd, "import")) && o.npos != 2) {
        fprintf(stderr, "kvarc %s: give %s\n", cmd, !strcmp(cmd, "export") ? "NS/NAME FILE" : "FILE NS/NAME");
        return 2;
    }
    char token[1100] = "", cmsg[300];
    if (!o.token_file)
        o.token_file = getenv("KVARC_TOKEN_FILE");
    if (o.token_file && (rc = read_token(o.token_file, token, sizeof token)))
        return rc;
    kvc_options copts = { .token = *token ? token : NULL, .tls_ca_file = o.tls_ca, .tls_name = o.tls_name };
    kvc_conn *k;
    if (kvc_connect_opts(o.target, &copts, &k, cmsg, sizeof cmsg)) {
        fprintf(stderr, "kvarc: cannot connect to %s: %s\n", o.target, cmsg);
        return 2;
    }
    if (!strcmp(cmd, "ls"))
        rc = cmd_ls(k, &o);
    else if (!strcmp(cmd, "stat") || !strcmp(cmd, "inspect"))
        rc = cmd_stat(k, &o, !strcmp(cmd, "inspect"));
    else if (!strcmp(cmd, "fork"))
        rc = cmd_fork(k, &o, "Fork");
    else if (!strcmp(cmd, "snapshot"))
        rc = cmd_fork(k, &o, "Snapshot");
    else if (!strcmp(cmd, "restore"))
        rc = cmd_fork(k, &o, "Restore");
    else if (!strcmp(cmd, "top"))
        rc = kvarc_top(k, o.target, o.interval, o.count);
    else if (!strcmp(cmd, "export"))
        rc = kvarc_export(k, o.target, o.pos[0], o.pos[1], o.section_bytes, o.json);
    else if (!strcmp(cmd, "import"))
        rc = kvarc_import(k, o.target, o.pos[0], o.pos[1], o.json);
    else
        rc = cmd_simple(k, &o, cmd);
    kvc_close(k);
    return rc;
}
