"""Global batches from a stage's datasets: blended, shuffled per epoch, sliced per DP rank, resumable.

The global sample order is a pure function of (datasets, weights, seed), so a run resumes exactly
from one number, the count of samples consumed, and any DP size or micro-batch split sees the same
samples in a global batch:
- blend: dataset d's k-th sample sits at key (k + 0.5) / w_d and the global order sorts all keys
  (ties by d) — any first n samples hold n·w_d ± (0.5 + D·w_d/2) of dataset d (D datasets), and
  the per-dataset counts at any position are computed directly, without replaying the order;
- epochs: the k-th sample of dataset d is sample perm_{d,e}[k mod N_d] with e = k div N_d, where
  perm_{d,e} is a seeded permutation (or, with sorted batching, groups of similar length, shuffled);
- slicing (Megatron's order): micro-batch j of DP rank r holds global positions
  j·m·dp + r·m … + m of the global batch, so DP2 with M micro-batches together see exactly what
  DP1 sees with 2M.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from megalong.config import ConfigError
from megalong.data.batch import MicroBatch, PackedSample, make_micro_batch
from megalong.data.packed_dataset import DocumentSamples, PackedDataset, open_samples


@dataclass
class DatasetEntry:
    path: str  # packed dataset prefix (or a document dataset prefix, trained unpacked)
    weight: float = 1.0


@dataclass
class DataConfig:
    datasets: list[DatasetEntry] = field(default_factory=list)
    seq_length: int | None = None  # when set, every packed dataset must have been packed to it
    loss_mode: Literal["token", "sequence"] = "token"  # ProLong token-scaled / LongAlign per sequence
    position_ids: Literal["continuous", "reset"] = "continuous"  # ProLong: continuous
    seed: int = 1234
    # Unpacked (document) datasets only: LongAlign's sorted batching — micro-batches of similar
    # length (groups of sort_group_size, 0 = the micro-batch size), groups shuffled per epoch.
    sorted_batching: bool = False
    sort_group_size: int = 0
    pad_to_multiple: int = 64  # unpacked micro-batches are padded to a multiple of this
    pad_token_id: int | None = None  # unpacked padding; None: the dataset tokenizer's EOD (else 0)


class Blend:
    """Deterministic weighted interleaving of datasets (see the module docstring)."""

    def __init__(self, weights):
        w = np.asarray(weights, dtype=np.float64)
        self.w = w / w.sum()

    def _key(self, d: int, k):
        return (np.asarray(k, dtype=np.float64) + 0.5) / self.w[d]

    def _count_below(self, d: int, t: float) -> int:
        c = max(0, int(np.ceil(t * self.w[d] - 0.5)))
        while c > 0 and self._key(d, c - 1) >= t:
            c -= 1
        while self._key(d, c) < t:
            c += 1
        return c

    def _next(self, base: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The n smallest keys after `base` samples of each dataset: (dataset ids, per-dataset k)."""
        D = len(self.w)
        ks = base[:, None] + np.arange(n)[None, :]
        keys = np.stack([self._key(d, ks[d]) for d in range(D)])
        ds = np.repeat(np.arange(D), n)
        order = np.lexsort((ds, keys.ravel()))[:n]
        return ds[order], ks.ravel()[order]

    def counts_before(self, n: int) -> np.ndarray:
        """How many samples of each dataset the first n global samples hold."""
        D = len(self.w)
        t_lo = max(0.0, n - D - 1.0)  # the keys below t_lo number at most n
        base = np.array([self._count_below(d, t_lo) for d in range(D)], dtype=np.int64)
        need = n - int(base.sum())
        ds, _ = self._next(base, need)
        return base + np.bincount(ds, minlength=D)

    def assign(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Dataset id and per-dataset sample number k of global samples start … start+count-1."""
        return self._next(self.counts_before(start), count)


class GlobalBatchLoader:
    """Micro-batches of a DP rank for any global step, from the stage's packed datasets."""

    def __init__(self, config: DataConfig, where: str = "data"):
        if not config.datasets:
            raise ConfigError(f"{where}.datasets is empty; list the packed dataset prefixes of the stage")
        for i, e in enumerate(config.datasets):
            if not e.weight > 0:
                raise ConfigError(f"{where}.datasets[{i}].weight must be > 0, got {e.weight}")
        self.config = config
        self.datasets = [open_samples(e.path, config.seq_length) for e in config.datasets]
        unpacked = [isinstance(d, DocumentSamples) for d in self.datasets]
        if config.sorted_batching and (len(self.datasets) != 1 or not unpacked[0]):
            raise ConfigError(f"{where}.sorted_batching needs exactly one unpacked (document) dataset; "
                              "packed samples all have one length, so sorting them changes nothing")
        if any(unpacked) and not all(unpacked):
            raise ConfigError(f"{where}.datasets mixes packed and unpacked (document) datasets; "
                              "pack the document dataset with tools/pack_dataset.py")
        self.unpacked = all(unpacked)
        self.blend = Blend([e.weight for e in config.datasets])
        self._perms: dict[tuple[int, int], np.ndarray] = {}
        self._group = config.sort_group_size

    # ------------------------------------------------------------ sample order

    def _permutation(self, d: int, epoch: int) -> np.ndarray:
        key = (d, epoch)
        if key not in self._perms:
            if len(self._perms) > 4 * len(self.datasets):
                self._perms.clear()
            rng = np.random.default_rng([self.config.seed, d, epoch])
            n = len(self.datasets[d])
            if self.config.sorted_batching:
                self._perms[key] = sorted_batch_order(self.datasets[d].lengths(), self._group, rng)
            else:
                self._perms[key] = rng.permutation(n)
        return self._perms[key]

    def sample_ids(self, start: int, count: int) -> list[tuple[int, int]]:
        """(dataset, sample index) of global samples start … start+count-1."""
        ds, ks = self.blend.assign(start, count)
        out = []
        for d, k in zip(ds.tolist(), ks.tolist()):
            n = len(self.datasets[d])
            out.append((d, int(self._permutation(d, k // n)[k % n])))
        return out

    def micro_batch_ids(self, consumed_samples: int, global_batch_size: int, micro_batch_size: int,
                        dp_rank: int = 0, dp_size: int = 1) -> list[list[tuple[int, int]]]:
        G, m = global_batch_size, micro_batch_size
        if G <= 0 or m <= 0 or G % (m * dp_size):
            raise ValueError(f"global_batch_size {G} must be a positive multiple of micro_batch_size × dp_size "
                             f"= {m} × {dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} not in 0..{dp_size - 1}")
        if self.config.sorted_batching:
            if self._group == 0:
                self._group = m
            elif self.config.sort_group_size == 0 and self._group != m:
                raise ValueError(f"sorted batching groups were formed for micro_batch_size {self._group}; "
                                 f"got {m} (set data.sort_group_size to fix the grouping)")
        ids = self.sample_ids(consumed_samples, G)
        step = m * dp_size
        return [ids[j * step + dp_rank * m: j * step + dp_rank * m + m] for j in range(G // step)]

    # ------------------------------------------------------------ batches

    def _pad_id(self, d: int) -> int:
        if self.config.pad_token_id is not None:
            return self.config.pad_token_id
        eod = (self.datasets[d].meta.get("tokenizer") or {}).get("eod_id")
        return int(eod) if eod is not None else 0

    def samples(self, ids: list[tuple[int, int]]) -> list[PackedSample]:
        samples = [self.datasets[d][i] for d, i in ids]
        if self.unpacked:
            longest = max(len(s.tokens) for s in samples)
            q = max(1, self.config.pad_to_multiple)
            length = -(-longest // q) * q
            samples = [pad_sample(s, length, self._pad_id(d)) for s, (d, _) in zip(samples, ids)]
        return samples

    def micro_batches(self, consumed_samples: int, global_batch_size: int, micro_batch_size: int,
                      dp_rank: int = 0, dp_size: int = 1) -> list[MicroBatch]:
        """This rank's micro-batches of the global batch that starts after `consumed_samples`
        (= step × global_batch_size while the batch size is constant)."""
        return [make_micro_batch(self.samples(ids), self.config.loss_mode, self.config.position_ids)
                for ids in self.micro_batch_ids(consumed_samples, global_batch_size, micro_batch_size,
                                                dp_rank, dp_size)]

    # ------------------------------------------------------------ checkpoint state

    def state_dict(self, consumed_samples: int) -> dict:
        counts = self.blend.counts_before(consumed_samples)
        return {"consumed_samples": int(consumed_samples),
                "per_dataset": {e.path: int(c) for e, c in zip(self.config.datasets, counts)},
                "epochs": {e.path: float(c) / len(ds) for e, c, ds in zip(self.config.datasets, counts,
                                                                          self.datasets)},
                "weights": [e.weight for e in self.config.datasets], "seed": self.config.seed,
                "sorted_batching": self.config.sorted_batching, "sort_group_size": self._group,
                "num_samples": [len(ds) for ds in self.datasets]}

    def resume(self, state: dict) -> int:
        """Checks that a saved state belongs to this data config; returns its consumed samples."""
        now = self.state_dict(0)
        for key in ("weights", "seed", "sorted_batching", "num_samples"):
            if state.get(key) != now[key]:
                raise ConfigError(f"data state in the checkpoint has {key}={state.get(key)!r} but the data "
                                  f"config gives {now[key]!r}: the sample order would differ; restore the "
                                  "data config of that run (or start the stage fresh)")
        if list(state.get("per_dataset", {})) != list(now["per_dataset"]):
            raise ConfigError(f"data state lists datasets {list(state.get('per_dataset', {}))}, the config "
                              f"{list(now['per_dataset'])}; restore the data config of that run")
        return int(state["consumed_samples"])


def sorted_batch_order(lengths: np.ndarray, group: int, rng: np.random.Generator) -> np.ndarray:
    """LongAlign's sorted batching: sort by length (random ties), cut into groups, shuffle the full
    groups; a last, shorter group stays last so every group starts at a multiple of `group`."""
    group = max(1, group)
    order = np.lexsort((rng.random(len(lengths)), lengths))
    n_full = len(order) // group
    blocks = order[:n_full * group].reshape(n_full, group)[rng.permutation(n_full)]
    return np.concatenate([blocks.ravel(), order[n_full * group:]])


def pad_sample(sample: PackedSample, length: int, pad_token_id: int) -> PackedSample:
    """Appends one padding segment (never a target) to reach `length` tokens."""
    n = len(sample.tokens)
    if n == length:
        return sample
    if n > length:
        raise ValueError(f"sample of {n} tokens does not fit {length}")
    tokens = np.concatenate([sample.tokens, np.full(length - n, pad_token_id, dtype=sample.tokens.dtype)])
    mask = np.concatenate([sample.target_mask, np.zeros(length - n, dtype=sample.target_mask.dtype)])
    return PackedSample(tokens, mask, np.concatenate([sample.doc_lengths, [length - n]]))


__all__ = ["DataConfig", "DatasetEntry", "Blend", "GlobalBatchLoader", "PackedDataset", "sorted_batch_order",
           "pad_sample"]
