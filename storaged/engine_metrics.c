/* engine_metrics.c - the engine's numbers in Prometheus text format, for
 * kvarcd's /metrics: conversations, segments and bytes on disk (read at
 * the scrape: the conversation table's records and the segment table,
 * never the extents, so a scrape costs the same whatever the archive
 * holds), and the counters the engine keeps since it opened (appends,
 * group commits, their fdatasync latency, compaction and verify runs). */
#include <stdio.h>
#include <string.h>

#include "kvd_internal.h"

int kvd_metrics(kvd_engine *e, prom_buf *b, kvd_err *err)
{
    uint64_t live = 0, deleted = 0, segs = 0, bytes = 0;
    MDB_txn *txn;
    MDB_cursor *cur;
    MDB_val k, v;
    int rc = kvd_mdb_err(mdb_txn_begin(e->env, NULL, MDB_RDONLY, &txn));
    if (rc)
        return kvd_fail(err, rc, "index read failed: %s", kvarc_strerror(rc));
    if (!(rc = kvd_mdb_err(mdb_cursor_open(txn, e->convs, &cur)))) {
        for (int op = MDB_FIRST; !mdb_cursor_get(cur, &k, &v, op); op = MDB_NEXT) {
            conv_rec c;
            memcpy(&c, v.mv_data, sizeof c);
            if (c.flags & KVD_CONV_DELETED)
                deleted++;
            else
                live++;
        }
        mdb_cursor_close(cur);
    }
    mdb_txn_abort(txn);
    if (rc)
        return kvd_fail(err, rc, "index read failed: %s", kvarc_strerror(rc));
    pthread_mutex_lock(&e->seg_mu);
    for (size_t i = 0; i < e->nseg; i++)
        if (e->segtab[i].state != SEG_DEAD) {
            segs++;
            bytes += e->segtab[i].bytes;
        }
    pthread_mutex_unlock(&e->seg_mu);

    prom_family(b, "kvarc_conversations", "gauge", "Conversations in the index, live or deleted (deleted: "
                "their space returns at the next compaction).");
    prom_sample_u64(b, "kvarc_conversations", "state=\"live\"", live);
    prom_sample_u64(b, "kvarc_conversations", "state=\"deleted\"", deleted);
    prom_family(b, "kvarc_segments", "gauge", "Segment files on disk.");
    prom_sample_u64(b, "kvarc_segments", NULL, segs);
    prom_family(b, "kvarc_segment_bytes", "gauge", "Bytes of the segment files on disk.");
    prom_sample_u64(b, "kvarc_segment_bytes", NULL, bytes);
    prom_family(b, "kvarc_appended_blocks_total", "counter", "Blocks (one layer's tokens of one append) made "
                "durable since kvarcd started.");
    prom_sample_u64(b, "kvarc_appended_blocks_total", NULL, atomic_load(&e->n_appends));
    prom_family(b, "kvarc_group_commits_total", "counter", "Group commits (one write, fdatasync and index "
                "commit for every append waiting) since kvarcd started.");
    prom_sample_u64(b, "kvarc_group_commits_total", NULL, atomic_load(&e->n_commits));
    prom_family(b, "kvarc_fdatasync_seconds", "histogram", "The group commit's fdatasync of the segment.");
    prom_hist_write(b, "kvarc_fdatasync_seconds", NULL, &e->sync_hist);
    prom_family(b, "kvarc_compaction_runs_total", "counter", "Compactions started since kvarcd started.");
    prom_sample_u64(b, "kvarc_compaction_runs_total", NULL, atomic_load(&e->n_compactions));
    prom_family(b, "kvarc_verify_runs_total", "counter", "Verify runs started since kvarcd started.");
    prom_sample_u64(b, "kvarc_verify_runs_total", NULL, atomic_load(&e->n_verifies));
    prom_family(b, "kvarc_recovery_replayed_blocks", "gauge", "Valid blocks the index lacked that recovery "
                "replayed when kvarcd opened the data directory.");
    prom_sample_u64(b, "kvarc_recovery_replayed_blocks", NULL, e->n_rolled_forward);
    return 0;
}
