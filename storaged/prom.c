/* prom.c - Prometheus text exposition format (0.0.4): buffer, samples, histogram.
 *
 * Design notes
 * prom_buf: one allocation that doubles as it fills; text stays NUL-
 * terminated after every append. Invariants: 1. len < cap whenever data is
 * not NULL; 2. once err is set nothing is appended (so a half-written line
 * can only be the last one, and a caller checking err never serves it).
 *
 * prom_hist (states: all zero = empty --prom_hist_observe_ns--> counting;
 * there is no reset): observation is the hot path, called by RPC workers
 * after every call, so it takes no lock: one relaxed atomic add to the
 * observation's bucket and one to sum_ns. The count is the sum of the
 * buckets, computed by prom_hist_write, not a third counter: that makes
 * observation two adds instead of three, and a scrape can never show a
 * +Inf bucket different from _count. The sum is kept in integer
 * nanoseconds so adds are exact (a double would need a CAS loop and lose
 * digits); it overflows after 584 years of total observed time. A scrape
 * reads each counter once, relaxed: an observation in flight may be in its
 * bucket and not yet in the sum, which Prometheus tolerates (counters only
 * need to be monotonic, and each is).
 */
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "prom.h"

const uint64_t prom_hist_bounds_ns[PROM_HIST_NB] = {
    25000ull, 50000ull, 100000ull, 250000ull, 500000ull,     /* 25 us .. 500 us */
    1000000ull, 2500000ull, 5000000ull,                      /* 1 ms .. 5 ms */
    10000000ull, 25000000ull, 50000000ull,                   /* 10 ms .. 50 ms */
    100000000ull, 250000000ull, 500000000ull,                /* 100 ms .. 500 ms */
    1000000000ull, 2500000000ull, 5000000000ull, 10000000000ull,   /* 1 s .. 10 s */
};

/* The same bounds as the le label values: written out, not formatted from
 * doubles, so they read the same in every scrape and every query. */
static const char *const bound_le[PROM_HIST_NB] = {
    "0.000025", "0.00005", "0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01",
    "0.025",    "0.05",    "0.1",    "0.25",    "0.5",    "1",     "2.5",    "5",     "10",
};

/* ---- prom_buf ---------------------------------------------------------- */

void prom_buf_init(prom_buf *b)
{
    memset(b, 0, sizeof *b);
}

void prom_buf_free(prom_buf *b)
{
    free(b->data);
    prom_buf_init(b);
}

static void set_err(prom_buf *b, int err, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void set_err(prom_buf *b, int err, const char *fmt, ...)
{
    if (b->err)
        return;
    b->err = err;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(b->errmsg, sizeof b->errmsg, fmt, ap);
    va_end(ap);
}

/* Room for n more bytes and the NUL; 0, or -ENOMEM recorded in b. */
static int reserve(prom_buf *b, size_t n)
{
    if (b->err)
        return b->err;
    if (b->data && n < b->cap - b->len)
        return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap - b->len <= n) {
        if (cap > SIZE_MAX / 2) {
            set_err(b, -ENOMEM, "metrics text: %zu + %zu bytes is more than memory can hold", b->len, n);
            return b->err;
        }
        cap *= 2;
    }
    char *d = realloc(b->data, cap);
    if (!d) {
        set_err(b, -ENOMEM, "metrics text: out of memory growing the buffer to %zu bytes", cap);
        return b->err;
    }
    if (!b->data)
        d[0] = '\0';
    b->data = d;
    b->cap = cap;
    return 0;
}

void prom_buf_append(prom_buf *b, const char *s, size_t n)
{
    if (reserve(b, n))
        return;
    memcpy(b->data + b->len, s, n);
    b->len += n;
    b->data[b->len] = '\0';
}

void prom_buf_vprintf(prom_buf *b, const char *fmt, va_list ap)
{
    if (reserve(b, 0))
        return;
    va_list ap2;
    va_copy(ap2, ap);
    size_t room = b->cap - b->len;
    int n = vsnprintf(b->data + b->len, room, fmt, ap);
    if (n < 0)
        set_err(b, -EINVAL, "metrics text: cannot format \"%s\"", fmt);
    else if ((size_t)n < room)
        b->len += (size_t)n;           /* it fitted */
    else if (!reserve(b, (size_t)n)) {
        vsnprintf(b->data + b->len, b->cap - b->len, fmt, ap2);
        b->len += (size_t)n;
    }
    b->data[b->len] = '\0';           /* undoes a truncated or failed attempt */
    va_end(ap2);
}

void prom_buf_printf(prom_buf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    prom_buf_vprintf(b, fmt, ap);
    va_end(ap);
}

/* ---- names and escaping -------------------------------------------------- */

/* Metric names: [a-zA-Z_:][a-zA-Z0-9_:]*; label names the same without ':'. */
static int name_ok(const char *s, int colon)
{
    if (!s || !*s)
        return 0;
    for (const char *p = s; *p; p++) {
        char c = *p;
        int ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || (colon && c == ':') ||
                 (p > s && c >= '0' && c <= '9');
        if (!ok)
            return 0;
    }
    return 1;
}

static int check_metric(prom_buf *b, const char *name)
{
    if (b->err)
        return b->err;
    if (!name_ok(name, 1))
        set_err(b, -EINVAL, "metric name '%s' is not [a-zA-Z_:][a-zA-Z0-9_:]*", name ? name : "(null)");
    return b->err;
}

/* Appends s with '\' and newline escaped, and '"' too when quote is set. */
static void escape(prom_buf *b, const char *s, int quote)
{
    const char *run = s;
    for (const char *p = s;; p++) {
        const char *rep = *p == '\\' ? "\\\\" : *p == '\n' ? "\\n" : (quote && *p == '"') ? "\\\"" : NULL;
        if (!rep && *p)
            continue;
        prom_buf_append(b, run, (size_t)(p - run));
        if (!*p)
            return;
        prom_buf_append(b, rep, 2);
        run = p + 1;
    }
}

void prom_label_escape(prom_buf *b, const char *value)
{
    escape(b, value ? value : "", 1);
}

void prom_label(prom_buf *b, const char *key, const char *value)
{
    if (b->err)
        return;
    if (!name_ok(key, 0)) {
        set_err(b, -EINVAL, "label name '%s' is not [a-zA-Z_][a-zA-Z0-9_]*", key ? key : "(null)");
        return;
    }
    prom_buf_printf(b, "%s%s=\"", b->len ? "," : "", key);
    prom_label_escape(b, value);
    prom_buf_append(b, "\"", 1);
}

/* ---- families and samples ---------------------------------------------- */

void prom_family(prom_buf *b, const char *name, const char *type, const char *help)
{
    static const char *const types[] = {"counter", "gauge", "histogram", "summary", "untyped"};
    if (check_metric(b, name))
        return;
    int known = 0;
    for (size_t i = 0; type && i < sizeof types / sizeof types[0]; i++)
        known |= !strcmp(type, types[i]);
    if (!known) {
        set_err(b, -EINVAL, "metric %s: type '%s' is not counter, gauge, histogram, summary or untyped", name,
                type ? type : "(null)");
        return;
    }
    prom_buf_printf(b, "# HELP %s ", name);
    escape(b, help ? help : "", 0);
    prom_buf_printf(b, "\n# TYPE %s %s\n", name, type);
}

/* "name" or "name{labels}", then a space. */
static void sample_head(prom_buf *b, const char *name, const char *labels)
{
    if (labels && *labels)
        prom_buf_printf(b, "%s{%s} ", name, labels);
    else
        prom_buf_printf(b, "%s ", name);
}

void prom_sample_u64(prom_buf *b, const char *name, const char *labels, uint64_t v)
{
    if (check_metric(b, name))
        return;
    sample_head(b, name, labels);
    prom_buf_printf(b, "%llu\n", (unsigned long long)v);
}

void prom_sample_f64(prom_buf *b, const char *name, const char *labels, double v)
{
    if (check_metric(b, name))
        return;
    sample_head(b, name, labels);
    if (isnan(v)) {
        prom_buf_printf(b, "NaN\n");
    } else if (isinf(v)) {
        prom_buf_printf(b, "%sInf\n", v > 0 ? "+" : "-");
    } else {
        /* 15 digits reads better (0.1, not 0.10000000000000001); 17 when
         * 15 would not read back as the same double */
        char s[40];
        snprintf(s, sizeof s, "%.15g", v);
        if (strtod(s, NULL) != v)
            snprintf(s, sizeof s, "%.17g", v);
        prom_buf_printf(b, "%s\n", s);
    }
}

/* ---- prom_hist ------------------------------------------------------------ */

void prom_hist_observe_ns(prom_hist *h, uint64_t ns)
{
    size_t i = 0;
    while (i < PROM_HIST_NB && ns > prom_hist_bounds_ns[i])
        i++;
    atomic_fetch_add_explicit(&h->bucket[i], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&h->sum_ns, ns, memory_order_relaxed);
}

void prom_hist_write(prom_buf *b, const char *name, const char *labels, const prom_hist *h)
{
    if (check_metric(b, name))
        return;
    const char *sep = labels && *labels ? "," : "";
    if (!labels)
        labels = "";
    uint64_t cum = 0;
    for (size_t i = 0; i <= PROM_HIST_NB; i++) {
        cum += atomic_load_explicit(&h->bucket[i], memory_order_relaxed);
        prom_buf_printf(b, "%s_bucket{%s%sle=\"%s\"} %llu\n", name, labels, sep,
                        i < PROM_HIST_NB ? bound_le[i] : "+Inf", (unsigned long long)cum);
    }
    /* seconds, exact: the integer part, then the nanoseconds without their
     * trailing zeros (3050000000 ns is 3.05) */
    uint64_t ns = atomic_load_explicit(&h->sum_ns, memory_order_relaxed);
    char frac[16] = "";
    unsigned long long f = ns % 1000000000u;
    if (f) {
        int digits = 9;
        for (; f % 10 == 0; f /= 10)
            digits--;
        snprintf(frac, sizeof frac, ".%0*llu", digits, f);
    }
    if (*labels) {
        prom_buf_printf(b, "%s_sum{%s} %llu%s\n", name, labels, (unsigned long long)(ns / 1000000000u), frac);
        prom_buf_printf(b, "%s_count{%s} %llu\n", name, labels, (unsigned long long)cum);
    } else {
        prom_buf_printf(b, "%s_sum %llu%s\n", name, (unsigned long long)(ns / 1000000000u), frac);
        prom_buf_printf(b, "%s_count %llu\n", name, (unsigned long long)cum);
    }
}
