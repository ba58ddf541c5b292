"""Loads an exported model with plain `transformers` and generates a chat reply (the demo's check that
the export is a real HuggingFace model)."""
from __future__ import annotations

import argparse
import json

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--hf-dir", required=True)
    ap.add_argument("--tokenizer", required=True, help="tokenizer.json the model was trained with")
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    args = ap.parse_args(argv)

    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    tok = Tokenizer.from_file(args.tokenizer)
    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, local_files_only=True, torch_dtype=torch.float32).eval()
    question = "Explain 'The for statement' in Python (for)."
    prompt = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n" + question +
              "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = torch.tensor([tok.encode(prompt).ids])
    eot = tok.token_to_id("<|eot_id|>")
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=eot,
                             pad_token_id=eot)
    reply = tok.decode(out[0, ids.shape[1]:].tolist())
    result = {"prompt": question, "reply": reply, "new_tokens": int(out.shape[1] - ids.shape[1]),
              "model_class": type(model).__name__}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
