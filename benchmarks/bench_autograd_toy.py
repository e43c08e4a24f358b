"""Step time of toy base-model training with the two ways of surviving in-place residuals (2024 ComfyUI).

The 2024 host's transformer blocks add attention outputs in place into tensors their norms saved for backward. By
default the training model hands norm1/norm2 a copy of their input; ``use_mutation_safe_autograd()`` switches it to
``torch.autograd.graph.allow_mutation_on_saved_tensors`` instead (the automatic fallback). This times both, side by
side and alternating, on the toy shapes UNet (base-model training on composites, cached encoders, caches warmed
first), e.g. after ``python scripts/shapes_benchmark.py --run-dir runs/shapes_v2 --stages data,vae``:

    python benchmarks/bench_autograd_toy.py --checkpoint runs/shapes_v2/toy_init.safetensors \\
        --data runs/shapes_v2/data/train
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

# the repository root, for comfy_headless, layerdiff_toy and scripts (the one sys.path line; README "Code map")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from comfy_headless import boot as headless  # noqa: E402
from comfy_headless.product import product_module  # noqa: E402
from layerdiff_toy import toy_model  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="toy SD1.5 checkpoint (the shapes benchmark's toy_init)")
    p.add_argument("--data", required=True, help="shapes training dataset folder")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=50, help="timed steps per run")
    p.add_argument("--rounds", type=int, default=2, help="alternating runs per setting")
    args = p.parse_args(argv)

    headless.boot()
    toy_model.register_toy_sd15()
    adapter = product_module("nodes.host.training")
    config_mod = product_module("layerdiff_model.training.config")
    training = product_module("layerdiff_model.training.loop")
    cache = adapter.EncoderOutputCache()  # shared by the runs, as the process-wide cache was
    warm_steps = -(-1000 // args.batch) + 5  # one epoch of the 1000-sample dataset fills the caches
    print(f"toy base-model training, batch {args.batch}, cached encoders, {args.steps} timed steps per run")
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for setting in ("norm input copies", "allow_mutation_on_saved_tensors"):
                config = config_mod.as_config(dict(
                    checkpoint=args.checkpoint, data=args.data, out=os.path.join(tmp, "out.safetensors"),
                    run_dir=os.path.join(tmp, f"run{round_}{setting[0]}"), resolution=64, batch_size=args.batch,
                    steps=warm_steps + args.steps, lr=5e-4, train="unet", composites=True, toy_model=True,
                    progress=False, threads=2, checkpoint_every=0, log_every=10**6, cache_latents=True,
                    cache_text=True))
                model = adapter.ComfyTrainingModel(config, cache=cache)
                if setting.startswith("allow"):
                    model.use_mutation_safe_autograd()
                trainer = training.Trainer(config, model)
                batches = iter(trainer.stream)
                for _ in range(warm_steps):
                    trainer.micro_step(next(batches))
                    trainer.optimizer.zero_grad(set_to_none=True)
                start = time.perf_counter()
                for _ in range(args.steps):
                    trainer.micro_step(next(batches))
                    trainer.optimizer_step()
                print(f"  round {round_ + 1}, {setting}: {(time.perf_counter() - start) / args.steps:.3f} s/step",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
