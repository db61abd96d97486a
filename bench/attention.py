#!/usr/bin/env python3
"""Attention benchmark: detinfer's CUDA kernels against PyTorch's scaled_dot_product_attention.

Runs the C++ harness (csrc/dev/attention.cu: validation, then decode and prefill timings through
detinfer's ops over a paged cache, and a device-to-device copy as the bandwidth ceiling), then
times torch.nn.functional.scaled_dot_product_attention on the same shapes with contiguous K/V
[batch, kv_heads, context, D] and enable_gqa=True, prints one table and writes
bench/results/attention.json.

    python3 bench/attention.py [--harness build/dev/dev_attention] [--out bench/results/attention.json]

Timing on both sides: CUDA events around each call, a sleep kernel before the start event so the
host runs ahead, medians, inputs rotated over copies larger than L2 where memory allows.
"""
import argparse
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

HEADS, KV_HEADS, DIM = 32, 8, 128


def median_ms(fn, iters):
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for i in range(3):
        fn(i)
    times = []
    for i in range(iters):
        torch.cuda._sleep(100_000)
        start.record()
        fn(i)
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    times.sort()
    return times[len(times) // 2]


def rotations(nbytes, cap=64):
    return int(min(cap, max(1, -(-int(1e9) // int(nbytes)))))


def torch_decode(batch, context):
    kv_bytes = 2 * batch * context * KV_HEADS * DIM * 2
    rot = rotations(kv_bytes)
    q = torch.randn(batch, HEADS, 1, DIM, device="cuda", dtype=torch.bfloat16)
    ks = [torch.rand(batch, KV_HEADS, context, DIM, device="cuda", dtype=torch.bfloat16) * 2 - 1 for _ in range(rot)]
    vs = [torch.rand(batch, KV_HEADS, context, DIM, device="cuda", dtype=torch.bfloat16) * 2 - 1 for _ in range(rot)]
    ms = median_ms(lambda i: F.scaled_dot_product_attention(q, ks[i % rot], vs[i % rot], enable_gqa=True), 40)
    del ks, vs
    torch.cuda.empty_cache()
    return ms, kv_bytes / (ms * 1e-3) / 1e9


def torch_prefill(tokens, dim):
    rot = min(rotations(2 * tokens * KV_HEADS * dim * 2), 8)
    qs = [torch.randn(1, HEADS, tokens, dim, device="cuda", dtype=torch.bfloat16) for _ in range(rot)]
    ks = [torch.rand(1, KV_HEADS, tokens, dim, device="cuda", dtype=torch.bfloat16) * 2 - 1 for _ in range(rot)]
    vs = [torch.rand(1, KV_HEADS, tokens, dim, device="cuda", dtype=torch.bfloat16) * 2 - 1 for _ in range(rot)]
    fn = lambda i: F.scaled_dot_product_attention(qs[i % rot], ks[i % rot], vs[i % rot], is_causal=True, enable_gqa=True)
    ms = median_ms(fn, 7 if tokens >= 16384 else 20)
    flops = 4.0 * HEADS * dim * tokens * (tokens + 1) / 2
    del qs, ks, vs
    torch.cuda.empty_cache()
    return ms, flops / (ms * 1e-3) / 1e12


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--harness", default="build/dev/dev_attention")
    ap.add_argument("--out", default="bench/results/attention.json")
    args = ap.parse_args()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)

    kernels_json = os.path.join(os.path.dirname(args.out), "attention_kernels.json")
    run = subprocess.run([args.harness, "--json", kernels_json], capture_output=True, text=True)
    print(run.stdout, end="")
    if run.returncode not in (0, 2):
        print(run.stderr, file=sys.stderr)
        sys.exit(f"harness failed with exit code {run.returncode}")
    with open(kernels_json) as f:
        ours = json.load(f)

    copy = ours["copy_gbps"]
    rows_dec, rows_pre = [], []
    for r in ours["decode"]:
        ms, gbps = torch_decode(r["batch"], r["context"])
        rows_dec.append({**r, "frac_copy": r["kv_gbps"] / copy, "torch_ms": ms, "torch_kv_gbps": gbps,
                         "speedup_vs_torch": ms / r["ms"]})
    torch_pre = {}
    for r in ours["prefill"]:
        key = (r["tokens"], r["dim"])
        if key not in torch_pre:
            torch_pre[key] = torch_prefill(*key)
        ms, tflops = torch_pre[key]
        rows_pre.append({**r, "torch_ms": ms, "torch_tflops": tflops, "speedup_vs_torch": ms / r["ms"]})

    result = {
        "device": ours["device"], "torch": torch.__version__, "validation_passed": ours["validation_passed"],
        "copy_gbps": copy, "shape": ours["shape"],
        "torch_layout": "contiguous K/V [batch, kv_heads, context, D], enable_gqa=True",
        "decode": rows_dec, "prefill": rows_pre,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)

    print(f"\nattention on {ours['device']}, {HEADS} heads / {KV_HEADS} kv heads, D={DIM}; torch {torch.__version__} SDPA "
          f"(contiguous K/V, enable_gqa); copy ceiling {copy:.0f} GB/s; validation "
          f"{'passed' if ours['validation_passed'] else 'FAILED'}")
    print(f"\n{'decode':>8} {'context':>8} {'us':>9} {'KV GB/s':>9} {'of copy':>8} {'torch us':>9} {'torch GB/s':>10} {'x torch':>8}")
    for r in rows_dec:
        print(f"{r['batch']:>8} {r['context']:>8} {r['ms']*1e3:>9.1f} {r['kv_gbps']:>9.0f} {100*r['frac_copy']:>7.0f}% "
              f"{r['torch_ms']*1e3:>9.1f} {r['torch_kv_gbps']:>10.0f} {r['speedup_vs_torch']:>8.2f}")
    print(f"\n{'prefill':>8} {'D':>4} {'kernel':>9} {'us':>9} {'TFLOP/s':>9} {'torch us':>9} {'torch TF/s':>10} {'x torch':>8}")
    for r in rows_pre:
        print(f"{r['tokens']:>8} {r['dim']:>4} {r['kernel']:>9} {r['ms']*1e3:>9.1f} {r['tflops']:>9.1f} {r['torch_ms']*1e3:>9.1f} "
              f"{r['torch_tflops']:>10.1f} {r['speedup_vs_torch']:>8.2f}")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
