#!/usr/bin/env python3
"""Writes a tokenizer folder that Triton's OpenAI frontend can load for a ChatGLM2 or InternLM2
model folder.

The frontend loads its `--tokenizer` with transformers' AutoTokenizer without remote code, and
both families' folders name their own Python tokenizer classes, so their folders fail to load
there. The frontend uses the tokenizer only to render the chat template (the backend
tokenizes the prompt itself), so this folder holds the model's `tokenizer.model` as Llama's
SentencePiece tokenizer (InternLM2's on text without special tokens: no dummy prefix) and the
chat template: InternLM2's own from its `tokenizer_config.json`, ChatGLM2's from
`chatglm2.jinja` beside this script (ChatGLM2-6B ships none).

  python3 make_tokenizer.py /models/internlm2_5-7b-chat /models/internlm2_5-7b-chat-frontend
"""

import argparse
import json
import shutil
from pathlib import Path


def make(model_dir: Path, out_dir: Path) -> Path:
    config = json.loads((model_dir / "config.json").read_text())
    kind = config.get("model_type")
    if kind == "chatglm":
        template = (Path(__file__).with_name("chatglm2.jinja")).read_text()
    elif kind == "internlm2":
        template = json.loads((model_dir / "tokenizer_config.json").read_text()).get("chat_template")
        if not template:
            raise SystemExit(f"{model_dir}/tokenizer_config.json has no chat_template")
    else:
        raise SystemExit(f"{model_dir}/config.json: model_type {kind!r} is neither chatglm nor internlm2")
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_dir / "tokenizer.model", out_dir / "tokenizer.model")
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_prefix_space": False, "legacy": True,
        "add_bos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "chat_template": template}, ensure_ascii=False, indent=1))
    return out_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    make(args.model_dir, args.out_dir)


if __name__ == "__main__":
    main()
