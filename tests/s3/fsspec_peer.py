"""PyTorch 2.x DCP over S3 as a peer: FsspecWriter/FsspecReader with s3fs.

    fsspec_peer.py save ENDPOINT URL     dcp.save of the state below to URL (s3://bucket/prefix)
    fsspec_peer.py load ENDPOINT URL     dcp.load of URL into zeros; checks every value
    fsspec_peer.py torchload ENDPOINT URL   torch.load of the torch.save file at URL (s3fs);
                                         checks every value

ENDPOINT is the S3 server (http://127.0.0.1:PORT). The state dict: "w" float32[64, 48],
"ids" int64[30, 7], "bias" float64[48], "half" float16[16, 8] and "step" the int 1234; element
i of each tensor is a function of i (expected()), which the C++ side computes the same way.
Exits non-zero on any mismatch.
"""
import sys

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter


def expected():
    return {
        "w": (torch.arange(64 * 48, dtype=torch.float64).reshape(64, 48) * 0.5 - 7).float(),
        "ids": torch.arange(30 * 7, dtype=torch.int64).reshape(30, 7) * 3 + 100,
        "bias": torch.arange(48, dtype=torch.float64) * 0.25 + 1,
        "half": ((torch.arange(16 * 8) % 50).double() * 0.25).half().reshape(16, 8),
        "step": 1234,
    }


def storage_options(endpoint):
    return {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}


def main():
    cmd, endpoint, url = sys.argv[1], sys.argv[2], sys.argv[3]
    if cmd == "save":
        dcp.save(expected(), storage_writer=FsspecWriter(url, **storage_options(endpoint)))
        return 0
    want = expected()
    if cmd == "torchload":
        import s3fs
        with s3fs.S3FileSystem(**storage_options(endpoint)).open(url, "rb") as f:
            sd = torch.load(f, weights_only=True)
        return check(sd, want)
    sd = {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0 for k, v in want.items()}
    dcp.load(sd, storage_reader=FsspecReader(url, **storage_options(endpoint)))
    return check(sd, want)


def check(sd, want):
    bad = 0
    for k, v in want.items():
        same = torch.equal(sd[k], v) if isinstance(v, torch.Tensor) else sd[k] == v
        if not same:
            print(f"mismatch in {k}: {sd[k]} != {v}")
            bad += 1
    print("checked", len(want), "entries,", bad, "mismatches")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
