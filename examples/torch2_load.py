"""The demo's last step: PyTorch 2.x loads the checkpoint dcpp saved, resharded.

    python torch2_load.py CKPT MODEL_PT [WORLD]

WORLD gloo ranks (default 2) load CKPT with torch.distributed.checkpoint into DTensors sharded by
columns (dcpp saved them by rows with 4 ranks) and check every element of their shards against
the demo's formula; rank 0 also torch.load()s MODEL_PT, the `dcpp convert --to torch` output.
"""
import os
import sys
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, zeros

warnings.filterwarnings("ignore")


def value_at(layer, rows, cols):
    # The demo's values (examples/demo.cc ValueAt): ((l*131 + r*7 + c) % 1000) * 0.5.
    return ((layer * 131 + rows[:, None] * 7 + cols[None, :]) % 1000).to(torch.float32) * 0.5


def run(rank, world, init_file, path, model_pt):
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank,
                            world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    md = dcp.FileSystemReader(path).read_metadata()
    sd = {"model": {}, "step": 0}
    for fqn, m in md.state_dict_metadata.items():
        if not isinstance(m, TensorStorageMetadata):
            continue
        _, layer, name = fqn.split(".")
        placements = [Shard(1)] if len(m.size) == 2 else [Replicate()]
        sd["model"].setdefault(layer, {})[name] = zeros(
            m.size, dtype=m.properties.dtype, device_mesh=mesh, placements=placements)
    t0 = time.monotonic()
    dcp.load(sd, checkpoint_id=path)
    seconds = time.monotonic() - t0
    nbytes = 0
    for layer, tensors in sd["model"].items():
        w = tensors["weight"]
        local = w.to_local()
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
        shape, offset = compute_local_shape_and_global_offset(w.shape, mesh, w.placements)
        want = value_at(int(layer.removeprefix("layer")), torch.arange(shape[0]) + offset[0],
                        torch.arange(shape[1]) + offset[1])
        assert torch.equal(local, want), f"rank {rank}: {layer}.weight differs"
        bias = tensors["bias"].to_local()
        assert torch.equal(bias, int(layer.removeprefix("layer")) + torch.arange(
            bias.shape[0], dtype=torch.float32)), f"rank {rank}: {layer}.bias differs"
        nbytes += local.numel() * local.element_size()
    assert sd["step"] == 1000, sd["step"]
    dist.barrier()
    if rank == 0:
        print(f"   {world} ranks loaded {len(sd['model'])} layers by columns "
              f"(saved by rows), {nbytes / 1e6:.0f} MB on rank 0 in {seconds:.2f} s: "
              f"values check out")
        full = torch.load(model_pt, weights_only=True)
        w = full["model"]["layer3"]["weight"]
        r, c = 4321 % w.shape[0], 1234 % w.shape[1]
        assert w[r, c].item() == ((3 * 131 + r * 7 + c) % 1000) * 0.5, w[r, c]
        print(f"   torch.load of the converted file: {len(full['model'])} layers, "
              f"step {full['step']}, layer3.weight{list(w.shape)} {w.dtype}: values check out")
    dist.destroy_process_group()


def main():
    path, model_pt = sys.argv[1], sys.argv[2]
    world = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(run, args=(world, os.path.join(tmp, "pg"), path, model_pt), nprocs=world,
                 join=True)


if __name__ == "__main__":
    main()
