#!/usr/bin/env python3
"""Hugging Face transformers baseline for bench/generate.mjs: greedy generate() on the same
checkpoint and the same prompt ids, bf16 on the GPU.

Each batch generates exactly newTokens tokens per prompt (min_new_tokens = max_new_tokens, so EOS
does not end it), prompts of equal length so no padding is needed; tokens per second are
batch * newTokens over the wall time of generate() (CUDA synchronized), after a short warm-up
at the same batch size.
Prefill: one forward pass over the long prompt, timed after a warm-up pass.
Usage: python3 bench/hf_generate.py --model DIR --input prompts.json --out result.json
"""
import argparse
import json
import time

import torch
import transformers
from transformers import AutoModelForCausalLM


def load(path):
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    except TypeError:  # transformers 4.x spells it torch_dtype
        return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.bfloat16)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with open(args.input) as f:
        spec = json.load(f)

    device = "cuda"
    model = load(args.model).to(device).eval()
    new_tokens = spec["newTokens"]

    def generate_seconds(prompts, count):
        ids = torch.tensor(prompts, device=device)
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=count,
                min_new_tokens=count,
                do_sample=False,
                pad_token_id=0,
            )
        torch.cuda.synchronize()
        return time.perf_counter() - start

    rows = []
    for batch in spec["batches"]:
        generate_seconds(spec["prompts"][:batch], 4)  # warm-up at this batch's shapes
        seconds = generate_seconds(spec["prompts"][:batch], new_tokens)
        rows.append({"batch": batch, "seconds": seconds, "tokensPerSecond": batch * new_tokens / seconds})
        print(f"hf batch {batch:4d}: {seconds:8.3f} s, {batch * new_tokens / seconds:9.1f} tok/s", flush=True)

    long_ids = torch.tensor([spec["longPrompt"]], device=device)
    with torch.inference_mode():
        model(long_ids)
        torch.cuda.synchronize()
        start = time.perf_counter()
        model(long_ids)
        torch.cuda.synchronize()
    prefill = len(spec["longPrompt"]) / (time.perf_counter() - start)
    print(f"hf prefill of {len(spec['longPrompt'])} tokens: {prefill:.1f} tok/s", flush=True)

    with open(args.out, "w") as f:
        json.dump(
            {
                "device": torch.cuda.get_device_name(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "rows": rows,
                "prefillTokensPerSecond": prefill,
            },
            f,
            indent=2,
        )


if __name__ == "__main__":
    main()
