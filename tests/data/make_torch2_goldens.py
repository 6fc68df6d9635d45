"""Writes tests/data/dcp_213_2ranks/: checkpoints PyTorch 2.13 saved with 2 gloo ranks.

    <venv python> tests/data/make_torch2_goldens.py

Runs tests/interop/dcp2_peer.py (see there for the state dict: DTensors on 1-D and 2-D meshes,
every dtype, a model with its AdamW state, plain values) and keeps:
    expected.pt  torch.save of the whole state (every DTensor gathered)
    sync/        dcp.save: .metadata (6-field TensorProperties, StorageMeta, version) + 2 files
    nocoll/      dcp.save(use_collectives=False): __0.metadata, __1.metadata, 2 files
The dcpp suite reads them without torch (tests/integration/torch2_golden_test.cc).
"""
import os
import shutil
import subprocess
import sys

here = os.path.dirname(os.path.abspath(__file__))
out = os.path.join(here, "dcp_213_2ranks")
shutil.rmtree(out, ignore_errors=True)
peer = os.path.join(here, "..", "interop", "dcp2_peer.py")
subprocess.run([sys.executable, peer, "save", out, "2", "--modes", "sync,nocoll"], check=True,
               timeout=300)
for root, _, files in os.walk(out):
    for f in files:
        print(os.path.relpath(os.path.join(root, f), here), os.path.getsize(os.path.join(root, f)))
