"""CPython side of the pickle interop test (tests/interop/pickle_interop_test.cc).

Modes:
  dump DIR    pickle every case of CASES with protocols 2-5 into DIR/<case>.p<N>.pkl, write the
              canonical form of each case to DIR/<case>.json, and a torch.save data.pkl to
              DIR/tensor.data.pkl (the C++ side reads them and compares).
  check DIR   load every DIR/<case>.p<N>.pkl written by dcpp::WritePickle and compare it with
              CASES[case] (or CPP_CASES[case]); exit 1 listing every mismatch.
  seeds DIR   write the seed corpus of the pickle_fuzz target (tests/fuzz/pickle_fuzz/).

The canonical form is JSON that keeps Python types apart (1, 1.0 and True differ; so do dict and
OrderedDict) and mirrors how the reader represents objects:
  None -> null, bool -> true/false, int -> ["int", "<decimal>"],
  float -> ["float", "<16 hex digits of the IEEE bits>"], str -> ["str", s],
  bytes/bytearray -> ["bytes", "<hex>"], tuple/list -> ["tuple"|"list", [...]],
  set/frozenset -> ["set", [...]], dict -> ["dict", [[k, v], ...]],
  global -> ["global", "module.name"],
  object -> ["object", callable, newobj, args, state, list_items, dict_items],
  persistent id -> ["persid", id].
"""

import argparse
import collections
import io
import json
import os
import pickle
import struct
import sys
import zipfile

import torch


def shared_case():
    x = [1, 2]
    return [x, x, (x,)]


# Values pickled by CPython and read by dcpp (and re-encoded by dcpp and loaded back here).
CASES = {
    "ints": [0, 1, 255, 256, 65535, 65536, -1, -256, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1,
             2**40, -(2**40), 2**63 - 1, -(2**63)],
    "floats": [0.0, -0.0, 1.5, -2.25, 1e300, 5e-324, float("inf"), float("-inf")],
    "strings": ["", "a", "h\u00e9llo w\u00f6rld \u20ac", "\u65e5\u672c\u8a9e", "x" * 300,
                "s" * 70000],
    "bytes": [b"", b"\x00\x01\xff", bytes(range(256)), b"B" * 70000],
    "tuples": [(), (1,), (1, 2), (1, 2, 3), (1, 2, 3, 4), ((1,), ((2,),))],
    "nested": {"a": [1, {"b": (2, [3])}], "c": {}, "d": [], 5: None, (1, "x"): 2.5,
               "t": True, "f": False},
    "sets": {"s": {1, 2, 3}, "e": set(), "nested": [{4}]},
    "ordered": collections.OrderedDict([("z", 1), ("a", [2])]),
    "big": [list(range(2500)), {f"k{i}": i for i in range(1200)}, {i: None for i in range(2000)}],
    # Several 64 KiB frames in protocol 4.
    "frames": {f"layer.{i}.weight": [i, -i * 1000003, "v", 0.5] for i in range(12000)},
    "shared": shared_case(),
    "torch": [torch.Size([2, 3]), torch.Size([]), torch.float32, torch.bfloat16, torch.int64],
    "namespace": argparse.Namespace(a=1, b="two"),
    # Read as bytes and set: re-encoded pickles load as equal values, not the same bytes.
    "lossy": [bytearray(b"abc"), bytearray(), frozenset({"a", "b"})],
}
LOSSY = {"lossy"}
# CPython memoizes a global's module name by object identity: torch.Size's "torch" (its
# __module__) and a dtype's "torch" (a sys.modules key) are distinct objects, so CPython writes the
# name twice where dcpp, which memoizes by value, writes a BINGET. Same values, a few bytes apart.
MODULE_NAME_MEMO_DIFFERS = {"torch", "cpp_torch"}

# Trees built by hand in pickle_interop_test.cc (WritePickle only); the expected Python values.
CPP_CASES = {
    "cpp_scalars": [None, True, False, 7, -70000, 2**33, 0.1, "\u00e9t\u00e9", b"\x00\x80"],
    "cpp_containers": {"list": [1, [2, [3]]], "tuple": (1, "a", None, 4.5), "set": {9},
                       "empty": ((), [], {}, set())},
    "cpp_ordered": collections.OrderedDict([("weight", 1.0), ("bias", 2.0)]),
    "cpp_torch": (torch.Size([4, 5]), torch.float16),
    "cpp_namespace": argparse.Namespace(x=[1, 2]),
    "cpp_persid": ("pid", ("storage", 0)),
}


class PersistentRef:
    def __init__(self, pid):
        self.pid = pid


def canon(v):
    if v is None or isinstance(v, bool):
        return v
    if isinstance(v, int):
        return ["int", str(v)]
    if isinstance(v, float):
        return ["float", struct.pack(">d", v).hex()]
    if isinstance(v, str):
        return ["str", v]
    if isinstance(v, (bytes, bytearray)):
        return ["bytes", bytes(v).hex()]
    if isinstance(v, torch.Size):
        return ["object", ["global", "torch.Size"], False,
                ["tuple", [["tuple", [canon(d) for d in v]]]], None, [], []]
    if isinstance(v, torch.dtype):
        return ["global", str(v)]
    if isinstance(v, tuple):
        return ["tuple", [canon(x) for x in v]]
    if isinstance(v, list):
        return ["list", [canon(x) for x in v]]
    if isinstance(v, (set, frozenset)):
        items = [canon(x) for x in v]
        return ["set", sorted(items, key=lambda j: json.dumps(j, sort_keys=True))]
    if isinstance(v, collections.OrderedDict):
        return ["object", ["global", "collections.OrderedDict"], False, ["tuple", []], None, [],
                [[canon(k), canon(x)] for k, x in v.items()]]
    if isinstance(v, dict):
        return ["dict", [[canon(k), canon(x)] for k, x in v.items()]]
    if isinstance(v, argparse.Namespace):
        return ["object", ["global", "argparse.Namespace"], True, ["tuple", []],
                canon(vars(v)), [], []]
    if isinstance(v, PersistentRef):
        return ["persid", canon(v.pid)]
    raise TypeError(f"no canonical form for {type(v)}")


def persid_tuple(v):
    """CPP_CASES['cpp_persid'] is written as a persistent id; model it as such."""
    return PersistentRef(v[1]) if isinstance(v, tuple) and v and v[0] == "pid" else v


class Loader(pickle.Unpickler):
    def persistent_load(self, pid):
        return PersistentRef(pid)


def dump(out):
    for name, value in CASES.items():
        for proto in (2, 3, 4, 5):
            with open(os.path.join(out, f"{name}.p{proto}.pkl"), "wb") as f:
                f.write(pickle.dumps(value, protocol=proto))
        with open(os.path.join(out, f"{name}.json"), "w", encoding="utf-8") as f:
            json.dump(canon(value), f, ensure_ascii=False)
    buf = io.BytesIO()
    torch.save(torch.arange(6, dtype=torch.float32).reshape(2, 3), buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        name = next(n for n in z.namelist() if n.endswith("/data.pkl"))
        with open(os.path.join(out, "tensor.data.pkl"), "wb") as f:
            f.write(z.read(name))


def check(out):
    expected_all = dict(CASES)
    expected_all.update(CPP_CASES)
    failures = []
    seen = 0
    for file in sorted(os.listdir(out)):
        if not file.startswith("cpp.") or not file.endswith(".pkl"):
            continue
        seen += 1
        _, name, proto, _ = file.split(".")
        with open(os.path.join(out, file), "rb") as f:
            data = f.read()
        if data[1] != int(proto[1:]):
            failures.append(f"{file}: header says protocol {data[1]}")
        try:
            got = Loader(io.BytesIO(data)).load()
        except Exception as e:  # noqa: BLE001 - any failure to load is a mismatch
            failures.append(f"{file}: pickle.loads failed: {e!r}")
            continue
        want = persid_tuple(expected_all[name])
        if canon(got) != canon(want):
            failures.append(f"{file}: got {got!r:.300}, expected {want!r:.300}")
        if name == "shared" and not (got[0] is got[1] is got[2][0]):
            failures.append(f"{file}: shared list was not shared")
        # Protocol-2 and -4 re-encodings of CPython's own pickles should be byte-identical.
        exact = name not in LOSSY and not (proto == "p4" and name in MODULE_NAME_MEMO_DIFFERS)
        if name in CASES and exact:
            ref = pickle.dumps(CASES[name], protocol=int(proto[1:]))
            if ref != data:
                failures.append(f"{file}: bytes differ from pickle.dumps (len {len(data)} vs "
                                f"{len(ref)})")
        if name in CPP_CASES and name != "cpp_persid" and exact:
            ref = pickle.dumps(CPP_CASES[name], protocol=int(proto[1:]))
            if ref != data:
                failures.append(f"{file}: bytes differ from pickle.dumps: {data!r:.200} vs "
                                f"{ref!r:.200}")
    if seen == 0:
        failures.append(f"no cpp.*.pkl files in {out}")
    for f in failures:
        print("MISMATCH", f)
    print(f"checked {seen} pickles, {len(failures)} mismatches")
    return 1 if failures else 0


def seeds(out):
    import dataclasses
    import enum
    import types

    # Stand-ins with the exact module and class names of DCP metadata (§2.1 of the DCP spec).
    mod = types.ModuleType("torch.distributed.checkpoint.metadata")
    fs = types.ModuleType("torch.distributed.checkpoint.filesystem")
    sys.modules[mod.__name__] = mod
    sys.modules[fs.__name__] = fs

    def define(module, cls):
        cls.__module__ = module.__name__
        cls.__qualname__ = cls.__name__
        setattr(module, cls.__name__, cls)
        return cls

    @dataclasses.dataclass
    class ChunkStorageMetadata:
        offsets: torch.Size
        sizes: torch.Size

    class _MEM_FORMAT_ENCODING(enum.Enum):
        TORCH_CONTIGUOUS_FORMAT = 0

    @dataclasses.dataclass
    class TensorProperties:
        dtype: torch.dtype = torch.float32
        requires_grad: bool = False

        def __getstate__(self):
            return (self.dtype, torch.strided, self.requires_grad,
                    _MEM_FORMAT_ENCODING.TORCH_CONTIGUOUS_FORMAT, False)

    @dataclasses.dataclass
    class TensorStorageMetadata:
        properties: TensorProperties
        size: torch.Size
        chunks: list

    @dataclasses.dataclass
    class BytesStorageMetadata:
        pass

    @dataclasses.dataclass(frozen=True)
    class MetadataIndex:
        fqn: str
        offset: object = None
        index: object = None

    @dataclasses.dataclass
    class Metadata:
        state_dict_metadata: dict
        planner_data: object = None
        storage_data: object = None

    @dataclasses.dataclass
    class _StorageInfo:
        relative_path: str
        offset: int
        length: int

    for c in (ChunkStorageMetadata, _MEM_FORMAT_ENCODING, TensorProperties, TensorStorageMetadata,
              BytesStorageMetadata, MetadataIndex, Metadata):
        define(mod, c)
    define(fs, _StorageInfo)

    chunks = [ChunkStorageMetadata(torch.Size([0, 0]), torch.Size([2, 3])),
              ChunkStorageMetadata(torch.Size([2, 0]), torch.Size([2, 3]))]
    md = Metadata(
        state_dict_metadata={
            "model.weight": TensorStorageMetadata(TensorProperties(), torch.Size([4, 3]), chunks),
            "step": BytesStorageMetadata(),
        },
        planner_data={"model.weight": ("model", "weight"), "step": ("step",)},
        storage_data={
            MetadataIndex("model.weight", torch.Size([0, 0]), 0): _StorageInfo("__0_0.distcp", 0, 900),
            MetadataIndex("model.weight", torch.Size([2, 0]), 1): _StorageInfo("__1_0.distcp", 0, 900),
            MetadataIndex("step"): _StorageInfo("__0_0.distcp", 900, 500),
        })
    files = {
        "dcp_metadata.p4.pkl": pickle.dumps(md, protocol=4),
        "dcp_metadata.p2.pkl": pickle.dumps(md, protocol=2),
        "nested.p2.pkl": pickle.dumps(CASES["nested"], protocol=2),
        "nested.p3.pkl": pickle.dumps(CASES["nested"], protocol=3),
        "sets.p4.pkl": pickle.dumps(CASES["sets"], protocol=4),
        "bytes_small.p5.pkl": pickle.dumps([b"\x00\xff", bytearray(b"ab"), "\u20ac"], protocol=5),
        "ordered.p2.pkl": pickle.dumps(CASES["ordered"], protocol=2),
        "shared.p4.pkl": pickle.dumps(CASES["shared"], protocol=4),
        "torch.p2.pkl": pickle.dumps(CASES["torch"], protocol=2),
        "ints.p4.pkl": pickle.dumps(CASES["ints"] + CASES["floats"], protocol=4),
    }
    buf = io.BytesIO()
    torch.save(torch.arange(6, dtype=torch.float32).reshape(2, 3), buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        name = next(n for n in z.namelist() if n.endswith("/data.pkl"))
        files["torch_save_tensor.data.pkl"] = z.read(name)
    for name, data in files.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["dump", "check", "seeds"])
    parser.add_argument("dir")
    args = parser.parse_args()
    if args.mode == "dump":
        dump(args.dir)
        return 0
    if args.mode == "seeds":
        seeds(args.dir)
        return 0
    return check(args.dir)


if __name__ == "__main__":
    sys.exit(main())
