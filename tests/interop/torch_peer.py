"""PyTorch side of the torch.save interop tests (run with a Python that has torch).

  torch_peer.py write DIR   writes torch.save files DIR/<case>.pt, each with DIR/<case>.pt.json:
                            {"tree": the object tree in the tagged form below}.
  torch_peer.py seeds DIR   writes the small archives that seed the torch_save_fuzz target
                            (tests/fuzz/torch_save_fuzz/), each under 4 KiB.
  torch_peer.py check DIR   for every DIR/<case>.pt.json (written by dcpp), torch.loads
                            DIR/<case>.pt (weights_only if the expectation says
                            "weights_only": true) and compares it with "tree"; exits 1 and
                            names the first differing key on a mismatch.

Tagged form: {"t": "none"|"bool"|"int"|"float"|"str"|"bytes"(hex)|"list"|"tuple", "v": ...},
{"t": "dict", "ordered": bool, "v": [[key, value], ...]}, and for tensors
{"t": "tensor", "dtype": "float32", "shape": [...], "hex": contiguous bytes (little-endian),
 "stride": [...], "storage_offset": n, "storage": first-seen index of the storage}
(layout keys are optional in expectations: only those present are compared).
"""

import collections
import json
import os
import sys

import torch

DTYPES = {
    "bool": torch.bool,
    "uint8": torch.uint8,
    "int8": torch.int8,
    "int16": torch.int16,
    "int32": torch.int32,
    "int64": torch.int64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
    "complex64": torch.complex64,
    "complex128": torch.complex128,
}
NAMES = {v: k for k, v in DTYPES.items()}


def tensor_bytes(t):
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


class Describer:
    def __init__(self):
        self.storages = {}

    def __call__(self, obj):
        if obj is None:
            return {"t": "none"}
        if isinstance(obj, bool):
            return {"t": "bool", "v": obj}
        if isinstance(obj, int):
            return {"t": "int", "v": obj}
        if isinstance(obj, float):
            return {"t": "float", "v": obj}
        if isinstance(obj, str):
            return {"t": "str", "v": obj}
        if isinstance(obj, bytes):
            return {"t": "bytes", "v": obj.hex()}
        if isinstance(obj, torch.Tensor):
            st = obj.storage()
            out = {
                "t": "tensor",
                "dtype": NAMES[obj.dtype],
                "shape": list(obj.shape),
                "hex": tensor_bytes(obj).hex(),
                "stride": list(obj.stride()),
                "storage_offset": obj.storage_offset(),
            }
            if st.size() > 0:
                out["storage"] = self.storages.setdefault(st.data_ptr(), len(self.storages))
            return out
        if isinstance(obj, tuple):
            return {"t": "tuple", "v": [self(x) for x in obj]}
        if isinstance(obj, list):
            return {"t": "list", "v": [self(x) for x in obj]}
        if isinstance(obj, dict):
            ordered = isinstance(obj, collections.OrderedDict)
            return {"t": "dict", "ordered": ordered, "v": [[self(k), self(v)] for k, v in obj.items()]}
        raise TypeError(f"cannot describe {type(obj)}")


def pattern(dtype, shape, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype in (torch.uint8,):
        return torch.randint(0, 256, shape, generator=g, dtype=torch.int64).to(dtype)
    if not dtype.is_floating_point and not dtype.is_complex:
        info = torch.iinfo(dtype)
        lo, hi = max(info.min, -(2**40)), min(info.max, 2**40)
        return torch.randint(lo, hi, shape, generator=g, dtype=torch.int64).to(dtype)
    if dtype.is_complex:
        real = torch.randn(shape, generator=g, dtype=torch.float64) * 100
        imag = torch.randn(shape, generator=g, dtype=torch.float64) * 100
        return torch.complex(real, imag).to(dtype)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * 100).to(dtype)


def cases():
    out = {}
    # Every dtype torch.save of 1.13 supports, a few shapes each.
    d = collections.OrderedDict()
    for i, (name, dt) in enumerate(DTYPES.items()):
        d[name] = pattern(dt, (3, 5), 100 + i)
        d[name + "_scalar"] = pattern(dt, (), 200 + i)
        d[name + "_empty"] = pattern(dt, (0, 3), 300 + i)
    out["dtypes"] = d

    # Layouts: views of one storage, a storage offset, a transpose, a parameter.
    base = pattern(torch.float32, (4, 6), 7)
    w = pattern(torch.float64, (3, 5), 8)
    out["layouts"] = {
        "model": {
            "base": base,
            "rows": base[1:3],
            "col": base[:, 2],
            "t": base.t(),
            "weight_t": w.t(),
            "param": torch.nn.Parameter(pattern(torch.float32, (2, 2), 9)),
            "frozen": torch.nn.Parameter(pattern(torch.float32, (3,), 10), requires_grad=False),
        },
        "offset_view": pattern(torch.int32, (10,), 11)[3:],
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
    }

    # Plain values in nested containers, with tensors inside lists and tuples.
    out["tree"] = {
        "none": None,
        "flags": [True, False],
        "ints": [0, 1, -1, 255, 256, 65535, 65536, -(2**31), 2**31, 2**62, -(2**63)],
        "floats": [0.0, 1.5, -2.25, 1e300, 1e-300, 0.1],
        "str": "héllo wörld ✓",
        "empty_str": "",
        "bytes": b"\x00\x01\xffabc",
        "empty_bytes": b"",
        "tuple": (1, "two", 3.0, (None,)),
        "empty": {"list": [], "tuple": (), "dict": {}},
        "od": collections.OrderedDict([("z", 1), ("a", [2, 3])]),
        "int_keys": {1: "one", 2: "two"},
        "layers": [{"w": pattern(torch.float16, (2, 3), 12)}, {"w": pattern(torch.bfloat16, (2, 3), 13)}],
        "pair": (pattern(torch.int64, (2,), 14), "x"),
    }

    # A single tensor at the root whose storage is larger than the tensor.
    out["root_view"] = pattern(torch.float32, (5, 4), 15)[2:4]
    # A list root.
    out["list_root"] = [pattern(torch.int16, (4,), 16), 7, "s"]

    # Cases rebuildable exactly from their description (no parameters; every storage covered by
    # its tensors): dcpp re-encodes them and must produce these files byte for byte.
    base = pattern(torch.float32, (4, 6), 20)
    out["ident_mixed"] = collections.OrderedDict(
        [
            ("w", base),
            ("rows", base[1:3]),
            ("t", base.t()),
            ("lone_t", pattern(torch.float64, (3, 5), 21).t()),
            ("ints", pattern(torch.int64, (7,), 22)),
            ("mask", pattern(torch.bool, (2, 2), 23)),
            ("half", pattern(torch.bfloat16, (3,), 24)),
            ("c", pattern(torch.complex64, (2,), 25)),
            ("scalar", pattern(torch.int32, (), 26)),
            ("empty", torch.zeros(0, 3)),
            ("opt", {"lr": 0.1, "betas": (0.9, 0.999), "steps": [1, 2, 3], "name": "adam",
                     "flag": True, "none": None, "raw": b"\x00\xff", 3: "int key"}),
        ]
    )
    out["ident_tensor"] = pattern(torch.float16, (2, 3), 27)
    return out


def write(directory):
    for name, obj in cases().items():
        path = os.path.join(directory, name + ".pt")
        torch.save(obj, path)
        with open(path + ".json", "w") as f:
            json.dump({"tree": Describer()(obj)}, f, allow_nan=False)


def seeds(directory):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    objs = {
        "tensor": torch.arange(6.0).reshape(2, 3),
        "shared_views": collections.OrderedDict(a=base, rows=base[1:], t=base.t(), col=base[:, 1]),
        "values": {"none": None, "b": True, "i": [1, -2, 2**40], "f": 0.5, "s": "str",
                   "bytes": b"\x00\xff", "t": (1, (2,)), "od": collections.OrderedDict(x=1)},
        "param_bf16": {"w": torch.nn.Parameter(torch.ones(2, 2)),
                       "h": torch.arange(4).to(torch.bfloat16)},
        "scalar_empty": [torch.tensor(7, dtype=torch.int64), torch.zeros(0, 3), torch.ones(2, dtype=torch.bool)],
        "complex_int": {"c": torch.ones(2, dtype=torch.complex64), "i8": torch.arange(5, dtype=torch.int8),
                        "u8": torch.arange(5, dtype=torch.uint8)[2:]},
    }
    for name, obj in objs.items():
        path = os.path.join(directory, name + ".pt")
        torch.save(obj, path)
        assert os.path.getsize(path) < 4096, path


def compare(exp, got, path):
    """Returns a description of the first difference, or None."""
    if not isinstance(exp, dict) or not isinstance(got, dict):
        return None if exp == got else f"{path}: expected {exp!r}, got {got!r}"
    if exp.get("t") != got.get("t"):
        return f"{path}: expected a {exp.get('t')}, got a {got.get('t')}"
    t = exp["t"]
    if t == "tensor":
        for k, v in exp.items():
            if got.get(k) != v:
                return f"{path}: tensor {k} differs: expected {v!r}, got {got.get(k)!r}"
        return None
    if t == "dict":
        if exp["ordered"] != got["ordered"]:
            return f"{path}: OrderedDict-ness differs"
        if len(exp["v"]) != len(got["v"]):
            return f"{path}: {len(exp['v'])} items expected, got {len(got['v'])}"
        for (ek, ev), (gk, gv) in zip(exp["v"], got["v"]):
            if ek != gk:
                return f"{path}: key {ek!r} expected, got {gk!r}"
            r = compare(ev, gv, f"{path}.{ek.get('v')}")
            if r:
                return r
        return None
    if t in ("list", "tuple"):
        if len(exp["v"]) != len(got["v"]):
            return f"{path}: {len(exp['v'])} items expected, got {len(got['v'])}"
        for i, (e, g) in enumerate(zip(exp["v"], got["v"])):
            r = compare(e, g, f"{path}.{i}")
            if r:
                return r
        return None
    if type(exp.get("v")) is not type(got.get("v")) or exp.get("v") != got.get("v"):
        return f"{path}: expected {exp.get('v')!r}, got {got.get('v')!r}"
    return None


def check(directory):
    names = sorted(f[: -len(".pt.json")] for f in os.listdir(directory) if f.endswith(".pt.json"))
    if not names:
        print(f"no expectations in {directory}", file=sys.stderr)
        return 1
    failures = 0
    for name in names:
        path = os.path.join(directory, name + ".pt")
        with open(path + ".json") as f:
            exp = json.load(f)
        weights_only = bool(exp.get("weights_only", False))
        try:
            obj = torch.load(path, weights_only=weights_only)
            got = Describer()(obj)
        except Exception as e:  # noqa: BLE001 - report any load failure
            print(f"{name}.pt: torch.load failed: {type(e).__name__}: {e}", file=sys.stderr)
            failures += 1
            continue
        diff = compare(exp["tree"], got, "<root>")
        if diff:
            print(f"{name}.pt: {diff}", file=sys.stderr)
            failures += 1
        else:
            print(f"{name}.pt: ok")
    return 1 if failures else 0


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("write", "check", "seeds"):
        print(__doc__, file=sys.stderr)
        return 2
    if sys.argv[1] == "write":
        write(sys.argv[2])
        return 0
    if sys.argv[1] == "seeds":
        seeds(sys.argv[2])
        return 0
    return check(sys.argv[2])


if __name__ == "__main__":
    sys.exit(main())
