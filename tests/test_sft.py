"""SFT: chat templates with an exact assistant-only mask, truncation, bad records, LongAlign weights."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megalong.data.batch import make_micro_batch
from megalong.data.sft import (LLAMA3_EOT, REASONS, BadRecord, SFTFormatter, fit_length, llama3_runs,
                               validate_messages)
from megalong.data.tokenizer import load_tokenizer
from tests.datasets import load_tool

ROOT = Path(__file__).resolve().parents[1]
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                   "<|eot_id|>"]
# Meta-Llama-3-8B-Instruct's tokenizer_config.json chat_template
LLAMA3_TEMPLATE = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                   "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim "
                   "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                   "{{ content }}{% endfor %}{% if add_generation_prompt %}"
                   "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHAT = [{"role": "system", "content": "You are terse."},
        {"role": "user", "content": "  What is two plus two? "},
        {"role": "assistant", "content": "Four."},
        {"role": "user", "content": "And three plus three?"},
        {"role": "assistant", "content": " Six, of course. "}]
CORPUS = ["You are terse. What is two plus two? Four. And three plus three? Six, of course.",
          "system user assistant the a of and is plus two three four six", "hello world " * 5]


def train_tokenizer(directory: Path, specials: list[str], chat_template: str | None = None) -> Path:
    """A tiny byte-level BPE (tokenizers), saved as a HF tokenizer directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    if chat_template is not None:
        (directory / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": chat_template,
            "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}))
    return directory


def llama3_text(messages) -> tuple[str, list[tuple[int, int]]]:
    """The official rendering and the character spans of assistant content + <|eot_id|>."""
    text, spans = "<|begin_of_text|>", []
    for m in messages:
        text += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
        body = m["content"].strip() + LLAMA3_EOT
        if m["role"] == "assistant":
            spans.append((len(text), len(text) + len(body)))
        text += body
    return text, spans


@pytest.fixture(scope="module")
def llama_like(tmp_path_factory):
    d = train_tokenizer(tmp_path_factory.mktemp("tok") / "llama_like", LLAMA3_SPECIALS, LLAMA3_TEMPLATE)
    return d, load_tokenizer("hf", d)


def test_llama3_template_exact_token_mask(llama_like):
    from tokenizers import Tokenizer

    d, tok = llama_like
    ex = SFTFormatter(tok, "llama3")({"messages": CHAT})
    text, spans = llama3_text(CHAT)
    ref = Tokenizer.from_file(str(d / "tokenizer.json")).encode(text, add_special_tokens=False)
    assert ex.tokens.tolist() == ref.ids  # run-wise tokenization equals the whole rendering's
    expected = [int(any(a <= s and e <= b for a, b in spans)) for s, e in ref.offsets]
    assert ex.target_mask.tolist() == expected
    assert ex.tokens[0] == tok.bos_id and ex.target_mask[0] == 0
    eot = tok.encode("<|eot_id|>")
    assert len(eot) == 1 and ex.tokens[-1] == eot[0] and ex.target_mask[-1] == 1
    targets = tok.decode(ex.tokens[ex.target_mask == 1].tolist())
    assert targets == "Four.<|eot_id|>Six, of course.<|eot_id|>"


def test_hf_chat_template_matches_builtin_llama3(llama_like):
    d, tok = llama_like
    built_in = SFTFormatter(tok, "llama3")({"messages": CHAT})
    via_hf = SFTFormatter(tok, "hf", str(d))({"messages": CHAT})
    assert via_hf.tokens.tolist() == built_in.tokens.tolist()
    assert via_hf.target_mask.tolist() == built_in.target_mask.tolist()


def test_hf_template_error_is_a_bad_record(tmp_path):
    raising = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}" \
              "{% endif %}{{ m['content'] }}{% endfor %}"
    d = train_tokenizer(tmp_path / "t", LLAMA3_SPECIALS, raising)
    fmt = SFTFormatter(load_tokenizer("hf", d), "hf", str(d))
    with pytest.raises(BadRecord) as e:
        fmt({"messages": CHAT})
    assert e.value.reason == "template_error" and "no system" in str(e.value)


def test_plain_tokenizer_tokenizes_the_template_as_text(tmp_path):
    tok = load_tokenizer("hf", train_tokenizer(tmp_path / "plain", []))
    assert tok.bos_id is None
    ex = SFTFormatter(tok, "llama3")({"messages": CHAT})
    text, _ = llama3_text(CHAT)
    assert tok.decode(ex.tokens.tolist()) == text
    # contiguous target runs decode to each answer + the end-of-turn text
    mask = np.concatenate([[0], ex.target_mask, [0]])
    starts, ends = np.flatnonzero(np.diff(mask) == 1), np.flatnonzero(np.diff(mask) == -1)
    runs = [tok.decode(ex.tokens[a:b].tolist()) for a, b in zip(starts, ends)]
    assert runs == ["Four.<|eot_id|>", "Six, of course.<|eot_id|>"]
    # a tokenizer with its own BOS but no <|begin_of_text|> starts with that BOS id
    own = load_tokenizer("hf", train_tokenizer(tmp_path / "own_bos", ["<s>", "</s>"]))
    ex2 = SFTFormatter(own, "llama3")({"messages": CHAT})
    assert ex2.tokens[0] == own.bos_id and ex2.target_mask[0] == 0
    assert own.decode(ex2.tokens[1:].tolist()) == text[len("<|begin_of_text|>"):]


def test_truncation_keeps_the_answer_or_drops():
    tokens = np.arange(10)
    mask = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 0], np.uint8)
    ex = fit_length(tokens, mask, 6, "truncate_left")
    assert ex.tokens.tolist() == [4, 5, 6, 7, 8, 9] and ex.truncated_tokens == 4
    assert ex.target_mask.tolist() == [0, 0, 1, 1, 1, 0]
    assert fit_length(tokens, mask, 10, "drop").truncated_tokens == 0
    with pytest.raises(BadRecord, match="too_long"):
        fit_length(tokens, mask, 9, "drop")
    with pytest.raises(BadRecord, match="no_target_after_truncation"):
        fit_length(tokens, mask, 2, "truncate_left")


def test_validate_messages_reasons():
    cases = {"not_an_object": [1], "missing_messages": {"conversations": []},
             "messages_not_a_list": {"messages": "hi"}, "empty_messages": {"messages": []},
             "message_not_an_object": {"messages": ["hi"]},
             "unknown_role": {"messages": [{"role": "bot", "content": "x"}]},
             "non_string_content": {"messages": [{"role": "user", "content": 5}]},
             "no_assistant_turn": {"messages": [{"role": "user", "content": "x"}]}}
    for reason, record in cases.items():
        with pytest.raises(BadRecord) as e:
            validate_messages(record)
        assert e.value.reason == reason
    assert llama3_runs(CHAT)[-1] == ("Six, of course.<|eot_id|>", True)


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


def test_prepare_sft_reports_bad_records_with_locations(tmp_path, llama_like, capsys):
    d, _ = llama_like
    tool = load_tool("prepare_sft")
    long_user = {"role": "user", "content": "two plus two " * 40}
    lines = ["{not json", [1, 2], {"conversations": []}, {"messages": "hi"}, {"messages": []},
             {"messages": ["hi"]}, {"messages": [{"role": "bot", "content": "x"}]},
             {"messages": [{"role": "user", "content": 5}]}, {"messages": [{"role": "user", "content": "x"}]},
             {"messages": CHAT[:3] + [long_user]}, {"messages": CHAT}]
    reasons = ["invalid_json", "not_an_object", "missing_messages", "messages_not_a_list", "empty_messages",
               "message_not_an_object", "unknown_role", "non_string_content", "no_assistant_turn",
               "no_target_after_truncation"]
    src = write_jsonl(tmp_path / "chats.jsonl", lines)
    out = tmp_path / "sft" / "chats"
    argv = ["--input", str(src), "--output-prefix", str(out), "--tokenizer-model", str(d), "--max-length", "60",
            "--no-progress"]
    assert tool.main(argv) == 0
    meta = json.loads((tmp_path / "sft" / "chats.meta.json").read_text())
    assert meta["counts"]["records"] == 11 and meta["counts"]["documents"] == 1
    for line, reason in enumerate(reasons, start=1):
        assert meta["skipped"][reason]["count"] == 1
        assert meta["skipped"][reason]["examples"][0].startswith(f"{src}:{line}: {reason}")
    printed = capsys.readouterr().out
    assert all(r in printed for r in reasons) and f"{src}:4" in printed
    argv[argv.index("60")] = "70"  # the good conversation (62 tokens) fits, the long one does not
    assert tool.main(argv + ["--overflow", "drop", "--overwrite"]) == 0
    meta = json.loads((tmp_path / "sft" / "chats.meta.json").read_text())
    assert meta["skipped"]["too_long"]["examples"][0].startswith(f"{src}:10: too_long")
    assert set(REASONS) - set(reasons) - {"too_long"} == {"template_error"}  # tested above
    with pytest.raises(SystemExit):
        tool.main(["--help"])


def test_longalign_weights_on_packed_sft(tmp_path, llama_like):
    d, tok = llama_like
    rng = np.random.default_rng(0)
    words = ["two", "plus", "three", "four", "six", "of", "course", "hello", "world"]
    say = lambda n: " ".join(rng.choice(words, n))  # noqa: E731
    records = []
    for i in range(40):
        turns = [{"role": "user", "content": say(int(rng.integers(1, 30)))}]
        for _ in range(int(rng.integers(1, 3))):
            turns += [{"role": "assistant", "content": say(int(rng.integers(1, 20)))},
                      {"role": "user", "content": say(int(rng.integers(1, 10)))}]
        records.append({"messages": turns[:-1] if i % 2 else turns[:-1] + [turns[-1], turns[1]]})
    src = write_jsonl(tmp_path / "c.jsonl", records)
    load_tool("prepare_sft").main(["--input", str(src), "--output-prefix", str(tmp_path / "docs" / "chats_sft"),
                                   "--tokenizer-model", str(d), "--no-progress"])
    pack = load_tool("pack_dataset")
    meta = pack.run_pack(str(ROOT / "examples" / "data" / "tiny_sft.yaml"), str(tmp_path / "packed"),
                         str(tmp_path / "docs"), overrides=["seq_length=512"], plot=False, show_progress=False)
    from megalong.data.packed_dataset import PackedDataset

    ds = PackedDataset(str(tmp_path / "packed"), seq_length=512)
    expected = {tuple(SFTFormatter(tok, "llama3")(r).tokens.tolist()) for r in records}
    seen = set()
    for i in range(len(ds)):
        s = ds[i]
        bounds = np.concatenate([[0], np.cumsum(s.doc_lengths)])
        with_targets = sum(int(s.target_mask[a + 1:b].any()) for a, b in zip(bounds[:-1], bounds[1:]))
        targets = sum(int(s.target_mask[a + 1:b].sum()) for a, b in zip(bounds[:-1], bounds[1:]))
        seq = make_micro_batch([s], loss_mode="sequence")
        assert abs(float(seq.loss_weights.sum()) - with_targets) < 1e-4
        tok_mode = make_micro_batch([s], loss_mode="token")
        assert float(tok_mode.loss_weights.sum()) == targets
        for a, b in zip(bounds[:-1], bounds[1:]):
            if s.target_mask[a:b].any():
                seen.add(tuple(s.tokens[a:b].tolist()))
    assert seen == expected and meta["sources"][0]["documents_used"] == len(records)
