"""Training throughput and peak memory of LayerDiff on the full SD1.5 architecture, with and without gradient
checkpointing, and with the allow_mutation_on_saved_tensors fallback (docs/TRAINING.md) instead of norm copies.

Random weights (no checkpoint needed): ComfyUI's own SD1.5 UNet (model_channels 320) with full-size LayerDiff
modules (max 3 foregrounds, enhancer at CLIP width), patched by the same adapter and trained through the same
``ComfyTrainingModel.predict_noise`` path as scripts/train_layerdiff.py. Latents and prompt embeddings are random
tensors (VAE and text encoder are frozen and outside the timed step). A step = sample timesteps and noise, forward,
epsilon MSE, backward, AdamW on the modules. Each setting runs in its own process so peak memory is its own:
CUDA ``max_memory_allocated``; on CPU the process's peak RSS (VmHWM, reset after the model is built) and the
growth over the RSS before the first step.

    python benchmarks/bench_training.py                          # CPU: 64x64, 2 foregrounds, batch 1
    python benchmarks/bench_training.py --device cuda            # GPU: 512x512, 2 foregrounds, batch 1
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

# the repository root, for comfy_headless, layerdiff_toy and scripts (the one sys.path line; README "Code map")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import process_memory  # noqa: E402  (next to this file)
from comfy_headless.product import product_module, product_names  # noqa: E402

SETTINGS = {"plain": "gradient checkpointing off", "checkpointing": "gradient checkpointing on ",
            "mutation-safe": "off, allow_mutation_on_saved_tensors"}  # name -> label in the printed table


def parse_args(argv=None):
    from bench_layerdiff import add_model_size_options

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_size_options(p, "layered samples per step")
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    p.add_argument("--mixed-precision", default="", choices=("", "no", "fp16", "bf16"),
                   help="autocast (default: bf16 on CUDA, none on CPU)")
    p.add_argument("--attention", default="host", choices=("host", "pytorch"),
                   help="UNet attention: 'host' = what ComfyUI picks for the device (sub-quadratic chunks on CPU, "
                        "PyTorch SDPA on CUDA); 'pytorch' = ComfyUI's SDPA path on any device (on CPU: the "
                        "activation memory a CUDA run has, at CPU speed)")
    p.add_argument("--settings", default=",".join(SETTINGS),
                   help="comma-separated settings to run, each in its own process")
    p.add_argument("--json", default="", help="also write the results to this file")
    p.add_argument("--worker", default="", choices=("", *SETTINGS),
                   help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(args, device: str, resolution: int, mixed: str) -> dict:
    import torch

    from bench_layerdiff import boot, build_sd15, conditioning

    boot(device)
    if args.attention == "pytorch":
        import comfy.ldm.modules.attention as host_attention

        host_attention.optimized_attention = host_attention.optimized_attention_masked = \
            host_attention.attention_pytorch
    adapter = product_module("nodes.host.inference")
    layers_cls = product_names("layerdiff_model.sampling.conditioning", "LayerPrompts")
    training = product_module("nodes.host.training")
    config_mod = product_module("layerdiff_model.training.config")
    train_loop = product_module("layerdiff_model.training.loop")

    base = build_sd15(device, torch.float32)
    config = config_mod.as_config(dict(checkpoint="random", data="-", out="-", run_dir="-", resolution=resolution,
                                       grad_checkpointing=args.worker == "checkpointing", mixed_precision=mixed,
                                       max_foregrounds=max(3, args.foregrounds)))
    model = training.ComfyTrainingModel(config, parts=(base, None, None))
    if args.worker == "mutation-safe":  # the fallback for hosts that mutate saved tensors
        model.use_mutation_safe_autograd()
    params = [p for _, p in model.trainable_parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    n, size = args.foregrounds, resolution // 8
    rows = args.batch * (2 * n + 1)
    conds = [conditioning(adapter, layers_cls, n, device, seed=i) for i in range(args.batch)]
    for c in conds:
        c[0][0] = c[0][0].to(device)
    latents = torch.randn(rows, 4, size, size, device=device)
    gen = torch.Generator().manual_seed(0)

    def step():
        t = torch.randint(0, 1000, (args.batch,), generator=gen).repeat_interleave(2 * n + 1).to(device)
        noise = torch.randn(latents.shape, generator=gen).to(device)
        with model.autograd_context():
            with train_loop.autocast_context(config, model.device):
                pred = model.predict_noise(model.noise_latents(latents, noise, t), t, conds)
            loss = torch.nn.functional.mse_loss(pred.float(), noise)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up (allocates optimizer state)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = process_memory.rss()
    process_memory.reset_peak_rss()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]
    result = {"setting": args.worker, "seconds_per_step": seconds, "samples_per_s": args.batch / seconds,
              "trainable_params": sum(p.numel() for p in params)}
    if device == "cuda":
        result["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    else:
        result["peak_rss_bytes"] = process_memory.peak_rss()
        result["rss_growth_bytes"] = result["peak_rss_bytes"] - rss_before
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    resolution = args.resolution or (512 if device == "cuda" else 64)
    mixed = args.mixed_precision or ("bf16" if device == "cuda" else "no")
    if args.worker:
        print(json.dumps(worker(args, device, resolution, mixed)))
        return 0
    results = []
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    if not settings or set(settings) - set(SETTINGS):
        raise SystemExit(f"bench_training.py: --settings {args.settings!r}: choose from {', '.join(SETTINGS)}")
    for setting in settings:
        cmd = [sys.executable, os.path.abspath(__file__), "--device", device, "--resolution", str(resolution),
               "--foregrounds", str(args.foregrounds), "--batch", str(args.batch), "--steps", str(args.steps),
               "--mixed-precision", mixed, "--attention", args.attention, "--worker", setting]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    gib = 1024 ** 3
    print(f"LayerDiff training, SD1.5 architecture (random weights), {device}, torch threads "
          f"{torch.get_num_threads()}, {resolution}x{resolution}, {args.foregrounds} foregrounds "
          f"({2 * args.foregrounds + 1} slots), batch {args.batch}, autocast {mixed}, attention {args.attention}, "
          f"{results[0]['trainable_params'] / 1e6:.1f}M trained parameters (modules), median of {args.steps} steps")
    for r in results:
        memory = (f"peak GPU memory {r['peak_gpu_bytes'] / gib:.2f} GiB" if "peak_gpu_bytes" in r else
                  f"peak RSS {r['peak_rss_bytes'] / gib:.2f} GiB (+{r['rss_growth_bytes'] / gib:.2f} GiB during steps)")
        print(f"  {SETTINGS[r['setting']]}: {r['samples_per_s']:.3f} samples/s ({r['seconds_per_step']:.2f} s/step), {memory}")
    if args.json:
        atomic_write = product_names("layerdiff_model.atomic_file", "atomic_write")

        report = {"device": device, "resolution": resolution, "attention": args.attention, "results": results}
        atomic_write(args.json, lambda fh: fh.write(json.dumps(report, indent=1).encode()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
