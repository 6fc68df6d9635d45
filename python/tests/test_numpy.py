"""dcpp without torch: these tests must pass in a venv that has only numpy, ml_dtypes, pytest."""
import os
import shutil
import sys

import ml_dtypes
import numpy as np
import pytest

import dcpp


def test_import_does_not_load_torch():
    assert "torch" not in sys.modules or os.environ.get("DCPP_TORCH_PRESENT") == "1"


def _bits(a):
    a = np.ascontiguousarray(a)
    return a.reshape(-1).view(np.uint8) if a.ndim else a.reshape(1).view(np.uint8)


@pytest.mark.parametrize("variant", ["sync", "nocoll"])
def test_reads_pytorch_213_checkpoint_like_torch(golden_213, variant):
    # expected.pt is torch.save of the same state (DTensors gathered) by PyTorch 2.13.
    expected = dcpp.open(os.path.join(golden_213, "expected.pt"))
    ckpt = dcpp.open(os.path.join(golden_213, variant))
    assert ckpt.format == "dcp" and expected.format == "torch"
    assert set(ckpt.keys()) == set(expected.keys())
    tensors = 0
    for key in expected.keys():
        if expected.is_tensor(key):
            a, b = expected[key], ckpt[key]
            assert a.dtype == b.dtype and a.shape == b.shape, key
            assert np.array_equal(_bits(a), _bits(b)), key
            tensors += 1
        else:
            assert ckpt[key] == expected[key], key
    assert tensors > 20
    assert ckpt["dtypes.bfloat16"].dtype == np.dtype(ml_dtypes.bfloat16)
    assert ckpt["dtypes.float8_e4m3fn"].dtype == np.dtype(ml_dtypes.float8_e4m3fn)
    assert ckpt["plain.name"] == expected["plain.name"]
    assert ckpt.verify()["items"] > 0


def test_info_lists_chunks_and_files(golden_213):
    ckpt = dcpp.open(os.path.join(golden_213, "sync"))
    info = ckpt.info("dt.shard0")
    assert info["is_tensor"] and len(info["chunks"]) == 2
    files = {c["file"] for c in info["chunks"]}
    assert files == {"__0_0.distcp", "__1_0.distcp"}
    for c in info["chunks"]:
        assert c["length"] > 0 and len(c["offsets"]) == len(info["shape"])


def test_slice_reads_only_its_chunk(golden_213):
    ckpt = dcpp.open(os.path.join(golden_213, "sync"))
    info = ckpt.info("dt.shard0")
    first = min(info["chunks"], key=lambda c: c["offsets"])
    whole = ckpt["dt.shard0"]
    ckpt.reset_bytes_read()
    part = ckpt.read("dt.shard0", first["offsets"], first["sizes"])
    assert np.array_equal(part, whole[tuple(slice(o, o + s) for o, s in
                                            zip(first["offsets"], first["sizes"]))])
    # Only the file of the first chunk was touched, not the other rank's.
    by_file = ckpt.bytes_read_by_file
    assert first["file"] in by_file
    assert {"__0_0.distcp", "__1_0.distcp"} - {first["file"]} - set(by_file)


def test_slice_of_large_tensor_reads_its_byte_range(tmp_path):
    a = np.arange(1024 * 1024, dtype=np.float32).reshape(1024, 1024)  # 4 MiB
    dcpp.save({"a": a}, tmp_path / "c")
    ckpt = dcpp.open(tmp_path / "c")
    data_file = ckpt.info("a")["chunks"][0]["file"]
    ckpt.reset_bytes_read()
    rows = ckpt.read("a", (100, 0), (8, 1024))
    assert np.array_equal(rows, a[100:108])
    wanted = 8 * 1024 * 4
    got = ckpt.bytes_read_by_file[data_file]
    # The rows, plus the archive's zip directory search (<= 64 KiB + a record) and its pickle,
    # rounded out to whole 256 KiB checksum segments (each read is verified against the
    # manifest): the first, the last two and the rows' own. Never the whole 4 MiB tensor.
    assert wanted <= got < wanted + 72 * 1024 + 4 * 256 * 1024, got
    ckpt.reset_bytes_read()
    col = ckpt.read("a", (0, 5), (1024, 1))
    assert np.array_equal(col[:, 0], a[:, 5])


def test_save_roundtrip_numpy_and_values(tmp_path):
    sd = {
        "model": {"w": np.random.default_rng(0).standard_normal((7, 5)).astype(np.float32),
                  "b": np.arange(5, dtype=np.int64),
                  "h": np.linspace(0, 1, 9, dtype=np.float32).astype(ml_dtypes.bfloat16),
                  "f8": np.linspace(-2, 2, 8).astype(ml_dtypes.float8_e4m3fn),
                  "t": np.arange(12, dtype=np.float64).reshape(3, 4).T},  # strided
        "step": 42, "lr": 0.5, "name": "run", "flags": [True, None, "x"], "raw": b"\x00\x01",
    }
    dcpp.save(sd, tmp_path / "c")
    ckpt = dcpp.open(tmp_path / "c")
    for k in ("w", "b", "h", "f8", "t"):
        got = ckpt["model." + k]
        assert got.dtype == sd["model"][k].dtype and got.shape == sd["model"][k].shape
        assert np.array_equal(_bits(got), _bits(sd["model"][k])), k
    assert ckpt["step"] == 42 and ckpt["lr"] == 0.5 and ckpt["name"] == "run"
    assert ckpt["flags"] == [True, None, "x"] and ckpt["raw"] == b"\x00\x01"
    assert ckpt.verify()["items"] == 10


class OnlyDLPack:
    """An array from 'another framework': reachable only through the DLPack protocol."""

    def __init__(self, a):
        self._a = a

    def __dlpack__(self, **kwargs):
        return self._a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


def test_dlpack_in_and_out(tmp_path):
    a = np.arange(20, dtype=np.int32).reshape(4, 5)
    dcpp.save({"a": OnlyDLPack(a)}, tmp_path / "c")
    got = dcpp.open(tmp_path / "c")["a"]
    assert np.array_equal(got, a)
    back = np.from_dlpack(got)  # numpy arrays dcpp returns export DLPack themselves
    assert np.shares_memory(back, got)


def test_convert_dcp_to_torch_and_back(tmp_path, golden_213):
    dcpp.convert(os.path.join(golden_213, "sync"), tmp_path / "m.pt", to="torch")
    pt = dcpp.open(tmp_path / "m.pt")
    assert pt.format == "torch"
    dcpp.convert(tmp_path / "m.pt", tmp_path / "d", to="dcp")
    d = dcpp.open(tmp_path / "d")
    src = dcpp.open(os.path.join(golden_213, "sync"))
    for key in ("dt.block2d", "model.net.0.weight", "dtypes.bfloat16"):
        assert np.array_equal(_bits(d[key]), _bits(src[key]))
    with pytest.raises(dcpp.InvalidArgumentError, match="to must be"):
        dcpp.convert(tmp_path / "d", tmp_path / "x", to="onnx")


def test_errors_are_dcpp_exceptions_with_messages(tmp_path, golden_213):
    with pytest.raises(dcpp.NotFoundError, match="does not exist"):
        dcpp.open(tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        dcpp.open(tmp_path / "missing")
    ckpt = dcpp.open(os.path.join(golden_213, "sync"))
    with pytest.raises(dcpp.NotFoundError, match='no key "nope"'):
        ckpt["nope"]
    with pytest.raises(dcpp.InvalidArgumentError, match="outside"):
        ckpt.read("dt.shard0", (0, 0), (1000, 1))
    with pytest.raises(dcpp.InvalidArgumentError, match="cannot store"):
        dcpp.save({"x": object()}, tmp_path / "bad")


def test_verify_detects_corruption(tmp_path):
    a = np.arange(4096, dtype=np.float32)
    dcpp.save({"a": a}, tmp_path / "c")
    ckpt = dcpp.open(tmp_path / "c")
    chunk = ckpt.info("a")["chunks"][0]
    path = tmp_path / "c" / chunk["file"]
    data = bytearray(path.read_bytes())
    data[chunk["offset"] + chunk["length"] // 2] ^= 0xFF  # inside the tensor's record
    path.write_bytes(bytes(data))
    with pytest.raises(dcpp.DataLossError, match="(?i)crc|checksum"):
        dcpp.open(tmp_path / "c").verify()
    # Truncation: the blob runs past the end of its file.
    path.write_bytes(bytes(data[: chunk["offset"] + 10]))
    with pytest.raises(dcpp.DataLossError, match="past the end"):
        dcpp.open(tmp_path / "c").verify()


def test_verify_reports_the_manifest_and_names_a_bad_item(tmp_path, golden_213):
    a = np.arange(1 << 18, dtype=np.float32)  # 1 MiB: four checksum segments
    dcpp.save({"a": a, "n": 5}, tmp_path / "c")
    assert any(n.endswith(".manifest") for n in os.listdir(tmp_path / "c"))
    report = dcpp.open(tmp_path / "c").verify()
    assert report["ok"] and report["has_manifest"] and report["items"] == 2
    assert report["segments_checked"] >= 5 and report["problems"] == []
    chunk = dcpp.open(tmp_path / "c").info("a")["chunks"][0]
    path = tmp_path / "c" / chunk["file"]
    data = bytearray(path.read_bytes())
    at = chunk["offset"] + chunk["length"] // 2
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(dcpp.DataLossError, match="checksum mismatch") as info:
        dcpp.open(tmp_path / "c").verify()
    assert '"a@[0]"' in str(info.value) and chunk["file"] in str(info.value)
    with pytest.raises(dcpp.DataLossError, match="checksum mismatch"):
        dcpp.open(tmp_path / "c")["a"]
    # A checkpoint PyTorch wrote: no manifest, CRCs and structure still checked.
    report = dcpp.open(os.path.join(golden_213, "sync")).verify()
    assert report["ok"] and not report["has_manifest"] and report["records_checked"] > 0
