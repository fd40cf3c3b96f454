"""PyTorch SDPA timing at the shapes of crates/spt-ops/examples/gpu_bench.rs, for comparison.

B=1, H=16, d=64, causal, L in {1024, 4096, 16384}; forward and forward+backward, f32 (the dtype
of the spt kernels) and bf16 (flash attention). Median of CUDA-event timings after warm-up.
Usage: python3 sdpa_bench.py OUT_DIR   -> OUT_DIR/sdpa.json
"""
import json
import os
import sys

import torch
import torch.nn.functional as F


def timed(fn, reps=5, warm=2):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "."
    os.makedirs(out_dir, exist_ok=True)
    dev = "cuda"
    cases = []
    for dtype in (torch.float32, torch.bfloat16):
        for L in (1024, 4096, 16384):
            torch.manual_seed(0)
            q, k, v = (torch.randn(1, 16, L, 64, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
            w = torch.randn(1, 16, L, 64, device=dev, dtype=dtype)

            def fwd():
                with torch.no_grad():
                    F.scaled_dot_product_attention(q, k, v, is_causal=True)

            def step():
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                (o * w).sum().backward()
                q.grad = k.grad = v.grad = None

            case = {"B": 1, "H": 16, "L": L, "d": 64, "causal": True, "dtype": str(dtype).replace("torch.", "")}
            try:
                case["fwd_ms"] = timed(fwd)
                case["fwd_bwd_ms"] = timed(step)
            except RuntimeError as e:  # e.g. out of memory
                case["error"] = str(e)[:300]
            print(case, flush=True)
            cases.append(case)
    res = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0), "cases": cases}
    with open(os.path.join(out_dir, "sdpa.json"), "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
