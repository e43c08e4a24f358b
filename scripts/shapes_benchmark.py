#!/usr/bin/env python
"""The shapes proof of learning, end to end, in one command (docs/DESIGN.md 2.7; docs/SHAPES_BENCHMARK.md).

Stages (each skipped when its output exists, unless --force; per-stage wall times go to RUN_DIR/timings.json):
  data         train split (seen colour/shape pairs), validation and test splits      scripts/make_shapes_dataset.py
               (held-out pairs; val from its own random stream, used for every tuning decision)
  vae          TAESD-topology VAE on shapes images + initial toy checkpoint            scripts/train_toy_vae.py
  base         the toy SD1.5 UNet on composites with global prompts                    scripts/train_layerdiff.py
               (--composites --train unet)
  full, no_intra, no_inter, no_enhancer
               LayerDiff modules with the base frozen, full and ablations              scripts/train_layerdiff.py
  tune         on the validation split only: CFG and SMG / SAG at several scales;      scripts/evaluate_shapes.py
               picks the SMG and SAG scales the eval stage uses
  eval         the test split, once: untrained, full with CFG, SAG and SMG (tuned      scripts/evaluate_shapes.py
               scales, more samples), the three ablations, chance level and ground truth
  report       RUN_DIR/report.md + report.json (table, settings, stage timings)
  --export-assets additionally writes the shipped toy assets (assets/toy_shapes) from the base + full weights.
  --from-assets takes the base and full weights from the shipped assets (the reported run's weights) instead of
  training them: the ablations, the tuning and the evaluation then run on exactly what users get.

    python scripts/shapes_benchmark.py                      # the reported benchmark (< 60 min on 2 CPU cores)
    python scripts/shapes_benchmark.py --quick              # smoke run, a few minutes
    python scripts/shapes_benchmark.py --stages eval,report # re-run some stages only
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# the repository root, for comfy_headless, layerdiff_toy and scripts (the one sys.path line; README "Code map")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from comfy_headless.product import product_module, product_names  # noqa: E402
from scripts import train_layerdiff  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = REPO_ROOT / "scripts"

# Settings of the reported run and of --quick. Every training stage uses the same script and the same
# hyper-parameters except what the ablation switches off.
FULL = {"train_count": 1000, "test_count": 96, "vae_steps": 0, "vae_crop": 0, "unet_width": 64,
        "base_steps": 3000, "base_batch": 16, "base_lr": 5e-4, "base_schedule": "cosine", "base_min_snr": 5.0,
        "high_noise_weight": 1.0, "module_steps": 1000, "module_batch": 8, "module_lr": 1e-3,
        "module_schedule": "constant", "eval_steps": 12, "val_count": 32, "ablation_test_count": 48,
        "smg_scales": "0.25,0.5,1,2", "sag_scales": "0.5,1", "mask_follow_prob": 0.5}
QUICK = {"train_count": 96, "test_count": 6, "vae_steps": 30, "vae_crop": 32, "unet_width": 64, "base_steps": 30,
         "base_batch": 8, "base_lr": 5e-4, "base_schedule": "constant", "base_min_snr": 5.0, "high_noise_weight": 1.0,
         "module_steps": 20, "module_batch": 4, "module_lr": 5e-4, "module_schedule": "constant", "eval_steps": 6,
         "val_count": 4, "ablation_test_count": 6, "smg_scales": "0.5", "sag_scales": "0.5",
         "mask_follow_prob": 0.5}
ABLATIONS = {"full": [], "no_intra": ["--no-intra-layer"], "no_inter": ["--no-inter-layer"],
             "no_enhancer": ["--no-enhancer"]}
STAGES = ("data", "vae", "base", *ABLATIONS, "tune", "eval", "report")
MAX_FOREGROUNDS = 2
ENHANCER_WIDTH = 64  # bottleneck: keeps the shipped weights small


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--run-dir", type=Path, default=REPO_ROOT / "runs" / "shapes_benchmark")
    p.add_argument("--quick", action="store_true", help="tiny settings: checks the pipeline in a few minutes")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--force", action="store_true", help="re-run the chosen stages even when their outputs exist")
    p.add_argument("--vae", type=Path, help="start the VAE stage from these TAESD weights (e.g. a longer-trained VAE)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a setting ({', '.join(FULL)})")
    p.add_argument("--export-assets", type=Path, nargs="?", const=Path("assets/toy_shapes"),
                   help="write the shipped toy assets here after training (default assets/toy_shapes)")
    p.add_argument("--from-assets", type=Path, nargs="?", const=Path("assets/toy_shapes"),
                   help="take the base and full weights from these shipped assets instead of training them")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--comfyui", default="", help="ComfyUI folder (default: $COMFYUI_PATH, else .cache/comfyui)")
    args = p.parse_args(argv)
    args.settings = dict(QUICK if args.quick else FULL)
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in args.settings:
            p.error(f"--set {item}: unknown setting {key!r}")
        try:
            args.settings[key] = type(args.settings[key])(value)
        except ValueError:
            p.error(f"--set {item}: {key} needs a {type(args.settings[key]).__name__}")
    for key in ("base_schedule", "module_schedule"):
        LR_SCHEDULES = product_names("layerdiff_model.training.config", "LR_SCHEDULES")
        if args.settings[key] not in LR_SCHEDULES:
            p.error(f"--set {key}={args.settings[key]}: choose one of {', '.join(LR_SCHEDULES)}")
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        p.error(f"unknown stages {unknown}; choose from {list(STAGES)}")
    if args.from_assets and not args.vae:
        args.vae = args.from_assets / "toy_shapes_base.safetensors"  # the shipped VAE, as the shipped base has it
    if args.settings["vae_steps"] == 0 and not args.vae and "vae" in args.stages:
        p.error("vae_steps is 0 (the VAE is taken as it is): pass --vae, e.g. --vae "
                "assets/toy_shapes/toy_shapes_base.safetensors, or train one with --set vae_steps=N")
    return args


class Pipeline:
    def __init__(self, args):
        self.args, self.s = args, args.settings
        self.encoder_cache = product_module("nodes.host.training").EncoderOutputCache()  # shared by all runs
        self.dir = args.run_dir.resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.timings_file = self.dir / "timings.json"
        self.timings = json.loads(self.timings_file.read_text()) if self.timings_file.exists() else {}
        self.train_data, self.test_data = self.dir / "data" / "train", self.dir / "data" / "test"
        self.val_data = self.dir / "data" / "val"
        self.vae, self.init_ckpt = self.dir / "toy_vae.safetensors", self.dir / "toy_init.safetensors"
        self.base = self.dir / "toy_base.safetensors"
        self.eval_json, self.tune_json = self.dir / "eval.json", self.dir / "tune.json"

    def weights(self, name: str) -> Path:
        return self.dir / f"layerdiff_{name}.safetensors"

    def outputs(self, stage: str) -> list[Path]:
        return {"data": [self.train_data / "shapes_dataset.json", self.test_data / "shapes_dataset.json",
                         self.val_data / "shapes_dataset.json"],
                "vae": [self.init_ckpt], "base": [self.base], "tune": [self.tune_json], "eval": [self.eval_json],
                "report": [self.dir / "report.md"]}.get(stage, [self.weights(stage)])

    def run(self) -> None:
        for stage in STAGES:
            if stage not in self.args.stages:
                continue
            if all(p.exists() for p in self.outputs(stage)) and not self.args.force:
                print(f"[shapes_benchmark] {stage}: outputs exist, skipped (--force re-runs it)", flush=True)
                continue
            print(f"[shapes_benchmark] {stage} ...", flush=True)
            began = time.time()
            getattr(self, f"stage_{stage}", lambda s=stage: self.stage_modules(s))()
            if stage != "report":
                self.timings[stage] = round(time.time() - began, 1)
                self.timings_file.write_text(json.dumps(self.timings, indent=1))
            print(f"[shapes_benchmark] {stage}: {time.time() - began:.0f} s", flush=True)
        if self.args.export_assets:
            self.export_assets(self.args.export_assets)

    # ------------------------------------------------------------------------------------------------ stages
    def python(self, script: str, *argv) -> None:
        cmd = [sys.executable, str(SCRIPTS / script), *[str(a) for a in argv]]
        env = dict(os.environ)
        if self.args.comfyui:
            env["COMFYUI_PATH"] = self.args.comfyui
        log = self.dir / "logs" / f"{Path(script).stem}-{int(time.time())}.log"
        log.parent.mkdir(exist_ok=True)
        with open(log, "w") as fh:
            fh.write(" ".join(cmd) + "\n")
            fh.flush()
            code = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
        if code:
            tail = log.read_text().splitlines()[-15:]
            raise SystemExit(f"[shapes_benchmark] {script} failed (exit {code}); log {log}:\n" + "\n".join(tail))

    def stage_data(self) -> None:
        from scripts import make_shapes_dataset as make

        for out, split, count, seed in ((self.train_data, "train", self.s["train_count"], self.args.seed),
                                        (self.test_data, "test", self.s["test_count"], self.args.seed + 1),
                                        (self.val_data, "val", self.s["val_count"], self.args.seed + 1)):
            argv = ["--out", str(out), "--count", str(count), "--split", split, "--seed", str(seed),
                    "--max-foregrounds", str(MAX_FOREGROUNDS), "--overwrite"]
            make.main(make.parse_args(argv))

    def stage_vae(self) -> None:
        argv = ["--data", self.train_data, "--test-data", self.test_data, "--out-vae", self.vae,
                "--out-checkpoint", self.init_ckpt, "--steps", self.s["vae_steps"], "--crop", self.s["vae_crop"],
                "--seed", self.args.seed, "--unet-width", self.s["unet_width"],
                "--threads", self.args.threads, "--max-samples", self.s["train_count"]]
        if self.args.vae:
            argv += ["--init-vae", self.args.vae.resolve()]
        self.python("train_toy_vae.py", *argv)

    def train_args(self, out: Path, run: str, steps: int, batch: int, lr: float) -> list:
        return ["--data", self.train_data, "--out", out, "--run-dir", self.dir / "train" / run, "--resolution", 64,
                "--batch-size", batch, "--steps", steps, "--lr", lr, "--lr-warmup", min(50, steps // 10),
                "--seed", self.args.seed, "--toy-model", "--threads", self.args.threads, "--checkpoint-every", 0,
                "--validate-every", 0, "--log-every", 25, "--no-progress", "--max-foregrounds", MAX_FOREGROUNDS,
                "--high-noise-weight", self.s["high_noise_weight"], "--cache-latents", "--cache-text"]

    def train(self, *argv) -> None:
        """scripts/train_layerdiff.py's ``train()`` in this process, so that the frozen encoders' outputs
        (``--cache-latents --cache-text``) are computed once for all training stages."""
        argv = [str(a) for a in argv]
        config = product_names("layerdiff_model.training.config", "as_config")(argv)
        log = self.dir / "logs" / f"train-{Path(config.out).stem}.cmd"
        log.parent.mkdir(exist_ok=True)
        log.write_text("python scripts/train_layerdiff.py " + " ".join(argv) + "\n")
        summary = train_layerdiff.train(config, cache=self.encoder_cache)
        if not summary.get("finished"):
            raise SystemExit(f"[shapes_benchmark] training {config.out} stopped at step {summary.get('step')}")

    def stage_base(self) -> None:
        if self.args.from_assets:
            from layerdiff_toy import toy_model

            toy_model.assemble_toy_checkpoint(self.base, REPO_ROOT / self.args.from_assets)
            return
        self.train("--checkpoint", self.init_ckpt, "--train", "unet", "--composites",
                   "--min-snr-gamma", self.s["base_min_snr"], "--lr-schedule", self.s["base_schedule"],
                   *self.train_args(self.base, "base", self.s["base_steps"], self.s["base_batch"], self.s["base_lr"]))

    def stage_modules(self, name: str) -> None:
        if name == "full" and self.args.from_assets:
            from layerdiff_toy import toy_model

            shutil.copyfile(toy_model.toy_layerdiff_weights_path(REPO_ROOT / self.args.from_assets),
                            self.weights(name))
            return
        self.train("--checkpoint", self.base, "--train", "modules", "--enhancer-width", ENHANCER_WIDTH,
                   "--lr-schedule", self.s["module_schedule"], "--mask-follow-prob", self.s["mask_follow_prob"],
                   *ABLATIONS[name],
                   *self.train_args(self.weights(name), name, self.s["module_steps"], self.s["module_batch"],
                                    self.s["module_lr"]))

    def scales(self, key: str) -> list[float]:
        return [float(v) for v in str(self.s[key]).split(",") if v.strip()]

    def evaluate(self, data: Path, count: int, runs: list[str], out: Path, *extra) -> None:
        argv = [*extra, "--checkpoint", self.base, "--toy-model", "--data", data, "--count", count,
                "--steps", self.s["eval_steps"], "--out", out, "--threads", self.args.threads,
                "--calibration-data", self.val_data, "--calibration-count", self.s["val_count"],
                "--baseline", "full (CFG)"]
        for run in runs:
            argv += ["--run", run]
        self.python("evaluate_shapes.py", *argv)

    def stage_tune(self) -> None:
        """SMG and SAG scales, chosen on the validation split by composite accuracy (then layer colour)."""
        full = self.weights("full")
        runs = [f"full (CFG)={full}"]
        runs += [f"full + SMG {v:g}={full},guidance=smg,smg_scale={v}" for v in self.scales("smg_scales")]
        runs += [f"full + SAG {v:g}={full},guidance=sag,sag_scale={v}" for v in self.scales("sag_scales")]
        out = self.dir / "tune_eval.json"
        self.evaluate(self.val_data, self.s["val_count"], runs, out)
        summary = json.loads(out.read_text())["summary"]

        def best(kind: str, key: str) -> float:
            return max(self.scales(key), key=lambda v: (summary[f"full + {kind} {v:g}"]["composite_acc"],
                                                        summary[f"full + {kind} {v:g}"]["fg_colour_acc"]))
        chosen = {"smg_scale": best("SMG", "smg_scales"), "sag_scale": best("SAG", "sag_scales"),
                  "split": "val", "samples": self.s["val_count"]}
        self.tune_json.write_text(json.dumps(chosen, indent=1))
        print(f"[shapes_benchmark] tuned on the validation split: {chosen}", flush=True)

    def stage_eval(self) -> None:
        full, tuned = self.weights("full"), json.loads(self.tune_json.read_text())
        few = self.s["ablation_test_count"]
        runs = [f"untrained=zero,enhancer_width={ENHANCER_WIDTH},max_foregrounds={MAX_FOREGROUNDS},count={few}",
                f"full (CFG)={full}", f"full + SAG={full},guidance=sag,sag_scale={tuned['sag_scale']}",
                f"full + SMG={full},guidance=smg,smg_scale={tuned['smg_scale']}",
                *(f"{name.replace('_', '-')} (CFG)={self.weights(name)},count={few}"
                  for name in ABLATIONS if name != "full")]
        self.evaluate(self.test_data, self.s["test_count"], runs, self.eval_json, "--vae-ceiling")

    def stage_report(self) -> None:
        result = json.loads(self.eval_json.read_text())
        table = (self.eval_json.with_suffix(".md")).read_text().strip()
        tune_table = (self.dir / "tune_eval.md").read_text().strip()
        tuned = json.loads(self.tune_json.read_text())
        vae = json.loads(self.vae.with_suffix(".json").read_text()) if self.vae.with_suffix(".json").exists() else {}
        total = sum(self.timings.values())
        lines = ["# Shapes benchmark result", "", f"Command: `{' '.join(['python', *sys.argv])}`", "",
                 "## Test split (evaluated once)", "", table, "",
                 f"## Validation split (tuning): chosen SMG scale {tuned['smg_scale']:g}, SAG scale "
                 f"{tuned['sag_scale']:g}", "", tune_table, "", f"Settings: {json.dumps(self.s)}", "",
                 "Stage wall times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in self.timings.items())
                 + f"; total {total:.0f} s ({total / 60:.1f} min)", ""]
        if vae:
            lines.append(f"VAE: test PSNR {vae['test_direct']['psnr_db']:.1f} dB, UNet latent std "
                         f"{vae['test_through_comfyui']['unet_latent_std']:.2f}")
        (self.dir / "report.md").write_text("\n".join(lines) + "\n")
        (self.dir / "report.json").write_text(json.dumps({"settings": self.s, "timings_s": self.timings,
                                                          "summary": result["summary"], "tuned": tuned,
                                                          "paired_vs_cfg": result["paired_vs_baseline"],
                                                          "palette": result["palette"], "vae": vae}, indent=1))
        print("\n".join(lines))

    def export_assets(self, target: Path) -> None:
        from layerdiff_toy import toy_model

        written = toy_model.export_toy_assets(self.base, self.weights("full"), REPO_ROOT / target,
                                        metadata={"benchmark_settings": json.dumps(self.s)})
        for kind, path in written.items():
            print(f"[shapes_benchmark] asset {kind}: {path} ({path.stat().st_size / 2**20:.1f} MB)")


def main(argv=None) -> int:
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--comfyui", default="")
    train_layerdiff.boot_comfyui(early.parse_known_args(argv)[0].comfyui)  # first: the options read the package
    Pipeline(parse_args(argv)).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
