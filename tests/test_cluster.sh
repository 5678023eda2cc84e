#!/usr/bin/env bash
# test_cluster.sh BINARY: a throwaway Ceph cluster (tools/ceph-cluster: 1 mon,
# 1 mgr, 3 OSDs, pool size 3), then BINARY (test_cluster) against it with the
# cluster's settings in CEPH_CONF, CEPH_KEYRING, CEPH_USER, CEPH_POOL and one
# OSD's pid file in CEPH_OSD_PIDFILE (all of them in CEPH_RUN_DIR); the cluster is stopped afterwards (kept,
# with its logs, when the test fails). Exit 77 without the Ceph packages.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$1
command -v ceph-osd >/dev/null || { echo "test_cluster: no Ceph packages: skipped"; exit 77; }
[ "$(id -u)" = 0 ] || { echo "test_cluster: needs root (the Ceph daemons): skipped"; exit 77; }
dir=$(mktemp -d /tmp/kvarc-ceph.XXXXXX)
rmdir "$dir"
trap 'bash "$root/tools/ceph-cluster" stop "$dir" >/dev/null 2>&1' EXIT
out=$(bash "$root/tools/ceph-cluster" start "$dir" --osd-size 1G 2>&1) || { echo "FAIL: cluster start: $out"; exit 1; }
set -a
. "$dir/env"
set +a
export CEPH_OSD_PIDFILE=$dir/run/osd.2.pid CEPH_RUN_DIR=$dir/run CEPH_CLUSTER_DIR=$dir KVARC_CEPH_TOOL=$root/tools/ceph-cluster
"$bin"
rc=$?
if [ $rc -ne 0 ]; then
    trap - EXIT
    bash "$root/tools/ceph-cluster" stop "$dir" --keep >/dev/null 2>&1
    echo "test_cluster: failed ($rc); the cluster's logs are in $dir/log"
fi
exit $rc
