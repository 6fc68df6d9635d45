"""dcpp.open, read, verify and convert on safetensors files written by the safetensors library
itself (the peer), without torch: numpy and the `safetensors` package only."""
import json
import os

import numpy as np
import pytest

import dcpp

st_numpy = pytest.importorskip("safetensors.numpy")


def _bits(a):
    a = np.ascontiguousarray(a)
    return a.reshape(-1).view(np.uint8) if a.ndim else a.reshape(1).view(np.uint8)


def _state():
    rng = np.random.default_rng(7)
    return {
        "embed.weight": rng.standard_normal((64, 48)).astype(np.float32),
        "layer.0.bias": rng.standard_normal(48).astype(np.float16),
        "layer.0.cube": rng.integers(-9, 9, (3, 4, 5)).astype(np.int8),
        "mask": rng.integers(0, 2, (7, 3)).astype(np.bool_),
        "count": np.array(123456789012, dtype=np.int64),  # 0-d
        "bytes": rng.integers(0, 255, 33).astype(np.uint8),
        "double": rng.standard_normal((2, 2)).astype(np.float64),
    }


def test_reads_a_file_written_by_the_safetensors_library(tmp_path):
    sd = _state()
    path = tmp_path / "model.safetensors"
    st_numpy.save_file(sd, str(path), metadata={"format": "np"})
    ckpt = dcpp.open(path)
    assert ckpt.format == "safetensors"
    assert set(ckpt.keys()) == set(sd)
    raw = path.read_bytes()
    for key, want in sd.items():
        got = ckpt[key]
        assert got.dtype == want.dtype and got.shape == want.shape, key
        assert np.array_equal(_bits(got), _bits(want)), key
        info = ckpt.info(key)
        assert info["is_tensor"] and tuple(info["shape"]) == want.shape
        (chunk,) = info["chunks"]
        # The chunk's byte range in the file holds exactly the tensor's little-endian bytes.
        assert chunk["file"] == "model.safetensors" and chunk["length"] == want.nbytes
        assert raw[chunk["offset"]:chunk["offset"] + chunk["length"]] == want.tobytes(), key
    assert ckpt.verify()["items"] == len(sd)


def test_a_box_reads_only_its_bytes(tmp_path):
    a = np.arange(1024 * 256, dtype=np.float32).reshape(1024, 256)  # 1 MiB
    path = tmp_path / "big.safetensors"
    st_numpy.save_file({"a": a, "b": np.ones(10, np.float32)}, str(path))
    ckpt = dcpp.open(path)
    ckpt.reset_bytes_read()
    rows = ckpt.read("a", (100, 0), (10, 256))
    assert np.array_equal(rows, a[100:110])
    assert ckpt.bytes_read == 10 * 256 * 4  # one contiguous run, nothing else
    ckpt.reset_bytes_read()
    cols = ckpt.read("a", (0, 8), (1024, 4))
    assert np.array_equal(cols, a[:, 8:12])
    # A strided box is read through bounded pieces of the byte span it covers (fewer, larger
    # reads), never beyond it: from row 0 column 8 to row 1023 column 11.
    span = (1023 * 256 + 12 - 8) * 4
    assert 1024 * 4 * 4 <= ckpt.bytes_read <= span


def test_reads_a_sharded_directory_with_index(tmp_path):
    sd = _state()
    keys = sorted(sd)
    first, second = keys[:3], keys[3:]
    d = tmp_path / "hf"
    d.mkdir()
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    st_numpy.save_file({k: sd[k] for k in first}, str(d / names[0]))
    st_numpy.save_file({k: sd[k] for k in second}, str(d / names[1]))
    weight_map = {k: names[0] for k in first} | {k: names[1] for k in second}
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": sum(v.nbytes for v in sd.values())},
                    "weight_map": weight_map}))
    ckpt = dcpp.open(d)
    assert ckpt.format == "safetensors" and set(ckpt.keys()) == set(sd)
    for key, want in sd.items():
        assert np.array_equal(_bits(ckpt[key]), _bits(want)), key
        assert ckpt.info(key)["chunks"][0]["file"] == weight_map[key]
    assert ckpt.verify()["items"] == len(sd)


def test_convert_dcp_to_safetensors_and_back(tmp_path):
    sd = _state()
    dcpp.save({**sd, "step": 5}, tmp_path / "dcp")
    skipped = dcpp.convert(tmp_path / "dcp", tmp_path / "hf", to="safetensors",
                           max_shard_size=1000)
    assert skipped == ["step"]
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1  # the small shard size split the tensors over several files
    loaded = {}
    for f in files:
        loaded.update(st_numpy.load_file(str(tmp_path / "hf" / f)))  # the peer reads them
    assert set(loaded) == set(sd)
    for key, want in sd.items():
        assert loaded[key].dtype == want.dtype and np.array_equal(_bits(loaded[key]), _bits(want))
    dcpp.convert(tmp_path / "hf", tmp_path / "back", to="dcp")
    back = dcpp.open(tmp_path / "back")
    assert back.format == "dcp" and set(back.keys()) == set(sd)
    for key, want in sd.items():
        assert np.array_equal(_bits(back[key]), _bits(want)), key
    dcpp.convert(tmp_path / "hf", tmp_path / "m.pt", to="torch")
    assert dcpp.open(tmp_path / "m.pt").format == "torch"
    with pytest.raises(dcpp.InvalidArgumentError, match="already safetensors"):
        dcpp.convert(tmp_path / "hf", tmp_path / "again", to="safetensors")


def test_damaged_files_are_refused_with_their_name(tmp_path):
    path = tmp_path / "model.safetensors"
    st_numpy.save_file(_state(), str(path))
    raw = path.read_bytes()
    (tmp_path / "short.safetensors").write_bytes(raw[:-5])  # data section truncated
    with pytest.raises(dcpp.DataLossError, match="short.safetensors"):
        dcpp.open(tmp_path / "short.safetensors")
    n = int.from_bytes(raw[:8], "little")
    (tmp_path / "huge.safetensors").write_bytes((1 << 40).to_bytes(8, "little") + raw[8:])
    with pytest.raises(dcpp.DataLossError, match="huge.safetensors"):
        dcpp.open(tmp_path / "huge.safetensors")
    bad = raw[:8] + raw[8:8 + n].replace(b'"F32"', b'"F99"', 1) + raw[8 + n:]
    (tmp_path / "dtype.safetensors").write_bytes(bad)
    with pytest.raises(dcpp.Error, match="F99"):
        dcpp.open(tmp_path / "dtype.safetensors")


def test_bfloat16_written_by_torch_reads_as_ml_dtypes(tmp_path):
    torch = pytest.importorskip("torch")
    st_torch = pytest.importorskip("safetensors.torch")
    import ml_dtypes

    t = torch.linspace(-3, 3, 40).reshape(5, 8).to(torch.bfloat16)
    st_torch.save_file({"w": t, "f8": t.float().to(torch.float8_e4m3fn)},
                       str(tmp_path / "m.safetensors"))
    ckpt = dcpp.open(tmp_path / "m.safetensors")
    w = ckpt["w"]
    assert w.dtype == np.dtype(ml_dtypes.bfloat16) and w.shape == (5, 8)
    assert np.array_equal(w.view(np.uint16), t.view(torch.int16).numpy().view(np.uint16))
    f8 = ckpt["f8"]
    assert f8.dtype == np.dtype(ml_dtypes.float8_e4m3fn)
    assert np.array_equal(f8.view(np.uint8),
                          t.float().to(torch.float8_e4m3fn).view(torch.uint8).numpy())
