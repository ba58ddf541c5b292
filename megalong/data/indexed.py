"""Megatron indexed datasets on disk: a streaming writer, atomic commits and the `.meta.json` beside them.

A dataset is the prefix `P` of `P.bin` (tokens), `P.idx` (Megatron's index, DESIGN §2) and `P.meta.json`.
The files are written under temporary names and renamed when complete — `.bin`, `.idx`, then the meta
last — so a dataset is *complete* exactly when its meta exists; a crash leaves no complete-looking
half. Readers must go through `open_dataset`/`read_meta`, which refuse incomplete datasets.

The writer produces the bytes of megatron-core's `IndexedDatasetBuilder` (a test asserts byte
identity) without importing megatron-core, whose import costs ~10 s on a 2-core machine — longer than
tokenizing 100 MB. Reading uses megatron-core's own `IndexedDataset`.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
# megatron.core.datasets.indexed_dataset.DType codes
DTYPE_CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.float64: 6,
               np.float32: 7, np.uint16: 8}
META_SUFFIX = ".meta.json"
PARTIAL = ".partial"  # temporary-name suffix; a file ending in it is never part of a dataset


class IncompleteDatasetError(RuntimeError):
    """A dataset whose files are missing or whose `.meta.json` was never written (crashed run)."""


def token_dtype(vocab_size: int) -> type:
    """uint16 when every id fits with margin (vocab < 65,500, megatron-core's rule), else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def dataset_paths(prefix: str | Path) -> dict[str, Path]:
    p = str(prefix)
    return {"bin": Path(p + ".bin"), "idx": Path(p + ".idx"), "meta": Path(p + META_SUFFIX)}


def is_complete(prefix: str | Path) -> bool:
    """True when the meta (written last) and both data files exist."""
    return all(p.is_file() for p in dataset_paths(prefix).values())


def has_leftovers(prefix: str | Path) -> bool:
    """True when some dataset file exists without the whole dataset being complete."""
    paths = dataset_paths(prefix)
    return not is_complete(prefix) and any(p.exists() for p in paths.values())


def remove_dataset(prefix: str | Path) -> None:
    """Removes a dataset, meta first, so that no moment shows new data under an old meta."""
    paths = dataset_paths(prefix)
    for key in ("meta", "idx", "bin"):
        paths[key].unlink(missing_ok=True)
        Path(str(paths[key]) + PARTIAL).unlink(missing_ok=True)


def _fsync_rename(tmp: Path, final: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def write_json_atomic(path: str | Path, data: Any) -> None:
    path = Path(path)
    tmp = Path(str(path) + PARTIAL)
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    _fsync_rename(tmp, path)


def read_meta(prefix: str | Path) -> dict:
    """The dataset's meta; `IncompleteDatasetError` when the dataset was never committed."""
    paths = dataset_paths(prefix)
    if not is_complete(prefix):
        missing = ", ".join(str(p) for p in paths.values() if not p.is_file())
        raise IncompleteDatasetError(
            f"dataset {prefix} is incomplete (missing: {missing}); it was not written to the end — "
            "re-run the tool that makes it (with --overwrite if asked)")
    meta = json.loads(paths["meta"].read_text())
    for key in ("bin", "idx"):
        expected = meta.get("files", {}).get(key, {}).get("bytes")
        actual = paths[key].stat().st_size
        if expected is not None and expected != actual:
            raise IncompleteDatasetError(
                f"dataset {prefix}: {paths[key].name} has {actual} bytes but its meta says {expected}; "
                "the files do not belong together — re-run the tool that makes it with --overwrite")
    return meta


def open_dataset(prefix: str | Path, mmap: bool = True):
    """megatron-core's `IndexedDataset` for a complete dataset (checked through its meta)."""
    read_meta(prefix)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(str(prefix), multimodal=False, mmap=mmap)


class DatasetWriter:
    """Streams documents into `{prefix}.bin.partial`; `commit(meta)` writes the index and renames.

    One Megatron *document* is a list of *sequences*: preprocessing writes one sequence per document
    (`add_documents`), packing writes one document per sample with one sequence per segment
    (`add_document`). Use as a context manager: leaving it with an exception removes the partial files.
    """

    def __init__(self, prefix: str | Path, dtype: type) -> None:
        scalar = np.dtype(dtype).type
        if scalar not in DTYPE_CODES:
            raise ValueError(f"unsupported dtype {dtype}; one of {[d.__name__ for d in DTYPE_CODES]}")
        self.prefix = Path(prefix)
        self.dtype = np.dtype(scalar)
        self._dtype_code = DTYPE_CODES[scalar]
        self.paths = dataset_paths(prefix)
        self._tmp = {k: Path(str(p) + PARTIAL) for k, p in self.paths.items()}
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        self._bin = open(self._tmp["bin"], "wb")
        self._bin_sha = hashlib.sha256()
        self._seq_lengths: list[np.ndarray] = []
        self._doc_ends: list[np.ndarray] = [np.zeros(1, np.int64)]  # document_indices start at 0
        self.num_sequences = 0
        self.num_documents = 0
        self.num_tokens = 0
        self.committed = False

    def _write_tokens(self, tokens: np.ndarray) -> None:
        data = np.ascontiguousarray(tokens, dtype=self.dtype).tobytes()
        self._bin.write(data)
        self._bin_sha.update(data)
        self.num_tokens += len(tokens)

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Appends `len(lengths)` documents of one sequence each; `tokens` is their concatenation."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if int(lengths.sum()) != len(tokens):
            raise ValueError(f"lengths sum to {int(lengths.sum())} but {len(tokens)} tokens were given")
        self._write_tokens(tokens)
        self._seq_lengths.append(lengths.astype(np.int32))
        self._doc_ends.append(self.num_sequences + np.arange(1, len(lengths) + 1, dtype=np.int64))
        self.num_sequences += len(lengths)
        self.num_documents += len(lengths)

    def add_document(self, tokens: np.ndarray, sequence_lengths: list[int] | np.ndarray) -> None:
        """Appends one document made of several sequences (e.g. a packed sample's segments)."""
        seq = np.asarray(sequence_lengths, dtype=np.int64)
        if int(seq.sum()) != len(tokens):
            raise ValueError(f"sequence lengths sum to {int(seq.sum())} but {len(tokens)} tokens were given")
        self._write_tokens(tokens)
        self._seq_lengths.append(seq.astype(np.int32))
        self.num_sequences += len(seq)
        self._doc_ends.append(np.array([self.num_sequences], np.int64))
        self.num_documents += 1

    def _write_index(self, path: Path) -> None:
        """megatron-core's `_IndexWriter` layout, with the pointers computed by a cumulative sum."""
        lengths = np.concatenate(self._seq_lengths) if self._seq_lengths else np.zeros(0, np.int32)
        doc_index = np.concatenate(self._doc_ends)
        pointers = np.zeros(len(lengths), np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        with open(path, "wb") as f:
            f.write(INDEX_HEADER)
            f.write(struct.pack("<Q", 1))
            f.write(struct.pack("<B", self._dtype_code))
            f.write(struct.pack("<Q", len(lengths)))
            f.write(struct.pack("<Q", len(doc_index)))
            f.write(lengths.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(doc_index.tobytes(order="C"))

    def commit(self, meta: dict) -> dict:
        """Finishes the files and renames them into place (meta last); returns the meta written.

        The meta gains `files` (bytes and sha256 of `.bin` and `.idx`) so a reader can tell that the
        three files belong together. An existing dataset under the same prefix is replaced.
        """
        self._bin.close()
        self._write_index(self._tmp["idx"])
        idx_sha = hashlib.sha256(self._tmp["idx"].read_bytes()).hexdigest()
        meta = dict(meta)
        meta["files"] = {
            "bin": {"bytes": self._tmp["bin"].stat().st_size, "sha256": self._bin_sha.hexdigest()},
            "idx": {"bytes": self._tmp["idx"].stat().st_size, "sha256": idx_sha},
        }
        self.paths["meta"].unlink(missing_ok=True)  # from here on, the old dataset is incomplete
        _fsync_rename(self._tmp["bin"], self.paths["bin"])
        _fsync_rename(self._tmp["idx"], self.paths["idx"])
        write_json_atomic(self.paths["meta"], meta)
        self.committed = True
        return meta

    def abort(self) -> None:
        """Drops the partial files; an existing complete dataset under the prefix stays untouched."""
        if not self._bin.closed:
            self._bin.close()
        for p in self._tmp.values():
            p.unlink(missing_ok=True)

    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            self.abort()
