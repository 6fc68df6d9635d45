"""dcpp with torch 2.13: dcp.save/load/async_save through dcpp's writer and reader, checked
against PyTorch's own FileSystemWriter/FileSystemReader, and numpy reads equal to torch's."""
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.api import CheckpointException  # noqa: E402

import dcpp  # noqa: E402
import dcpp.torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def state():
    g = torch.Generator().manual_seed(3)
    return {
        "model": {"w": torch.randn(33, 17, generator=g),
                  "b": torch.randn(17, generator=g).to(torch.bfloat16),
                  "f8": torch.randn(4, 8, generator=g).to(torch.float8_e5m2),
                  "i": torch.arange(10, dtype=torch.int64),
                  "half": torch.randn(3, 3, generator=g).half(),
                  "t": torch.randn(6, 4, generator=g).t()},  # non-contiguous
        "step": 9, "sched": {"lr": 0.1, "name": "cos", "milestones": [1, 2, 3]},
    }


def zeros_like(sd):
    if isinstance(sd, dict):
        return {k: zeros_like(v) for k, v in sd.items()}
    if isinstance(sd, torch.Tensor):
        return torch.zeros(sd.shape, dtype=sd.dtype)
    return None if not isinstance(sd, (int, float, str, list)) else type(sd)() if not isinstance(
        sd, list) else []


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            assert_same(a[k], b[k])
        elif isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            assert torch.equal(a[k].contiguous().view(torch.uint8),
                               b[k].contiguous().view(torch.uint8)), k
        else:
            assert a[k] == b[k], k


WRITERS = {
    "dcpp": lambda p: dcpp.torch.FileSystemWriter(p, thread_count=2),
    "torch": lambda p: dcp.FileSystemWriter(p),
}
READERS = {
    "dcpp": lambda p: dcpp.torch.FileSystemReader(p),
    "torch": lambda p: dcp.FileSystemReader(p),
}


@pytest.mark.parametrize("wkind", ["dcpp", "torch"])
@pytest.mark.parametrize("rkind", ["dcpp", "torch"])
def test_save_load_one_process(tmp_path, wkind, rkind):
    sd = state()
    dcp.save(sd, storage_writer=WRITERS[wkind](tmp_path / "c"))
    out = zeros_like(sd)
    dcp.load(out, storage_reader=READERS[rkind](tmp_path / "c"))
    assert_same(out, sd)


def test_same_files_as_pytorch_writer(tmp_path):
    sd = state()
    dcp.save(sd, storage_writer=dcpp.torch.FileSystemWriter(tmp_path / "d", thread_count=3))
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(tmp_path / "t", thread_count=3))
    # The same files, and dcpp's checksum manifest and save lock beside them (PyTorch ignores
    # both).
    ours = sorted(os.listdir(tmp_path / "d"))
    manifests = [n for n in ours if n.startswith(".metadata.") and n.endswith(".manifest")]
    assert len(manifests) == 1 and ".dcpp.lock" in ours
    extras = set(manifests) | {".dcpp.lock"}
    assert [n for n in ours if n not in extras] == sorted(os.listdir(tmp_path / "t"))
    md_d = dcp.FileSystemReader(tmp_path / "d").read_metadata()
    md_t = dcp.FileSystemReader(tmp_path / "t").read_metadata()
    assert md_d.state_dict_metadata == md_t.state_dict_metadata
    assert md_d.planner_data == md_t.planner_data
    assert md_d.storage_data.keys() == md_t.storage_data.keys()
    assert not any(n.endswith(".tmp") for n in os.listdir(tmp_path / "d"))


def test_async_save(tmp_path):
    sd = state()
    fut = dcp.async_save(sd, storage_writer=dcpp.torch.FileSystemWriter(tmp_path / "a"))
    fut.result()
    out = zeros_like(sd)
    dcp.load(out, storage_reader=dcp.FileSystemReader(tmp_path / "a"))
    assert_same(out, sd)


def test_numpy_reads_equal_torch(tmp_path):
    sd = state()
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(tmp_path / "t"))
    dcp.save(sd, storage_writer=dcpp.torch.FileSystemWriter(tmp_path / "d"))
    for path in (tmp_path / "t", tmp_path / "d"):
        ckpt = dcpp.open(path)
        for k, v in sd["model"].items():
            got = ckpt["model." + k]
            assert got.shape == tuple(v.shape)
            want = v.contiguous().view(torch.uint8).numpy()
            assert np.array_equal(np.ascontiguousarray(got).view(np.uint8).reshape(want.shape),
                                  want), k
        assert ckpt["step"] == 9 and ckpt["sched.milestones"] == [1, 2, 3]
        box = ckpt.read("model.w", (5, 2), (10, 3))
        assert np.array_equal(box, sd["model"]["w"][5:15, 2:5].numpy())
        assert ckpt.verify()["items"] > 0


def test_torch_loads_what_numpy_saved(tmp_path):
    a = np.arange(24, dtype=np.float32).reshape(4, 6)
    dcpp.save({"a": a, "n": {"k": 3}}, tmp_path / "c")
    out = {"a": torch.zeros(4, 6), "n": {"k": 0}}
    dcp.load(out, storage_reader=dcp.FileSystemReader(tmp_path / "c"))
    assert torch.equal(out["a"], torch.from_numpy(a)) and out["n"]["k"] == 3
    # DLPack in: a torch tensor goes in as it is.
    t = torch.randn(5, 5).to(torch.bfloat16)
    dcpp.save({"t": t}, tmp_path / "t")
    got = dcpp.open(tmp_path / "t")["t"]
    assert torch.equal(torch.from_numpy(got.view(np.uint16).copy()).view(torch.bfloat16), t)


def test_errors_carry_dcpp_message(tmp_path):
    sd = state()
    dcp.save(sd, storage_writer=dcpp.torch.FileSystemWriter(tmp_path / "c"))
    for name in os.listdir(tmp_path / "c"):
        if name.endswith(".distcp"):
            p = tmp_path / "c" / name
            p.write_bytes(p.read_bytes()[:100])
    # dcp.load wraps each rank's exception in a CheckpointException (a BaseException).
    with pytest.raises(CheckpointException, match="past the end of the file") as info:
        dcp.load(zeros_like(sd), storage_reader=dcpp.torch.FileSystemReader(tmp_path / "c"))
    cause = info.value.failures[0][0]
    assert isinstance(cause, dcpp.DataLossError) and "__0_0.distcp" in str(cause)
    with pytest.raises(dcpp.NotFoundError):
        dcpp.torch.FileSystemReader(tmp_path / "none").read_metadata()


def flip_payload_byte(directory):
    """Flips one byte in the middle of the largest data file (inside a tensor's payload)."""
    name = max((n for n in os.listdir(directory) if n.endswith(".distcp")),
               key=lambda n: os.path.getsize(os.path.join(directory, n)))
    path = os.path.join(directory, name)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x01
    open(path, "wb").write(bytes(data))


def test_dcpp_torch_writer_writes_a_manifest_that_loads_verify(tmp_path):
    sd = {"w": torch.randn(256, 1024), "step": 3}  # 1 MiB: several checksum segments
    dcp.save(sd, storage_writer=dcpp.torch.FileSystemWriter(tmp_path / "c", thread_count=2))
    names = os.listdir(tmp_path / "c")
    assert sum(n.startswith(".metadata.") and n.endswith(".manifest") for n in names) == 1
    report = dcpp.open(tmp_path / "c").verify()
    assert report["ok"] and report["has_manifest"] and report["segments_checked"] >= 4
    # A second save over it (its data files get a tag of their own) keeps one manifest.
    dcp.save(sd, storage_writer=dcpp.torch.FileSystemWriter(tmp_path / "c", thread_count=2))
    names = os.listdir(tmp_path / "c")
    assert sum(n.endswith(".manifest") for n in names) == 1
    assert dcpp.open(tmp_path / "c").verify()["has_manifest"]
    # PyTorch's own reader ignores the manifest.
    out = {"w": torch.zeros(256, 1024), "step": 0}
    dcp.load(out, storage_reader=dcp.FileSystemReader(tmp_path / "c"))
    assert torch.equal(out["w"], sd["w"]) and out["step"] == 3
    # A flipped payload byte: dcpp's reader refuses it, verify names it; verify=False salvages.
    flip_payload_byte(tmp_path / "c")
    with pytest.raises(CheckpointException, match="checksum mismatch"):
        dcp.load({"w": torch.zeros(256, 1024)},
                 storage_reader=dcpp.torch.FileSystemReader(tmp_path / "c"))
    with pytest.raises(dcpp.DataLossError, match=r'BAD "w@\[0, 0\]" in "__0_\d(_[0-9a-f]{8})?.distcp" at offset'):
        dcpp.open(tmp_path / "c").verify()
    out = {"w": torch.zeros(256, 1024)}
    dcp.load(out, storage_reader=dcpp.torch.FileSystemReader(tmp_path / "c", verify=False))
    assert not torch.equal(out["w"], sd["w"])


def test_pytorch_written_checkpoint_checks_crcs(tmp_path):
    sd = {"w": torch.randn(512, 1024)}  # 2 MiB: its record is checked when read whole
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(tmp_path / "t"))
    report = dcpp.open(tmp_path / "t").verify()
    assert report["ok"] and not report["has_manifest"] and report["records_checked"] > 0
    flip_payload_byte(tmp_path / "t")
    with pytest.raises(CheckpointException, match="CRC-32 mismatch"):
        dcp.load({"w": torch.zeros(512, 1024)},
                 storage_reader=dcpp.torch.FileSystemReader(tmp_path / "t"))
    with pytest.raises(dcpp.DataLossError, match="no manifest"):
        dcpp.open(tmp_path / "t").verify()


def run_ranks(tmp_path, world, wkind, rkind):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "dist_worker.py"), str(r),
                               str(world), str(tmp_path), wkind, rkind], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(world)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=240)[0].decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-4000:]


@pytest.mark.parametrize("world", [1, 3])
def test_dtensor_gloo_ranks(tmp_path, world):
    # dcpp writes and reads under a gloo job; PyTorch's own reader and dcpp's numpy reader load
    # the result afterwards in this process.
    run_ranks(tmp_path, world, "dcpp", "dcpp")
    sys.path.insert(0, HERE)
    from dist_worker import global_state
    g = global_state()
    for name in ("sync", "async"):
        out = {"model": {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in g.items()},
               "step": 0, "note": {"tag": "", "ranks": 0}}
        dcp.load(out, storage_reader=dcp.FileSystemReader(tmp_path / name))
        for k, v in g.items():
            assert torch.equal(out["model"][k].view(torch.uint8), v.view(torch.uint8)), k
        assert out["step"] == 11 and out["note"]["ranks"] == world
        ckpt = dcpp.open(tmp_path / name)
        assert np.array_equal(ckpt["model.w"], g["w"].numpy())
        assert len(ckpt.info("model.w")["chunks"]) == world


def test_dtensor_three_ranks_pytorch_writer_dcpp_reader(tmp_path):
    run_ranks(tmp_path, 3, "torch", "dcpp")


def _data_files(directory):
    return sorted(n for n in os.listdir(directory) if n.endswith(".distcp"))


def _state_of(seed):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g), "step": seed}


def test_replacing_a_checkpoint_never_touches_its_files_before_the_commit(tmp_path, monkeypatch):
    path = tmp_path / "c"
    first = _state_of(1)
    dcp.save(first, storage_writer=dcpp.torch.FileSystemWriter(path, thread_count=2))
    old_files = _data_files(path)
    old_bytes = {n: (path / n).read_bytes() for n in old_files}
    # A second save that dies after writing its data, before the commit (a crash, a full disk).
    real = dcpp._dcpp.commit_checkpoint

    def dies(*args, **kwargs):
        raise dcpp.UnavailableError("injected: the commit never happens")

    monkeypatch.setattr(dcpp._dcpp, "commit_checkpoint", dies)
    with pytest.raises(CheckpointException, match="injected"):
        dcp.save(_state_of(2), storage_writer=dcpp.torch.FileSystemWriter(path, thread_count=2))
    monkeypatch.setattr(dcpp._dcpp, "commit_checkpoint", real)
    # The last good checkpoint is whole: its files were not rewritten, PyTorch loads it, verify
    # passes. The failed save's files carry a tag of their own.
    assert {n: (path / n).read_bytes() for n in old_files} == old_bytes
    assert set(_data_files(path)) > set(old_files)
    out = {"w": torch.zeros(64, 32), "b": torch.zeros(32), "step": 0}
    dcp.load(out, storage_reader=dcp.FileSystemReader(path))
    assert torch.equal(out["w"], first["w"]) and out["step"] == 1
    assert dcpp.open(path).verify()["ok"]
    # The next good save replaces it and removes every file the new metadata does not use.
    third = _state_of(3)
    dcp.save(third, storage_writer=dcpp.torch.FileSystemWriter(path, thread_count=2))
    used = {sd.relative_path for sd in dcp.FileSystemReader(path).read_metadata()
            .storage_data.values()}
    assert set(_data_files(path)) == used and not used & set(old_files)
    dcp.load(out, storage_reader=dcp.FileSystemReader(path))
    assert torch.equal(out["w"], third["w"]) and out["step"] == 3
    assert dcpp.open(path).verify()["ok"]


def test_a_save_while_another_holds_the_directory_fails_at_once(tmp_path):
    path = tmp_path / "c"
    dcp.save(_state_of(1), storage_writer=dcpp.torch.FileSystemWriter(path))
    other = dcpp._dcpp.SaveGuard(os.fspath(path))  # what a concurrent save holds
    assert other.locked
    before = {n: (path / n).read_bytes() for n in _data_files(path)}
    with pytest.raises(CheckpointException, match="lock"):
        dcp.save(_state_of(2), storage_writer=dcpp.torch.FileSystemWriter(path))
    assert {n: (path / n).read_bytes() for n in _data_files(path)} == before
    other.release()
    dcp.save(_state_of(2), storage_writer=dcpp.torch.FileSystemWriter(path))
    out = {"w": torch.zeros(64, 32), "b": torch.zeros(32), "step": 0}
    dcp.load(out, storage_reader=dcpp.torch.FileSystemReader(path))
    assert out["step"] == 2


def test_a_directory_that_is_not_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "mine"
    path.mkdir()
    (path / "__0_0.distcp").write_bytes(b"a user's own file")
    with pytest.raises(CheckpointException, match="not a checkpoint"):
        dcp.save(_state_of(1), storage_writer=dcpp.torch.FileSystemWriter(path))
    assert (path / "__0_0.distcp").read_bytes() == b"a user's own file"
