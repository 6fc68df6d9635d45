#!/usr/bin/env bash
# The README demo: save a sharded state dict with 4 ranks, reload it with 3 under another
# sharding, inspect the checkpoint (and draw its shard map), and convert it to one torch.save file.
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
if /usr/bin/python3 -c "import torch" 2>/dev/null; then
  echo
  echo "== torch.load of the converted file by PyTorch $(/usr/bin/python3 -c 'import torch; print(torch.__version__)')"
  /usr/bin/python3 - "$out/model.pt" <<'PY'
import sys, torch
sd = torch.load(sys.argv[1])
w = sd["model"]["layer3"]["weight"]
# The demo's values: element (r, c) of layer l is ((l*131 + r*7 + c) % 1000) * 0.5. Every element
# of layer3 is checked, whatever the size the demo ran with (DCPP_DEMO_MB).
r = torch.arange(w.shape[0], dtype=torch.int64).unsqueeze(1)
c = torch.arange(w.shape[1], dtype=torch.int64).unsqueeze(0)
expected = ((3 * 131 + r * 7 + c) % 1000).to(torch.float32) * 0.5
bad = (w != expected).nonzero()
assert bad.numel() == 0, f"layer3.weight differs at {bad[0].tolist()}: {w[tuple(bad[0])]}"
print(f"   {len(sd['model'])} layers, step {sd['step']}, layer3.weight{list(w.shape)} {w.dtype}: values check out")
PY
fi
