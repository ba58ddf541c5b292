"""Plans a packed dataset from a recipe: pick documents per source, chunk them, pack them into samples.

Planning works on document lengths only (the index), so planning 20B tokens takes seconds; the
writer (`megalong.data.packed_dataset.write_packed_dataset`) then copies the tokens. Per source:
1. a seeded shuffle of its documents; each length plan takes documents until it holds its token
   share (the longest plan takes the longest documents first, as ProLong gives its long-length
   data the long documents);
2. documents longer than the plan's length are split into chunks of that length (SFT examples are
   left-truncated or dropped instead); a split's short last piece is dropped or kept, by option;
3. best-fit-decreasing puts the pieces into samples of `seq_length` tokens; each sample holds pieces
   of one source (like ProLong's per-domain samples), the rest of a sample is one padding segment.
Samples of all sources are then shuffled together. Everything is seeded: same recipe → same bytes.
"""
from __future__ import annotations

import hashlib
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megalong.config import ConfigError
from megalong.data.indexed import META_SUFFIX, IncompleteDatasetError, read_meta
from megalong.data.recipe import Recipe, SourceConfig, plans_of

LOSS_SUFFIX = "_loss"  # the sibling dataset holding target masks


@dataclass
class SourceDocs:
    """What planning needs from one document dataset: its name, document lengths and kind."""

    name: str
    doc_lengths: np.ndarray  # int64 [n_docs]
    has_loss_mask: bool = False  # SFT document datasets carry a {prefix}_loss sibling
    prefix: str = ""
    meta: dict = field(default_factory=dict)


@dataclass
class PlanStats:
    length: int
    target_share: float  # of the source's tokens
    tokens: int = 0


@dataclass
class SourceStats:
    name: str
    target_share: float
    budget_tokens: int = 0
    tokens: int = 0  # tokens placed in samples
    documents_used: int = 0  # document occurrences (a repeated document counts each time)
    epochs: float = 0.0  # occurrences / documents of the source
    pieces: int = 0
    samples: int = 0
    padding_tokens: int = 0
    truncated_tokens: int = 0  # short leftovers dropped and left-truncated tokens
    dropped_documents: int = 0  # overlong documents dropped (overlong: drop)
    dropped_tokens: int = 0
    plans: list[PlanStats] = field(default_factory=list)


@dataclass
class PackPlan:
    """Pieces in output order; sample i holds pieces sample_ptr[i]:sample_ptr[i+1], then padding."""

    seq_length: int
    piece_source: np.ndarray  # int32 [P] index into the recipe's sources
    piece_doc: np.ndarray  # int64 [P] document index inside that source
    piece_offset: np.ndarray  # int64 [P] first token inside the document
    piece_length: np.ndarray  # int64 [P]
    sample_ptr: np.ndarray  # int64 [N+1]
    sample_source: np.ndarray  # int32 [N]
    sources: list[SourceStats]

    @property
    def num_samples(self) -> int:
        return len(self.sample_source)

    def sample_fill(self) -> np.ndarray:
        """Non-padding tokens per sample."""
        cs = np.concatenate([[0], np.cumsum(self.piece_length)])
        return cs[self.sample_ptr[1:]] - cs[self.sample_ptr[:-1]]

    def totals(self) -> dict:
        tokens = int(self.piece_length.sum())
        capacity = self.num_samples * self.seq_length
        padding = capacity - tokens
        truncated = sum(s.truncated_tokens for s in self.sources)
        dropped = sum(s.dropped_tokens for s in self.sources)
        return {"samples": self.num_samples, "tokens": tokens, "capacity": capacity,
                "padding_tokens": padding, "truncated_tokens": truncated, "dropped_tokens": dropped,
                "padding_fraction": padding / max(capacity, 1),
                "truncated_fraction": truncated / max(tokens + truncated, 1),
                "waste_fraction": (padding + truncated) / max(capacity + truncated, 1)}


# ---------------------------------------------------------------- reading the sources' indexes


def read_source_meta(prefix: str, where: str) -> dict:
    if not Path(prefix + META_SUFFIX).is_file():
        raise ConfigError(f"{where}: {prefix}{META_SUFFIX} does not exist; every dataset needs its meta "
                          "(write document datasets with tools/preprocess_data.py or tools/prepare_sft.py)")
    try:
        return read_meta(prefix)
    except IncompleteDatasetError as e:
        raise ConfigError(f"{where}: {e}") from None
    except ValueError as e:
        raise ConfigError(f"{where}: {prefix}{META_SUFFIX} is not valid JSON ({e}); re-create the dataset") from None


def resolve_prefix(path: str, data_root: str | Path) -> str:
    p = Path(os.path.expanduser(os.path.expandvars(path)))
    return str(p if p.is_absolute() else Path(data_root) / p)


def open_source(cfg: SourceConfig, data_root: str | Path, where: str, key: str) -> SourceDocs:
    """Reads a document dataset's index and meta (not its tokens); errors name the recipe file
    (`where`) and key (`key`, e.g. sources[2])."""
    where = f"{where}: key '{key}.path'"
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = resolve_prefix(cfg.path, data_root)
    missing = [prefix + ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
    if missing:
        raise ConfigError(f"{where}: source {cfg.name!r}: {', '.join(missing)} not found "
                          f"(path {cfg.path!r} resolved against data root {str(data_root)!r}); "
                          "check the path or pass --data-root")
    meta = read_source_meta(prefix, where)
    if meta.get("kind") != "documents":
        raise ConfigError(f"{where}: {prefix} has kind {meta.get('kind')!r}, expected a 'documents' "
                          "dataset (packing takes document datasets, not packed ones)")
    ds = IndexedDataset(prefix)
    seq_cs = np.concatenate([[0], np.cumsum(ds.sequence_lengths, dtype=np.int64)])
    di = np.asarray(ds.document_indices, dtype=np.int64)
    doc_lengths = seq_cs[di[1:]] - seq_cs[di[:-1]]
    has_loss = IndexedDataset.exists(prefix + LOSS_SUFFIX)
    if has_loss:
        loss = IndexedDataset(prefix + LOSS_SUFFIX)
        if not (np.array_equal(loss.sequence_lengths, ds.sequence_lengths)
                and np.array_equal(loss.document_indices, ds.document_indices)):
            raise ConfigError(f"{where}: {prefix}{LOSS_SUFFIX} does not have the structure of {prefix} "
                              "(different sequence lengths); re-create the SFT dataset")
    return SourceDocs(cfg.name, doc_lengths, has_loss, prefix, meta)


def check_tokenizers(sources: list[SourceDocs], where: str) -> dict:
    """All sources must share one tokenizer (paths may differ); returns its description."""
    def identity(tok: dict) -> dict:
        return {k: v for k, v in (tok or {}).items() if k not in ("path", "name_or_path")}

    first = identity(sources[0].meta.get("tokenizer"))
    for i, src in enumerate(sources[1:], start=1):
        tok = identity(src.meta.get("tokenizer"))
        if tok != first:
            diff = "; ".join(f"{k}: {tok.get(k)!r} vs {first.get(k)!r}" for k in sorted(set(tok) | set(first))
                             if tok.get(k) != first.get(k))
            raise ConfigError(f"{where}: key 'sources[{i}].path': {src.name!r} was tokenized differently from "
                              f"sources[0] ({sources[0].name!r}): {diff}; re-tokenize with one tokenizer")
    first = sources[0].meta.get("tokenizer") or {}
    return first


def file_fingerprint(prefix: str) -> dict:
    """sha256 of the .idx and size of the .bin: cheap, and changes whenever the data does."""
    out = {}
    for pre, tag in ((prefix, ""), (prefix + LOSS_SUFFIX, "loss_")):
        if not os.path.isfile(pre + ".idx"):
            continue
        h = hashlib.sha256()
        with open(pre + ".idx", "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        out[f"{tag}idx_sha256"] = h.hexdigest()
        out[f"{tag}bin_bytes"] = os.path.getsize(pre + ".bin")
    return out


# ---------------------------------------------------------------- best-fit decreasing


def best_fit_decreasing(sizes: np.ndarray, capacity: int) -> tuple[np.ndarray, int]:
    """Bin index per item under best-fit decreasing; returns (bins, number of bins).

    Exact BFD, fast because it works on groups: items of one size are placed together (a bin with
    room r takes r // s of them, as sequential best fit would), and open bins are kept in buckets by
    remaining room, the smallest fitting one found by a memchr over an occupancy bytearray. Python
    work grows with the number of distinct sizes (bounded by `capacity`), not with the items.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    n = len(sizes)
    if n == 0:
        return np.zeros(0, dtype=np.int64), 0
    if sizes.min() < 1 or sizes.max() > capacity:
        raise ValueError(f"item sizes must be in 1..{capacity}, got {sizes.min()}..{sizes.max()}")
    order = np.argsort(-sizes, kind="stable")
    sorted_sizes = sizes[order]
    cut = np.flatnonzero(np.diff(sorted_sizes)) + 1
    starts, ends = np.concatenate([[0], cut]), np.concatenate([cut, [n]])
    min_size = int(sorted_sizes[-1])
    buckets: list[list[int] | None] = [None] * (capacity + 1)  # open bins by remaining room
    occupied = bytearray(capacity + 1)  # 1 where buckets[room] is non-empty: find() is a memchr
    placed_bins: list[int] = []  # bins in placement order; run j = run_len[j] bins taking run_k[j] items
    run_len: list[int] = []
    run_k: list[int] = []
    n_bins = 0
    top = -1  # no open bin has more room than this (lowered by failed searches)

    def put(room: int, bins: list[int]) -> None:
        nonlocal top
        if room < min_size:  # no item left can use it: the bin is closed
            return
        if buckets[room] is None:
            buckets[room] = list(bins)
        else:
            buckets[room].extend(bins)
        occupied[room] = 1
        top = max(top, room)

    def record(bins: list[int], k: int) -> None:
        placed_bins.extend(bins)
        run_len.append(len(bins))
        run_k.append(k)

    for s, c in zip(sorted_sizes[starts].tolist(), (ends - starts).tolist()):
        room = occupied.find(1, s) if s <= top else -1  # best fit: the smallest room >= s
        if room < 0:
            top = min(top, s - 1)
        while c and room >= 0:
            k = room // s
            group = buckets[room]
            if len(group) * k <= c:  # every bin with this room fills up with k items
                buckets[room] = None
                occupied[room] = 0
                record(group, k)
                put(room - k * s, group)
                c -= len(group) * k
                room = occupied.find(1, room + 1)
            else:  # q bins take k items, one more takes the remainder
                q, rem = divmod(c, k)
                used = q + (1 if rem else 0)
                taken, buckets[room] = group[:used], group[used:]
                if not buckets[room]:
                    buckets[room], occupied[room] = None, 0
                if q:
                    record(taken[:q], k)
                    put(room - k * s, taken[:q])
                if rem:
                    record(taken[q:], rem)
                    put(room - rem * s, taken[q:])
                c = 0
        if c:  # open new bins: full ones take capacity // s items each
            per_bin = capacity // s
            q, rem = divmod(c, per_bin)
            if q:
                ids = list(range(n_bins, n_bins + q))
                n_bins += q
                record(ids, per_bin)
                put(capacity - per_bin * s, ids)
            if rem:
                record([n_bins], rem)
                put(capacity - rem * s, [n_bins])
                n_bins += 1
    in_sorted_order = np.repeat(np.asarray(placed_bins, dtype=np.int64),
                                np.repeat(np.asarray(run_k, dtype=np.int64), run_len))
    bins = np.empty(n, dtype=np.int64)
    bins[order] = in_sorted_order
    return bins, n_bins


# ---------------------------------------------------------------- selection and chunking


def _source_rng(seed: int, name: str, what: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode()), what])


def _take_until(lengths: np.ndarray, budget: float) -> int:
    """Number of leading items whose total first reaches `budget` (all of them if it never does)."""
    if budget <= 0 or len(lengths) == 0:
        return 0
    cs = np.cumsum(lengths)
    return min(int(np.searchsorted(cs, budget, side="left")) + 1, len(lengths))


def select_documents(recipe: Recipe, index: int, src: SourceDocs, budget: float,
                     where: str = "recipe") -> tuple[list[np.ndarray], SourceStats]:
    """Document occurrences per length plan (plans longest first), reaching `budget` tokens."""
    cfg = recipe.sources[index]
    plans = plans_of(recipe, cfg)
    stats = SourceStats(cfg.name, cfg.share, int(round(budget)),
                        plans=[PlanStats(p.length, p.share) for p in plans])
    lengths = src.doc_lengths.astype(np.int64)
    available = int(lengths.sum())
    if available == 0:
        raise ConfigError(f"{where}: key 'sources[{index}].path': source {cfg.name!r} ({src.prefix}) has no tokens")
    passes = max(1, int(np.ceil(budget / available - 1e-9)))
    if passes > 1 and not recipe.packing.allow_repeat:
        raise ConfigError(f"{where}: key 'sources[{index}].share': source {cfg.name!r} has {available:,} tokens but its share "
                          f"{cfg.share:g} of the stage needs {int(budget):,}; lower total_tokens/num_samples, "
                          "leave them unset (size the stage to the scarcest source), or set "
                          "packing.allow_repeat: true")
    rng = _source_rng(recipe.seed, cfg.name, 0)
    occurrences = np.concatenate([rng.permutation(len(lengths)) for _ in range(passes)])
    remaining = occurrences
    chosen = []
    for j, plan in enumerate(plans):
        plan_budget = budget * plan.share
        rem_len = lengths[remaining]
        last = j == len(plans) - 1
        if recipe.packing.long_docs_first and not last:
            by_length = np.argsort(-rem_len, kind="stable")
            k = _take_until(rem_len[by_length], plan_budget)
            take = np.zeros(len(remaining), dtype=bool)
            take[by_length[:k]] = True
            picked, remaining = remaining[take], remaining[~take]
        else:
            k = _take_until(rem_len, plan_budget)
            picked, remaining = remaining[:k], remaining[k:]
        chosen.append(picked)
    stats.documents_used = int(sum(len(c) for c in chosen))
    stats.epochs = stats.documents_used / len(lengths)
    return chosen, stats


def chunk_documents(docs: np.ndarray, doc_lengths: np.ndarray, length: int, mode: str,
                    min_chunk: int, short_leftover: str, stats: SourceStats):
    """(doc, offset, length) pieces of at most `length` tokens; counts what is cut or dropped."""
    n = doc_lengths[docs].astype(np.int64)
    if mode in ("truncate_left", "drop"):
        over = n > length
        if mode == "drop":
            stats.dropped_documents += int(over.sum())
            stats.dropped_tokens += int(n[over].sum())
            keep = ~over
            return docs[keep], np.zeros(int(keep.sum()), np.int64), n[keep]
        stats.truncated_tokens += int((n[over] - length).sum())
        return docs, np.where(over, n - length, 0), np.minimum(n, length)
    full = n // length
    rest = n - full * length
    keep_rest = (rest > 0) & ((full == 0) | (rest >= min_chunk) | (short_leftover == "pack"))
    stats.truncated_tokens += int(rest[(rest > 0) & ~keep_rest].sum())
    first = np.concatenate([[0], np.cumsum(full)[:-1]])
    chunk_doc = np.repeat(docs, full)
    chunk_off = (np.arange(int(full.sum())) - np.repeat(first, full)) * length
    out_doc = np.concatenate([chunk_doc, docs[keep_rest]])
    out_off = np.concatenate([chunk_off, (full * length)[keep_rest]])
    out_len = np.concatenate([np.full(len(chunk_doc), length, np.int64), rest[keep_rest]])
    return out_doc, out_off, out_len


def stage_total_tokens(recipe: Recipe, sources: list[SourceDocs]) -> int:
    if recipe.total_tokens is not None:
        return recipe.total_tokens
    if recipe.num_samples is not None:
        return recipe.num_samples * recipe.seq_length
    return int(min(int(s.doc_lengths.sum()) / c.share for s, c in zip(sources, recipe.sources)))


# ---------------------------------------------------------------- the plan


def plan_packing(recipe: Recipe, sources: list[SourceDocs], where: str = "recipe",
                 progress=None) -> PackPlan:
    """Index-only plan of the whole stage (see the module docstring)."""
    if len(sources) != len(recipe.sources):
        raise ValueError("one SourceDocs per recipe source is needed")
    S = recipe.seq_length
    total = stage_total_tokens(recipe, sources)
    p_src, p_doc, p_off, p_len, p_bin, all_stats = [], [], [], [], [], []
    n_bins = 0
    for i, (cfg, src) in enumerate(zip(recipe.sources, sources)):
        chosen, stats = select_documents(recipe, i, src, total * cfg.share, where)
        mode = cfg.overlong if cfg.overlong != "auto" else ("truncate_left" if src.has_loss_mask else "split")
        docs, offs, lens = [], [], []
        for plan, picked in zip(stats.plans, chosen):
            d, o, n = chunk_documents(picked, src.doc_lengths, plan.length, mode,
                                      recipe.packing.min_chunk_length, recipe.packing.short_leftover, stats)
            plan.tokens = int(n.sum())
            docs.append(d)
            offs.append(o)
            lens.append(n)
        lens_all = np.concatenate(lens)
        keep = lens_all > 0  # empty documents have nothing to pack
        bins, nb = best_fit_decreasing(lens_all[keep], S)
        p_src.append(np.full(int(keep.sum()), i, np.int32))
        p_doc.append(np.concatenate(docs)[keep])
        p_off.append(np.concatenate(offs)[keep])
        p_len.append(lens_all[keep])
        p_bin.append(bins + n_bins)
        stats.tokens, stats.pieces, stats.samples = int(lens_all.sum()), int(keep.sum()), nb
        stats.padding_tokens = nb * S - stats.tokens
        all_stats.append(stats)
        n_bins += nb
        if progress is not None:
            progress(cfg.name, stats)
    src_a, doc_a, off_a, len_a, bin_a = (np.concatenate(x) for x in (p_src, p_doc, p_off, p_len, p_bin))
    rng = np.random.default_rng([recipe.seed, 0x5A4D])
    position = np.empty(n_bins, dtype=np.int64)
    position[rng.permutation(n_bins)] = np.arange(n_bins)  # output slot of each bin
    P = len(len_a)
    if recipe.packing.shuffle_segments:
        within = rng.permutation(P)  # a random rank inside the sample
    else:
        within = np.argsort(np.argsort(-len_a, kind="stable"))  # largest first
    order = np.argsort(position[bin_a] * max(P, 1) + within)  # unique keys: any sort gives one order
    sample_of_piece = position[bin_a][order]
    sample_ptr = np.concatenate([[0], np.cumsum(np.bincount(sample_of_piece, minlength=n_bins))])
    sample_source = np.empty(n_bins, dtype=np.int32)
    sample_source[sample_of_piece] = src_a[order]
    return PackPlan(S, src_a[order], doc_a[order], off_a[order], len_a[order],
                    sample_ptr.astype(np.int64), sample_source, all_stats)


def achieved_shares(plan: PackPlan) -> list[float]:
    total = max(sum(s.tokens for s in plan.sources), 1)
    return [s.tokens / total for s in plan.sources]
