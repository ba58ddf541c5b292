"""Tokenizers: HF and SentencePiece load with the right special ids, and every backend (gigatoken
fast path, HF `tokenizers`, sentencepiece) gives exactly the reference ids."""
from __future__ import annotations

import hashlib
import io
import json
import pickle

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from megalong.data.tokenizer import TokenizerError, load_tokenizer, probe_texts

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    \"\"\"Adds two numbers.\"\"\"\n    return a + b\n\n\nclass Foo:\n    pass\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += x[i] * 2;\n}\n",
    "Long-context models read books, code repositories and papers: 64K to 512K tokens.",
    "Café, naïve, Ångström — 日本語のテキスト, 中文, 한국어, русский, ελληνικά, 🚀🙂.",
    '{"key": "value", "numbers": [1, 2, 3.5e-3], "nested": {"ok": true}}',
    "   indented   text\twith\ttabs\n\n\nand blank lines   \n",
] * 4

VARIED = [
    "plain English sentence.", "  leading and trailing spaces  ", "\t\ttabs\tand\nnewlines\r\n",
    "x" * 700, "     " * 40, "if x:\n        return y  # deeply indented\n",
    "emoji 👨\u200d👩\u200d👧 flags 🇯🇵 combining e\u0301 nbsp\u00a0zw\u200bsp", "ＦＵＬＬ width ① ﬁ",
    "<|endoftext|> special inside text <|endoftext|>", "unseen words: zyxwvut qqqq ĳ ǆ",
    "", "1234567890 3.14159 -42 0xFF", "mixed 中文 and English and العربية",
]


def train_hf_bpe(directory, vocab_size=400, config=True) -> str:
    """A tiny byte-level BPE like GPT-2/Llama-3's, saved as a HF tokenizer directory."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|begin|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    if config:
        (directory / "tokenizer_config.json").write_text(json.dumps(
            {"eos_token": {"content": "<|endoftext|>"}, "bos_token": "<|begin|>"}))
    return str(directory)


def train_sentencepiece(path, model_type="bpe") -> str:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 3), model_writer=model, vocab_size=600,
                                   model_type=model_type, byte_fallback=True, minloglevel=2)
    path.write_bytes(model.getvalue())
    return str(path)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return train_hf_bpe(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("sp") / "tok.model")


def hf_reference(path: str, texts):
    ref = Tokenizer.from_file(path)
    return [ref.encode(t, add_special_tokens=False).ids for t in texts]


def test_hf_special_ids_from_config_and_names(hf_dir, tmp_path):
    tok = load_tokenizer("HuggingFaceTokenizer", hf_dir)
    ref = Tokenizer.from_file(f"{hf_dir}/tokenizer.json")
    assert tok.eod_id == ref.token_to_id("<|endoftext|>") == 0
    assert tok.bos_id == ref.token_to_id("<|begin|>") == 1
    assert tok.vocab_size == ref.get_vocab_size() == 400
    # a tokenizer.json without a config beside it: EOD found by its well-known name, no BOS
    (tmp_path / "tok.json").write_bytes(open(f"{hf_dir}/tokenizer.json", "rb").read())
    bare = load_tokenizer("hf", tmp_path / "tok.json")
    assert (bare.eod_id, bare.bos_id) == (0, None)
    over = load_tokenizer("hf", hf_dir, eod_id=7, bos_id=9)
    assert (over.eod_id, over.bos_id) == (7, 9)
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        load_tokenizer("hf", hf_dir, eod_id=400)


def test_gigatoken_matches_hf_tokenizers(hf_dir):
    """The fast path is chosen for a byte-level BPE and reproduces HF ids on varied text."""
    tok = load_tokenizer("hf", hf_dir)
    assert tok.backend == "gigatoken", tok.backend_note
    texts = VARIED + CORPUS + probe_texts(["<|endoftext|>"])[::7]
    expected = hf_reference(f"{hf_dir}/tokenizer.json", texts)
    assert tok.encode_batch(texts) == expected
    assert [tok.encode(t) for t in VARIED] == expected[: len(VARIED)]
    flat, lengths = tok.encode_flat(texts)
    assert lengths.tolist() == [len(e) for e in expected]
    assert flat.tolist() == [i for e in expected for i in e]
    ref = load_tokenizer("hf", hf_dir, backend="reference")
    assert ref.backend == "tokenizers"
    assert ref.encode_batch(texts) == expected
    assert tok.decode(tok.encode(VARIED[6])) == VARIED[6]


def test_gigatoken_matches_hf_on_sentencepiece_style_bpe(tmp_path):
    """Llama-2-style HF BPE (Metaspace-like normalizer, byte fallback): fast path equals HF."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=500, special_tokens=specials))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    ours = load_tokenizer("hf", path)
    assert ours.eod_id == tok.token_to_id("</s>") and ours.bos_id == tok.token_to_id("<s>")
    texts = VARIED + CORPUS
    assert ours.encode_batch(texts) == hf_reference(str(path), texts)


def test_fallback_when_gigatoken_cannot_load(tmp_path):
    """WordPiece is not BPE: the reference is used, the reason recorded; requiring gigatoken fails."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]", "</s>"]))
    path = tmp_path / "wp.json"
    tok.save(str(path))
    ours = load_tokenizer("hf", path)
    assert ours.backend == "tokenizers" and "gigatoken cannot load" in ours.backend_note
    assert ours.encode_batch(VARIED) == hf_reference(str(path), VARIED)
    with pytest.raises(TokenizerError, match="gigatoken"):
        load_tokenizer("hf", path, backend="gigatoken")


@pytest.mark.parametrize("kind", ["SentencePieceTokenizer", "GPTSentencePieceTokenizer", "sentencepiece"])
def test_sentencepiece(sp_model, kind):
    tok = load_tokenizer(kind, sp_model)
    ref = spm.SentencePieceProcessor(model_file=sp_model)
    assert (tok.eod_id, tok.bos_id, tok.vocab_size) == (ref.eos_id(), ref.bos_id(), ref.get_piece_size())
    texts = VARIED + CORPUS
    assert tok.encode_batch(texts) == [ref.encode(t) for t in texts]
    flat, lengths = tok.encode_flat(texts)
    assert flat.tolist() == [i for t in texts for i in ref.encode(t)]
    assert tok.decode(tok.encode(CORPUS[0])) == ref.decode(ref.encode(CORPUS[0]))


def test_describe_and_pickle(hf_dir, sp_model):
    for tok, file in [(load_tokenizer("hf", hf_dir), f"{hf_dir}/tokenizer.json"),
                      (load_tokenizer("sentencepiece", sp_model), sp_model)]:
        d = tok.describe()
        with open(file, "rb") as f:
            assert d["sha256"] == hashlib.sha256(f.read()).hexdigest()
        assert d["vocab_size"] == tok.vocab_size and d["eod_id"] == tok.eod_id and d["bos_id"] == tok.bos_id
        assert d["type"] in ("hf", "sentencepiece") and d["path"].endswith(file.split("/")[-1])
        clone = pickle.loads(pickle.dumps(tok))  # what a spawn-started worker receives
        assert clone.describe() == d and clone.encode_batch(VARIED) == tok.encode_batch(VARIED)


def test_errors_name_the_problem(tmp_path, hf_dir):
    with pytest.raises(TokenizerError, match="unknown tokenizer type 'GPT2BPETokenizer'"):
        load_tokenizer("GPT2BPETokenizer", hf_dir)
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer("hf", tmp_path / "missing.json")
    (tmp_path / "garbage.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a HuggingFace tokenizer.json"):
        load_tokenizer("hf", tmp_path / "garbage.json")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        load_tokenizer("sentencepiece", tmp_path / "garbage.json")
