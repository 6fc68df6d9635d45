"""dcpp as the storage engine behind torch.distributed.checkpoint.

    import torch.distributed.checkpoint as dcp
    import dcpp.torch
    dcp.save(sd, storage_writer=dcpp.torch.FileSystemWriter(path, thread_count=4))
    dcp.load(sd, storage_reader=dcpp.torch.FileSystemReader(path))
    dcp.async_save(sd, storage_writer=dcpp.torch.FileSystemWriter(path))

The writer and reader are PyTorch's own FileSystemWriter/FileSystemReader with their data path
replaced: planning, file naming and the metadata object are PyTorch's, so the directory is
exactly what PyTorch's FileSystemWriter writes (PyTorch's FileSystemReader loads it, and dcpp's
reader loads PyTorch's). The bytes are moved by dcpp's C++ engine with the GIL released: tensors
are written as torch.save archives straight from their memory by `thread_count` threads, each file
fsync'ed, and `.metadata` committed atomically (temporary, fsync, rename, fsync of the
directory). As dcpp's own writer does, the coordinator refuses a directory that is not a
checkpoint, holds the directory's save lock from planning to the commit (a save from another
process fails at once), gives the data files of a save that replaces a checkpoint names of their
own (so a failed save never damages the last good checkpoint), and removes what no committed
metadata uses after the commit (rank-local saves, use_collectives=False, take no lock). Loads read each item's byte range in parallel straight into the destination tensor
(no torch.load, no intermediate copy).
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
from torch.futures import Future
from typing import Any, Optional

import torch
import torch.distributed.checkpoint as _dcp
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import WriteResult

from . import _dcpp

__all__ = ["FileSystemWriter", "FileSystemReader"]

_METADATA = ".metadata"
_SUFFIX = ".distcp"
# Directory (real path) -> the save lock this process's coordinator holds on it.
_GUARDS: dict = {}

# dtypes whose torch tensors cross into the engine through __dlpack__ as they are; the others go
# as same-size integer views with the dtype named.
_DLPACK = {
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16,
    torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128,
}
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def _engine_tensor(t: torch.Tensor):
    """A CPU tensor in the form the engine takes without copying it."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype in _DLPACK:
        return t
    return _dcpp.TensorIn(t.view(_SAME_SIZE_INT[t.element_size()]), _dtype_name(t.dtype))


def _nbytes(item) -> int:
    td = item.tensor_data
    n = 1
    for s in td.size:
        n *= s
    return n * torch._utils._element_size(td.properties.dtype)


def _buckets(n: int, items: list) -> list:
    """Items spread over n files: bytes items round-robin, tensors largest first into the
    lightest file, so the files (one per thread) carry about equal bytes."""
    if n <= 1:
        return [list(items)]
    out = [[] for _ in range(n)]
    load = [0] * n
    blobs = [i for i in items if i.type == WriteItemType.BYTE_IO]
    tensors = sorted((i for i in items if i.type != WriteItemType.BYTE_IO), key=_nbytes,
                     reverse=True)
    for k, item in enumerate(blobs):
        out[k % n].append(item)
    for item in tensors:
        k = load.index(min(load))
        out[k].append(item)
        load[k] += _nbytes(item)
    return out


@dataclasses.dataclass(frozen=True)
class _HashedWriteResult(WriteResult):
    """PyTorch's WriteResult with the xxHash3 checksums of the blob's segments (for the
    manifest); travels to the coordinator pickled, like any WriteResult."""

    checksums: tuple = ()


class FileSystemWriter(_dcp.FileSystemWriter):
    """PyTorch's FileSystemWriter (same arguments, same directory) whose bytes dcpp writes."""

    def __init__(self, path, single_file_per_rank: bool = True, sync_files: bool = True,
                 thread_count: int = 1, per_thread_copy_ahead: int = 10_000_000,
                 cache_staged_state_dict: bool = False, overwrite: bool = True, **kwargs: Any):
        if kwargs.get("_extensions"):
            raise _dcpp.UnimplementedError(
                "dcpp.torch.FileSystemWriter: stream extensions are not supported")
        super().__init__(path, single_file_per_rank=single_file_per_rank, sync_files=sync_files,
                         thread_count=thread_count, per_thread_copy_ahead=per_thread_copy_ahead,
                         cache_staged_state_dict=cache_staged_state_dict, overwrite=overwrite,
                         **kwargs)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        super().set_up_storage_writer(is_coordinator, *args, **kwargs)
        self._is_coordinator = is_coordinator
        self._tag = ""

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        plan = super().prepare_local_plan(plan)  # makes the directory, applies `overwrite`
        # Replacing a committed checkpoint: this save's data files get names of their own, so the
        # previous checkpoint's files stay whole until the new metadata is committed (PyTorch's
        # writer rewrites them in place, so a failed save would damage the last good checkpoint).
        self._tag = "_" + os.urandom(4).hex() if self._metadata_exists() else ""
        if getattr(self, "_is_coordinator", False) and self.use_collectives:
            # The lock keeps other processes out. A save of this process that failed on its way
            # (PyTorch calls no writer method after a failed step) left its lock with its writer
            # object; the next save here to the same directory takes it over.
            key = os.path.realpath(os.fspath(self.path))
            old = _GUARDS.pop(key, None)
            if old is not None:
                old.release()
            self._guard = _dcpp.SaveGuard(os.fspath(self.path))
            _GUARDS[key] = self._guard
        return plan

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future:
        prefix = plan.storage_data.prefix
        tag = getattr(self, "_tag", "")
        groups = (_buckets(self.thread_count, plan.items) if self.single_file_per_rank
                  else [[item] for item in plan.items])
        groups = [g for g in groups if g]
        files = []
        for n, group in enumerate(groups):
            blobs = []
            for item in group:
                data = planner.resolve_data(item)
                if item.type == WriteItemType.BYTE_IO:
                    blobs.append(bytes(data.getbuffer()))
                else:
                    blobs.append(_engine_tensor(data))
            files.append((f"{prefix}{n}{tag}{_SUFFIX}", blobs))
        where = _dcpp.write_files(os.fspath(self.path), files, max(1, self.thread_count),
                                  self.sync_files)
        results = []
        for (name, _), group, spans in zip(files, groups, where):
            for item, (offset, length, hashes) in zip(group, spans):
                results.append(_HashedWriteResult(index=item.index, size_in_bytes=length,
                                                  storage_data=_StorageInfo(name, offset, length),
                                                  checksums=tuple(hashes)))
        fut: Future = Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list) -> None:
        # The metadata object is PyTorch's, filled as PyTorch's writer fills it; only the commit
        # differs: dcpp writes it to a temporary, fsyncs, renames and fsyncs the directory.
        metadata.version = "1.0.0"
        storage_md = {}
        for wr_list in results:
            storage_md.update({wr.index: wr.storage_data for wr in wr_list})
        metadata.storage_data = storage_md
        metadata.storage_meta = self.storage_meta()
        if not self.use_collectives and self.rank is not None:
            name = f"__{self.rank}{_METADATA}"
        else:
            name = _METADATA
        # The checksums the writers computed go to the manifest dcpp writes beside the
        # metadata (PyTorch ignores it; dcpp verifies loads and `dcpp verify` against it).
        blobs = []
        for wr_list in results:
            for wr in wr_list:
                hashes = getattr(wr, "checksums", None)
                if not hashes:
                    blobs = None  # a writer that kept none: no manifest rather than a partial one
                    break
                info = wr.storage_data
                blobs.append((info.relative_path, info.offset, info.length, list(hashes)))
            if blobs is None:
                break
        guard = getattr(self, "_guard", None)
        self._guard = None
        try:
            _dcpp.commit_checkpoint(os.fspath(self.path), name, pickle.dumps(metadata), blobs)
            if guard is not None:
                guard.remove_leftovers()  # the replaced checkpoint's files, failed saves' files
        finally:
            if guard is not None:
                guard.release()
                key = os.path.realpath(os.fspath(self.path))
                if _GUARDS.get(key) is guard:
                    del _GUARDS[key]


class FileSystemReader(_dcp.FileSystemReader):
    """PyTorch's FileSystemReader whose reads dcpp does: each item's byte range, in parallel,
    straight into the destination tensor."""

    def __init__(self, path, thread_count: int = 4, verify: bool = True, **kwargs: Any):
        """verify: check every blob read against the checkpoint's manifest of checksums, or the
        zip CRC-32s of the records read whole when it has none (False: salvage what a damaged
        checkpoint still holds)."""
        super().__init__(path, **kwargs)
        self.thread_count = thread_count
        self.verify = verify
        self._metadata_name = _METADATA

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        name = _METADATA if rank is None else f"__{rank}{_METADATA}"
        metadata = pickle.loads(_dcpp.read_file(os.fspath(self.path), name))
        self._metadata_name = name
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future:
        infos = [self.storage_data[req.storage_index] for req in plan.items]
        if any(info.transform_descriptors for info in infos):
            return super().read_data(plan, planner)  # compressed items: PyTorch's own path
        requests, targets, copies = [], [], []
        for req, info in zip(plan.items, infos):
            if req.type == LoadItemType.BYTE_IO:
                requests.append((info.relative_path, info.offset, info.length, None, None, None))
                targets.append(None)
                continue
            target = planner.resolve_tensor(req).detach()
            offsets = list(req.storage_offsets)
            if target.device.type == "cpu":
                requests.append((info.relative_path, info.offset, info.length,
                                 _engine_tensor(target), offsets, None))
            else:
                requests.append((info.relative_path, info.offset, info.length, None, offsets,
                                 list(req.lengths)))
            targets.append(target)
        out = _dcpp.read_items(os.fspath(self.path), requests, max(1, self.thread_count),
                               self._metadata_name, self.verify)
        for req, target, got in zip(plan.items, targets, out):
            if req.type == LoadItemType.BYTE_IO:
                planner.load_bytes(req, io.BytesIO(got))
                continue
            if got is not None:  # a destination the engine could not write into
                target.copy_(torch.from_numpy(got.data).view(target.dtype).reshape(tuple(got.shape)))
            planner.commit_tensor(req, target)
        fut: Future = Future()
        fut.set_result(None)
        return fut
