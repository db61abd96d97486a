#!/usr/bin/env python3
"""Produce Hugging Face transformers reference fixtures for detinfer's tests.

Writes, under test/fixtures/hf/:
  llama/ qwen2/ qwen3/ mistral/   tiny random-initialised bf16 checkpoints
                                  (config.json, model.safetensors, generation_config.json,
                                  tokenizer files) plus reference.safetensors/.json
  default/                        reference.safetensors/.json for models/default
                                  (its weights stay in models/default)
  tokenizer-cases.json            ids/decodes from the Python `tokenizers` library

Usage (after tools/train_default_model.py):
    python3 tools/make_fixtures.py --model models/default --out test/fixtures/hf

Runs on CUDA when available (that is how the committed fixtures were made);
--cpu forces CPU for smoke tests.
"""

import argparse
import json
import os
import platform
import shutil
import sys

# Deterministic cuBLAS workspaces; must be set before CUDA is initialised.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch

import safetensors
import tokenizers
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_default_model import add_legacy_rope_keys  # noqa: E402

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]

PROMPTS = [
    "ROMEO:",
    "To be, or not to be, that is the question:",
    (
        "JULIET:\n"
        "O Romeo, Romeo! wherefore art thou Romeo?\n"
        "Deny thy father and refuse thy name;\n"
        "Or, if thou wilt not, be but sworn my love,\n"
        "And I'll no longer be a Capulet.\n"
        "\n"
        "ROMEO:\n"
        "[Aside] Shall I hear more, or shall I speak at this?"
    ),
]
NEW_TOKENS = 24
MAX_LOGITS_BYTES = 1_000_000  # per model; beyond this the long prompt keeps only its tail
TAIL_POSITIONS = 8

TOKENIZER_CASES = [
    "Hello, world!",
    "ROMEO:\nBut, soft! what light through yonder window breaks?",
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "To be, or not to be, that is the question:",
    "O Romeo, Romeo! wherefore art thou Romeo?",
    "Now is the winter of our discontent\nMade glorious summer by this sun of York;",
    "",
    " ",
    "   leading and trailing spaces   ",
    "multiple     spaces    between     words",
    "tabs\tand\t\ttabs",
    "\n\n\n",
    "line one\nline two\n\nline four\r\nwindows line",
    "don't won't I'm you're we'll they've he'd 'tis",
    "UPPER lower MiXeD CamelCase",
    "numbers 0 7 42 1234567890 3.14159 1,000,000",
    "punctuation!?.,;:'\"()[]{}-_/\\|@#$%^&*+=<>~`",
    "naïve café résumé façade",
    "Ünïcödé Ästhetik, señor, São Paulo, Ærøskøbing",
    "Ελληνικά και русский текст",
    "日本語のテキストです。",
    "中文测试：你好，世界！",
    "한국어 문장",
    "مرحبا بالعالم",
    "emoji 🙂🎭👑 and family 👨‍👩‍👧 and flag 🇬🇧",
    "dashes — and ellipsis… and quotes “curly” ‘single’",
    "\u00a0non-breaking\u00a0space and zero\u200bwidth",
    "control \x00\x01\x07 bytes",
    "<|endoftext|>",
    "text before<|endoftext|>text after",
    "<|im_start|>user\nWho art thou?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>system\nYou are a player.<|im_end|>\n",
    "<|im_start <|im_end|x <|endoftext",
    "def f(x):\n    return x * 2\n",
    "https://example.com/path?query=1&x=2#frag",
    "hahahahahahahahahahahahahahahahahahaha",
]


def log(msg):
    print(msg, flush=True)


def versions():
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "safetensors": safetensors.__version__,
    }


def load_model(path, dtype, device):
    kw = dict(attn_implementation="eager")
    try:
        m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
    except TypeError:
        m = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype, **kw)
    return m.to(device).eval()


# --------------------------------------------------------------------------- tiny checkpoints

COMMON = dict(
    vocab_size=4096,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    hidden_act="silu",
    initializer_range=0.1,
    attention_dropout=0.0,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=0,
    use_cache=True,
)


def tiny_specs():
    return {
        "llama": (
            LlamaForCausalLM,
            LlamaConfig(
                **COMMON,
                rope_theta=500000.0,
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                },
                tie_word_embeddings=False,
                attention_bias=False,
                mlp_bias=False,
            ),
        ),
        "qwen2": (
            Qwen2ForCausalLM,
            Qwen2Config(**COMMON, rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False),
        ),
        "qwen3": (
            Qwen3ForCausalLM,
            Qwen3Config(**COMMON, rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False,
                        attention_bias=False),
        ),
        "mistral": (
            MistralForCausalLM,
            MistralConfig(**COMMON, rope_theta=10000.0, sliding_window=None, tie_word_embeddings=False),
        ),
    }


def make_tiny(name, cls, config, out_dir, tokenizer_dir, seed):
    torch.manual_seed(seed)
    model = cls(config)
    # Default init leaves norm weights at 1 and biases at 0; perturb them (fixed
    # seed) so that the norm scales and the Qwen2 q/k/v biases are exercised.
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * config.initializer_range)
            elif "norm" in pname and p.dim() == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
    model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0, do_sample=False)
    os.makedirs(out_dir, exist_ok=True)
    try:
        model.save_pretrained(out_dir, safe_serialization=True)
    except TypeError:
        model.save_pretrained(out_dir)
    add_legacy_rope_keys(out_dir)
    for f in TOKENIZER_FILES:
        src = os.path.join(tokenizer_dir, f)
        if os.path.exists(src):
            shutil.copyfile(src, os.path.join(out_dir, f))
    n = sum(p.numel() for p in model.parameters())
    size = os.path.getsize(os.path.join(out_dir, "model.safetensors"))
    log(f"{name}: {cls.__name__}, {n} parameters, model.safetensors {size} bytes")
    return n


# --------------------------------------------------------------------------- references


@torch.no_grad()
def make_reference(name, model_dir, out_dir, tok, device, model_path_note):
    model = load_model(model_dir, torch.bfloat16, device)
    n_params = sum(p.numel() for p in model.parameters())
    records = []
    for i, text in enumerate(PROMPTS):
        ids = tok.encode(text, add_special_tokens=False).ids
        x = torch.tensor([ids], dtype=torch.long, device=device)
        logits = model(input_ids=x).logits[0].float().cpu()  # [T, V]
        out = model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
            eos_token_id=0,
        )
        greedy = out.sequences[0, len(ids):].cpu()
        step_logits = torch.stack([l[0] for l in out.logits]).float().cpu()  # [G, V]
        top2 = step_logits.topk(2, dim=-1)
        margin = top2.values[:, 0] - top2.values[:, 1]
        mismatch = (top2.indices[:, 0] != greedy[: step_logits.size(0)]).sum().item()
        if mismatch:
            log(f"  warning: {mismatch} generated tokens differ from the argmax of the step logits")
        records.append(dict(text=text, ids=ids, logits=logits, greedy=greedy, margin=margin,
                            step_top2=top2.indices.cpu()))

    full_bytes = sum(r["logits"].numel() * 4 for r in records)
    tensors = {}
    meta_prompts = []
    for i, r in enumerate(records):
        T = len(r["ids"])
        pos = list(range(T))
        if full_bytes > MAX_LOGITS_BYTES and i == len(records) - 1 and T > TAIL_POSITIONS:
            pos = pos[-TAIL_POSITIONS:]
        tensors[f"prompt{i}.ids"] = torch.tensor(r["ids"], dtype=torch.int32)
        tensors[f"prompt{i}.logits"] = r["logits"][pos[0] : pos[-1] + 1].contiguous()
        tensors[f"prompt{i}.logits_pos"] = torch.tensor(pos, dtype=torch.int32)
        tensors[f"prompt{i}.greedy"] = r["greedy"].to(torch.int32).contiguous()
        tensors[f"prompt{i}.margin"] = r["margin"].contiguous()
        decoded = tok.decode(r["greedy"].tolist(), skip_special_tokens=False)
        meta_prompts.append({
            "text": r["text"],
            "num_tokens": T,
            "logits_positions": [pos[0], pos[-1] + 1],
            "logits_all_positions": len(pos) == T,
            "greedy_len": int(r["greedy"].numel()),
            "greedy_stopped_at_eos": bool(r["greedy"].numel() < NEW_TOKENS),
            "greedy_text": decoded,
            "min_margin": float(r["margin"].min()) if r["margin"].numel() else None,
            "argmax_last_prompt_position": int(r["logits"][-1].argmax()),
        })
        log(f"  {name} prompt{i}: {T} tokens, logits rows {pos[0]}..{pos[-1]}, greedy {r['greedy'].numel()} "
            f"(min margin {meta_prompts[-1]['min_margin']:.4f}): {decoded!r}")

    os.makedirs(out_dir, exist_ok=True)
    st_path = os.path.join(out_dir, "reference.safetensors")
    save_file(tensors, st_path, metadata={"format": "pt", "model": name})
    cfg = model.config
    meta = {
        "model": name,
        "architecture": type(model).__name__,
        "checkpoint": model_path_note,
        "parameters": n_params,
        "dtype": "bfloat16",
        "attn_implementation": "eager",
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "vocab_size": cfg.vocab_size,
        "new_tokens": NEW_TOKENS,
        "eos_token_id": 0,
        "prompts": meta_prompts,
        "tensors": {
            "promptN.ids": "int32 [T]: prompt token ids (no special tokens added)",
            "promptN.logits": "float32 [P, V]: logits (model output .float()) of one full forward pass over the "
                              "prompt, for the positions listed in promptN.logits_pos",
            "promptN.logits_pos": "int32 [P]: prompt positions of the rows of promptN.logits (contiguous)",
            "promptN.greedy": "int32 [G]: generate(do_sample=False, max_new_tokens=24) new tokens, G <= 24 "
                              "(stops early only if eos id 0 is produced)",
            "promptN.margin": "float32 [G]: top-1 minus top-2 logit at each generation step (generate's raw "
                              "logits, KV-cache decoding); 0 means an exact bf16 tie, where generate took the "
                              "lowest tied id (torch.argmax)",
        },
        "logits_note": (
            "all prompt positions are kept" if all(p["logits_all_positions"] for p in meta_prompts)
            else f"all positions for the first prompts; only the last {TAIL_POSITIONS} positions of the last "
                 f"(longer) prompt, to keep the file under ~1 MB"
        ),
        "versions": versions(),
        "file_bytes": os.path.getsize(st_path),
    }
    with open(os.path.join(out_dir, "reference.json"), "w") as f:
        json.dump(meta, f, indent=2, ensure_ascii=False)
        f.write("\n")
    log(f"  wrote {st_path} ({meta['file_bytes']} bytes)")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()


def make_tokenizer_cases(tok, tokenizer_path_note, out_path):
    cases = []
    for text in TOKENIZER_CASES:
        enc = tok.encode(text, add_special_tokens=False)
        enc_sp = tok.encode(text, add_special_tokens=True)
        cases.append({
            "text": text,
            "ids": enc.ids,
            "tokens": enc.tokens,
            "ids_add_special": enc_sp.ids,
            "decoded": tok.decode(enc.ids, skip_special_tokens=False),
            "decoded_skip_special": tok.decode(enc.ids, skip_special_tokens=True),
        })
    doc = {
        "tokenizer": tokenizer_path_note,
        "description": (
            "Reference tokenizations from the Python `tokenizers` library: ids with add_special_tokens false "
            "(`ids`, with the byte-level token strings in `tokens`) and true (`ids_add_special`), and the "
            "decoded text of `ids` with skip_special_tokens false and true."
        ),
        "versions": versions(),
        "cases": cases,
    }
    with open(out_path, "w") as f:
        json.dump(doc, f, indent=2, ensure_ascii=False)
        f.write("\n")
    log(f"wrote {out_path}: {len(cases)} cases")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/default", help="trained default model directory")
    ap.add_argument("--out", default="test/fixtures/hf", help="fixtures directory")
    ap.add_argument("--seed", type=int, default=20240601)
    ap.add_argument("--cpu", action="store_true", help="force CPU (smoke tests only)")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    torch.use_deterministic_algorithms(True, warn_only=True)
    log(f"versions: {versions()}  device: {device}")
    os.makedirs(args.out, exist_ok=True)
    tok = Tokenizer.from_file(os.path.join(args.model, "tokenizer.json"))

    make_tokenizer_cases(tok, os.path.join(args.model, "tokenizer.json"),
                         os.path.join(args.out, "tokenizer-cases.json"))

    make_reference("default", args.model, os.path.join(args.out, "default"), tok, device, args.model)

    for k, (name, (cls, config)) in enumerate(tiny_specs().items()):
        d = os.path.join(args.out, name)
        make_tiny(name, cls, config, d, args.model, args.seed + 100 * k)
        make_reference(name, d, d, tok, device, d)

    total = 0
    for root, _, files in os.walk(args.out):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    log(f"fixtures total {total} bytes under {args.out}")


if __name__ == "__main__":
    sys.exit(main())
