#!/usr/bin/env bash
# test_ceph_cluster: tools/ceph-cluster brings up a real cluster on loopback
# (1 mon, 1 mgr, 3 OSDs, cephx, pool size 3) that the RADOS backend's tests
# will run on (issue 19). Checks: every PG clean; the client user it makes
# writes and reads its pool and nothing else (cephx scopes it); with one OSD
# killed -9 a write is still acknowledged and read back (size 3, min_size 2);
# stop leaves no daemon and no directory. Exit 77 without the Ceph packages.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
command -v ceph-osd >/dev/null && command -v rados >/dev/null || { echo "test_ceph_cluster: no Ceph packages: skipped"; exit 77; }
[ "$(id -u)" = 0 ] || { echo "test_ceph_cluster: needs root: skipped"; exit 77; }
dir=$(mktemp -d /tmp/kvarc-ceph.XXXXXX)
rmdir "$dir"
fail() { echo "FAIL: $*" >&2; bash "$root/tools/ceph-cluster" stop "$dir" --keep >/dev/null 2>&1; echo "logs: $dir/log" >&2; exit 1; }
trap 'bash "$root/tools/ceph-cluster" stop "$dir" >/dev/null 2>&1' EXIT

out=$(bash "$root/tools/ceph-cluster" start "$dir" --osd-size 1G 2>&1) || fail "start: $out"
eval "$(grep '^CEPH_' "$dir/env")"
[ "$CEPH_POOL" = kvarc ] && [ -r "$CEPH_KEYRING" ] || fail "env: $(cat "$dir/env")"
r() { timeout 60 rados -c "$CEPH_CONF" -k "$CEPH_KEYRING" --id "$CEPH_USER" "$@"; }
adm() { timeout 60 ceph -c "$CEPH_CONF" -k "$dir/admin.keyring" -n client.admin "$@"; }

head -c 65536 /dev/urandom > "$dir/obj"
r -p kvarc put o1 "$dir/obj" || fail "put as client.kvarc"
r -p kvarc get o1 "$dir/obj.back" && cmp -s "$dir/obj" "$dir/obj.back" || fail "get as client.kvarc"
adm osd pool create other 8 8 >/dev/null 2>&1 || fail "create a second pool"
if r -p other put o1 "$dir/obj" 2>/dev/null; then fail "client.kvarc wrote to a pool outside its caps"; fi
adm pg stat | grep -q 'active+clean' || fail "pgs: $(adm pg stat)"
[ "$(adm osd pool get kvarc size -f json | grep -o '"size":[0-9]*')" = '"size":3' ] || fail "pool size"

kill -9 "$(cat "$dir/run/osd.1.pid")"
r -p kvarc put o2 "$dir/obj" || fail "put with one OSD down"
r -p kvarc get o2 "$dir/obj.back2" && cmp -s "$dir/obj" "$dir/obj.back2" || fail "get with one OSD down"

bash "$root/tools/ceph-cluster" stop "$dir" || fail "stop"
trap - EXIT
[ ! -e "$dir" ] || fail "stop left $dir"
for p in ceph-mon ceph-mgr ceph-osd; do
    pgrep -f "$p -c $dir/" >/dev/null && fail "stop left a $p"
done
echo "test_ceph_cluster: ok"
