"""Speed and memory of LayerDiff against plain SD1.5, measured side by side in one run.

Targets (foundation issue): on the same batch of slots the patched UNet with trained-size modules costs at most
1.15x the time and 1.10x the peak memory of the unpatched SD1.5 UNet; SMG sampling costs at most 1.5x CFG sampling.

The SD1.5 UNet is ComfyUI's own (real architecture, random weights: no checkpoint needed), run through
ComfyUI's ModelPatcher and samplers. Repetitions are interleaved (A B A B ...) and medians reported, so load from
other processes hits both sides alike. CPU peak memory is not measured (no reliable per-call allocator statistic
on CPU); CUDA peak memory is ``torch.cuda.max_memory_allocated`` per call. On CPU (Linux) peak memory is the
process high-water mark (VmHWM, reset through /proc/self/clear_refs after the model is built) during one forward,
measured in two child processes that each hold only one side (SD1.5 alone, or SD1.5 + LayerDiff modules), so it
includes the weights, the activations and the Python/torch runtime.

    python benchmarks/bench_layerdiff.py                       # CPU, 64x64, 2 foregrounds
    python benchmarks/bench_layerdiff.py --device cuda --resolution 512 --dtype fp16
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

# the repository root, for comfy_headless, layerdiff_toy and scripts (the one sys.path line; README "Code map")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import process_memory  # noqa: E402  (next to this file)
from comfy_headless import boot as headless  # noqa: E402
from comfy_headless.product import product_module  # noqa: E402
from layerdiff_toy import toy_model  # noqa: E402

SD15_YAML = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4], "num_heads": 8,
    "transformer_depth": 1, "context_dim": 768, "use_spatial_transformer": True, "use_linear_in_transformer": False,
    "legacy": False, "adm_in_channels": None, "use_temporal_attention": False, "use_temporal_resblock": False,
}


def add_model_size_options(p: argparse.ArgumentParser, batch_help: str) -> None:
    """--device, --resolution, --foregrounds and --batch: what every benchmark here is sized by."""
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--resolution", type=int, default=0, help="image side (default 64 on CPU, 512 on CUDA)")
    p.add_argument("--foregrounds", type=int, default=2)
    p.add_argument("--batch", type=int, default=1, help=batch_help)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_size_options(p, "layered samples per batch")
    p.add_argument("--steps", type=int, default=4, help="sampling steps for the CFG/SMG comparison")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--no-sampling", action="store_true", help="only the UNet forward time and memory")
    p.add_argument("--json", default="", help="also write the results to this file")
    p.add_argument("--memory-side", default="", choices=("", "sd15", "layerdiff"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def boot(device: str) -> None:
    """Boot ComfyUI headless on ``device`` ("cpu" or "cuda")."""
    headless.boot(cpu=device != "cuda")


def build_sd15(device, dtype):
    import comfy.model_patcher
    import comfy.supported_models
    import torch

    model_config = comfy.supported_models.SD15(toy_model.toy_unet_config(SD15_YAML))
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, device=device)
    toy_model.init_weights_(model.diffusion_model, toy_model.DEFAULT_SEED, 0.02)
    model.diffusion_model.to(device=device, dtype=dtype)
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device(device),
                                            offload_device=torch.device(device))


def conditioning(adapter, layer_prompts_cls, n, device, seed):
    import torch
    g = torch.Generator().manual_seed(seed)
    glob = torch.randn(1, 77, 768, generator=g)
    embeds = tuple(torch.randn(1, 77, 768, generator=g) for _ in range(n + 1))
    return [adapter.layered_entry(glob, {}, layer_prompts_cls(tuple(f"p{i}" for i in range(n + 1)), embeds))]


def timed(fn, device):
    import torch
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return elapsed, peak


def counted_flops(fn) -> int:
    """Floating-point operations of one call (matmuls, convolutions, attention), counted by torch's
    FlopCounterMode: independent of machine load, unlike the times."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def interleaved(fns: dict, repeats: int, device: str) -> dict:
    results = {k: {"time": [], "peak": []} for k in fns}
    for k, fn in fns.items():  # warm-up
        fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            t, peak = timed(fn, device)
            results[k]["time"].append(t)
            results[k]["peak"].append(peak)
    return {k: {"time": statistics.median(v["time"]),
                "peak": max(v["peak"]) if v["peak"][0] is not None else None} for k, v in results.items()}


def core_sag(model):
    """``model`` through ComfyUI's own Self-Attention Guidance node (scale 0.5, blur 2), or None when absent."""
    import nodes

    sag = nodes.NODE_CLASS_MAPPINGS.get("SelfAttentionGuidance")
    return None if sag is None else sag().patch(model, 0.5, 2.0)[0]


def _child_peak_rss(argv, side: str) -> int:
    import subprocess
    cmd = [sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:]),
           "--memory-side", side]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss"]


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    resolution = args.resolution or (512 if device == "cuda" else 64)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    boot(device)
    import comfy.model_management
    import comfy.sample
    adapter = product_module("nodes.host.inference")
    conditioning_mod = product_module("layerdiff_model.sampling.conditioning")

    base = build_sd15(device, dtype)
    modules = patched = None
    if args.memory_side != "sd15":  # the SD1.5-only memory child must not hold the modules
        modules = adapter.build_modules(adapter.config_for_model(base, max_foregrounds=max(3, args.foregrounds)),
                                        seed=1, zero_outputs=False)
        modules.to(device)
        patched = adapter.apply_patch(base, modules, "benchmark")
    n = args.foregrounds
    rows = args.batch * (2 * n + 1)
    h = w = resolution // 8
    pos = conditioning(adapter, conditioning_mod.LayerPrompts, n, device, 1)
    neg = conditioning(adapter, conditioning_mod.LayerPrompts, n, device, 2)
    x = torch.randn(rows, 4, h, w, generator=torch.Generator().manual_seed(0)).to(device)
    latent = torch.zeros(rows, 4, h, w)
    noise = torch.randn(rows, 4, h, w, generator=torch.Generator().manual_seed(3))
    sigma = torch.full((rows,), 5.0, device=device)
    plain = [[pos[0][0], {}]]  # the global prompt only: what the unpatched UNet reads

    def unet(model, layered):
        """One positive UNet pass through the adapter's cond pipeline (as training runs it)."""
        comfy.model_management.load_models_gpu([model])
        conds = [pos if layered else plain] * args.batch

        def run():
            with torch.inference_mode():
                adapter.apply_model_with_conds(model, x, sigma, conds, "benchmark")
        return run

    def sampling(model):
        def run():
            comfy.sample.sample(model, noise, args.steps, 7.0, "euler", "normal", pos, neg, latent, seed=0,
                                disable_pbar=True)
        return run

    if args.memory_side:  # child process: one side only, report the peak of one forward
        model, layered = (base, False) if args.memory_side == "sd15" else (patched, True)
        run = unet(model, layered)
        run()
        process_memory.reset_peak_rss()
        run()
        print(json.dumps({"peak_rss": process_memory.peak_rss()}))
        return 0

    # UNet forward: unpatched vs patched. load_models_gpu switches which clone is patched in, so time each
    # side in its own interleaved block of calls.
    forward = {}
    for _ in range(args.repeats):
        for key, model, layered in (("sd15", base, False), ("layerdiff", patched, True)):
            run = unet(model, layered)
            run()
            t, peak = timed(run, device)
            forward.setdefault(key, {"time": [], "peak": []})
            forward[key]["time"].append(t)
            forward[key]["peak"].append(peak)
    forward = {k: {"time": statistics.median(v["time"]), "peak": v["peak"][0] and max(v["peak"])}
               for k, v in forward.items()}

    prompt_kv = adapter.patch_state(patched, "benchmark").prompt_kv
    flops = {"sd15": counted_flops(unet(base, False))}
    prompt_kv.clear()  # first step of a run: the layer prompts' keys/values are projected
    flops["layerdiff_first"] = counted_flops(unet(patched, True))
    flops["layerdiff"] = counted_flops(unet(patched, True))  # later steps reuse them
    if device == "cpu" and process_memory.reset_peak_rss():
        for key in ("sd15", "layerdiff"):
            forward[key]["peak"] = _child_peak_rss(argv, key)

    smg_every = adapter.with_self_mask_guidance(patched, 0.5, 0.0, 2.0, "benchmark")
    smg_default = adapter.with_self_mask_guidance(patched, 0.5, 0.2, 2.0, "benchmark")
    nothing = {"time": None, "peak": None}
    sample_times = {"cfg": nothing, "smg_every_step": nothing, "smg_default_warmup": nothing, "sag": nothing}
    if not args.no_sampling:
        samplers = {"cfg": sampling(patched), "smg_every_step": sampling(smg_every),
                    "smg_default_warmup": sampling(smg_default)}
        sag = core_sag(patched)
        if sag is not None:
            samplers["sag"] = sampling(sag)
        sample_times.update(interleaved(samplers, max(2, args.repeats // 2), device))
        flops.update({f"sampling_{k}": counted_flops(fn) for k, fn in samplers.items()})

    # the layer prompt enhancer runs once per sampling run, on the conditioning (LayerDiff Enhance Layer Prompts)
    def enhance_once():
        with torch.inference_mode():
            adapter.enhance(pos, modules, "benchmark")
            adapter.enhance(neg, modules, "benchmark")
    enhance_once()
    enhancer_time = statistics.median(timed(enhance_once, device)[0] for _ in range(args.repeats))
    flops["enhancer"] = counted_flops(enhance_once)

    unet_params = sum(p.numel() for p in base.model.diffusion_model.parameters())
    module_params = sum(p.numel() for p in modules.parameters())
    enhancer_params = sum(p.numel() for p in modules.enhancer.parameters()) if modules.enhancer is not None else 0
    rows_out = [
        ("UNet forward time (s)", forward["sd15"]["time"], forward["layerdiff"]["time"], 1.15),
        ("UNet forward GFLOPs (counted), first step", flops["sd15"] / 1e9, flops["layerdiff_first"] / 1e9, 1.15),
        ("UNet forward GFLOPs (counted), later steps", flops["sd15"] / 1e9, flops["layerdiff"] / 1e9, 1.15),
        ("UNet forward peak memory (MiB)" + (" [process RSS]" if device == "cpu" else ""), forward["sd15"]["peak"],
         forward["layerdiff"]["peak"], 1.10),
        ("sampling time, SMG every step vs CFG (s)", sample_times["cfg"]["time"],
         sample_times["smg_every_step"]["time"], 1.5),
        ("sampling time, SMG after 20% warm-up vs CFG (s)", sample_times["cfg"]["time"],
         sample_times["smg_default_warmup"]["time"], 1.5),
    ]
    rows_out += [
        ("sampling time, ComfyUI SAG node vs CFG (s)", sample_times["cfg"]["time"], sample_times["sag"]["time"],
         None),
        ("prompt enhancer, once per run, vs a CFG run (s)", sample_times["cfg"]["time"],
         sample_times["cfg"]["time"] and sample_times["cfg"]["time"] + enhancer_time, None),
    ]
    if "sampling_cfg" in flops:
        rows_out += [
            ("sampling GFLOPs, ComfyUI SAG node vs CFG", flops["sampling_cfg"] / 1e9,
             flops["sampling_sag"] / 1e9 if "sampling_sag" in flops else None, None),
            ("prompt enhancer GFLOPs, once per run, vs a CFG run", flops["sampling_cfg"] / 1e9,
             (flops["sampling_cfg"] + flops["enhancer"]) / 1e9, None),
            ("sampling GFLOPs, SMG every step vs CFG", flops["sampling_cfg"] / 1e9,
             flops["sampling_smg_every_step"] / 1e9, 1.5),
            ("sampling GFLOPs, SMG after 20% warm-up vs CFG", flops["sampling_cfg"] / 1e9,
             flops["sampling_smg_default_warmup"] / 1e9, 1.5),
        ]
    print(f"\nLayerDiff benchmark: device {device}, {args.dtype}, {resolution}x{resolution}, batch {args.batch} x "
          f"{n} foregrounds = {rows} slots, {args.steps} sampling steps, median of {args.repeats}")
    print(f"parameters: SD1.5 UNet {unet_params / 1e6:.1f}M, LayerDiff modules {module_params / 1e6:.1f}M "
          f"(of which prompt enhancer {enhancer_params / 1e6:.1f}M): {module_params * 2 / 2**20:.0f} MiB of extra "
          f"weights in fp16, {module_params * 4 / 2**20:.0f} MiB in fp32")
    print("times: median wall clock of interleaved repeats (sensitive to machine load); GFLOPs: counted by "
          "torch.utils.flop_counter (load-independent); forward times are steady-state steps")
    print(f"{'metric':56s} {'baseline':>10s} {'LayerDiff':>10s} {'ratio':>7s} {'target':>7s}")
    results = []
    for name, a, b, target in rows_out:
        target_text = f"{target:6.2f}x" if target else f"{'-':>7s}"
        if a is None or b is None:
            print(f"{name:56s} {'n/a':>10s} {'n/a':>10s} {'':>7s} {target_text}  not measured")
            continue
        if "MiB" in name:
            a, b = a / 2**20, b / 2**20
        ratio = b / a
        verdict = ("PASS" if ratio <= target else "FAIL") if target else ""
        print(f"{name:56s} {a:10.4f} {b:10.4f} {ratio:6.3f}x {target_text}  {verdict}")
        results.append({"metric": name, "baseline": a, "layerdiff": b, "ratio": ratio, "target": target})
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"device": device, "resolution": resolution, "dtype": args.dtype, "foregrounds": n,
                       "unet_params": unet_params, "module_params": module_params,
                       "enhancer_params": enhancer_params, "results": results}, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
