#!/usr/bin/env python3
"""Train the small default model shipped with detinfer.

Trains a byte-level BPE tokenizer (4096 entries) and a 4-layer Qwen3-architecture
causal language model (~3.4M parameters) on the tiny-shakespeare corpus, then saves
both in Hugging Face format (bf16 safetensors) to an output directory.

Usage:
    python3 tools/train_default_model.py PATH/TO/tinyshakespeare.txt --out models/default

Needs: torch, transformers (4.5x or 5.x), tokenizers, safetensors. A CUDA GPU is
strongly recommended.
"""

import argparse
import json
import math
import os
import platform
import random
import sys
import time

# Deterministic cuBLAS workspaces; must be set before CUDA is initialised.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import numpy as np
import torch
import torch.nn.functional as F

import tokenizers
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS, IM_START, IM_END]  # ids 0, 1, 2

# ChatML-style template; kept deliberately small so that a minimal Jinja
# implementation can render it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def log(msg):
    print(msg, flush=True)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(train_text, vocab_size):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Feed the text in line-sized pieces (same merges as one big string, far
    # less memory in the trainer's word counter).
    lines = train_text.splitlines(keepends=True)
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    return tok


def wrap_tokenizer(tok):
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=EOS,
        unk_token=None,
        bos_token=None,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(fast, out_dir):
    fast.save_pretrained(out_dir)
    # Recent transformers versions write the template to chat_template.jinja;
    # keep it inside tokenizer_config.json instead so that one file carries it.
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["chat_template"] = CHAT_TEMPLATE
    cfg["eos_token"] = EOS
    cfg["pad_token"] = EOS
    cfg["bos_token"] = None
    # Portable spellings that transformers 4.x understands as well as 5.x.
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = cfg.pop("extra_special_tokens", None)
    if isinstance(extra, dict):
        extra = list(extra.values())
    cfg["additional_special_tokens"] = extra or [IM_START, IM_END]
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
        f.write("\n")
    jinja = os.path.join(out_dir, "chat_template.jinja")
    if os.path.exists(jinja):
        os.remove(jinja)


def add_legacy_rope_keys(out_dir):
    """Mirror transformers 5's `rope_parameters` into the older `rope_theta` /
    `rope_scaling` keys of config.json, so that readers written for either layout
    (transformers 4.x, most published checkpoints) see the same RoPE settings."""
    path = os.path.join(out_dir, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict) and "rope_theta" in rp:
        cfg["rope_theta"] = rp["rope_theta"]
        scaling = {k: v for k, v in rp.items() if k != "rope_theta"}
        cfg["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling
    if "dtype" in cfg and "torch_dtype" not in cfg:
        cfg["torch_dtype"] = cfg["dtype"]
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


# --------------------------------------------------------------------------- model


def make_config(vocab_size):
    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        attention_bias=False,
        attention_dropout=0.0,
        use_sliding_window=False,
        hidden_act="silu",
        initializer_range=0.02,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        use_cache=True,
    )


def make_model(config):
    try:
        return Qwen3ForCausalLM._from_config(config, attn_implementation="sdpa")
    except Exception:
        return Qwen3ForCausalLM(config)


def load_model(path, dtype):
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except TypeError:
        return AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype)


@torch.no_grad()
def evaluate(model, ids, ctx, device, batch=64):
    """Mean cross-entropy (nats/token) over every token of `ids` except the first.

    The sequence is cut into windows of ctx+1 tokens that overlap by one, so each
    token is predicted exactly once (with up to ctx-1 tokens of context).
    """
    model.eval()
    n = ids.numel()
    starts = list(range(0, n - 1, ctx))
    total, count = 0.0, 0
    for b in range(0, len(starts), batch):
        chunk = starts[b : b + batch]
        # Full-length windows batch together; a final short one goes alone.
        full = [s for s in chunk if s + ctx + 1 <= n]
        parts = []
        if full:
            parts.append(torch.stack([ids[s : s + ctx + 1] for s in full]))
        for s in chunk:
            if s + ctx + 1 > n:
                parts.append(ids[s:n].unsqueeze(0))
        for w in parts:
            w = w.to(device)
            x, y = w[:, :-1], w[:, 1:]
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(input_ids=x).logits
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
            total += loss.item()
            count += y.numel()
    model.train()
    return total / count


def lr_at(step, steps, warmup, peak, floor_frac):
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return peak * (floor_frac + (1 - floor_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def add_dropout_hooks(model, p):
    """Training-only residual dropout (embeddings, attention and MLP outputs).

    The Qwen3 modules have no residual dropout of their own; forward hooks add it
    without changing the architecture, and are removed before saving. Modules in
    eval() mode are unaffected."""
    if p <= 0:
        return []

    def hook(mod, inp, out):
        if isinstance(out, tuple):
            return (F.dropout(out[0], p, mod.training),) + tuple(out[1:])
        return F.dropout(out, p, mod.training)

    handles = [model.get_input_embeddings().register_forward_hook(hook)]
    for layer in model.model.layers:
        handles.append(layer.self_attn.register_forward_hook(hook))
        handles.append(layer.mlp.register_forward_hook(hook))
    return handles


def parse_recipes(spec):
    out = []
    for item in spec.split(","):
        steps, _, drop = item.partition(":")
        out.append((int(steps), float(drop or 0.0)))
    return out


def train_one(args, config, train_ids, val_ids, device, steps, dropout):
    """Train one model from the fixed seed for `steps` steps (full cosine schedule)."""
    seed_everything(args.seed)
    model = make_model(config).to(device)
    model.train()
    handles = add_dropout_hooks(model, dropout)
    warmup = min(args.warmup, max(1, steps // 10))

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    opt_kwargs = dict(lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    if device.type == "cuda":
        opt_kwargs["fused"] = True
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        **opt_kwargs,
    )

    gen = torch.Generator().manual_seed(args.seed)
    max_start = train_ids.numel() - args.ctx - 1
    train_dev = train_ids.to(device)
    offs = torch.arange(args.ctx + 1, device=device)

    def get_batch():
        starts = torch.randint(0, max_start + 1, (args.batch,), generator=gen).to(device)
        w = train_dev[starts[:, None] + offs[None, :]]
        return w[:, :-1], w[:, 1:]

    eval_every = max(1, steps // args.evals)
    history = []
    t_train = time.time()
    running, running_n = 0.0, 0
    steps_done = 0
    for step in range(steps):
        lr = lr_at(step, steps, warmup, args.lr, args.min_lr_frac)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = get_batch()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        steps_done = step + 1
        running = running + loss.detach()
        running_n += 1
        if steps_done % eval_every == 0 or steps_done == steps:
            val = evaluate(model, val_ids, args.ctx, device)
            tr = float(running) / max(1, running_n)
            running, running_n = 0.0, 0
            el = time.time() - t_train
            history.append({"step": steps_done, "train_loss": round(tr, 4), "val_loss": round(val, 4),
                            "seconds": round(el, 1)})
            log(f"  step {steps_done:5d}/{steps}  lr {lr:.2e}  train {tr:.4f}  val {val:.4f}  {el:.1f}s")
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_seconds = time.time() - t_train
    for h in handles:
        h.remove()
    model.eval()
    final_train = evaluate(model, train_ids[: val_ids.numel() * 3], args.ctx, device)
    final_val = evaluate(model, val_ids, args.ctx, device)
    log(f"  final (fp32 weights): train-sample loss {final_train:.4f}  validation loss {final_val:.4f}  "
        f"({train_seconds:.1f}s, {1000 * train_seconds / steps:.1f} ms/step)")
    result = {
        "steps": steps,
        "dropout": dropout,
        "warmup_steps": warmup,
        "tokens_seen": steps * args.batch * args.ctx,
        "epochs": round(steps * args.batch * args.ctx / train_ids.numel(), 2),
        "train_loss": history[-1]["train_loss"],
        "train_sample_loss": round(final_train, 4),
        "val_loss": round(final_val, 4),
        "train_wall_seconds": round(train_seconds, 1),
        "history": history,
    }
    return model, result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus", help="path to tinyshakespeare.txt")
    ap.add_argument("--out", default="models/default", help="output directory")
    ap.add_argument("--recipes", default="150:0,300:0,300:0.1,600:0.1,600:0.2,1200:0.2,1200:0.3",
                    help="comma-separated STEPS:DROPOUT training recipes; each trains a fresh model from the "
                         "same seed, and the one with the lowest final validation loss is saved. Pass a single "
                         "recipe to reproduce a model directly.")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100, help="warmup steps (at most a tenth of the steps)")
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--evals", type=int, default=6, help="validation evaluations per recipe")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--val-frac", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--max-seconds", type=float, default=230.0,
                    help="training time budget over all recipes; a recipe that would not fit (judged by the "
                         "measured time per step) is skipped and recorded as such")
    ap.add_argument("--cpu", action="store_true", help="force CPU (smoke tests only)")
    args = ap.parse_args()

    t_start = time.time()
    seed_everything(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.use_deterministic_algorithms(True, warn_only=True)
    gpu_name = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    log(f"torch {torch.__version__}  transformers {transformers.__version__}  tokenizers {tokenizers.__version__}  device {gpu_name}")

    with open(args.corpus, encoding="utf-8") as f:
        text = f.read()
    split = int(len(text) * (1 - args.val_frac))
    train_text, val_text = text[:split], text[split:]
    log(f"corpus: {len(text)} chars; train {len(train_text)}, validation {len(val_text)} (last {args.val_frac:.0%})")

    # ---- tokenizer
    t0 = time.time()
    tok = train_tokenizer(train_text, args.vocab)
    vocab_size = tok.get_vocab_size()
    assert vocab_size == args.vocab, f"tokenizer vocab {vocab_size} != {args.vocab}"
    fast = wrap_tokenizer(tok)
    os.makedirs(args.out, exist_ok=True)
    save_tokenizer(fast, args.out)
    train_ids = torch.tensor(tok.encode(train_text).ids, dtype=torch.long)
    val_ids = torch.tensor(tok.encode(val_text).ids, dtype=torch.long)
    log(f"tokenizer: vocab {vocab_size}, trained in {time.time() - t0:.1f}s; "
        f"train {train_ids.numel()} tokens ({len(train_text) / train_ids.numel():.2f} chars/token), "
        f"validation {val_ids.numel()} tokens")

    # ---- model(s)
    config = make_config(vocab_size)
    probe = make_model(config)
    n_params = sum(p.numel() for p in probe.parameters())  # tied weights counted once
    n_params_nonembed = n_params - probe.get_input_embeddings().weight.numel()
    del probe
    log(f"model: Qwen3ForCausalLM, {n_params} parameters ({n_params_nonembed} excluding embeddings)")

    recipes = parse_recipes(args.recipes)
    results, best, best_state = [], None, None
    spent, sec_per_step = 0.0, None
    for steps, dropout in recipes:
        if sec_per_step is not None and spent + steps * sec_per_step * 1.1 > args.max_seconds:
            log(f"recipe {steps} steps, dropout {dropout}: skipped (time budget)")
            results.append({"steps": steps, "dropout": dropout, "skipped": "time budget"})
            continue
        log(f"recipe {steps} steps, dropout {dropout}:")
        model, res = train_one(args, config, train_ids, val_ids, device, steps, dropout)
        spent += res["train_wall_seconds"]
        sec_per_step = res["train_wall_seconds"] / steps
        results.append(res)
        if best is None or res["val_loss"] < best["val_loss"]:
            best = res
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    log(f"selected recipe: {best['steps']} steps, dropout {best['dropout']} (validation loss {best['val_loss']:.4f})")

    # ---- save the selected model in bf16
    model = make_model(config)
    model.load_state_dict(best_state)
    model = model.to(torch.bfloat16)
    model.generation_config = GenerationConfig(
        bos_token_id=0, eos_token_id=0, pad_token_id=0, do_sample=False, max_length=1024
    )
    try:
        model.save_pretrained(args.out, safe_serialization=True)
    except TypeError:
        model.save_pretrained(args.out)
    add_legacy_rope_keys(args.out)
    del model

    # ---- reload the saved bf16 checkpoint: validation loss and a sample
    m = load_model(args.out, torch.bfloat16).to(device).eval()
    val_bf16 = evaluate(m, val_ids, args.ctx, device)
    log(f"saved bf16 checkpoint: validation loss {val_bf16:.4f} nats/token")
    tk = AutoTokenizer.from_pretrained(args.out)
    enc = tk("ROMEO:", return_tensors="pt")
    with torch.no_grad():
        out = m.generate(
            input_ids=enc["input_ids"].to(device),
            attention_mask=enc["attention_mask"].to(device),
            max_new_tokens=64,
            do_sample=False,
        )
    sample = tk.decode(out[0], skip_special_tokens=False)
    sample_ids = out[0].tolist()
    log("sample (greedy, 64 new tokens, bf16 reloaded):\n----\n" + sample + "\n----")

    stats = {
        "model": "Qwen3ForCausalLM",
        "parameters": n_params,
        "parameters_excluding_embeddings": n_params_nonembed,
        "vocab_size": vocab_size,
        "steps": best["steps"],
        "dropout": best["dropout"],
        "batch_size": args.batch,
        "context": args.ctx,
        "tokens_seen": best["tokens_seen"],
        "epochs": best["epochs"],
        "train_tokens": train_ids.numel(),
        "val_tokens": val_ids.numel(),
        "optimizer": {"name": "AdamW", "lr": args.lr, "betas": [0.9, 0.95], "weight_decay": args.weight_decay,
                      "warmup_steps": best["warmup_steps"], "schedule": "cosine",
                      "min_lr_frac": args.min_lr_frac, "grad_clip": 1.0},
        "precision": "fp32 weights, bf16 autocast; saved as bf16",
        "seed": args.seed,
        "train_loss": best["train_loss"],
        "train_loss_note": "mean minibatch loss over the last evaluation interval (dropout active if any)",
        "train_sample_loss": best["train_sample_loss"],
        "train_sample_loss_note": "eval-mode loss on the first 3x(validation size) tokens of the training split",
        "val_loss": best["val_loss"],
        "val_loss_bf16_saved": round(val_bf16, 4),
        "val_loss_note": "mean cross-entropy, nats per token, over the whole held-out last 10% of the corpus "
                         "(fp32 weights; val_loss_bf16_saved is the saved bf16 checkpoint). The recipe was "
                         "selected on this split.",
        "history": best["history"],
        "train_wall_seconds": best["train_wall_seconds"],
        "recipes": results,
        "recipes_total_train_seconds": round(spent, 1),
        "script_wall_seconds": round(time.time() - t_start, 1),
        "sample_prompt": "ROMEO:",
        "sample_ids": sample_ids,
        "sample": sample,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
        "device": gpu_name,
    }
    with open(os.path.join(args.out, "training_stats.json"), "w") as f:
        json.dump(stats, f, indent=2, ensure_ascii=False)
        f.write("\n")
    log(f"wrote {args.out}: " + ", ".join(sorted(os.listdir(args.out))))
    log(json.dumps({k: stats[k] for k in ("parameters", "steps", "dropout", "tokens_seen", "train_loss",
                                          "val_loss", "val_loss_bf16_saved", "train_wall_seconds")}))


if __name__ == "__main__":
    sys.exit(main())
