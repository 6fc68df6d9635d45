"""PyTorch 2.x's torch.distributed.checkpoint (DCP) as a peer, run across gloo ranks.

    dcp2_peer.py save OUT WORLD [--modes sync,async,nocoll,ts2dcp]
        WORLD ranks build the state dict below and write, under OUT:
          expected.pt  torch.save of the same state with every DTensor gathered whole (rank 0)
          sync/        dcp.save
          async/       dcp.async_save(...).result()
          nocoll/      dcp.save(use_collectives=False): __{rank}.metadata per rank, no .metadata
          ts2dcp/      format_utils.torch_save_to_dcp(expected.pt)
    dcp2_peer.py load DIR[,DIR...] WORLD EXPECTED
        WORLD ranks load each DIR (any saver) into DTensors on other meshes and placements than the
        saver used, into a real model + AdamW through get_state_dict/set_state_dict, and check
        every value against EXPECTED (a torch.save file, e.g. a save run's expected.pt); rank 0
        also runs format_utils.dcp_to_torch_save(DIR) and checks the file the same way.
    dcp2_peer.py check-torch FILE EXPECTED
        torch.load(FILE) must equal torch.load(EXPECTED): same keys, dtypes, shapes, bits.

The state dict (keys as DCP flattens them):
    model.*            a small nn.Sequential after one AdamW step (replicated on every rank)
    optim.state.*      its AdamW state (step, exp_avg, exp_avg_sq) from get_state_dict
    optim.param_groups.0.*  its param group (lr, betas, ...: bytes items)
    dt.<case>          float32 DTensors: shard0 / shard1 / replicate on a 1-D mesh of WORLD,
                       block2d on a 2-D mesh (Shard(0), Shard(1)), uneven sizes throughout,
                       tiny (one row: the other ranks hold empty shards)
    dtypes.<dtype>     one DTensor per dtype torch has (Shard(0), 5 rows over WORLD ranks)
    plain.*            int, float, str, bytes, list, tuple, None
Element values are functions of the global element index (make_full), so every rank can
build its own shard and any loader can check any piece. Exits non-zero on any mismatch.
"""
import math
import os
import sys
import tempfile
import traceback
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint import format_utils
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

warnings.filterwarnings("ignore")

# Every dtype a tensor of torch 2.13 can have, except quantized and bits* types (no arithmetic).
DTYPE_NAMES = [
    "bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
    "float16", "bfloat16", "float32", "float64", "complex32", "complex64", "complex128",
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
    "float4_e2m1fn_x2",
]
DTYPES = [getattr(torch, n) for n in DTYPE_NAMES if hasattr(torch, n)]


def make_full(shape, dtype, seed):
    """Deterministic values of a whole tensor: finite, exactly representable in `dtype`."""
    n = math.prod(shape)
    idx = torch.arange(n, dtype=torch.int64) + seed * 1000
    if dtype == torch.bool:
        t = idx % 3 == 0
    elif dtype in (torch.uint64, torch.uint32, torch.uint16):
        # Use the high bits too (values beyond the signed range of the same width).
        bits = {torch.uint16: 16, torch.uint32: 32, torch.uint64: 64}[dtype]
        signed = {16: torch.int16, 32: torch.int32, 64: torch.int64}[bits]
        v = (idx * 40503 + 12345) & ((1 << min(bits, 63)) - 1)
        if bits == 64:
            v = v | (idx % 2 << 63)  # sets the top bit on odd elements (wraps in int64)
        t = v.to(signed).view(dtype) if bits < 64 else v.view(dtype)
    elif str(dtype) in ("torch.float8_e8m0fnu", "torch.float4_e2m1fn_x2"):
        # No arithmetic on these: build them from raw bytes (no NaN encodings).
        t = ((idx * 7 + 3) % 200 + 20).to(torch.uint8).view(dtype)
    elif dtype.is_complex:
        real = idx.to(torch.float32) * 0.25 - 3
        t = torch.complex(real, -real * 0.5).to(dtype)
    elif dtype.is_floating_point:
        v = idx.to(torch.float64) * 0.375 - 5.5
        if dtype.itemsize == 1:
            v = v.remainder(16) - 8  # inside every float8 range (fnuz kinds have no -0)
        t = v.to(dtype)
    else:
        info = torch.iinfo(dtype)
        t = ((idx * 37 + 11) % (info.max - info.min + 1 if info.max < 2**32 else 2**40) +
             (info.min if info.max < 2**32 else -2**39)).to(dtype)
    return t.reshape(shape)


def dt_cases(world):
    """name -> (global shape, dtype, seed, placements, mesh shape)."""
    mesh2d = (2, world // 2) if world % 2 == 0 else (world, 1)
    cases = {
        "dt.shard0": ((7, 5), torch.float32, 1, [Shard(0)], (world,)),
        "dt.shard1": ((4, 11), torch.float32, 2, [Shard(1)], (world,)),
        "dt.replicate": ((3, 4), torch.float32, 3, [Replicate()], (world,)),
        "dt.block2d": ((9, 7), torch.float32, 4, [Shard(0), Shard(1)], mesh2d),
        "dt.tiny": ((1, 3), torch.float32, 5, [Shard(0)], (world,)),
        "dt.shard0_3d": ((5, 2, 3), torch.float64, 6, [Shard(0)], (world,)),
    }
    for i, dtype in enumerate(DTYPES):
        name = str(dtype).removeprefix("torch.")
        cases[f"dtypes.{name}"] = ((5, 4), dtype, 10 + i, [Shard(0)], (world,))
    return cases


# Load side: other meshes and placements than any saver used.
def load_placements(name, world):
    mesh2d = (2, world // 2) if world % 2 == 0 else (world, 1)
    if name == "dt.shard0":
        return [Shard(1)], (world,)
    if name in ("dt.shard1", "dt.tiny"):
        return [Shard(0)], (world,)
    if name == "dt.replicate":
        return [Shard(1)], (world,)
    if name == "dt.block2d":
        return [Shard(1), Shard(0)], mesh2d
    if name == "dt.shard0_3d":
        return [Shard(2)], (world,)
    return [Shard(1)], (world,)  # dtypes.*


def local_piece(full, mesh, placements):
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    shape, offset = compute_local_shape_and_global_offset(full.shape, mesh, placements)
    sl = tuple(slice(o, o + s) for o, s in zip(offset, shape))
    return full[sl].clone()  # own storage, as real shards have (async_save stages storages)


def make_dtensor(full, mesh, placements, fill):
    piece = local_piece(full, mesh, placements)
    if not fill:
        piece = torch.zeros_like(piece.view(torch.uint8) if piece.dtype.itemsize == 1 and
                                 piece.dtype not in (torch.bool, torch.uint8, torch.int8)
                                 else piece)
        if piece.dtype != full.dtype:
            piece = piece.view(full.dtype)
    # shape/stride given: no collective (gloo cannot move every dtype).
    return DTensor.from_local(piece, mesh, placements, run_check=False, shape=full.shape,
                              stride=full.stride())


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(),
                                       torch.nn.Linear(5, 3))
        self.register_buffer("scale", torch.arange(3, dtype=torch.float32) + 1)

    def forward(self, x):
        return self.net(x) * self.scale


def trained_model():
    torch.manual_seed(0)
    model = Model()
    optim = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    for step in range(2):
        x = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 10 - step
        model(x).square().sum().backward()
        optim.step()
        optim.zero_grad()
    return model, optim


def plain_values():
    return {"step": 1234, "lr": 0.125, "name": "dcpp", "raw": b"\x00\x01\xff",
            "items": [1, 2.5, "x", None], "pair": (3, "four"), "none": None}


def meshes(world):
    out = {}
    for shape in {(world,), (2, world // 2) if world % 2 == 0 else (world, 1)}:
        out[shape] = init_device_mesh("cpu", shape)
    return out


def build_state(world, fill, for_load=False):
    ms = meshes(world)
    sd = {}
    for name, (shape, dtype, seed, placements, mshape) in dt_cases(world).items():
        if for_load:
            placements, mshape = load_placements(name, world)
        group, leaf = name.split(".")
        sd.setdefault(group, {})[leaf] = make_dtensor(make_full(shape, dtype, seed), ms[mshape],
                                                      placements, fill)
    return sd


def expected_state(world):
    model, optim = trained_model()
    msd, osd = get_state_dict(model, optim)
    sd = {"model": msd, "optim": osd, "plain": plain_values()}
    for name, (shape, dtype, seed, _, _) in dt_cases(world).items():
        group, leaf = name.split(".")
        sd.setdefault(group, {})[leaf] = make_full(shape, dtype, seed)
    return sd


def bits_equal(a, b):
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.contiguous().reshape(-1), b.contiguous().reshape(-1)
    if a.dtype == torch.bool:
        return torch.equal(a, b)
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def compare(got, want, where, bad):
    if isinstance(want, torch.Tensor):
        if isinstance(got, DTensor):
            got = got.to_local()
        if not isinstance(got, torch.Tensor) or not bits_equal(got, want):
            bad.append(f"{where}: {got!r} != {want!r}")
    elif isinstance(want, dict):
        if not isinstance(got, dict) or set(got) != set(want):
            bad.append(f"{where}: keys {sorted(map(str, got)) if isinstance(got, dict) else got}"
                       f" != {sorted(map(str, want))}")
            return
        for k in want:
            compare(got[k], want[k], f"{where}.{k}", bad)
    elif isinstance(want, (list, tuple)):
        if type(got) is not type(want) or len(got) != len(want):
            bad.append(f"{where}: {got!r} != {want!r}")
            return
        for i, (g, w) in enumerate(zip(got, want)):
            compare(g, w, f"{where}[{i}]", bad)
    elif type(got) is not type(want) or got != want:
        bad.append(f"{where}: {got!r} != {want!r}")


def check_dtensors(sd, expected, bad):
    for group in ("dt", "dtypes"):
        for leaf, dt in sd[group].items():
            full = expected[group][leaf]
            want = local_piece(full, dt.device_mesh, dt.placements)
            compare(dt.to_local(), want, f"{group}.{leaf} {dt.placements}", bad)


def init(rank, world, init_file):
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank,
                            world_size=world)


def run_save(rank, world, init_file, out, modes):
    init(rank, world, init_file)
    model, optim = trained_model()
    msd, osd = get_state_dict(model, optim)
    sd = build_state(world, True)
    sd.update({"model": msd, "optim": osd, "plain": plain_values()})
    if rank == 0:
        torch.save(expected_state(world), os.path.join(out, "expected.pt"))
    dist.barrier()
    if "sync" in modes:
        dcp.save(sd, checkpoint_id=os.path.join(out, "sync"))
    if "async" in modes:
        dcp.async_save(sd, checkpoint_id=os.path.join(out, "async")).result()
    if "nocoll" in modes:
        dcp.save(sd, checkpoint_id=os.path.join(out, "nocoll"), use_collectives=False)
    if "ts2dcp" in modes and rank == 0:
        format_utils.torch_save_to_dcp(os.path.join(out, "expected.pt"),
                                       os.path.join(out, "ts2dcp"))
    dist.barrier()


def run_load(rank, world, init_file, paths, expected_file):
    init(rank, world, init_file)
    expected = torch.load(expected_file, weights_only=False)
    for path in paths:
        load_one(rank, world, path, expected)
        dist.barrier()


def load_one(rank, world, path, expected):
    bad = []
    torch.manual_seed(1)  # another initialisation than the saved model's
    model = Model()
    optim = torch.optim.AdamW(model.parameters(), lr=0.5)
    msd, osd = get_state_dict(model, optim)  # initialises AdamW's state (zeros)
    sd = build_state(world, False, for_load=True)
    sd.update({"model": msd, "optim": osd,
               "plain": {k: None for k in expected["plain"]}})
    dcp.load(sd, checkpoint_id=path)
    set_state_dict(model, optim, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    check_dtensors(sd, expected, bad)
    compare(sd["plain"], expected["plain"], "plain", bad)
    got_msd, got_osd = get_state_dict(model, optim)
    compare(dict(got_msd), dict(expected["model"]), "model", bad)
    compare(got_osd, expected["optim"], "optim", bad)
    if rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "full.pt")
            format_utils.dcp_to_torch_save(path, out)
            compare(torch.load(out, weights_only=False), expected, "dcp_to_torch_save", bad)
    if bad:
        print(f"rank {rank}: MISMATCH loading {path}\n" + "\n".join(bad[:40]), flush=True)
        sys.exit(1)


def spawn(fn, world, *args):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(fn, args=(world, os.path.join(tmp, "pg"), *args), nprocs=world, join=True)


def main():
    mode = sys.argv[1]
    try:
        if mode == "save":
            out, world = sys.argv[2], int(sys.argv[3])
            modes = "sync,async,nocoll,ts2dcp"
            if "--modes" in sys.argv:
                modes = sys.argv[sys.argv.index("--modes") + 1]
            os.makedirs(out, exist_ok=True)
            spawn(run_save, world, out, modes.split(","))
        elif mode == "load":
            path, world, expected = sys.argv[2], int(sys.argv[3]), sys.argv[4]
            spawn(run_load, world, path.split(","), expected)
        elif mode == "check-torch":
            bad = []
            for f in sys.argv[2].split(","):
                compare(torch.load(f, weights_only=False),
                        torch.load(sys.argv[3], weights_only=False), f, bad)
            if bad:
                print("MISMATCH\n" + "\n".join(bad[:40]), flush=True)
                sys.exit(1)
        else:
            sys.exit(f"unknown mode {mode}")
    except Exception:
        traceback.print_exc()
        sys.exit(1)
    print(f"{mode} ok: {' '.join(sys.argv[2:])}")


if __name__ == "__main__":
    main()
