#!/usr/bin/env bash
# The README demo: save a sharded state dict with 4 ranks, reload it with 3 under another
# sharding, inspect the checkpoint and draw its shard map, convert it to one torch.save file, and
# load both in PyTorch 2.x.
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
echo "== dcpp inspect --svg: layer0's shard map, and what 3 column-sharded readers read"
"$build"/dcpp inspect "$out/ckpt" --svg "$out/shard_map.svg" --match 'model.layer0.*' --ranks 3 --dim 1
echo
echo "== dcpp convert to torch.save, then inspect it"
"$build"/dcpp convert "$out/ckpt" "$out/model.pt" --to torch
"$build"/dcpp inspect "$out/model.pt" > "$out/inspect_pt.txt"
tail -n 4 "$out/inspect_pt.txt"
echo
echo "== dcpp diff DCP vs torch.save"
"$build"/dcpp diff "$out/ckpt" "$out/model.pt" > "$out/diff.txt"
tail -n 1 "$out/diff.txt"
# The last step: PyTorch 2.x (scripts/setup's venv) loads the dcpp checkpoint resharded, and the
# converted torch.save file.
py=${DCPP_TORCH2_PYTHON:-$("$(dirname "$0")"/../scripts/venv-path)/bin/python}
echo
echo "== PyTorch $("$py" -c 'import torch; print(torch.__version__)') loads the DCP checkpoint with 2 ranks, resharded"
timeout 600 "$py" "$(dirname "$0")"/torch2_load.py "$out/ckpt" "$out/model.pt" 2
