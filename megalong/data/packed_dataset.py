"""The packed dataset on disk: writing it from a plan, reading it back as `PackedSample`s.

Format (docs/data_formats.md): a megatron-core indexed dataset where one Megatron *document* is one
training sample of exactly `seq_length` tokens and each Megatron *sequence* inside it is one document
segment (the last one may be padding). Target masks live in the sibling `{prefix}_loss` dataset of
identical structure (uint8 0/1, or float32 for fractional weights); absent means all ones. The
`.meta.json` (kind="packed") is written last, so a dataset without it is incomplete.

`DocumentSamples` reads an unpacked document dataset (e.g. SFT examples for sorted batching) the same
way: one document = one sample of its own length with one segment.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from megalong.data.batch import PackedSample
from megalong.data.indexed import (META_SUFFIX, DatasetWriter, IncompleteDatasetError, read_meta,
                                   remove_dataset, token_dtype)
from megalong.data.packing import LOSS_SUFFIX, PackPlan, SourceDocs

FORMAT_VERSION = 1


class DatasetError(ValueError):
    """A dataset on disk that cannot be used as asked; the message says which file and why."""


def _load_meta(prefix: str) -> dict:
    if not Path(prefix + META_SUFFIX).is_file() and not Path(prefix + ".idx").is_file():
        raise DatasetError(f"no dataset at {prefix}: {prefix}{META_SUFFIX} and {prefix}.idx do not exist")
    try:
        return read_meta(prefix)
    except IncompleteDatasetError as e:
        raise DatasetError(str(e)) from None
    except ValueError as e:  # bad JSON
        raise DatasetError(f"{prefix}{META_SUFFIX} is not valid JSON ({e}); re-create the dataset") from None


def _open_indexed(prefix: str):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for ext in (".bin", ".idx"):
        if not os.path.isfile(prefix + ext):
            raise DatasetError(f"{prefix}{ext} is missing; re-create the dataset")
    return IndexedDataset(prefix)


class _Samples:
    """Shared reading: sample i = Megatron document i, its sequences = its segments."""

    def __init__(self, prefix: str, meta: dict):
        self.prefix, self.meta = prefix, meta
        self.tokens_ds = _open_indexed(prefix)
        self.doc_index = np.asarray(self.tokens_ds.document_indices, dtype=np.int64)
        self.loss_ds = None
        if os.path.isfile(prefix + LOSS_SUFFIX + ".idx"):
            self.loss_ds = _open_indexed(prefix + LOSS_SUFFIX)
            if not np.array_equal(self.loss_ds.sequence_lengths, self.tokens_ds.sequence_lengths):
                raise DatasetError(f"{prefix}{LOSS_SUFFIX} does not match {prefix} (different sequence "
                                   "lengths); re-create the dataset")

    def __len__(self) -> int:
        return len(self.doc_index) - 1

    def _check(self, i: int) -> int:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} out of range for {self.prefix} ({len(self)} samples)")
        return i % len(self)

    def _read(self, ds, i: int) -> np.ndarray:
        a, b = int(self.doc_index[i]), int(self.doc_index[i + 1])
        return np.concatenate(ds[a:b]) if b - a > 1 else np.array(ds[a])

    def sample_length(self, i: int) -> int:
        a, b = int(self.doc_index[i]), int(self.doc_index[i + 1])
        return int(self.tokens_ds.sequence_lengths[a:b].sum())

    def __getitem__(self, i: int) -> PackedSample:
        i = self._check(int(i))
        tokens = self._read(self.tokens_ds, i).astype(np.int64)
        mask = self._read(self.loss_ds, i) if self.loss_ds is not None else np.ones(len(tokens), np.uint8)
        return PackedSample(tokens, mask, self._doc_lengths(i, len(tokens)))


class PackedDataset(_Samples):
    """A packed dataset (kind="packed"): every sample has exactly `seq_length` tokens."""

    def __init__(self, prefix: str, seq_length: int | None = None):
        meta = _load_meta(prefix)
        if meta.get("kind") != "packed":
            raise DatasetError(f"{prefix}.meta.json has kind {meta.get('kind')!r}, expected 'packed'; pack "
                               "document datasets with tools/pack_dataset.py first")
        super().__init__(prefix, meta)
        self.seq_length = int(meta["seq_length"])
        if seq_length is not None and seq_length != self.seq_length:
            raise DatasetError(f"{prefix} was packed to seq_length {self.seq_length}, but {seq_length} was "
                               "asked for; pack the stage again or change the training seq_length")
        if len(self) != meta.get("num_samples", len(self)):
            raise DatasetError(f"{prefix}.idx holds {len(self)} samples but its meta says "
                               f"{meta['num_samples']}; the files do not belong together")
        if (self.loss_ds is not None) != bool(meta.get("loss_mask", {}).get("present", False)):
            raise DatasetError(f"{prefix}{LOSS_SUFFIX}.bin/.idx presence does not match the meta "
                               "(loss_mask.present); re-run tools/pack_dataset.py")

    def _doc_lengths(self, i: int, n: int) -> np.ndarray:
        lengths = self.tokens_ds.sequence_lengths[self.doc_index[i]:self.doc_index[i + 1]].astype(np.int64)
        if n != self.seq_length:
            raise DatasetError(f"{self.prefix}: sample {i} has {n} tokens, expected {self.seq_length}")
        return lengths


class DocumentSamples(_Samples):
    """An unpacked document dataset (kind="documents"): one document = one sample, one segment."""

    def __init__(self, prefix: str):
        meta = _load_meta(prefix)
        if meta.get("kind") != "documents":
            raise DatasetError(f"{prefix}.meta.json has kind {meta.get('kind')!r}, expected 'documents'")
        super().__init__(prefix, meta)

    def _doc_lengths(self, i: int, n: int) -> np.ndarray:
        return np.array([n], dtype=np.int64)

    def lengths(self) -> np.ndarray:
        cs = np.concatenate([[0], np.cumsum(self.tokens_ds.sequence_lengths, dtype=np.int64)])
        return cs[self.doc_index[1:]] - cs[self.doc_index[:-1]]


def open_samples(prefix: str, seq_length: int | None = None) -> PackedDataset | DocumentSamples:
    """Opens a packed dataset, or a document dataset as unpacked samples, by its meta's kind."""
    kind = _load_meta(prefix).get("kind")
    if kind == "documents":
        return DocumentSamples(prefix)
    return PackedDataset(prefix, seq_length)


# ---------------------------------------------------------------- writing


def _token_dtype(sources_ds, tokenizer: dict):
    vocab = tokenizer.get("vocab_size")
    if vocab is not None:
        return token_dtype(int(vocab))
    return max((ds.index.dtype for ds in sources_ds), key=lambda d: np.dtype(d).itemsize)


def _reader(ds):
    """read(doc, offset, length) for a document dataset, cheap when documents are single sequences."""
    di = np.asarray(ds.document_indices, dtype=np.int64)
    single = bool(np.all(np.diff(di) == 1))

    def read(doc: int, offset: int, length: int) -> np.ndarray:
        if single:
            return ds.get(int(di[doc]), offset=int(offset), length=int(length))
        return np.concatenate(ds[int(di[doc]):int(di[doc + 1])])[offset:offset + length]
    return read


def write_packed_dataset(prefix: str, plan: PackPlan, sources: list[SourceDocs], meta: dict,
                         pad_token_id: int, show_progress: bool = True) -> dict:
    """Copies the planned pieces into `{prefix}` (+ `_loss`); the main meta.json is written last."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from tqdm import tqdm

    S = plan.seq_length
    token_ds = [IndexedDataset(s.prefix) for s in sources]
    loss_ds = [IndexedDataset(s.prefix + LOSS_SUFFIX) if s.has_loss_mask else None for s in sources]
    tok_dtype = _token_dtype(token_ds, meta.get("tokenizer") or {})
    float_mask = any(ds is not None and np.dtype(ds.index.dtype).kind == "f" for ds in loss_ds)
    mask_dtype = np.float32 if float_mask else np.uint8
    need_loss = bool((plan.sample_fill() < S).any()) or any(ds is not None for ds in loss_ds)
    read_tok = [_reader(ds) for ds in token_ds]
    read_loss = [_reader(ds) if ds is not None else None for ds in loss_ds]

    Path(prefix + META_SUFFIX).unlink(missing_ok=True)  # the old dataset is invalid from here on
    tokens = np.empty(S, dtype=tok_dtype)
    mask = np.empty(S, dtype=mask_dtype)
    with DatasetWriter(prefix, tok_dtype) as tok_out, \
            (DatasetWriter(prefix + LOSS_SUFFIX, mask_dtype) if need_loss else nullcontext()) as loss_out:
        for i in tqdm(range(plan.num_samples), desc="writing samples", unit="sample", disable=not show_progress):
            a, b = int(plan.sample_ptr[i]), int(plan.sample_ptr[i + 1])
            pos = 0
            for src, doc, off, n in zip(plan.piece_source[a:b].tolist(), plan.piece_doc[a:b].tolist(),
                                        plan.piece_offset[a:b].tolist(), plan.piece_length[a:b].tolist()):
                tokens[pos:pos + n] = read_tok[src](doc, off, n)
                mask[pos:pos + n] = read_loss[src](doc, off, n) if read_loss[src] is not None else 1
                pos += n
            lengths = plan.piece_length[a:b].tolist()
            if pos < S:  # one padding segment, never a target
                tokens[pos:] = pad_token_id
                mask[pos:] = 0
                lengths.append(S - pos)
            tok_out.add_document(tokens, lengths)
            if loss_out is not None:
                loss_out.add_document(mask, lengths)
        if loss_out is not None:
            loss_out.commit({"kind": "loss_mask", "of": Path(prefix).name, "dtype": np.dtype(mask_dtype).name})
        else:
            remove_dataset(prefix + LOSS_SUFFIX)  # a stale mask from an earlier run
        meta = dict(meta)
        meta.update({"kind": "packed", "format_version": FORMAT_VERSION, "seq_length": S,
                     "num_samples": plan.num_samples, "token_dtype": np.dtype(tok_dtype).name,
                     "pad_token_id": int(pad_token_id),
                     "loss_mask": {"present": need_loss,
                                   "dtype": np.dtype(mask_dtype).name if need_loss else None}})
        return tok_out.commit(meta)
