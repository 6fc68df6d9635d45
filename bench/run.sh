#!/usr/bin/env bash
# Runs every benchmark of dcpp_bench in its own process, so each peak RSS is its own, and prints
# one table: GB/s and peak RSS beside the machine's raw limits.
#   bench/run.sh BUILD_DIR [MB]     (build with -DDCPP_BUILD_BENCHMARKS=ON; default 512 MB)
set -euo pipefail
bench=${1:?usage: bench/run.sh BUILD_DIR [MB]}/bench/dcpp_bench
export DCPP_BENCH_MB=${2:-512}
names=$("$bench" --benchmark_list_tests)
printf '%-32s %10s %14s\n' benchmark GB/s peak_RSS_MiB
for n in $names; do
  "$bench" --benchmark_filter="^${n}\$" --benchmark_format=json 2>/dev/null |
    python3 -c '
import json, sys
for b in json.load(sys.stdin)["benchmarks"]:
    name = b["name"].replace("/iterations:3/real_time", "")
    gbs, rss = b["bytes_per_second"] / 1e9, b["peak_rss_MiB"]
    print(f"{name:32s} {gbs:10.2f} {rss:14.0f}")'
done
