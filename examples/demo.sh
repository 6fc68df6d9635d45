#!/usr/bin/env bash
# The README demo: save a sharded state dict with 4 ranks, reload it with 3 under another
# sharding, inspect the checkpoint, and convert it to one torch.save file.
set -euo pipefail
build=${1:-build}
out=${DCPP_DEMO_DIR:-/tmp/dcpp-demo}
mkdir -p "$out"
"$build"/examples/dcpp_demo "$out" --mb "${DCPP_DEMO_MB:-320}"
echo
echo "== dcpp inspect (first lines)"
"$build"/dcpp inspect "$out/ckpt" | head -n 12
echo "..."
"$build"/dcpp inspect "$out/ckpt" | tail -n 1
echo
echo "== dcpp convert to torch.save, then inspect it"
"$build"/dcpp convert "$out/ckpt" "$out/model.pt" --to torch
"$build"/dcpp inspect "$out/model.pt" | tail -n 4
"$build"/dcpp diff "$out/ckpt" "$out/model.pt" | tail -n 1
