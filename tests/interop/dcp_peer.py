"""PyTorch's own DCP (the 1.13 prototype, torch.distributed._shard.checkpoint) as a peer.

    dcp_peer.py save DIR WORLD DIM      WORLD gloo ranks save a checkpoint to DIR
    dcp_peer.py load DIR WORLD DIM [--alias]
                                        WORLD gloo ranks load DIR and check every value

The state dict (every rank): "w" float32[10, 6] and "ids" int64[7, 4], both ShardedTensors split
on dimension DIM with ChunkShardingSpec; "bias" a replicated float64[6]; "step" the int 1234.
Element values are functions of their global index (see expected()), which the C++ side
computes the same way. --alias maps the torch >= 2.0 class paths (what dcpp writes by default)
onto the prototype's classes so it can read them. Exits non-zero on any mismatch.
"""
import copy
import dataclasses
import os
import sys
import tempfile

# The 1.13 prototype does not import on Python 3.11 (a dataclass field has a mutable default);
# turn such defaults into default factories while it imports.
_orig_get_field = dataclasses._get_field


def _get_field(cls, a_name, a_type, *args):
    default = cls.__dict__.get(a_name, dataclasses.MISSING)
    if isinstance(default, dataclasses.Field):
        d = default.default
        if d is not dataclasses.MISSING and d.__class__.__hash__ is None:
            default.default = dataclasses.MISSING
            default.default_factory = lambda d=d: copy.deepcopy(d)
    return _orig_get_field(cls, a_name, a_type, *args)


dataclasses._get_field = _get_field

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.distributed._shard.checkpoint as dcp  # noqa: E402
from torch.distributed._shard import sharded_tensor  # noqa: E402
from torch.distributed._shard.sharding_spec import ChunkShardingSpec  # noqa: E402

SHAPES = {"w": ((10, 6), torch.float32), "ids": ((7, 4), torch.int64)}


def expected(name):
    shape, dtype = SHAPES[name]
    n = shape[0] * shape[1]
    idx = torch.arange(n, dtype=torch.float64).reshape(shape)
    if name == "w":
        return (idx * 0.5 - 7).to(dtype)
    return (idx * 3 + 100).to(dtype)


def expected_bias():
    return torch.arange(6, dtype=torch.float64) * 0.25 + 1


def alias_modern_paths():
    import types
    import torch.distributed._shard.checkpoint.metadata as proto
    import torch.distributed._shard.checkpoint.filesystem as proto_fs
    from torch.distributed._shard.sharded_tensor import metadata as st_md

    class StorageMeta:  # torch >= 2.4 field; the prototype ignores it
        pass

    m = types.ModuleType("torch.distributed.checkpoint.metadata")
    for n in ("Metadata", "MetadataIndex", "TensorStorageMetadata", "BytesStorageMetadata",
              "ChunkStorageMetadata"):
        setattr(m, n, getattr(proto, n))
    m.TensorProperties = st_md.TensorProperties
    m._MEM_FORMAT_ENCODING = st_md.MEM_FORMAT_ENCODING
    m.StorageMeta = StorageMeta
    fs = types.ModuleType("torch.distributed.checkpoint.filesystem")
    fs._StorageInfo = proto_fs._StorageInfo
    pkg = types.ModuleType("torch.distributed.checkpoint")
    pkg.metadata, pkg.filesystem = m, fs
    sys.modules.update({"torch.distributed.checkpoint": pkg,
                        "torch.distributed.checkpoint.metadata": m,
                        "torch.distributed.checkpoint.filesystem": fs})


def make_state_dict(world, dim, fill):
    spec = ChunkShardingSpec(dim=dim, placements=[f"rank:{r}/cpu" for r in range(world)])
    sd = {}
    for name, (shape, dtype) in SHAPES.items():
        st = sharded_tensor.empty(spec, *shape, dtype=dtype)
        for shard in st.local_shards():
            if fill:
                off, size = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                shard.tensor.copy_(expected(name)[off[0]:off[0] + size[0], off[1]:off[1] + size[1]])
            else:
                shard.tensor.zero_()
        sd[name] = st
    sd["bias"] = expected_bias() if fill else torch.zeros(6, dtype=torch.float64)
    sd["step"] = 1234 if fill else 0
    return sd


def run(rank, mode, path, world, dim, alias, init_file):
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=world)
    if mode == "save":
        dcp.save_state_dict(make_state_dict(world, dim, True), dcp.FileSystemWriter(path))
    else:
        if alias:
            alias_modern_paths()
        sd = make_state_dict(world, dim, False)
        dcp.load_state_dict(sd, dcp.FileSystemReader(path))
        bad = []
        for name in SHAPES:
            for shard in sd[name].local_shards():
                off, size = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                want = expected(name)[off[0]:off[0] + size[0], off[1]:off[1] + size[1]]
                if not torch.equal(shard.tensor, want):
                    bad.append(f"{name} shard at {off}: {shard.tensor.tolist()} != {want.tolist()}")
        if not torch.equal(sd["bias"], expected_bias()):
            bad.append(f"bias: {sd['bias'].tolist()}")
        if sd["step"] != 1234:
            bad.append(f"step: {sd['step']!r}")
        if bad:
            print(f"rank {rank}: MISMATCH\n" + "\n".join(bad), flush=True)
            sys.exit(1)
    dist.barrier()
    dist.destroy_process_group()


def main():
    mode, path, world, dim = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    alias = "--alias" in sys.argv[5:]
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "pg")
        mp.spawn(run, args=(mode, path, world, dim, alias, init_file), nprocs=world, join=True)
    print(f"{mode} ok: {world} ranks, dim {dim}")


if __name__ == "__main__":
    main()
