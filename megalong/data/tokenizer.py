"""Tokenizers for preprocessing: HuggingFace (`tokenizer.json`) and SentencePiece (`.model`).

`load_tokenizer(kind, path)` returns an object with `encode`, `encode_batch`, `decode`, `vocab_size`,
`eod_id`, `bos_id` and `describe()` (what `.meta.json` records, and what packing compares between
sources). HF tokenizers and SentencePiece are the reference. For HF BPE tokenizers the encoder is
`gigatoken` (a Rust BPE ~10× faster than `tokenizers` with identical ids) when it loads the tokenizer
*and* reproduces the reference ids on a probe set at load; otherwise `tokenizers` itself.

Encoding never adds special tokens: BOS/EOD are the caller's choice (`--prepend-bos`, `--append-eod`).
Every encode call runs on the calling thread; parallelism comes from worker processes.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any, Sequence

import numpy as np

KIND_ALIASES = {
    "hf": "hf", "huggingface": "hf", "huggingfacetokenizer": "hf",
    "sentencepiece": "sentencepiece", "sp": "sentencepiece", "sentencepiecetokenizer": "sentencepiece",
    "gptsentencepiecetokenizer": "sentencepiece", "llama2tokenizer": "sentencepiece",
}
BACKENDS = ("auto", "gigatoken", "reference")
# Names tried, in order, when no tokenizer_config.json names the special tokens.
EOD_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")
BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "<|bos|>")


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or used as asked; the message says what to pass instead."""


def canonical_kind(kind: str) -> str:
    k = KIND_ALIASES.get(kind.lower().replace("-", "").replace("_", ""))
    if k is None:
        raise TokenizerError(f"unknown tokenizer type {kind!r}: use one of HuggingFaceTokenizer (hf), "
                             "SentencePieceTokenizer / GPTSentencePieceTokenizer / Llama2Tokenizer (sentencepiece)")
    return k


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def probe_texts(extra: Sequence[str] = ()) -> list[str]:
    """Texts on which a fast encoder must reproduce the reference ids exactly: unicode (CJK, RTL,
    combining marks, emoji sequences, compatibility forms), whitespace runs, code, numbers, long
    repeats, plus seeded random strings over those alphabets and the tokenizer's special tokens."""
    fixed = [
        "", " ", "\n", "Hello world", "Hello  world", " leading space", "trailing space ",
        "don't DON'T we'll I'M they've", "e\u0301 café naïve Ångström ﬁnance ＡＢＣ ① ½ ™",
        "日本語のテキスト 中文 한국어 العربية עברית русский ελληνικά हिन्दी ไทย",
        "🚀 👨\u200d👩\u200d👧\u200d👦 🇳🇱 🏳️\u200d🌈 \u00a0\u200b\ufeff\u2028\u2029",
        "  lots   of\t\twhitespace\n\n\n   \r\n\t \u3000end   ", "\n\n\n\n    \n\t\t\t",
        "def f(x):\n    if x:\n        return {'a': [1, 2.5e-3, -7]}  # comment\n\treturn None\n",
        '{"key": "value", "n": 12345678901234567890, "nested": {"x": null}}',
        "#include <stdio.h>\nint main(void) { printf(\"%d\\n\", 42); return 0; }\n",
        "x" * 4000, "ab" * 1500 + " " * 300 + "\n" * 50, "1234567890" * 200, "3.14159 2,000,000 0x1F 1e10",
        "https://example.com/a/b?c=d&e=f#g user@example.org", "\\ \\\\ \"quoted\" 'single' `tick`",
    ]
    alphabet = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789     \n\n\t.,;:!?'\"()[]{}<>"
                "-_=+*/\\|@#$%^&~`éüßøñçЖжλπ中文日本語한국ع🙂🚀\u0301\u00a0\u200b")
    rng = random.Random(1234)
    rand = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 300))) for _ in range(300)]
    specials = [f"before{t}after {t} {t}{t}" for t in extra]
    return fixed + rand + specials


class _Base:
    kind: str
    backend: str
    file: Path
    vocab_size: int
    eod_id: int | None
    bos_id: int | None
    backend_note: str = ""

    def _check_ids(self, eod_id: int | None, bos_id: int | None) -> None:
        for name, value in (("eod", eod_id), ("bos", bos_id)):
            if value is not None and not 0 <= value < self.vocab_size:
                raise TokenizerError(f"--{name}-id {value} is outside the vocabulary of {self.file} "
                                     f"(0..{self.vocab_size - 1})")

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """All texts' ids concatenated (int64) and each text's length; the fast path of workers."""
        ids = self.encode_batch(texts)
        lengths = np.fromiter((len(x) for x in ids), np.int64, len(ids))
        flat = np.fromiter((t for x in ids for t in x), np.int64, int(lengths.sum()))
        return flat, lengths

    def describe(self) -> dict[str, Any]:
        """Identity of the tokenizer for `.meta.json`: equal dicts (minus path) mean equal ids."""
        return {"type": self.kind, "path": str(self.file), "sha256": sha256_file(self.file),
                "vocab_size": self.vocab_size, "eod_id": self.eod_id, "bos_id": self.bos_id}

    def spec(self) -> tuple:
        return (self.kind, str(self.file), self.eod_id, self.bos_id, self.backend)

    def __reduce__(self):
        # Worker processes started with `spawn` rebuild the tokenizer from its file.
        return (_rebuild, self.spec())


def _rebuild(kind: str, path: str, eod_id: int | None, bos_id: int | None, backend: str):
    return load_tokenizer(kind, path, eod_id, bos_id,
                          backend="gigatoken" if backend == "gigatoken" else "reference")


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):  # an AddedToken written as {"content": ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer(_Base):
    kind = "hf"

    def __init__(self, path: str | Path, eod_id: int | None = None, bos_id: int | None = None,
                 backend: str = "auto") -> None:
        from tokenizers import Tokenizer

        path = Path(path)
        self.file = (path / "tokenizer.json") if path.is_dir() else path
        if not self.file.is_file():
            hint = (" (a directory with only tokenizer.model is a SentencePiece tokenizer: use "
                    "--tokenizer-type SentencePieceTokenizer --tokenizer-model DIR/tokenizer.model)"
                    if path.is_dir() and (path / "tokenizer.model").is_file() else "")
            raise TokenizerError(f"HuggingFace tokenizer not found: {self.file} does not exist; pass a "
                                 f"tokenizer.json file or a directory holding one{hint}")
        self.file = self.file.resolve()
        try:
            self._hf = Tokenizer.from_file(str(self.file))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"{self.file}: not a HuggingFace tokenizer.json ({e})") from None
        vocab = self._hf.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        named = self._named_special_tokens()
        self.eod_id = eod_id if eod_id is not None else self._first_id(named.get("eos_token"), EOD_NAMES)
        self.bos_id = bos_id if bos_id is not None else self._first_id(named.get("bos_token"), BOS_NAMES)
        self._check_ids(self.eod_id, self.bos_id)
        self._giga = None
        self.backend = "tokenizers"
        self._choose_backend(backend)

    def _named_special_tokens(self) -> dict[str, str]:
        """eos/bos names from tokenizer_config.json or special_tokens_map.json beside the file."""
        out: dict[str, str] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            f = self.file.parent / name
            if f.is_file():
                try:
                    cfg = json.loads(f.read_text())
                except ValueError:
                    continue
                for key in ("eos_token", "bos_token"):
                    content = _token_content(cfg.get(key))
                    if content is not None:
                        out[key] = content
        return out

    def _first_id(self, configured: str | None, names: Sequence[str]) -> int | None:
        for name in ([configured] if configured else []) + list(names):
            i = self._hf.token_to_id(name)
            if i is not None:
                return i
        return None

    def _choose_backend(self, backend: str) -> None:
        if backend not in BACKENDS:
            raise TokenizerError(f"unknown tokenizer backend {backend!r}; one of {', '.join(BACKENDS)}")
        if backend == "reference":
            self.backend_note = "tokenizers (asked for the reference backend)"
            return
        try:
            import gigatoken

            giga = gigatoken.Tokenizer(str(self.file))
        except Exception as e:  # not installed, or a model it does not support (WordPiece, Unigram, ...)
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            self.backend_note = f"tokenizers (gigatoken cannot load this tokenizer: {reason})"
            if backend == "gigatoken":
                raise TokenizerError(f"{self.file}: --tokenizer-backend gigatoken failed: {reason}") from None
            return
        specials = [t.content for t in self._hf.get_added_tokens_decoder().values()]
        probes = probe_texts(specials)
        reference = [self._hf.encode(t, add_special_tokens=False).ids for t in probes]
        fast = giga.encode_batch_list(probes, parallel=False)
        bad = [t for t, a, b in zip(probes, reference, fast) if a != b]
        if bad:
            self.backend_note = (f"tokenizers (gigatoken differs from tokenizers on {len(bad)} of "
                                 f"{len(probes)} probe texts, e.g. {bad[0][:40]!r})")
            if backend == "gigatoken":
                raise TokenizerError(f"{self.file}: gigatoken's ids differ from tokenizers' on "
                                     f"{len(bad)} probe texts, e.g. {bad[0][:60]!r}; use the reference backend")
            return
        self._giga = giga
        self.backend = "gigatoken"
        self.backend_note = f"gigatoken (identical to tokenizers on {len(probes)} probe texts)"

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        if self._giga is not None:
            return self._giga.encode_batch_list(list(texts), parallel=False)
        return [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]

    def encode_flat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        if self._giga is None or not texts:
            return super().encode_flat(texts)
        import awkward as ak

        arr = self._giga.encode_batch(list(texts), parallel=False)
        lengths = np.asarray(ak.num(arr, axis=1), dtype=np.int64)
        flat = np.asarray(ak.flatten(arr, axis=1), dtype=np.int64)
        return flat, lengths

    def decode(self, ids: Sequence[int]) -> str:
        return self._hf.decode(list(ids), skip_special_tokens=False)


class SentencePieceTokenizer(_Base):
    """A SentencePiece `.model`; EOD is its `eos_id` (Megatron's GPTSentencePieceTokenizer choice)."""

    kind = "sentencepiece"

    def __init__(self, path: str | Path, eod_id: int | None = None, bos_id: int | None = None,
                 backend: str = "auto") -> None:
        import sentencepiece as spm

        path = Path(path)
        self.file = (path / "tokenizer.model") if path.is_dir() else path
        if not self.file.is_file():
            raise TokenizerError(f"SentencePiece model not found: {self.file} does not exist; pass the "
                                 ".model file (or a directory holding tokenizer.model)")
        self.file = self.file.resolve()
        if backend == "gigatoken":
            raise TokenizerError("--tokenizer-backend gigatoken applies to HuggingFace tokenizers only "
                                 "(its SentencePiece path treats special-token text differently)")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.file))
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with C++ text
            raise TokenizerError(f"{self.file}: not a SentencePiece model ({e})") from None
        self.vocab_size = self._sp.get_piece_size()
        self.eod_id = eod_id if eod_id is not None else (self._sp.eos_id() if self._sp.eos_id() >= 0 else None)
        self.bos_id = bos_id if bos_id is not None else (self._sp.bos_id() if self._sp.bos_id() >= 0 else None)
        self._check_ids(self.eod_id, self.bos_id)
        self.backend = "sentencepiece"
        self.backend_note = "sentencepiece (reference)"

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return self._sp.encode(list(texts), num_threads=1)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


def load_tokenizer(kind: str, path: str | Path, eod_id: int | None = None, bos_id: int | None = None,
                   backend: str = "auto") -> HFTokenizer | SentencePieceTokenizer:
    """Loads a tokenizer by Megatron-style type name (`HuggingFaceTokenizer`, `SentencePieceTokenizer`,
    `GPTSentencePieceTokenizer`) or short name (`hf`, `sentencepiece`). `eod_id`/`bos_id` override the
    ids the tokenizer declares. `backend`: `auto` (gigatoken when verified identical), `gigatoken`
    (required, else an error) or `reference`."""
    if backend not in BACKENDS:
        raise TokenizerError(f"unknown tokenizer backend {backend!r}; one of {', '.join(BACKENDS)}")
    if not os.path.exists(path):
        raise TokenizerError(f"tokenizer path {path} does not exist (megalong loads local files only: "
                             "download the tokenizer first, e.g. with `huggingface-cli download`)")
    cls = HFTokenizer if canonical_kind(kind) == "hf" else SentencePieceTokenizer
    return cls(path, eod_id=eod_id, bos_id=bos_id, backend=backend)
