/* test_prom.c - the Prometheus text format helpers (storaged/prom.h): the
 * exact text of a counter family, label escaping, doubles, a histogram
 * after a few observations and an empty one, sticky errors, growth. */
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "prom.h"
#include "testutil.h"

/* CHECK that b holds exactly want, showing both when not. */
#define CHECK_TEXT(b, want)                                                                  \
    CHECK((b)->err == 0 && (b)->data && !strcmp((b)->data, (want)) && (b)->len == strlen(want), \
          "err %d (%s)\n--- got ---\n%s\n--- want ---\n%s", (b)->err, (b)->errmsg,            \
          (b)->data ? (b)->data : "(null)", (want))

static void test_counter(void)
{
    prom_buf b;
    prom_buf_init(&b);
    prom_family(&b, "kvarc_appends_total", "counter", "Blocks appended.\nSecond line, a \\ and a \"quote\".");
    prom_sample_u64(&b, "kvarc_appends_total", NULL, 42);
    prom_sample_u64(&b, "kvarc_appends_total", "", 0);
    prom_sample_u64(&b, "kvarc_appends_total", "ns=\"a\"", UINT64_MAX);
    CHECK_TEXT(&b, "# HELP kvarc_appends_total Blocks appended.\\nSecond line, a \\\\ and a \"quote\".\n"
                   "# TYPE kvarc_appends_total counter\n"
                   "kvarc_appends_total 42\n"
                   "kvarc_appends_total 0\n"
                   "kvarc_appends_total{ns=\"a\"} 18446744073709551615\n");
    prom_buf_free(&b);
    CHECK(b.data == NULL && b.len == 0 && b.err == 0, "prom_buf_free leaves an empty buffer");
}

static void test_labels(void)
{
    prom_buf l, b;
    prom_buf_init(&l);
    prom_buf_init(&b);
    prom_label(&l, "method", "Ap\"pe\\nd\nx");
    prom_label(&l, "code", "OK");
    prom_label(&l, "empty", "");
    CHECK_TEXT(&l, "method=\"Ap\\\"pe\\\\nd\\nx\",code=\"OK\",empty=\"\"");
    prom_family(&b, "kvarc_calls_total", "counter", "Calls.");
    prom_sample_u64(&b, "kvarc_calls_total", l.data, 7);
    CHECK_TEXT(&b, "# HELP kvarc_calls_total Calls.\n# TYPE kvarc_calls_total counter\n"
                   "kvarc_calls_total{method=\"Ap\\\"pe\\\\nd\\nx\",code=\"OK\",empty=\"\"} 7\n");
    prom_buf_free(&l);

    /* prom_label_escape alone: the inside of the quotes, in a run of plain text */
    prom_label_escape(&l, "\\\"\n\\\\plain\"");
    CHECK_TEXT(&l, "\\\\\\\"\\n\\\\\\\\plain\\\"");
    prom_buf_free(&l);
    prom_buf_free(&b);
}

static void test_f64(void)
{
    static const struct {
        double v;
        const char *want;
    } cases[] = {
        {0.5, "g 0.5\n"},   {0.1, "g 0.1\n"},       {-3, "g -3\n"},        {1e-7, "g 1e-07\n"},
        {0, "g 0\n"},       {INFINITY, "g +Inf\n"}, {-INFINITY, "g -Inf\n"}, {NAN, "g NaN\n"},
        {123456789.25, "g 123456789.25\n"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        prom_buf b;
        prom_buf_init(&b);
        prom_sample_f64(&b, "g", NULL, cases[i].v);
        CHECK_TEXT(&b, cases[i].want);
        prom_buf_free(&b);
    }
    /* every double reads back as itself */
    double hard[] = {1.0 / 3, 0.1 + 0.2, 5e-324, 1.7976931348623157e308, 2.0 / 3 * 1e-300};
    for (size_t i = 0; i < sizeof hard / sizeof hard[0]; i++) {
        prom_buf b;
        prom_buf_init(&b);
        prom_sample_f64(&b, "g", "k=\"v\"", hard[i]);
        const char *num = b.data ? strchr(b.data, ' ') : NULL;
        CHECK(num && !strncmp(b.data, "g{k=\"v\"} ", 9) && strtod(num + 1, NULL) == hard[i],
              "%.17g written as '%s'", hard[i], b.data ? b.data : "(null)");
        prom_buf_free(&b);
    }
}

static const char *const empty_hist =
    "h_bucket{le=\"0.000025\"} 0\nh_bucket{le=\"0.00005\"} 0\nh_bucket{le=\"0.0001\"} 0\n"
    "h_bucket{le=\"0.00025\"} 0\nh_bucket{le=\"0.0005\"} 0\nh_bucket{le=\"0.001\"} 0\n"
    "h_bucket{le=\"0.0025\"} 0\nh_bucket{le=\"0.005\"} 0\nh_bucket{le=\"0.01\"} 0\n"
    "h_bucket{le=\"0.025\"} 0\nh_bucket{le=\"0.05\"} 0\nh_bucket{le=\"0.1\"} 0\n"
    "h_bucket{le=\"0.25\"} 0\nh_bucket{le=\"0.5\"} 0\nh_bucket{le=\"1\"} 0\n"
    "h_bucket{le=\"2.5\"} 0\nh_bucket{le=\"5\"} 0\nh_bucket{le=\"10\"} 0\n"
    "h_bucket{le=\"+Inf\"} 0\nh_sum 0\nh_count 0\n";

static prom_hist static_hist;   /* zero by static storage */

static void test_hist_empty(void)
{
    prom_buf b;
    prom_buf_init(&b);
    prom_hist_write(&b, "h", NULL, &static_hist);
    CHECK_TEXT(&b, empty_hist);
    prom_buf_free(&b);

    prom_hist *h = calloc(1, sizeof *h);
    CHECK(h != NULL, "calloc");
    if (!h)
        return;
    prom_hist_write(&b, "h", "", h);
    CHECK_TEXT(&b, empty_hist);
    prom_buf_free(&b);
    free(h);
}

static void test_hist(void)
{
    /* bounds are strictly increasing and match the documented seconds */
    static const double secs[PROM_HIST_NB] = {0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001,
                                              0.0025,   0.005,   0.01,   0.025,   0.05,   0.1,
                                              0.25,     0.5,     1,      2.5,     5,      10};
    for (int i = 0; i < PROM_HIST_NB; i++)
        CHECK(llround(secs[i] * 1e9) == (long long)prom_hist_bounds_ns[i] &&
                  (i == 0 || prom_hist_bounds_ns[i] > prom_hist_bounds_ns[i - 1]),
              "bound %d is %llu ns", i, (unsigned long long)prom_hist_bounds_ns[i]);

    prom_hist h = {0};
    prom_hist_observe_ns(&h, 0);             /* le 25 us */
    prom_hist_observe_ns(&h, 25000);         /* exactly on a bound: le is inclusive */
    prom_hist_observe_ns(&h, 25001);         /* le 50 us */
    prom_hist_observe_ns(&h, 3000000);       /* 3 ms: le 5 ms */
    prom_hist_observe_ns(&h, 10000000000);   /* 10 s: the last bound */
    prom_hist_observe_ns(&h, 20000000000);   /* 20 s: only +Inf */
    prom_buf b;
    prom_buf_init(&b);
    prom_family(&b, "kvarc_call_seconds", "histogram", "Call latency.");
    prom_hist_write(&b, "kvarc_call_seconds", "method=\"Append\"", &h);
    /* sum: 0 + 25000 + 25001 + 3000000 + 1e10 + 2e10 ns = 30.003050001 s */
    CHECK_TEXT(&b, "# HELP kvarc_call_seconds Call latency.\n# TYPE kvarc_call_seconds histogram\n"
                   "kvarc_call_seconds_bucket{method=\"Append\",le=\"0.000025\"} 2\n"
                   "kvarc_call_seconds_bucket{method=\"Append\",le=\"0.00005\"} 3\n"
                   "kvarc_call_seconds_bucket{method=\"Append\",le=\"0.0001\"} 3\n"
                   "kvarc_call_seconds_bucket{method=\"Append\",le=\"0.00025\"} 3\n"
                   "kvarc_call_seconds_bucket{method=\"Append\",le=\"0.0005\"} 3\n"
                   "kvarc_call_seconds_bucket{method=\"Append\",le=\"0.001\"} 3\n"
                   "kvarc_call_seconds_bucket{method=\"Append\",le=\"0.0025\"} 3\n"
                   "kvarc_call_seconds_bucket{method=\"Append\",le=\"0.005\"} 4\n"
                   "kvarc_call_seconds_bucket{method=\"Append\",le=\"0.01\"} 4\n"
                   "kvarc_call_seconds_bucket{method=\"Append\",le=\"0.025\"} 4\n"
                   "kvarc_call_seconds_bucket{method=\"Append\",le=\"0.05\"} 4\n"
                   "kvarc_call_seconds_bucket{method=\"Append\",le=\"0.1\"} 4\n"
                   "kvarc_call_seconds_bucket{method=\"Append\",le=\"0.25\"} 4\n"
                   "kvarc_call_seconds_bucket{method=\"Append\",le=\"0.5\"} 4\n"
                   "kvarc_call_seconds_bucket{method=\"Append\",le=\"1\"} 4\n"
                   "kvarc_call_seconds_bucket{method=\"Append\",le=\"2.5\"} 4\n"
                   "kvarc_call_seconds_bucket{method=\"Append\",le=\"5\"} 4\n"
                   "kvarc_call_seconds_bucket{method=\"Append\",le=\"10\"} 5\n"
                   "kvarc_call_seconds_bucket{method=\"Append\",le=\"+Inf\"} 6\n"
                   "kvarc_call_seconds_sum{method=\"Append\"} 30.003050001\n"
                   "kvarc_call_seconds_count{method=\"Append\"} 6\n");
    prom_buf_free(&b);

    /* a sum of whole seconds has no fraction; trailing zeros go */
    prom_hist w = {0};
    prom_hist_observe_ns(&w, 2000000000);
    prom_hist_observe_ns(&w, 1050000000);
    prom_hist_write(&b, "w", NULL, &w);
    CHECK(b.data && strstr(b.data, "\nw_sum 3.05\nw_count 2\n"), "got:\n%s", b.data ? b.data : "(null)");
    prom_buf_free(&b);
    prom_hist_observe_ns(&w, 950000000);
    prom_hist_write(&b, "w", NULL, &w);
    CHECK(b.data && strstr(b.data, "\nw_sum 4\nw_count 3\n"), "got:\n%s", b.data ? b.data : "(null)");
    prom_buf_free(&b);
}

/* Threads observing at once lose nothing: count and sum exact. */
enum { OBS_THREADS = 4, OBS_EACH = 200000 };

static void *observer(void *arg)
{
    prom_hist *h = arg;
    for (uint64_t i = 0; i < OBS_EACH; i++)
        prom_hist_observe_ns(h, i % 3 ? 1000 : 30000);   /* two buckets, the first twice as often */
    return NULL;
}

static void test_hist_threads(void)
{
    static prom_hist h;
    pthread_t t[OBS_THREADS];
    int started = 0;
    for (; started < OBS_THREADS; started++)
        if (pthread_create(&t[started], NULL, observer, &h))
            break;
    CHECK(started == OBS_THREADS, "started %d threads", started);
    for (int i = 0; i < started; i++)
        pthread_join(t[i], NULL);
    /* 4 x 200000 = 800000 observations, 4 x 66667 = 266668 of them 30 us;
     * sum 533332 us + 266668 x 30 us = 8.533372 s */
    prom_buf b;
    prom_buf_init(&b);
    prom_hist_write(&b, "t", NULL, &h);
    CHECK(b.data && strstr(b.data, "t_bucket{le=\"0.000025\"} 533332\nt_bucket{le=\"0.00005\"} 800000\n") &&
              strstr(b.data, "t_bucket{le=\"+Inf\"} 800000\nt_sum 8.533372\nt_count 800000\n"),
          "got\n%s", b.data ? b.data : "(null)");
    prom_buf_free(&b);
}

/* Bad names set a sticky -EINVAL that says which; later good appends change nothing. */
static void test_errors(void)
{
    static const struct {
        int kind;   /* 0 family name, 1 family type, 2 sample name, 3 label key, 4 hist name */
        const char *arg, *want;
    } cases[] = {
        {0, "1abc", "metric name '1abc'"},     {0, "", "metric name ''"},
        {0, "a-b", "metric name 'a-b'"},       {1, "counters", "type 'counters'"},
        {2, "a b", "metric name 'a b'"},       {3, "a:b", "label name 'a:b'"},
        {3, "9", "label name '9'"},            {4, "h{", "metric name 'h{'"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        prom_buf b;
        prom_buf_init(&b);
        prom_sample_u64(&b, "ok_before", NULL, 1);
        switch (cases[i].kind) {
        case 0: prom_family(&b, cases[i].arg, "counter", "x"); break;
        case 1: prom_family(&b, "m", cases[i].arg, "x"); break;
        case 2: prom_sample_u64(&b, cases[i].arg, NULL, 1); break;
        case 3: prom_label(&b, cases[i].arg, "v"); break;
        case 4: prom_hist_write(&b, cases[i].arg, NULL, &static_hist); break;
        }
        prom_sample_u64(&b, "ok_after", NULL, 2);
        prom_buf_printf(&b, "more %d\n", 3);
        CHECK(b.err == -EINVAL && strstr(b.errmsg, cases[i].want) && b.data &&
                  !strcmp(b.data, "ok_before 1\n"),
              "case %zu: err %d, errmsg '%s', text '%s'", i, b.err, b.errmsg, b.data ? b.data : "(null)");
        prom_buf_free(&b);
    }
    /* the first error is the one reported */
    prom_buf e;
    prom_buf_init(&e);
    prom_sample_u64(&e, "first bad", NULL, 1);
    prom_label(&e, "second bad", "v");
    CHECK(e.err == -EINVAL && strstr(e.errmsg, "'first bad'") && !e.len, "errmsg '%s'", e.errmsg);
    prom_buf_free(&e);
    CHECK(e.err == 0 && !e.errmsg[0], "prom_buf_free clears the error");

    /* names the format allows */
    prom_buf b;
    prom_buf_init(&b);
    prom_family(&b, "_a:b_9", "gauge", NULL);
    CHECK_TEXT(&b, "# HELP _a:b_9 \n# TYPE _a:b_9 gauge\n");
    prom_buf_free(&b);
    prom_label(&b, "_k9", NULL);
    CHECK_TEXT(&b, "_k9=\"\"");
    prom_buf_free(&b);
}

/* Growth past the first allocation many times over, text intact. */
static void test_growth(void)
{
    prom_buf b = {0};   /* zero-initialized is as good as prom_buf_init */
    enum { N = 20000 };
    for (int i = 0; i < N; i++)
        prom_buf_printf(&b, "line_%d %d\n", i, i * 7);
    char big[3000];
    memset(big, 'x', sizeof big - 1);
    big[sizeof big - 1] = '\0';
    prom_buf_printf(&b, "%s\n", big);   /* one append larger than the doubling step alone */
    prom_buf_append(&b, "end", 3);
    CHECK(b.err == 0 && b.data && b.len == strlen(b.data) && b.len < b.cap, "err %d len %zu cap %zu", b.err,
          b.len, b.cap);
    size_t want = 0;
    char line[64];
    int ok = b.data != NULL;
    const char *p = b.data;
    for (int i = 0; ok && i < N; i++) {
        int n = snprintf(line, sizeof line, "line_%d %d\n", i, i * 7);
        ok = !strncmp(p, line, (size_t)n);
        p += n;
        want += (size_t)n;
    }
    CHECK(ok, "the lines came out as written");
    CHECK(ok && !strncmp(p, big, sizeof big - 1) && !strcmp(p + sizeof big - 1, "\nend"), "the tail");
    CHECK(b.len == want + sizeof big - 1 + 1 + 3, "len %zu", b.len);
    prom_buf_free(&b);

    /* one byte at a time, so some append lands exactly on the end of the
     * allocation: the NUL still needs room (len < cap) */
    prom_buf c;
    prom_buf_init(&b);
    prom_buf_init(&c);
    int room = 1;
    for (int i = 0; i < 5000; i++) {
        prom_buf_append(&b, "x", 1);
        prom_buf_printf(&c, "%c", 'y');
        room &= b.len < b.cap && c.len < c.cap && b.data[b.len] == '\0' && c.data[c.len] == '\0';
    }
    CHECK(room && b.err == 0 && c.err == 0 && b.len == 5000 && c.len == 5000 && strspn(b.data, "x") == 5000 &&
              strspn(c.data, "y") == 5000,
          "byte by byte: len %zu/%zu cap %zu/%zu", b.len, c.len, b.cap, c.cap);
    prom_buf_free(&b);
    prom_buf_free(&c);
}

int main(void)
{
    test_counter();
    test_labels();
    test_f64();
    test_hist_empty();
    test_hist();
    test_hist_threads();
    test_errors();
    test_growth();
    return tu_finish("test_prom");
}
