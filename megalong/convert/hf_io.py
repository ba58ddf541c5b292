"""Streaming HF checkpoint I/O: read tensors one at a time, write safetensors shards with an index.

Reading never loads a whole model: safetensors headers give names and shapes, `safe_open` reads one
tensor on demand. Pickled `.bin` weights are read only when the caller allows it (`torch.load` with
`weights_only=True`, memory-mapped). Writing plans the shards from the shapes up front, so tensors
are written as they arrive and memory holds at most one shard.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megalong.convert.hf_llama import ConversionError

SAFE_INDEX, SAFE_SINGLE = "model.safetensors.index.json", "model.safetensors"
BIN_INDEX, BIN_SINGLE = "pytorch_model.bin.index.json", "pytorch_model.bin"
SAFE_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise ConversionError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


class HFWeights:
    """The tensors of an HF model directory: names/shapes from headers, data one tensor at a time."""

    def __init__(self, hf_dir: str | Path, allow_unsafe_bin: bool = False):
        self.dir = Path(hf_dir)
        self.file_of: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self._bin: dict[Path, dict] = {}
        if not self.dir.is_dir():
            raise ConversionError(f"{self.dir}: not a directory (expected an HF model directory)")
        if (self.dir / SAFE_INDEX).is_file():
            self._index(self.dir / SAFE_INDEX, self._safetensors_header)
        elif (self.dir / SAFE_SINGLE).is_file():
            self._safetensors_header(self.dir / SAFE_SINGLE, None)
        elif (self.dir / BIN_INDEX).is_file() or (self.dir / BIN_SINGLE).is_file():
            if not allow_unsafe_bin:
                raise ConversionError(
                    f"{self.dir}: holds only pickled PyTorch .bin weights; pass --allow-unsafe-bin to read them "
                    "(torch.load with weights_only=True), or convert them to safetensors first")
            if (self.dir / BIN_INDEX).is_file():
                self._index(self.dir / BIN_INDEX, self._bin_header)
            else:
                self._bin_header(self.dir / BIN_SINGLE, None)
        else:
            shards = sorted(p.name for p in self.dir.glob("*.safetensors"))
            hint = f" (found {', '.join(shards[:3])}: is {SAFE_INDEX} missing?)" if shards else ""
            raise ConversionError(f"{self.dir}: no {SAFE_SINGLE} or {SAFE_INDEX}{hint}")

    def _index(self, index_path: Path, read_header) -> None:
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(f"{index_path}: no 'weight_map' (tensor name -> shard file)")
        by_file: dict[str, list[str]] = {}
        for name, fname in weight_map.items():
            by_file.setdefault(fname, []).append(name)
        for fname, names in sorted(by_file.items()):
            path = self.dir / fname
            if not path.is_file():
                raise ConversionError(f"{index_path}: shard {fname} is missing (it holds {len(names)} tensors, "
                                      f"e.g. {names[0]}); download it again")
            read_header(path, set(names))
        for name in weight_map:
            if name not in self.file_of:
                raise ConversionError(f"{index_path}: tensor {name} is listed in shard {weight_map[name]}, "
                                      "but that file does not contain it")

    def _safetensors_header(self, path: Path, wanted: Optional[set]) -> None:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    if wanted is not None and name not in wanted:
                        continue
                    sl = f.get_slice(name)
                    self.file_of[name], self.shapes[name] = path, tuple(sl.get_shape())
                    self.dtypes[name] = SAFE_DTYPES.get(sl.get_dtype(), None)
        except ConversionError:
            raise
        except Exception as e:  # truncated or non-safetensors file
            raise ConversionError(f"{path}: cannot read the safetensors header ({e})") from None

    def _bin_header(self, path: Path, wanted: Optional[set]) -> None:
        state = self._load_bin(path)
        for name, t in state.items():
            if wanted is None or name in wanted:
                self.file_of[name], self.shapes[name], self.dtypes[name] = path, tuple(t.shape), t.dtype

    def _load_bin(self, path: Path) -> dict:
        if path not in self._bin:
            try:
                self._bin[path] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) format cannot be memory-mapped
                self._bin[path] = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise ConversionError(f"{path}: cannot load with weights_only=True ({e})") from None
        return self._bin[path]

    def get(self, name: str) -> torch.Tensor:
        if name not in self.file_of:
            raise ConversionError(f"{self.dir}: tensor {name} not found")
        path = self.file_of[name]
        if path.suffix == ".bin":
            return self._load_bin(path)[name]
        try:  # opened per tensor: a handle kept open keeps every page read so far mapped (RSS)
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(name)
        except Exception as e:
            raise ConversionError(f"{path}: cannot read tensor {name} ({e})") from None


def parse_size(text: str) -> int:
    """'2GB' / '500MB' / '1GiB' / bytes -> bytes (decimal units as HF's max_shard_size)."""
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    t = text.strip().upper()
    for unit, mult in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


class ShardWriter:
    """Writes model-0000k-of-0000n.safetensors + model.safetensors.index.json from a plan of
    (name, shape, dtype) given up front; `add` tensors in plan order, each shard is saved when full."""

    def __init__(self, out_dir: Path, plan: Iterable[tuple[str, tuple, torch.dtype]], max_shard_bytes: int):
        self.out_dir = Path(out_dir)
        self.plan = {name: (tuple(shape), dtype) for name, shape, dtype in plan}
        shards, size = [[]], 0
        for name, (shape, dtype) in self.plan.items():
            nbytes = torch.Size(shape).numel() * dtype.itemsize
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes
        n = len(shards)
        self.files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.shard_of = {name: i for i, names in enumerate(shards) for name in names}
        self.remaining = [set(names) for names in shards]
        self.buffers: list[dict] = [{} for _ in shards]
        self.total_bytes = sum(torch.Size(s).numel() * d.itemsize for s, d in self.plan.values())

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.plan:
            raise ConversionError(f"internal: tensor {name} is not in the output plan")
        shape, dtype = self.plan[name]
        if tuple(tensor.shape) != shape:
            raise ConversionError(f"{name}: shape {list(tensor.shape)} does not match the config's {list(shape)}")
        i = self.shard_of[name]
        self.buffers[i][name] = tensor.to(dtype).contiguous()
        self.remaining[i].discard(name)
        if not self.remaining[i]:
            save_file(self.buffers[i], str(self.out_dir / self.files[i]), metadata={"format": "pt"})
            self.buffers[i] = {}

    def close(self) -> None:
        missing = [n for r in self.remaining for n in r]
        if missing:
            raise ConversionError(f"internal: {len(missing)} tensors were never written, e.g. {missing[0]}")
        write_json(self.out_dir / SAFE_INDEX, {
            "metadata": {"total_size": self.total_bytes},
            "weight_map": {name: self.files[i] for name, i in self.shard_of.items()}})


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copies the tokenizer files HF's AutoTokenizer reads; errors when there are none."""
    found = [f for f in TOKENIZER_FILES if (Path(src) / f).is_file()]
    if not found:
        raise ConversionError(f"{src}: no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...); "
                              "point --tokenizer-dir at the source HF model directory")
    for f in found:
        shutil.copy2(Path(src) / f, Path(dst) / f)
    return found
