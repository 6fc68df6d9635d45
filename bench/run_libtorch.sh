#!/usr/bin/env bash
# The libtorch adapter (dcpp::libtorch::Save/Load) against libtorch's torch::save/torch::load of
# the same model and Adam state, each measurement in its own process (its own peak RSS).
#   bench/run_libtorch.sh BUILD_DIR [MB] [DIR]   (build with -DDCPP_BUILD_BENCHMARKS=ON)
set -euo pipefail
bench=${1:?usage: bench/run_libtorch.sh BUILD_DIR [MB] [DIR]}/bench/dcpp_libtorch_bench
mb=${2:-256}
dir=${3:-$(mktemp -d)}
trap 'rm -rf "$dir"' EXIT
for mode in dcpp-save dcpp-load torch-save torch-load; do
  "$bench" "$mode" "$dir" "$mb"
done
