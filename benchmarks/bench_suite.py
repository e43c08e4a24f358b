"""The one benchmark command: LayerDiff against its peers for 1, 2 and 3 foregrounds, side by side in one run.

For each foreground count it runs ``bench_layerdiff.py`` (the patched UNet vs the unpatched one on the same slots:
time, counted FLOPs, peak memory; SMG vs CFG vs ComfyUI's SAG node; the prompt enhancer's cost) and
``bench_training.py`` (one training step with and without gradient checkpointing: time, peak memory), each in its
own processes, and prints one table with a column per foreground count. Full SD1.5 architecture with random
weights; on CPU at 64x64 by default, on a GPU at 512x512 in fp16 (training in bf16 autocast).

    python benchmarks/bench_suite.py                                   # CPU, 64x64, ~15 minutes here
    python benchmarks/bench_suite.py --device cuda --resolution 512 --dtype fp16
    python benchmarks/bench_suite.py --device cuda --resolution 768 --dtype fp16 --no-training
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--foregrounds", default="1,2,3", help="comma-separated foreground counts")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--resolution", type=int, default=0, help="image side (default 64 on CPU, 512 on CUDA)")
    p.add_argument("--dtype", default="", choices=("", "fp32", "fp16", "bf16"), help="default fp32 CPU, fp16 CUDA")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=4, help="sampling steps of the CFG / SMG / SAG runs")
    p.add_argument("--training-steps", type=int, default=3)
    p.add_argument("--no-training", action="store_true")
    p.add_argument("--json", default="", help="also write every result to this file")
    return p.parse_args(argv)


def _run(script: str, args: list[str], json_path: str) -> dict:
    cmd = [sys.executable, os.path.join(HERE, script), *args, "--json", json_path]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{script} {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    with open(json_path, encoding="utf-8") as fh:
        return json.load(fh)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    resolution = args.resolution or (512 if device == "cuda" else 64)
    dtype = args.dtype or ("fp16" if device == "cuda" else "fp32")
    counts = [int(c) for c in args.foregrounds.split(",") if c.strip()]
    sizing = ["--device", device, "--resolution", str(resolution)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            print(f"foregrounds {n}: UNet, sampling, enhancer ...", flush=True)
            unet = _run("bench_layerdiff.py", sizing + ["--foregrounds", str(n), "--dtype", dtype, "--repeats",
                                                        str(args.repeats), "--steps", str(args.steps)],
                        os.path.join(tmp, f"unet{n}.json"))
            training = None
            if not args.no_training:
                print(f"foregrounds {n}: training steps ...", flush=True)
                training = _run("bench_training.py", sizing + ["--foregrounds", str(n), "--steps",
                                                               str(args.training_steps), "--settings",
                                                               "plain,checkpointing"],
                                os.path.join(tmp, f"train{n}.json"))
            results[n] = {"unet": unet, "training": training}
    first = results[counts[0]]["unet"]
    print(f"\nLayerDiff benchmark suite: {device}, {dtype}, {resolution}x{resolution}, batch 1, "
          f"{args.steps} sampling steps, median of {args.repeats} interleaved repeats")
    print(f"parameters: SD1.5 UNet {first['unet_params'] / 1e6:.1f}M; LayerDiff modules "
          f"{first['module_params'] / 1e6:.1f}M (enhancer {first['enhancer_params'] / 1e6:.1f}M) = "
          f"{first['module_params'] * 2 / 2**20:.0f} MiB extra in fp16 (the modules are sized for up to 3 "
          f"foregrounds whatever the count used)")
    header = f"{'metric: baseline -> LayerDiff (ratio)':56s}" + "".join(f"{f'{n} foreground(s)':>27s}" for n in counts)
    print(header)
    metrics = [r["metric"] for r in first["results"]]
    for metric in metrics:
        cells = []
        for n in counts:
            row = next((r for r in results[n]["unet"]["results"] if r["metric"] == metric), None)
            cells.append(f"{row['baseline']:9.4g} -> {row['layerdiff']:<9.4g}{row['ratio']:6.3f}x" if row
                         else f"{'n/a':>27s}")
        print(f"{metric:56s}" + "".join(cells))
    if not args.no_training:
        gib = 1024 ** 3
        for setting, label in (("plain", "training step, checkpointing off"),
                               ("checkpointing", "training step, checkpointing on")):
            for what, key, scale, unit in (("s/step", "seconds_per_step", 1, ""),
                                           ("peak GiB", "peak_gpu_bytes" if device == "cuda" else "peak_rss_bytes",
                                            gib, "")):
                cells = []
                for n in counts:
                    row = next(r for r in results[n]["training"]["results"] if r["setting"] == setting)
                    cells.append(f"{row[key] / scale:27.2f}{unit}")
                print(f"{label + ' (' + what + ')':56s}" + "".join(cells))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"device": device, "dtype": dtype, "resolution": resolution,
                       "results": {str(k): v for k, v in results.items()}}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
