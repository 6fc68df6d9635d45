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
"$build"/dcpp inspect "$out/ckpt" > "$out/inspect.txt"
sed -n 1,12p "$out/inspect.txt"
echo "..."
tail -n 1 "$out/inspect.txt"
echo
echo "== dcpp convert to torch.save, then inspect it"
"$build"/dcpp convert "$out/ckpt" "$out/model.pt" --to torch
"$build"/dcpp inspect "$out/model.pt" > "$out/inspect_pt.txt"
tail -n 4 "$out/inspect_pt.txt"
echo
echo "== dcpp diff DCP vs torch.save"
"$build"/dcpp diff "$out/ckpt" "$out/model.pt" > "$out/diff.txt"
tail -n 1 "$out/diff.txt"
