#!/usr/bin/env bash
# Server CPU and wall time per lock cycle for the statement variants in this directory
# (docs/benchmarks.md, session 13). Needs a PostgreSQL server on this machine at
# 127.0.0.1:PORT (user postgres, database postgres) whose `distlock` schema exists (run any
# lock against it once, or PgLocks::migrate), and pgbench. Each script is one grant and
# one release, sent as prepared statements on one connection.
#
#   bench/pgbench/run.sh PORT [ROUNDS] [CYCLES]
set -euo pipefail
port=${1:?usage: run.sh PORT [ROUNDS] [CYCLES]}
rounds=${2:-3}
cycles=${3:-40000}
dir=$(cd "$(dirname "$0")" && pwd)
export PGHOST=127.0.0.1 PGPORT=$port PGUSER=postgres PGDATABASE=postgres
datadir=$(psql -Atc "SHOW data_directory")
pm=$(head -1 "$datadir/postmaster.pid")
ticks=$(getconf CLK_TCK)
# CPU ticks of the whole server: the postmaster with its ended children, and the live ones.
cpu() {
    local t c
    t=$(awk '{print $14+$15+$16+$17}' "/proc/$pm/stat")
    for c in $(pgrep -P "$pm"); do
        t=$((t + $(awk '{print $14+$15}' "/proc/$c/stat" 2>/dev/null || echo 0)))
    done
    echo "$t"
}
scripts=(select1 bare lock-draw s12-grant s13-grant s13-no-version s13-no-name)
for r in $(seq 1 "$rounds"); do
    for s in "${scripts[@]}"; do
        a=$(cpu)
        tps=$(pgbench -n -M prepared -f "$dir/$s.sql" -t "$cycles" 2>&1 | sed -n 's/^tps = \([0-9.]*\).*/\1/p')
        sleep 0.2
        b=$(cpu)
        awk -v r="$r" -v s="$s" -v a="$a" -v b="$b" -v n="$cycles" -v hz="$ticks" -v tps="$tps" \
            'BEGIN { printf "round %s  %-15s server CPU %6.1f us/cycle  wall %6.1f us/cycle\n", r, s, (b - a) * 1e6 / hz / n, 1e6 / tps }'
    done
done
