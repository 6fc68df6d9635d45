# Peer of safetensors_interop_test.cc: the real Python safetensors package and PyTorch's
# HuggingFaceStorageWriter/Reader, consolidate_safetensors_files and
# QuantizedHuggingFaceStorageReader, on files the C++ side writes or reads.
#
# Tensor values are a function both sides compute: byte i of the tensor with seed k is
# (i * 131 + k * 17 + 7) % 256 (bool: that & 1), viewed as the dtype, row-major.
import json
import os
import socket
import sys
import warnings

import torch

warnings.filterwarnings("ignore")

DTYPES = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
    "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32,
    "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
    "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2,
    "float8_e4m3fnuz": torch.float8_e4m3fnuz, "float8_e5m2fnuz": torch.float8_e5m2fnuz,
    "complex64": torch.complex64, "uint16": torch.uint16, "uint32": torch.uint32,
    "uint64": torch.uint64,
}


def pattern(dtype, shape, seed):
    n = 1
    for d in shape:
        n *= d
    size = n * torch.empty((), dtype=dtype).element_size()
    b = (torch.arange(size, dtype=torch.int64) * 131 + seed * 17 + 7) % 256
    if dtype == torch.bool:
        b = b & 1
    return b.to(torch.uint8).view(dtype).reshape(shape)


def all_dtypes():
    return {f"t_{name}": pattern(dt, (3, 4), k) for k, (name, dt) in enumerate(DTYPES.items())}


def model(float_only=False):
    sd = {"layers.0.w": pattern(torch.float32, (8, 6), 1),
          "layers.0.b": pattern(torch.bfloat16, (6,), 2),
          "emb": pattern(torch.float16, (10, 4), 3)}
    if not float_only:
        sd["ids"] = pattern(torch.int64, (8, 3), 4)
    return sd


def same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def check(loaded, want, what):
    bad = [k for k in want if k not in loaded or not same(loaded[k], want[k])]
    extra = [k for k in loaded if k not in want]
    if bad or extra:
        print(f"{what}: differ {bad}, unexpected {extra}")
        sys.exit(1)
    print(f"{what}: {len(want)} tensors equal")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_save(rank, world, port, path, consolidate, mapping):
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.tensor import DTensor, Shard, init_device_mesh
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    sd = {}
    for k, t in model(float_only=consolidate).items():
        dim = 1 if k == "layers.0.w" else 0
        # DTensor's Shard(dim) follows torch.chunk: ceil-sized pieces, the last ranks may be empty.
        pieces = list(t.chunk(world, dim=dim))
        local = pieces[rank].contiguous() if rank < len(pieces) else t.narrow(dim, 0, 0)
        sd[k] = DTensor.from_local(local, mesh, [Shard(dim)], run_check=False, shape=t.shape,
                                   stride=t.stride())
    dcp.save(sd, storage_writer=HuggingFaceStorageWriter(
        path, save_distributed=True, enable_consolidation=consolidate,
        fqn_to_index_mapping=mapping))
    dist.destroy_process_group()


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    from safetensors.torch import load_file, save_file
    if cmd == "write-all-dtypes":  # OUT_FILE
        save_file(all_dtypes(), args[0], metadata={"format": "pt", "source": "safetensors"})
    elif cmd == "read-all-dtypes":  # FILE written by dcpp
        check(load_file(args[0]), all_dtypes(), "safetensors.load_file")
    elif cmd == "torch-hf-save":  # DIR plain|dist|cons
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import HuggingFaceStorageWriter
        mode = args[1]
        if mode == "plain":
            dcp.save(model(), storage_writer=HuggingFaceStorageWriter(
                args[0], fqn_to_index_mapping={"layers.0.w": 1, "layers.0.b": 1, "emb": 2,
                                               "ids": 2}), no_dist=True)
        else:
            import torch.multiprocessing as mp
            cons = mode == "cons"
            mapping = {"layers.0.w": 1, "layers.0.b": 2, "emb": 2} if cons else None
            mp.spawn(_dist_save, args=(4, free_port(), args[0], cons, mapping), nprocs=4)
    elif cmd == "torch-hf-load":  # DIR [float]: PyTorch's reader on dcpp's output
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import HuggingFaceStorageReader
        want = model(float_only=len(args) > 1)
        sd = {k: torch.zeros_like(v) for k, v in want.items()}
        dcp.load(sd, storage_reader=HuggingFaceStorageReader(args[0]), no_dist=True)
        check(sd, want, "HuggingFaceStorageReader")
    elif cmd == "torch-consolidate":  # IN OUT: PyTorch's consolidation of dcpp's shards
        from torch.distributed.checkpoint._consolidate_hf_safetensors import (
            consolidate_safetensors_files)
        os.makedirs(args[1], exist_ok=True)
        consolidate_safetensors_files(args[0], args[1], fqn_to_index_mapping={
            "layers.0.w": 1, "layers.0.b": 1, "emb": 1}, num_threads=2)
        loaded = {}
        for f in sorted(os.listdir(args[1])):
            if f.endswith(".safetensors"):
                loaded.update(load_file(os.path.join(args[1], f)))
        check(loaded, model(float_only=True), "consolidate_safetensors_files")
    elif cmd == "read-model":  # DIR [float]: dcpp's whole-tensor output via safetensors + index
        index = json.load(open(os.path.join(args[0], "model.safetensors.index.json")))
        loaded = {}
        for f in sorted(set(index["weight_map"].values())):
            loaded.update(load_file(os.path.join(args[0], f)))
        assert index["metadata"]["total_size"] == sum(
            t.numel() * t.element_size() for t in loaded.values())
        check(loaded, model(float_only=len(args) > 1), "safetensors + index")
    elif cmd == "quant-make":  # DIR REF_DIR: a DeepSeek-V3-style fp8 checkpoint, and what
        # PyTorch's QuantizedHuggingFaceStorageReader loads from it (float32 and bfloat16)
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import QuantizedHuggingFaceStorageReader
        d, ref = args
        os.makedirs(d, exist_ok=True)
        os.makedirs(ref, exist_ok=True)
        raw = pattern(torch.uint8, (300, 260), 9)
        raw[(raw & 0x7F) == 0x7F] = 0  # no NaN encodings
        w = raw.view(torch.float8_e4m3fn)
        k = torch.arange(9, dtype=torch.float32).reshape(3, 3)
        scale = torch.ldexp(1 + k / 8, (k - 4).to(torch.int32))
        norm = pattern(torch.bfloat16, (260,), 10)
        save_file({"layers.0.mlp.weight": w, "layers.0.norm.weight": norm},
                  f"{d}/model-00001-of-00002.safetensors")
        save_file({"layers.0.mlp.weight_scale_inv": scale}, f"{d}/model-00002-of-00002.safetensors")
        json.dump({"metadata": {"total_size": 300 * 260 + 36 + 520}, "weight_map": {
            "layers.0.mlp.weight": "model-00001-of-00002.safetensors",
            "layers.0.norm.weight": "model-00001-of-00002.safetensors",
            "layers.0.mlp.weight_scale_inv": "model-00002-of-00002.safetensors"}},
            open(f"{d}/model.safetensors.index.json", "w"), indent=2)
        for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            sd = {"layers.0.mlp.weight": torch.zeros(300, 260, dtype=dt),
                  "layers.0.norm.weight": torch.zeros(260, dtype=torch.bfloat16)}
            dcp.load(sd, storage_reader=QuantizedHuggingFaceStorageReader(d, target_dtype=dt),
                     no_dist=True)
            save_file(sd, f"{ref}/ref_{name}.safetensors")
    elif cmd == "expect-reject":  # FILE...: the safetensors package must refuse each
        from safetensors import safe_open
        for f in args:
            try:
                with safe_open(f, framework="pt") as h:
                    for k in h.keys():
                        h.get_tensor(k)
            except Exception as e:  # noqa: BLE001 - any refusal is what we want
                print(f"{os.path.basename(f)}: refused: {str(e)[:80]}")
                continue
            print(f"{f}: accepted")
            sys.exit(1)
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
