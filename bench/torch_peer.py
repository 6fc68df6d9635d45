"""The PyTorch peers of `dcpp bench`: DCP save/load and torch.save/torch.load of the same state.

Run by `dcpp bench` with the venv's Python (PyTorch 2.x):
    torch_peer.py --kind large|small --op dcp_save|dcp_load|torch_save|torch_load
                  --threads T --bytes B --dir DIR    (or --ops dcp_save:4,dcp_load:4,...)
Prints one JSON object per operation: {"op", "threads", "seconds", "bytes", "peak_rss_bytes"}. The state is built exactly as
dcpp's bench builds it (tensor shapes and count), filled with non-zero bytes; saves fsync (DCP:
sync_files=True; torch.save: os.fsync before close), loads fill pre-allocated tensors (DCP) or
return new ones (torch.load).
"""
import argparse
import warnings
import json
import os
import resource
import shutil
import sys
import time

import torch
import torch.distributed.checkpoint as dcp


def shapes(kind, total):
    if kind == "large":
        cols = 4096
        rows = total // 8 // cols // 4
        return [(rows, cols)] * 8
    if kind == "small":
        # The same sizes dcpp uses: 4 KiB .. 64 KiB float32 vectors, cycling.
        out, i, used = [], 0, 0
        while True:
            n = 1024 << (i % 5)
            if used + 4 * n > total and i >= 5:
                break
            out.append((n,))
            used += 4 * n
            i += 1
        return out
    raise SystemExit(f"unknown kind {kind}")


def state(kind, total, fill):
    sd = {}
    for i, s in enumerate(shapes(kind, total)):
        t = torch.empty(s, dtype=torch.float32)
        if fill:
            t.fill_(0.5 + i)
        else:
            t.zero_()
        sd[f"t{i}"] = t
    return sd


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kind", required=True)
    ap.add_argument("--op", help="one operation")
    ap.add_argument("--ops", help="comma-separated op[:threads] list, run in this order in this "
                    "process; one JSON line each")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bytes", type=int, required=True)
    ap.add_argument("--dir", required=True)
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    ops = a.ops.split(",") if a.ops else [a.op]
    for n, spec in enumerate(ops):
        op, _, threads = spec.partition(":")
        run(a, op, int(threads) if threads else a.threads, after_another=n > 0)
    if a.ops:  # a list cleans up after itself
        shutil.rmtree(os.path.join(a.dir, f"torch_{a.kind}_dcp"), ignore_errors=True)
        pt = os.path.join(a.dir, f"torch_{a.kind}_pt.pt")
        if os.path.exists(pt):
            os.remove(pt)


def fresh_memory(after_another):
    """A save after another operation of this process starts with the memory a new process gets
    (dcpp's cases and fio do): the previous operation's state and the removed checkpoint's
    page cache were freed a moment ago, and the host still backs that memory for about 2 s, so
    a save's page cache taken from it would skip the host faults every other writer pays (one
    run measured DCP's 4-thread save, which followed its 1-thread one, at 1.8 GB/s and the
    1-thread one, first in its process, at 0.31)."""
    if after_another:
        time.sleep(3)


def run(a, op, threads, after_another=False):
    path = os.path.join(a.dir, f"torch_{a.kind}_{'dcp' if op.startswith('dcp') else 'pt'}")
    nbytes = sum(4 * int(torch.Size(s).numel()) for s in shapes(a.kind, a.bytes))
    if op == "dcp_save":
        # The previous checkpoint goes before the state is built (as dcpp's case does), so the
        # save does not write into page-cache memory freed a moment earlier.
        shutil.rmtree(path, ignore_errors=True)
        fresh_memory(after_another)
        sd = state(a.kind, a.bytes, True)
        t0 = time.perf_counter()
        dcp.save(sd, storage_writer=dcp.FileSystemWriter(path, thread_count=threads,
                                                          sync_files=True))
        dt = time.perf_counter() - t0
    elif op in ("dcp_load", "dcp_load_cold"):
        sd = state(a.kind, a.bytes, False)
        if op == "dcp_load_cold":  # as a new job finds it: not in the page cache
            for name in os.listdir(path):
                fd = os.open(os.path.join(path, name), os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
        t0 = time.perf_counter()
        dcp.load(sd, storage_reader=dcp.FileSystemReader(path))
        dt = time.perf_counter() - t0
        if float(sd["t1"].view(-1)[0]) != 1.5:
            raise SystemExit("dcp_load: wrong value")
    elif op == "torch_save":
        fresh_memory(after_another)
        sd = state(a.kind, a.bytes, True)
        t0 = time.perf_counter()
        with open(path + ".pt", "wb") as f:
            torch.save(sd, f)
            f.flush()
            os.fsync(f.fileno())
        dt = time.perf_counter() - t0
    elif op == "torch_load":
        t0 = time.perf_counter()
        sd = torch.load(path + ".pt", weights_only=True)
        dt = time.perf_counter() - t0
        if float(sd["t1"].view(-1)[0]) != 1.5:
            raise SystemExit("torch_load: wrong value")
    else:
        raise SystemExit(f"unknown op {op}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"op": op, "threads": threads, "seconds": dt, "bytes": nbytes,
                      "peak_rss_bytes": rss}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
