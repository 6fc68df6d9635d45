#!/usr/bin/env python3
"""Benchmark rows for async save: dcpp's AsyncSave beside PyTorch 2.13's dcp.async_save.

Prints one JSON object per line, {"case", "figures", "target", "pass"}:
  * dcpp_async_bench (bench/async_bench.cc): blocking time of AsyncSave against a memcpy of the
    same bytes, first and second save, 1 and 4 ranks, time to commit, peak RSS;
  * PyTorch's dcp.async_save with the thread and the process executor, gloo, one process, the
    same bytes (8 float32 tensors), run by the venv's Python in the same run.
Usage: async_rows.py [--build BUILD_DIR] [--mib N]. DCPP_BUILD_DIR also names the build.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def arg(name, default):
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


def torch_rows(mib, saves=3):
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    tmp = tempfile.mkdtemp(prefix="dcpp-async-torch-")
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=0, world_size=1)
    per = (mib << 20) // 8 // 4
    sd = {f"layer{i}": torch.arange(per, dtype=torch.float32) % 1000 for i in range(8)}
    rows = []
    for kind in (AsyncCheckpointerType.THREAD, AsyncCheckpointerType.PROCESS):
        blocking, commits = [], []
        for i in range(saves):
            t0 = time.perf_counter()
            fut = dcp.async_save(sd, checkpoint_id=f"{tmp}/{kind.value}{i % 2}",
                                 async_checkpointer_type=kind)
            t1 = time.perf_counter()
            fut = getattr(fut, "upload_completion", fut)
            fut.result(timeout=300)
            commits.append(time.perf_counter() - t0)
            blocking.append(t1 - t0)
        later = sorted(blocking[1:])[len(blocking[1:]) // 2]
        rows.append({
            "case": f"torch {torch.__version__} dcp.async_save {kind.value} executor, 1 rank, "
                    f"{mib} MiB",
            "figures": {"first_blocking_ms": blocking[0] * 1e3, "second_blocking_ms": later * 1e3,
                        "commit_ms": sorted(commits)[len(commits) // 2] * 1e3},
            "target": "reference (PyTorch on the same bytes)",
            "pass": True,
        })
    dist.destroy_process_group()
    return rows


def main():
    mib = int(arg("--mib", "64"))
    if "--torch" in sys.argv:
        for row in torch_rows(mib):
            print(json.dumps(row))
        return 0
    build = arg("--build", os.environ.get("DCPP_BUILD_DIR", os.path.join(ROOT, "build")))
    binary = os.path.join(build, "dcpp_async_bench")
    rows = []
    out = subprocess.run([binary, "--mib", str(mib)], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        return 1
    rows += [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    venv = subprocess.run([os.path.join(ROOT, "scripts", "venv-path")], capture_output=True,
                          text=True).stdout.strip()
    py = os.path.join(venv, "bin", "python")
    peer = subprocess.run([py, os.path.abspath(__file__), "--torch", "--mib", str(mib)],
                          capture_output=True, text=True, timeout=600)
    if peer.returncode != 0:
        sys.stderr.write(peer.stderr[-4000:])
        return 1
    rows += [json.loads(line) for line in peer.stdout.splitlines() if line.startswith("{")]
    ours = next(r for r in rows if r["case"].startswith("async_save thread executor, 1 rank"))
    for r in rows:
        if r["case"].startswith("torch") and "thread" in r["case"]:
            rows.append({
                "case": "async_save blocking, dcpp against torch thread executor, second save",
                "figures": {"dcpp_ms": ours["figures"]["second_blocking_ms"],
                            "torch_ms": r["figures"]["second_blocking_ms"]},
                "target": "dcpp blocks no longer than torch",
                "pass": ours["figures"]["second_blocking_ms"] <= r["figures"]["second_blocking_ms"],
            })
            break
    for r in rows:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
