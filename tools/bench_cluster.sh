#!/usr/bin/env bash
# bench_cluster.sh - the RADOS backend against the local one, in the same run
# (issue 19): bench-load (the mix of every call, every record read back
# checked) against a kvarcd on the local backend and one on a Ceph pool,
# alternated, each on a fresh data directory; then the tokens appended a
# second, Append/AppendMany/AppendStream and RerankLayer/Fetch p50 and p99,
# as ratios RADOS/local.
#
#   tools/bench_cluster.sh [--seconds S] [--clients N] [--convs M] [--pairs P] [--cluster DIR]
#
# Defaults: 30 s, 4 clients, 16 conversations, 2 pairs (local, rados,
# local, rados). Without --cluster it starts a throwaway cluster
# (tools/ceph-cluster: 1 mon, 1 mgr, 3 OSDs, pool size 3) and stops it at
# the end. Binaries from build/ (KVARC_BUILD overrides).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bld=${KVARC_BUILD:-$root/build}
secs=30 clients=4 convs=16 pairs=2 cluster=""
while [ $# -gt 0 ]; do
    case $1 in
    --seconds) secs=$2; shift 2 ;;
    --clients) clients=$2; shift 2 ;;
    --convs) convs=$2; shift 2 ;;
    --pairs) pairs=$2; shift 2 ;;
    --cluster) cluster=$2; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench_cluster: unknown argument $1" >&2; exit 2 ;;
    esac
done
work=$(mktemp -d /var/tmp/kvarc-bench-cluster.XXXXXX)
own=""
cleanup() {
    pkill -f "kvarcd --data $work/" 2>/dev/null || true
    [ -n "$own" ] && bash "$root/tools/ceph-cluster" stop "$own" >/dev/null 2>&1
    rm -rf "$work"
}
trap cleanup EXIT
if [ -z "$cluster" ]; then
    own=$work/ceph
    bash "$root/tools/ceph-cluster" start "$own" >/dev/null
    cluster=$own
fi
set -a
. "$cluster/env"
set +a

run() {     # run BACKEND N: one bench-load run, its JSON line and tokens appended to $work/BACKEND.N
    local backend=$1 n=$2 d=$work/$1.$2 extra=()
    mkdir -p "$d"
    [ "$backend" = rados ] && extra=(--rados-pool "$CEPH_POOL" --rados-conf "$CEPH_CONF" --rados-user "$CEPH_USER"
                                   --rados-keyring "$CEPH_KEYRING" --node "bench$n")
    "$bld/storaged/kvarcd" --data "$d" "${extra[@]}" 2>"$d.log" &
    local pid=$! i
    for i in $(seq 300); do [ -S "$d/kvarcd.sock" ] && break; sleep 0.1; done
    "$bld/tools/bench-load" --data "$d" --seconds "$secs" --clients "$clients" --convs "$convs" --quiet \
        > "$d.out" 2>&1 || { echo "bench_cluster: bench-load on $backend failed:"; tail -30 "$d.out"; exit 1; }
    kill -TERM $pid; wait $pid || true
    echo "$backend run $n: $(grep -c . "$d.out") lines, $(grep -o '"calls_per_s":[0-9.]*' "$d.out")"
}
for p in $(seq "$pairs"); do
    run local "$p"
    run rados "$p"
done
python3 - "$work" "$pairs" "$secs" <<'EOF'
import json, re, sys, glob
work, pairs, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
def load(b, n):
    t = open(f"{work}/{b}.{n}.out").read()
    j = json.loads([l for l in t.splitlines() if l.startswith('{"bench":"load"')][-1])
    tok = int(re.search(r"tokens appended: (\d+)", t).group(1))
    return j, tok
rows = []
for n in range(1, pairs + 1):
    (jl, tl), (jr, tr) = load("local", n), load("rados", n)
    rows.append((n, jl, tl, jr, tr))
print(f"\nbench_cluster: bench-load {secs:.0f} s per run; RADOS (pool of 3 OSDs, size 3) vs local, alternated pairs")
print(f"{'pair':>4} {'metric':<22} {'local':>10} {'rados':>10} {'rados/local':>12}")
for n, jl, tl, jr, tr in rows:
    def line(name, a, b, fmt="{:.1f}"):
        print(f"{n:>4} {name:<22} {fmt.format(a):>10} {fmt.format(b):>10} {b / a if a else float('nan'):>11.2f}x")
    line("tokens appended/s", tl / secs, tr / secs)
    line("calls/s (all)", jl["calls_per_s"], jr["calls_per_s"])
    for m in ("Append", "AppendMany", "AppendStream", "RerankLayer", "Fetch", "Open", "Create"):
        a, b = jl["methods"].get(m), jr["methods"].get(m)
        if a and b:
            line(m + " p50 ms", a["p50_ms"], b["p50_ms"], "{:.2f}")
            line(m + " p99 ms", a["p99_ms"], b["p99_ms"], "{:.2f}")
    print(f"{n:>4} {'unexpected / wrong':<22} {jl['unexpected_errors']}/{jl['wrong']:<8} {jr['unexpected_errors']}/{jr['wrong']}")
EOF
