/* kvarc_top.c - `kvarc top`: a live view of a running kvarcd, from the
 * same counters its /metrics endpoint serves (the Metrics call answers
 * them in Prometheus text over the service itself, so top needs no
 * --metrics-listen and works over TCP with a '*' token).
 *
 * Every interval it reads the counters, and shows the rates over the
 * interval (calls, errors, bytes and records per second, mean latency,
 * the 99th percentile's histogram bucket) per method and in total, with
 * the gauges (conversations, segments, bytes on disk, calls in flight).
 * On a terminal each view replaces the last; otherwise (a pipe, a log)
 * the views follow one another. It runs until interrupted, or for
 * --count views. */
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "kvarc.pb-c.h"
#include "kvarc_admin.h"

/* One scrape: every sample as "name{labels}" -> value, in the text's order. */
typedef struct sample {
    char  *key;
    double v;
} sample;

typedef struct scrape {
    sample *s;
    size_t  n;
    char   *text;     /* the samples' keys point into it */
    double  t;        /* when it was taken (CLOCK_MONOTONIC, seconds) */
} scrape;

static double mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void scrape_free(scrape *sc)
{
    free(sc->s);
    free(sc->text);
    memset(sc, 0, sizeof *sc);
}

/* Parse the exposition text (taking it): comment lines skipped, each
 * sample line split at its last space. */
static int scrape_parse(char *text, scrape *sc)
{
    size_t cap = 256;
    sc->text = text;
    sc->n = 0;
    if (!(sc->s = malloc(cap * sizeof *sc->s)))
        return -1;
    for (char *line = text, *next; line && *line; line = next) {
        next = strchr(line, '\n');
        if (next)
            *next++ = 0;
        char *sp = strrchr(line, ' ');
        if (line[0] == '#' || !sp)
            continue;
        *sp = 0;
        if (sc->n == cap) {
            sample *g = realloc(sc->s, (cap *= 2) * sizeof *g);
            if (!g)
                return -1;
            sc->s = g;
        }
        sc->s[sc->n].key = line;
        sc->s[sc->n++].v = strtod(sp + 1, NULL);
    }
    return 0;
}

static double get(const scrape *sc, const char *key)
{
    for (size_t i = 0; sc && i < sc->n; i++)
        if (!strcmp(sc->s[i].key, key))
            return sc->s[i].v;
    return 0;
}

/* The value of key in cur minus in prev (prev NULL: since kvarcd started). */
static double delta(const scrape *cur, const scrape *prev, const char *key)
{
    return get(cur, key) - (prev ? get(prev, key) : 0);
}

/* The bucket bound under which q of the interval's calls of method fell
 * (its le, seconds); NAN when there were none, INFINITY above the last bound. */
static double quantile(const scrape *cur, const scrape *prev, const char *method, double q)
{
    char pre[160], key[200];
    snprintf(pre, sizeof pre, "kvarc_rpc_duration_seconds_bucket{method=\"%s\",le=\"", method);
    double total = delta(cur, prev, (snprintf(key, sizeof key, "%s+Inf\"}", pre), key));
    if (total <= 0)
        return NAN;
    size_t np = strlen(pre);
    for (size_t i = 0; i < cur->n; i++)
        if (!strncmp(cur->s[i].key, pre, np) && strcmp(cur->s[i].key + np, "+Inf\"}") &&
            delta(cur, prev, cur->s[i].key) >= q * total)
            return strtod(cur->s[i].key + np, NULL);
    return INFINITY;
}

/* A byte rate or count, short: 12.3K, 4.5M. */
static const char *human(double v, char *buf, size_t len)
{
    const char *u = " KMGT";
    int i = 0;
    while (fabs(v) >= 1000 && i < 4) {
        v /= 1000;
        i++;
    }
    if (i)
        snprintf(buf, len, "%.1f%c", v, u[i]);
    else
        snprintf(buf, len, "%.0f", v);
    return buf;
}

static const char *ms_text(double s, char *buf, size_t len)
{
    if (isnan(s))
        snprintf(buf, len, "-");
    else if (isinf(s))
        snprintf(buf, len, ">10s");
    else
        snprintf(buf, len, "%.3g", s * 1e3);
    return buf;
}

/* The methods in the counters, in their order (each has an OK line). */
static size_t methods_of(const scrape *sc, const char **out, size_t max)
{
    static const char pre[] = "kvarc_rpc_calls_total{method=\"";
    size_t n = 0;
    for (size_t i = 0; i < sc->n && n < max; i++) {
        const char *k = sc->s[i].key;
        if (strncmp(k, pre, sizeof pre - 1) || !strstr(k, "code=\"OK\""))
            continue;
        out[n++] = k + sizeof pre - 1;      /* Append",code="OK"} : up to the quote */
    }
    return n;
}

/* Every call of method m (all codes), and those not OK, in the interval. */
static void calls_of(const scrape *cur, const scrape *prev, const char *m, size_t mlen, double *all, double *bad)
{
    char pre[120];
    snprintf(pre, sizeof pre, "kvarc_rpc_calls_total{method=\"%.*s\",code=\"", (int)mlen, m);
    size_t np = strlen(pre);
    *all = *bad = 0;
    for (size_t i = 0; i < cur->n; i++)
        if (!strncmp(cur->s[i].key, pre, np)) {
            double d = delta(cur, prev, cur->s[i].key);
            *all += d;
            if (strncmp(cur->s[i].key + np, "OK\"", 3))
                *bad += d;
        }
}

static void show(const scrape *cur, const scrape *prev, const char *target, int tty)
{
    double dt = prev ? cur->t - prev->t : get(cur, "kvarc_uptime_seconds");
    if (dt <= 0)
        dt = 1e-9;
    char a[32], b[32], c[32], d[32], e[32], f[32];
    if (tty)
        printf("\033[H\033[J");
    char ver[128] = "?", rev[128] = "?";
    for (size_t i = 0; i < cur->n; i++)
        if (!strncmp(cur->s[i].key, "kvarc_build_info{", 17))
            sscanf(cur->s[i].key + 17, "version=\"%127[^\"]\",revision=\"%127[^\"]", ver, rev);
    printf("kvarcd %s (git %s) at %s, up %.0f s\n", ver, rev, target, get(cur, "kvarc_uptime_seconds"));
    /* in flight: not counting the Metrics call that read these */
    printf("conversations %.0f live, %.0f deleted   segments %.0f, %sB on disk   calls in flight %.0f\n",
           get(cur, "kvarc_conversations{state=\"live\"}"), get(cur, "kvarc_conversations{state=\"deleted\"}"),
           get(cur, "kvarc_segments"), human(get(cur, "kvarc_segment_bytes"), a, sizeof a),
           get(cur, "kvarc_rpc_in_flight") - 1);
    double fs_n = delta(cur, prev, "kvarc_fdatasync_seconds_count"),
           fs_s = delta(cur, prev, "kvarc_fdatasync_seconds_sum");
    printf("%s %.1f s: records appended %s/s  served %s/s   group commits %s/s  fdatasync mean %s ms   "
           "auth refused %.0f\n", prev ? "last" : "since start,", dt,
           human(delta(cur, prev, "kvarc_records_appended_total") / dt, a, sizeof a),
           human(delta(cur, prev, "kvarc_records_served_total") / dt, b, sizeof b),
           human(delta(cur, prev, "kvarc_group_commits_total") / dt, c, sizeof c),
           ms_text(fs_n > 0 ? fs_s / fs_n : NAN, d, sizeof d), delta(cur, prev, "kvarc_auth_refusals_total"));
    printf("\n%-15s %9s %8s %9s %9s %10s %10s %12s\n", "METHOD", "CALLS/S", "ERR/S", "MEAN MS", "P99 MS<=",
           "IN B/S", "OUT B/S", "CALLS TOTAL");
    const char *ms[64];
    size_t nm = methods_of(cur, ms, 64);
    double tc = 0, te = 0, tin = 0, tout = 0;
    for (size_t i = 0; i < nm; i++) {
        size_t ml = strcspn(ms[i], "\"");
        char name[64], key[160];
        snprintf(name, sizeof name, "%.*s", (int)ml, ms[i]);
        double all, bad, total, badt;
        calls_of(cur, prev, ms[i], ml, &all, &bad);
        calls_of(cur, NULL, ms[i], ml, &total, &badt);
        snprintf(key, sizeof key, "kvarc_rpc_duration_seconds_sum{method=\"%s\"}", name);
        double lat = delta(cur, prev, key);
        snprintf(key, sizeof key, "kvarc_rpc_received_bytes_total{method=\"%s\"}", name);
        double in = delta(cur, prev, key);
        snprintf(key, sizeof key, "kvarc_rpc_sent_bytes_total{method=\"%s\"}", name);
        double out = delta(cur, prev, key);
        tc += all;
        te += bad;
        tin += in;
        tout += out;
        if (total == 0)
            continue;                          /* never called: not shown */
        printf("%-15s %9.1f %8.1f %9s %9s %10s %10s %12.0f\n", name, all / dt, bad / dt,
               ms_text(all > 0 ? lat / all : NAN, a, sizeof a), ms_text(quantile(cur, prev, name, 0.99), b, sizeof b),
               human(in / dt, c, sizeof c), human(out / dt, d, sizeof d), total);
    }
    printf("%-15s %9.1f %8.1f %9s %9s %10s %10s\n", "total", tc / dt, te / dt, "", "", human(tin / dt, e, sizeof e),
           human(tout / dt, f, sizeof f));
    if (!tty)
        printf("\n");
    fflush(stdout);
}

static volatile sig_atomic_t stop;
static void on_int(int sig)
{
    (void)sig;
    stop = 1;
}

static int read_metrics(kvc_conn *k, scrape *sc, char *msg, size_t len)
{
    Kvarc__V1__Empty e = KVARC__V1__EMPTY__INIT;
    ProtobufCMessage *rep = NULL;
    int st = kvc_call(k, "Metrics", &e.base, &kvarc__v1__metrics_reply__descriptor, &rep, 0, msg, len);
    if (st)
        return st;
    char *text = strdup(((Kvarc__V1__MetricsReply *)rep)->text);
    protobuf_c_message_free_unpacked(rep, NULL);
    sc->t = mono();
    if (!text || scrape_parse(text, sc)) {
        snprintf(msg, len, "out of memory");
        return -1;
    }
    return 0;
}

int kvarc_top(kvc_conn *k, const char *target, double interval, long count)
{
    if (!(interval > 0) || interval > 3600 || count < 0) {
        fprintf(stderr, "kvarc top: --interval takes seconds in (0, 3600], --count a number >= 0\n");
        return 2;
    }
    int tty = isatty(STDOUT_FILENO);
    struct sigaction sa = { .sa_handler = on_int };
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    scrape prev = { 0 }, cur = { 0 };
    char msg[300];
    int st = read_metrics(k, &prev, msg, sizeof msg);
    if (st)
        return st < 0 ? (fprintf(stderr, "kvarc top: %s\n", msg), 1) : kvarc_admin_fail(st, "top", msg, target);
    show(&prev, NULL, target, tty);                 /* the first view: since kvarcd started */
    for (long shown = 1; !stop && (!count || shown < count); shown++) {
        struct timespec d = { (time_t)interval, (long)((interval - floor(interval)) * 1e9) };
        while (nanosleep(&d, &d) && !stop)
            ;
        if (stop)
            break;
        if ((st = read_metrics(k, &cur, msg, sizeof msg))) {
            scrape_free(&prev);
            return st < 0 ? (fprintf(stderr, "kvarc top: %s\n", msg), 1) : kvarc_admin_fail(st, "top", msg, target);
        }
        show(&cur, &prev, target, tty);
        scrape_free(&prev);
        prev = cur;
        memset(&cur, 0, sizeof cur);
    }
    scrape_free(&prev);
    return 0;
}
