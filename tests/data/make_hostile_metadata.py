"""Writes tests/data/hostile/shared_chunk_list.metadata: a `.metadata` PyTorch 2.13 writes itself
(FileSystemWriter.finish, so its own pickling) whose 4 000 tensors all hold ONE chunk list
object of 50 000 chunks. Python's pickler writes that list once and refers to it from every
other tensor with a memo GET, so the file is small while copying the list for every key would
make 2 * 10^8 chunks (over 20 GB of memory). dcpp must refuse it with a clear DataLoss.

    <venv python> tests/data/make_hostile_metadata.py

Read by src/codec/metadata_hostile_test.cc (MetadataHostileTest.*SharedChunkList*). A smaller
one of the same shape (500 tensors sharing 4 000 chunks, under the fuzzers' 64 KiB max_len) goes
to tests/fuzz/metadata_fuzz/ as a seed (hostile_*: the golden-file tests skip it).
"""
import os
import shutil
import tempfile

import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    TensorProperties,
    TensorStorageMetadata,
)

KEYS = 4000
CHUNKS = 50000

here = os.path.dirname(os.path.abspath(__file__))
out = os.path.join(here, "hostile")
os.makedirs(out, exist_ok=True)



def write(keys, chunks, dst):
    # One chunk object repeated keeps the list itself small (each repeat is a memo GET too).
    chunk = ChunkStorageMetadata(offsets=torch.Size([0]), sizes=torch.Size([1]))
    shared = [chunk] * chunks
    props = TensorProperties(dtype=torch.float32)
    md = Metadata(
        state_dict_metadata={
            f"k{i}": TensorStorageMetadata(properties=props, size=torch.Size([1]), chunks=shared)
            for i in range(keys)
        }
    )
    tmp = tempfile.mkdtemp()
    try:
        writer = FileSystemWriter(tmp, sync_files=False)
        writer.reset()
        writer.finish(md, [])
        shutil.copyfile(os.path.join(tmp, ".metadata"), dst)
        print(os.path.relpath(dst, here), os.path.getsize(dst))
    finally:
        shutil.rmtree(tmp)


write(KEYS, CHUNKS, os.path.join(out, "shared_chunk_list.metadata"))
write(500, 4000, os.path.join(here, "..", "fuzz", "metadata_fuzz",
                              "hostile_torch213_shared_chunk_list.metadata"))
