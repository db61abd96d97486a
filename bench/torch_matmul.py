#!/usr/bin/env python3
"""PyTorch's bf16 matmul on the shapes of bench/matmul.mjs, timed the same way as our kernels.

out[M,N] = a[M,K] @ w[N,K]^T (torch.nn.functional.linear, bf16 in and out), median of per-call
CUDA-event times over inputs rotated through a pool larger than L2, and the bf16 8192^3 matmul
ceiling. Usage: python3 bench/torch_matmul.py OUT.json
"""
import json
import sys

import torch
import torch.nn.functional as F

# 8B-class shapes, then Qwen3-0.6B's decode products (q|k|v, o, gate|up, down) at small M only.
SHAPES = [(4096, 4096), (12288, 4096), (4096, 12288), (151936, 1024), (4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072)]
MS = [1, 8, 32, 128, 512, 4096]
DECODE_MS = [1, 8, 16, 64]


def median_us(call, iters):
    for i in range(3):
        call(i)
    torch.cuda.synchronize()
    times = []
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for i in range(iters):
        start.record()
        call(i)
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1e3)
    times.sort()
    return times[len(times) // 2]


def main():
    out_path = sys.argv[1] if len(sys.argv) > 1 else "torch_matmul.json"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    dev = torch.device("cuda")
    # Ceiling: bf16 8192^3.
    s = 8192
    a = torch.randn(s, s, device=dev, dtype=torch.bfloat16)
    b = torch.randn(s, s, device=dev, dtype=torch.bfloat16)
    us = median_us(lambda i: torch.matmul(a, b), 20)
    peak = 2 * s**3 / us / 1e6
    print(f"torch bf16 8192^3: {us:.1f} us, {peak:.1f} TFLOP/s", flush=True)
    del a, b
    results = []
    for n, k in SHAPES:
        w_bytes = n * k * 2
        pool = max(2, (400 << 20) // w_bytes + 1)
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.05 for _ in range(pool)]
        for m in (DECODE_MS if n * k <= 4096 * 4096 // 2 else MS):
            xs = [torch.randn(m, k, device=dev, dtype=torch.bfloat16) for _ in range(pool)]
            iters = 20 if m * n * k > (1 << 36) else 50
            us = median_us(lambda i: F.linear(xs[i % pool], ws[i % pool]), iters)
            tflops = 2 * m * n * k / us / 1e6
            gbs = w_bytes / us / 1e3
            print(f"torch N={n:6d} K={k:6d} M={m:5d}: {us:9.1f} us {tflops:7.1f} TFLOP/s weights {gbs:7.1f} GB/s", flush=True)
            results.append({"N": n, "K": k, "M": m, "us": us, "tflops": tflops, "weight_gbs": gbs})
            del xs
        del ws
        torch.cuda.empty_cache()
    with open(out_path, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "peak_tflops": peak,
                   "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
