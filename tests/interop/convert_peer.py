"""torch.save files for the convert round trip: PyTorch writes one, and checks one.

    convert_peer.py write FILE    writes a nested state dict with torch.save
    convert_peer.py check FILE    torch.load()s FILE and compares it with the same state dict

Exits non-zero (naming the key) on any difference.
"""
import collections
import sys

import torch


def state_dict():
    g = torch.Generator().manual_seed(5)
    return {
        "model": {
            "embed.weight": torch.randn(11, 7, generator=g),
            "layers": [
                {"w": torch.randn(7, 7, generator=g).to(torch.bfloat16),
                 "b": torch.arange(7, dtype=torch.float64)},
                {"w": torch.randn(7, 7, generator=g).t(),  # non-contiguous view
                 "b": torch.arange(7, dtype=torch.int32)},
            ],
            "mask": torch.tensor([True, False, True]),
            "scale": torch.tensor(2.5, dtype=torch.float16),
        },
        "optim": {"step": 17, "lr": 3e-4, "betas": (0.9, 0.999), "name": "adamw",
                  "groups": [[1, 2], [3]]},
        "epoch": 4,
    }


def compare(path, want, got):
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor) or got.dtype != want.dtype or got.shape != want.shape \
                or not torch.equal(got, want):
            sys.exit(f"MISMATCH at {path}: {got!r} != {want!r}")
    elif isinstance(want, dict):
        if not isinstance(got, dict) or set(got) != set(want):
            sys.exit(f"MISMATCH at {path}: keys {sorted(got)} != {sorted(want)}")
        for k in want:
            compare(f"{path}.{k}", want[k], got[k])
    elif isinstance(want, (list, tuple)):
        if type(got) is not type(want) or len(got) != len(want):
            sys.exit(f"MISMATCH at {path}: {got!r} != {want!r}")
        for i, (w, h) in enumerate(zip(want, got)):
            compare(f"{path}.{i}", w, h)
    elif got != want or type(got) is not type(want):
        sys.exit(f"MISMATCH at {path}: {got!r} != {want!r}")


def main():
    mode, path = sys.argv[1], sys.argv[2]
    if mode == "write":
        torch.save(state_dict(), path)
    else:
        compare("", state_dict(), torch.load(path))
    print(f"{mode} ok")


if __name__ == "__main__":
    main()
