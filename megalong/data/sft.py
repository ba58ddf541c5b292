"""SFT conversations → tokens with a target mask on assistant turns only (UltraChat, LongAlign format).

A record is `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`. The chat
template renders it as text runs, each marked target or not; every run is tokenized on its own and the
ids concatenated, so the mask is exact at token level: 1 on the assistant's content and its
end-of-turn token, 0 on everything else (BOS, headers, system and user turns).

- `llama3`: Meta's Llama-3 instruct format, built in:
  `<|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{content|trim}<|eot_id|>` per turn.
  With a tokenizer that lacks those special tokens the same text is tokenized as plain text.
- `hf`: the `chat_template` of a local HF tokenizer directory (transformers' `apply_chat_template`);
  assistant spans are found by rendering the conversation prefix by prefix.
Too long examples keep their last `max_length` tokens (the answer and the latest turns) or are dropped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import numpy as np

ROLES = ("system", "user", "assistant")
LLAMA3_BOS = "<|begin_of_text|>"
LLAMA3_EOT = "<|eot_id|>"

# Why a record can be skipped; the tool counts each and reports file:line of the first few.
REASONS = {
    "invalid_json": "the line is not valid JSON",
    "not_an_object": "the record is not a JSON object",
    "missing_messages": "no 'messages' key",
    "messages_not_a_list": "'messages' is not a list",
    "empty_messages": "'messages' is empty",
    "message_not_an_object": "a message is not an object with 'role' and 'content'",
    "unknown_role": f"a role is not one of {', '.join(ROLES)}",
    "non_string_content": "a message's 'content' is not a string",
    "no_assistant_turn": "no assistant message, so nothing to learn",
    "too_long": "longer than max_length (overflow: drop)",
    "no_target_after_truncation": "left truncation removed every assistant token",
    "template_error": "the chat template failed on this conversation",
}


class BadRecord(ValueError):
    """A record that cannot become an SFT example; `reason` is a key of REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        super().__init__(f"{reason}: {REASONS[reason]}" + (f" ({detail})" if detail else ""))


@dataclass
class SFTExample:
    tokens: np.ndarray  # int64 [n]
    target_mask: np.ndarray  # uint8 [n]
    truncated_tokens: int = 0


def validate_messages(record: Any) -> list[dict]:
    """The record's messages, checked; raises BadRecord naming the first problem."""
    if not isinstance(record, dict):
        raise BadRecord("not_an_object", f"got {type(record).__name__}")
    if "messages" not in record:
        raise BadRecord("missing_messages", f"keys: {', '.join(sorted(map(str, record)))[:80]}")
    messages = record["messages"]
    if not isinstance(messages, list):
        raise BadRecord("messages_not_a_list", f"got {type(messages).__name__}")
    if not messages:
        raise BadRecord("empty_messages")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise BadRecord("message_not_an_object", f"message {j}")
        if m["role"] not in ROLES:
            raise BadRecord("unknown_role", f"message {j} has role {m['role']!r}")
        if not isinstance(m["content"], str):
            raise BadRecord("non_string_content", f"message {j} content is {type(m['content']).__name__}")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("no_assistant_turn")
    return messages


# ---------------------------------------------------------------- templates → (text, is_target) runs


def llama3_runs(messages: Sequence[dict]) -> list[tuple[str, bool]]:
    """Meta's Llama-3 instruct template (content trimmed, BOS first), split at target boundaries."""
    runs: list[tuple[str, bool]] = []
    prefix = LLAMA3_BOS
    for m in messages:
        prefix += f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n"
        body = m["content"].strip() + LLAMA3_EOT
        if m["role"] == "assistant":
            runs += [(prefix, False), (body, True)]
            prefix = ""
        else:
            prefix += body
    if prefix:
        runs.append((prefix, False))
    return runs


class HFChatTemplate:
    """Runs from a local HF tokenizer directory's `chat_template` (transformers' apply_chat_template)."""

    def __init__(self, tokenizer_dir: str):
        from transformers import AutoTokenizer

        self.dir = tokenizer_dir
        self.tok = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        if not getattr(self.tok, "chat_template", None):
            raise ValueError(f"{tokenizer_dir} has no chat_template (tokenizer_config.json); use --template llama3")

    def _render(self, messages: Sequence[dict], generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(list(messages), tokenize=False,
                                            add_generation_prompt=generation_prompt)

    def __call__(self, messages: Sequence[dict]) -> list[tuple[str, bool]]:
        runs: list[tuple[str, bool]] = []
        done = ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self._render(messages[:i], True)
            full = self._render(messages[:i + 1], False)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise BadRecord("template_error", f"{self.dir}'s chat_template does not render conversations "
                                "prefix by prefix, so assistant spans cannot be located; use --template llama3")
            runs += [(prompt[len(done):], False), (full[len(prompt):], True)]
            done = full
        rest = self._render(messages, False)
        if not rest.startswith(done):
            raise BadRecord("template_error", "the full rendering does not extend the last assistant turn")
        if rest[len(done):]:
            runs.append((rest[len(done):], False))
        return runs


# ---------------------------------------------------------------- tokenization


def split_bos(runs: Sequence[tuple[str, bool]], bos_id: int | None) -> tuple[list[int], list[tuple[str, bool]]]:
    """With `bos_id` given, a leading Llama-3 BOS text becomes that id (for tokenizers that lack
    `<|begin_of_text|>` but have a BOS of their own); returns (head ids, remaining runs)."""
    if bos_id is not None and runs and runs[0][0].startswith(LLAMA3_BOS):
        return [bos_id], [(runs[0][0][len(LLAMA3_BOS):], runs[0][1]), *runs[1:]]
    return [], list(runs)


def assemble(head: list[int], runs: Sequence[tuple[str, bool]],
             pieces: Sequence[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenates each run's ids; the mask is the run's target flag on each of its tokens."""
    ids, mask = list(head), [0] * len(head)
    for (_, target), piece in zip(runs, pieces):
        ids += piece
        mask += [int(target)] * len(piece)
    return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8)


def tokenize_runs(runs: Sequence[tuple[str, bool]], encode_batch: Callable[[list[str]], list[list[int]]],
                  bos_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Encodes every run on its own (so target boundaries are token boundaries)."""
    head, runs = split_bos(runs, bos_id)
    return assemble(head, runs, encode_batch([t for t, _ in runs]))


def fit_length(tokens: np.ndarray, mask: np.ndarray, max_length: int | None,
               overflow: Literal["truncate_left", "drop"]) -> SFTExample:
    """Applies max_length: keep the last tokens (the answer) or drop; raises BadRecord when dropped."""
    n = len(tokens)
    if max_length is None or n <= max_length:
        return SFTExample(tokens, mask, 0)
    if overflow == "drop":
        raise BadRecord("too_long", f"{n} tokens > {max_length}")
    if overflow != "truncate_left":
        raise ValueError(f"overflow must be truncate_left or drop, got {overflow!r}")
    tokens, mask = tokens[n - max_length:], mask[n - max_length:]
    if not mask[1:].any():  # the first token is never predicted
        raise BadRecord("no_target_after_truncation", f"{n} tokens cut to the last {max_length}")
    return SFTExample(tokens, mask, n - max_length)


class SFTFormatter:
    """record → SFTExample with one template, one tokenizer, one length policy."""

    def __init__(self, tokenizer, template: str = "llama3", hf_template_dir: str | None = None,
                 max_length: int | None = None, overflow: str = "truncate_left"):
        if template == "llama3":
            self.render = llama3_runs
        elif template == "hf":
            if not hf_template_dir:
                raise ValueError("template 'hf' needs the HF tokenizer directory holding the chat_template")
            self.render = HFChatTemplate(hf_template_dir)
        else:
            raise ValueError(f"unknown template {template!r}: llama3 or hf")
        self.tokenizer, self.template = tokenizer, template
        self.max_length, self.overflow = max_length, overflow
        # Llama-3's BOS is a special token of Llama-3 tokenizers; others use their own BOS (if any).
        bos_id = getattr(tokenizer, "bos_id", None)
        self.bos_id = bos_id if bos_id is not None and len(tokenizer.encode(LLAMA3_BOS)) != 1 else None

    def runs(self, record: Any) -> list[tuple[str, bool]]:
        messages = validate_messages(record)
        try:
            return self.render(messages)
        except BadRecord:
            raise
        except Exception as e:  # a jinja error inside the template
            raise BadRecord("template_error", f"{type(e).__name__}: {e}") from None

    def __call__(self, record: Any) -> SFTExample:
        tokens, mask = tokenize_runs(self.runs(record), self.tokenizer.encode_batch, self.bos_id)
        return fit_length(tokens, mask, self.max_length, self.overflow)

    def format_batch(self, records: Sequence[Any]) -> list[SFTExample | BadRecord]:
        """Like calling the formatter on each record, with one encode_batch call for all runs."""
        out: list[Any] = [None] * len(records)
        prepared = {}
        for i, record in enumerate(records):
            try:
                prepared[i] = split_bos(self.runs(record), self.bos_id)
            except BadRecord as e:
                out[i] = e
        encoded = iter(self.tokenizer.encode_batch([t for _, runs in prepared.values() for t, _ in runs]))
        for i, (head, runs) in prepared.items():
            tokens, mask = assemble(head, runs, [next(encoded) for _ in runs])
            try:
                out[i] = fit_length(tokens, mask, self.max_length, self.overflow)
            except BadRecord as e:
                out[i] = e
        return out
