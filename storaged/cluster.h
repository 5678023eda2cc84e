/* cluster.h - the RADOS backend (cluster.c): what the engine's files call.
 * Not installed; kvd.h has the options (kvd_cluster_options). */
#ifndef KVD_CLUSTER_H
#define KVD_CLUSTER_H

#include "kvd_internal.h"

/* Connect e to the pool opt names (timeouts set) and start the lock
 * renewal thread: 0 or an error in err (which names the pool or setting). */
int  clu_open(kvd_engine *e, const kvd_cluster_options *opt, kvd_err *err);
/* Release every writer lock held, stop the thread, disconnect. */
void clu_close(kvd_engine *e);

/* Before a create of ns/name: a new cluster-wide id in *id, the name bound
 * to it (-EEXIST if bound to a live conversation) and its writer lock held.
 * clu_create_undo unbinds it when the create failed before it was logged. */
int  clu_create_begin(kvd_engine *e, const char *ns, const char *name, uint64_t *id, kvd_err *err);
void clu_create_undo(kvd_engine *e, const char *ns, const char *name, uint64_t id);
/* After a logged delete: the name unbound (if still bound to id). */
void clu_name_release(kvd_engine *e, const char *ns, const char *name, uint64_t id);

/* Before appending to (or deleting) conversation id: its writer lock held
 * and the cache holding its whole log. KVARC_ELOCKED naming the holder,
 * or an error. */
int  clu_writer_begin(kvd_engine *e, uint64_t id, kvd_err *err);

/* The group commit's step between the index prepare and the local write:
 * every accepted, not ingested item of batch appended to its
 * conversation's log (the durability point), the cache's log positions
 * advanced in txn. 0, or an error: the batch must then fail whole. */
int  clu_log_batch(kvd_engine *e, MDB_txn *txn, kvd_item *batch, kvd_err *err);
/* Before an item's prepare in a batch: refused alone (0, or its code with
 * it->err set) when its conversation's lock lapsed or its cache is stale,
 * instead of failing the whole batch in clu_log_batch. */
int  clu_item_check(kvd_engine *e, kvd_item *it);
/* The batch committed: the cache holds what clu_log_batch logged. */
void clu_batch_done(kvd_engine *e, kvd_item *batch);
/* The batch failed after clu_log_batch: its conversations are synced
 * again before their next use (their logs may hold what the cache lacks). */
void clu_batch_failed(kvd_engine *e, kvd_item *batch);

/* Bring the cache up to the cluster for ns/name (kvd_conv_open), for
 * conversation id, or for every name in namespace ns (NULL: all). */
int  clu_sync_name(kvd_engine *e, const char *ns, const char *name, kvd_err *err);
int  clu_sync_id(kvd_engine *e, uint64_t id, kvd_err *err);
int  clu_sync_all(kvd_engine *e, const char *ns, kvd_err *err);

/* Remove from the pool what no conversation needs: every object (head
 * and segments) of a deleted conversation that no live one descends from,
 * and of creates that died before logging; nothing changed
 * within grace_s seconds (a fork of it may be in the making; 0: the
 * --rados-gc-grace-s kvarcd runs with). The objects and bytes removed. */
int  clu_compact(kvd_engine *e, unsigned grace_s, uint64_t *objects, uint64_t *bytes, kvd_err *err);

/* Every conversation's log in the pool checked: entries 1..n without a
 * gap, each extent readable and holding whole blocks of that conversation
 * whose header and payload CRCs hold. Each problem through log (may be
 * NULL) and counted in *problems; 0, or an error reaching the pool. */
int  clu_verify(kvd_engine *e, uint64_t *problems, void (*log)(void *arg, const char *line), void *arg,
                kvd_err *err);

#endif
