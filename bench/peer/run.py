"""Entry point of the PyTorch peer benchmarks (scripts/peer-bench.sh runs it in .venv-peer/).

Adds PyTorch's figures, measured now, to the records of our result files:

    python3 bench/peer/run.py [--results DIR] [--quick] attention ffn steps layers generate predict

- attention -> DIR/attention.json, ffn -> DIR/ffn.json (bench/peer/ops.py);
- layers -> DIR/lora-linear.json, DIR/linear-cross-entropy.json and DIR/norm-activation.json
  (bench/peer/layers.py);
- steps -> DIR/finetune-speed.json and DIR/finetune-speed-accuracy-setting.json
  (bench/peer/steps.py);
- generate -> DIR/generate.json (bench/peer/generate.py);
- predict -> DIR/predict.json (bench/peer/predict.py).

`--quick` measures small shapes instead of the records' (attention L <= 256, FFN 256 tokens,
steps B <= 2, L <= 64, 2 steps, layers 64 rows and a 1000-token vocabulary, generation 2 layers
and 16 new tokens, inference 2 batches once): for checking the pipeline; point --results at a copy, since
the figures are not those of the records' shapes.
"""
import argparse
import os

from common import ROOT, setup_torch

STEP_FILES = ("finetune-speed.json", "finetune-speed-accuracy-setting.json", "finetune-speed-bf16.json")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("parts", nargs="+", choices=("attention", "ffn", "steps", "layers", "generate", "predict"))
    ap.add_argument("--results", default=os.path.join(ROOT, "bench", "results"),
                    help="folder of the result files to update in place")
    ap.add_argument("--quick", action="store_true", help="small shapes (pipeline check)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch = setup_torch()
    print(f"peer: torch {torch.__version__}, {torch.get_num_threads()} threads"
          + (", quick shapes" if args.quick else ""), flush=True)
    for part in args.parts:
        if part in ("attention", "ffn"):
            import ops

            path = os.path.join(args.results, f"{part}.json")
            (ops.bench_attention if part == "attention" else ops.bench_ffn)(torch, path, args.quick)
        elif part == "layers":
            import layers

            layers.bench_layers(torch, args.results, args.quick)
        elif part == "generate":
            import generate

            generate.bench_generate(torch, os.path.join(args.results, "generate.json"), args.quick)
        elif part == "predict":
            import predict

            predict.bench_predict(torch, os.path.join(args.results, "predict.json"), args.quick)
        else:
            import steps

            paths = [os.path.join(args.results, f) for f in STEP_FILES
                     if os.path.exists(os.path.join(args.results, f))]
            steps.bench_steps(torch, paths, args.quick)
        print(f"peer: {part} done", flush=True)


if __name__ == "__main__":
    main()
