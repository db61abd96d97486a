# PyTorch's token choice on the same shapes as csrc/dev/sampling.cu's bench: logits f32
# [rows, 151936], the usual eager recipes (argmax; softmax + multinomial; topk + softmax +
# multinomial; sort + cumsum top-p + multinomial), CUDA-event medians over rotating inputs.
# Usage: python3 bench/torch_sampling.py OUT.json
import json
import sys

import torch

V = 151936


def greedy(x):
    ids = torch.argmax(x, dim=-1)
    return ids, torch.log_softmax(x, dim=-1).gather(1, ids[:, None])


def temperature(x, t=0.7):
    return torch.multinomial(torch.softmax(x / t, dim=-1), 1)


def top_k(x, k=50, t=0.7):
    v, i = torch.topk(x / t, k, dim=-1)
    return i.gather(1, torch.multinomial(torch.softmax(v, dim=-1), 1))


def top_p(x, p=0.9, t=0.7):
    v, i = torch.sort(x / t, dim=-1, descending=True)
    probs = torch.softmax(v, dim=-1)
    cum = torch.cumsum(probs, dim=-1)
    probs = probs.masked_fill(cum - probs > p, 0.0)
    return i.gather(1, torch.multinomial(probs, 1))


def top_p_logprobs(x, p=0.9, t=0.7):
    ids = top_p(x, p, t)
    lp = torch.log_softmax(x, dim=-1)
    return ids, lp.gather(1, ids), torch.topk(lp, 20, dim=-1)


CASES = [("greedy", greedy), ("temperature 0.7", temperature), ("top-k 50", top_k), ("top-p 0.9", top_p),
         ("top-p 0.9 + 20 top", top_p_logprobs)]


def main():
    out = sys.argv[1]
    torch.manual_seed(0)
    results = []
    for rows in (1, 8, 64, 256):
        xs = [torch.randn(rows, V, device="cuda") for _ in range(4)]
        for name, fn in CASES:
            for i in range(5):
                fn(xs[i % 4])
            times = []
            for i in range(40):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn(xs[i % 4])
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) * 1000)
            times.sort()
            results.append({"rows": rows, "choice": name, "us": times[len(times) // 2]})
            print(f"torch {rows:5d}  {name:32s} {times[len(times) // 2]:10.1f}", flush=True)
    with open(out, "w") as f:
        json.dump({"vocab": V, "torch": torch.__version__, "results": results}, f, indent=1)


main()
