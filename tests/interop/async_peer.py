"""PyTorch 2.x side of async_save_interop_test.cc: loads a checkpoint dcpp's AsyncSave wrote.

Usage: async_peer.py load DIR. The checkpoint holds "model.w" (float32 [8, 16], value i at flat
index i, saved as four row shards by four ranks), "model.b" (int64 [16], value 3*i, replicated
on every rank) and "step" (int 42). Exits 0 iff torch's dcp.load gives exactly those values.
"""
import sys

import torch
import torch.distributed.checkpoint as dcp


def main():
    mode, path = sys.argv[1], sys.argv[2]
    assert mode == "load", mode
    sd = {"model": {"w": torch.zeros(8, 16), "b": torch.zeros(16, dtype=torch.int64)}, "step": -1}
    dcp.load(sd, checkpoint_id=path, no_dist=True)
    want_w = torch.arange(8 * 16, dtype=torch.float32).reshape(8, 16)
    want_b = torch.arange(16, dtype=torch.int64) * 3
    ok = torch.equal(sd["model"]["w"], want_w) and torch.equal(sd["model"]["b"], want_b)
    ok = ok and sd["step"] == 42
    print(f"load {'ok' if ok else 'MISMATCH'}: {path} step={sd['step']}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
