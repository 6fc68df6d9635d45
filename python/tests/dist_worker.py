"""One rank of a gloo job for test_torch.py: saves DTensor state through a storage writer and
loads it back under another sharding through a storage reader.

    python dist_worker.py RANK WORLD DIR WRITER READER     (WRITER/READER: dcpp | torch)
"""
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

import dcpp.torch


def global_state():
    g = torch.Generator().manual_seed(7)
    return {
        "w": torch.randn(9, 6, generator=g),
        "emb": torch.randn(12, 4, generator=g).to(torch.bfloat16),
        "bias": torch.arange(5, dtype=torch.float32),
        "f8": torch.randn(6, 3, generator=g).to(torch.float8_e4m3fn),
    }


def writer(kind, path, **kw):
    if kind == "dcpp":
        return dcpp.torch.FileSystemWriter(path, thread_count=2, **kw)
    return dcp.FileSystemWriter(path, **kw)


def reader(kind, path):
    return dcpp.torch.FileSystemReader(path) if kind == "dcpp" else dcp.FileSystemReader(path)


def main():
    rank, world, out, wkind, rkind = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], \
        sys.argv[4], sys.argv[5]
    dist.init_process_group("gloo", init_method=f"file://{out}/pg", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    g = global_state()
    sd = {
        "model": {"w": distribute_tensor(g["w"], mesh, [Shard(0)]),
                  "emb": distribute_tensor(g["emb"], mesh, [Shard(1)]),
                  "bias": distribute_tensor(g["bias"], mesh, [Replicate()]),
                  # gloo moves no float8, so this shard is cut locally (6 rows split evenly).
                  "f8": DTensor.from_local(g["f8"].chunk(world, 0)[rank].clone(), mesh, [Shard(0)],
                                           run_check=False)},
        "step": 11, "note": {"tag": "run-a", "ranks": world},
    }
    dcp.save(sd, storage_writer=writer(wkind, f"{out}/sync"))
    fut = dcp.async_save(sd, storage_writer=writer(wkind, f"{out}/async"))
    fut.result()
    for name in ("sync", "async"):
        # Load under another sharding (rows <-> columns swapped).
        dst = {
            "model": {"w": distribute_tensor(torch.zeros(9, 6), mesh, [Shard(1)]),
                      "emb": distribute_tensor(torch.zeros(12, 4, dtype=torch.bfloat16), mesh,
                                               [Shard(0)]),
                      "bias": distribute_tensor(torch.zeros(5), mesh, [Replicate()]),
                      "f8": DTensor.from_local(torch.zeros(6, 3, dtype=torch.float8_e4m3fn),
                                               mesh, [Replicate()], run_check=False)},
            "step": 0, "note": {"tag": "", "ranks": 0},
        }
        dcp.load(dst, storage_reader=reader(rkind, f"{out}/{name}"))
        for k in ("w", "emb", "bias", "f8"):
            d = dst["model"][k]
            got = d.to_local() if k == "f8" else d.full_tensor()
            assert torch.equal(got.view(torch.uint8), g[k].view(torch.uint8)), (name, k)
        assert dst["step"] == 11 and dst["note"] == {"tag": "run-a", "ranks": world}, dst
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank}: done", flush=True)


if __name__ == "__main__":
    main()
    # Every check has passed and been reported: leave without interpreter teardown, where
    # gloo's threads occasionally abort a process ("terminate called without an active
    # exception") after the work is done.
    sys.stdout.flush()
    os._exit(0)
