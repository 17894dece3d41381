"""The peer measured in the same run (issue 21 item 5): the device's own PyTorch and
transformers serving a 6B-8B shape with random bf16 weights, greedy, at batch 1, 16 and 64:
transformers' `generate` with a static KV cache (which it compiles with torch.compile) and,
for reference, with its default dynamic cache in eager mode. Every model is
`LlamaForCausalLM` at the shape's sizes: Llama-3.1-8B and Vicuna-7B are that model;
InternLM2.5-7B has the same layers; ChatGLM2-6B's layers (2 K/V heads, 13,696-wide MLP, 28
layers) are Llama's at those sizes apart from its rotary layout, which costs nothing
measurable. One JSON line per (batch, variant):

    python3 scripts/gpu/lib/torch_peer.py --shape llama-3.1-8b [--batches 1 16 64]
        [--prompt 128] [--new 64]

`decode_step_ms` is (time of PROMPT + NEW + 1 tokens − time of PROMPT + 1) / NEW, each the
median of three timed `generate` calls after warm-ups with the same shapes (compilation
happens there); `ttft_ms` is the time of one generated token. Beside `triton-llm bench
--shape … --batch B --prompt 128 --new 64` in the same run, the two give a ratio measured
side by side.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[3]


def llama_config(shape):
    """The shape's sizes as a LlamaConfig's keyword arguments."""
    c = json.loads((REPO / "bench" / "shapes" / shape / "config.json").read_text())
    if c.get("model_type") == "chatglm":
        heads = c["num_attention_heads"]
        return dict(hidden_size=c["hidden_size"], intermediate_size=c["ffn_hidden_size"],
                    num_hidden_layers=c["num_layers"], num_attention_heads=heads,
                    num_key_value_heads=c["multi_query_group_num"], vocab_size=c["padded_vocab_size"],
                    max_position_embeddings=min(c["seq_length"], 8192),
                    rms_norm_eps=c["layernorm_epsilon"])
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "rms_norm_eps", "rope_theta")
    out = {k: c[k] for k in keys if k in c}
    out["max_position_embeddings"] = min(c.get("max_position_embeddings", 4096), 8192)
    return out


def timed(fn, repeats=3):
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-3.1-8b")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--variants", nargs="+", default=["static_compiled", "dynamic_eager"])
    args = parser.parse_args()

    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = llama_config(args.shape)
    config = LlamaConfig(**sizes, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    model.eval()
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "device": torch.cuda.get_device_name()}
    print(json.dumps({"shape": args.shape, "sizes": sizes, **versions,
                      "parameters": sum(p.numel() for p in model.parameters())}), flush=True)

    for batch in args.batches:
        ids = torch.randint(3, config.vocab_size, (batch, args.prompt), device="cuda")
        mask = torch.ones_like(ids)
        for variant in args.variants:
            row = {"shape": args.shape, "batch": batch, "prompt": args.prompt, "new": args.new,
                   "variant": variant, **versions}
            try:
                extra = {"cache_implementation": "static"} if variant == "static_compiled" else {}

                def generate(new):
                    with torch.inference_mode():
                        return model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                              max_new_tokens=new, min_new_tokens=new, eos_token_id=None,
                                              pad_token_id=0, **extra)

                started = time.perf_counter()
                for new in (1, args.new + 1):
                    generate(new)
                    generate(new)
                row["warmup_s"] = round(time.perf_counter() - started, 1)
                out = generate(args.new + 1)
                assert out.shape == (batch, args.prompt + args.new + 1), tuple(out.shape)
                first = timed(lambda: generate(1))
                whole = timed(lambda: generate(args.new + 1))
                step = (whole - first) / args.new
                row.update(ttft_ms=first * 1e3, decode_step_ms=step * 1e3,
                           decode_tokens_per_s=batch / step,
                           output_tokens_per_s=batch * (args.new + 1) / whole)
            except Exception as e:  # a variant this transformers cannot run: said, not fatal
                row["error"] = f"{type(e).__name__}: {e}"[:500]
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
