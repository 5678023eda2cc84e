/* prom.h - Prometheus text exposition format (version 0.0.4) helpers (internal).
 *
 * What kvarcd's /metrics endpoint (metrics_http.h) writes its body with:
 *
 *     prom_buf b;
 *     prom_buf_init(&b);
 *     prom_family(&b, "kvarc_calls_total", "counter", "RPC calls answered.");
 *     prom_buf l;                                  (a label set, built safely)
 *     prom_buf_init(&l);
 *     prom_label(&l, "method", "Append");
 *     prom_label(&l, "code", "OK");
 *     prom_sample_u64(&b, "kvarc_calls_total", l.data, n);
 *     prom_buf_free(&l);
 *     if (b.err) ... b.errmsg says what went wrong ...
 *
 * produces
 *
 *     # HELP kvarc_calls_total RPC calls answered.
 *     # TYPE kvarc_calls_total counter
 *     kvarc_calls_total{method="Append",code="OK"} 42
 *
 * Errors are sticky: every append into a prom_buf returns nothing; the first
 * failure (out of memory, a metric or label name the format does not allow)
 * sets b.err to a negative errno and b.errmsg to what and where, and later
 * appends change nothing, so a caller writes many lines and checks once.
 *
 * Numbers: integers as decimal (%llu); doubles with the fewest of 15 or 17
 * significant digits that read back as the same double, and the format's
 * own spellings +Inf, -Inf and NaN.
 *
 * prom_hist: a latency histogram with fixed bucket bounds (below), updated
 * without locks. Caveats: observations racing a prom_hist_write may appear
 * in a bucket but not yet in the sum (each number is exact on its own; the
 * +Inf bucket always equals the count, as both are the same sum).
 */
#ifndef KVARC_PROM_H
#define KVARC_PROM_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

/* ---- prom_buf: a growable text buffer -------------------------------- */

typedef struct prom_buf {
    char  *data;         /* NUL-terminated text (len bytes); NULL until the first append */
    size_t len;          /* bytes of text, not counting the NUL */
    size_t cap;          /* bytes allocated at data */
    int    err;          /* 0, or the first failure's negative errno (sticky) */
    char   errmsg[160];  /* what the first failure was, "" while err is 0 */
} prom_buf;

/* An empty buffer. A zero-initialized prom_buf is the same. */
void prom_buf_init(prom_buf *b);
/* Frees the text; b is empty again (err cleared) and may be reused. */
void prom_buf_free(prom_buf *b);
/* Appends printf-style text; on failure sets b->err (-ENOMEM, or -EINVAL
 * when vsnprintf cannot format) and leaves the text as it was. */
void prom_buf_printf(prom_buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void prom_buf_vprintf(prom_buf *b, const char *fmt, va_list ap) __attribute__((format(printf, 2, 0)));
/* Appends n bytes of s. */
void prom_buf_append(prom_buf *b, const char *s, size_t n);

/* ---- families, samples, labels ---------------------------------------- */

/* "# HELP name help" (help with '\' and newline escaped as \\ and \n) and
 * "# TYPE name type". type: "counter", "gauge", "histogram", "summary" or
 * "untyped"; name: [a-zA-Z_:][a-zA-Z0-9_:]*. Anything else: -EINVAL. */
void prom_family(prom_buf *b, const char *name, const char *type, const char *help);

/* "name{labels} v" and a newline; "name v" when labels is NULL or "".
 * labels is an already formatted label set without braces, such as
 * method="Append",code="OK" (build it with prom_label). */
void prom_sample_u64(prom_buf *b, const char *name, const char *labels, uint64_t v);
void prom_sample_f64(prom_buf *b, const char *name, const char *labels, double v);

/* Appends value with '\', '"' and newline escaped as \\, \" and \n: the
 * inside of a label value's quotes. */
void prom_label_escape(prom_buf *b, const char *value);
/* Appends key="value" (value escaped), preceded by a comma when b already
 * holds text, so successive calls build a label set. key:
 * [a-zA-Z_][a-zA-Z0-9_]*, else -EINVAL. */
void prom_label(prom_buf *b, const char *key, const char *value);

/* ---- prom_hist: a lock-free latency histogram -------------------------- */

/* Bucket upper bounds, seconds (le is "less than or equal"): exponential,
 * 1 - 2.5 - 5 per decade (x2 or x2.5 a step), from 25 us to 10 s:
 *   0.000025 0.00005 0.0001 0.00025 0.0005 0.001 0.0025 0.005 0.01
 *   0.025 0.05 0.1 0.25 0.5 1 2.5 5 10, then +Inf. */
#define PROM_HIST_NB 18
extern const uint64_t prom_hist_bounds_ns[PROM_HIST_NB];   /* the same bounds, nanoseconds */

typedef struct prom_hist {
    _Atomic uint64_t bucket[PROM_HIST_NB + 1];   /* observations per bucket, NOT cumulative:
                                                    [i] <= bound i and > bound i-1; [NB] above 10 s */
    _Atomic uint64_t sum_ns;                     /* total of every observation, nanoseconds */
} prom_hist;

/* All zero is an empty histogram: static storage, calloc or memset. The
 * count is not stored; prom_hist_write adds the buckets up. */

/* Records one observation of ns nanoseconds: two relaxed atomic adds, safe
 * from any number of threads at once. */
void prom_hist_observe_ns(prom_hist *h, uint64_t ns);

/* Writes the samples of one histogram (prom_family(..., "histogram", ...)
 * comes first, once per name): cumulative name_bucket{labels,le="..."}
 * lines for every bound and le="+Inf", then name_sum (seconds, exact from
 * the nanoseconds) and name_count. labels as for prom_sample_u64. */
void prom_hist_write(prom_buf *b, const char *name, const char *labels, const prom_hist *h);

#endif
