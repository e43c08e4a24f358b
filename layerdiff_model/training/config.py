"""Training configuration and its command line (docs/DESIGN.md 2.6). Host-free: parsing ``--help`` imports no ComfyUI.

One :class:`TrainConfig` describes a run; ``scripts/train_layerdiff.py`` builds it from the command line
(:func:`build_parser`, :func:`config_from_args`) and the in-process API accepts a config, a dict or an argv list.
The fields that decide what a checkpoint contains (:data:`RESUME_FIXED_FIELDS`) must match when a run resumes.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import LayerDiffError

SCRIPT = "train_layerdiff.py"
TRAIN_MODES = ("modules", "unet", "modules+unet")
MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULES = ("constant", "cosine")


class TrainConfigError(LayerDiffError):
    """A training option is invalid, or a resumed run's options differ from the checkpoint's."""


@dataclass
class TrainConfig:
    checkpoint: str = ""
    data: str = ""
    out: str = ""
    run_dir: str = ""
    resolution: int = 512
    batch_size: int = 1
    steps: int = 1000
    lr: float = 1e-4
    seed: int = 0
    train: str = "modules"
    composites: bool = False
    layer_images: bool = False
    max_foregrounds: int = 3
    inter_layer: bool = True
    intra_layer: bool = True
    enhancer: bool = True
    role_modulation: bool = True
    enhancer_width: int = 0
    enhancer_depth: int = 2
    init_weights: str = ""
    grad_accum: int = 1
    mixed_precision: str = "no"
    grad_checkpointing: bool = False
    cache_latents: bool = False
    cache_text: bool = False
    ema_decay: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lr_warmup: int = 0
    lr_schedule: str = "constant"
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    validate_every: int = 0
    validation_samples: int = 2
    validation_steps: int = 12
    validation_cfg: float = 5.0
    log_every: int = 10
    resume: bool = False
    stop_after: int = 0
    prompt_dropout: float = 0.1
    min_snr_gamma: float = 0.0
    high_noise_weight: float = 0.0
    mask_loss_weight: float = 1.0
    mask_follow_prob: float = 0.0
    toy_model: bool = False
    threads: int = 0
    workers: int = 0
    device: str = "auto"
    comfyui: str = ""
    progress: bool = True
    extra: dict = field(default_factory=dict)

    @property
    def trains_modules(self) -> bool:
        return self.train in ("modules", "modules+unet")

    @property
    def trains_unet(self) -> bool:
        return self.train in ("unet", "modules+unet")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise TrainConfigError(f"{SCRIPT}: unknown training options {unknown}; see `{SCRIPT} --help`.")
        return cls(**dict(raw))


# What a checkpoint's tensors, data order and noise depend on: a resumed run must use the same values.
RESUME_FIXED_FIELDS = ("train", "composites", "layer_images", "max_foregrounds", "inter_layer", "intra_layer",
                       "enhancer", "role_modulation", "enhancer_width", "enhancer_depth", "resolution", "batch_size",
                       "grad_accum", "seed", "prompt_dropout", "ema_decay", "lr_schedule", "mask_loss_weight",
                       "min_snr_gamma", "high_noise_weight", "mask_follow_prob")  # a field added later: its default


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}


def check_resume_compatible(saved: Mapping[str, Any], config: TrainConfig, source: str) -> None:
    diffs = [f"--{name.replace('_', '-')} {saved.get(name)!r} -> {getattr(config, name)!r}"
             for name in RESUME_FIXED_FIELDS if saved.get(name, _DEFAULTS[name]) != getattr(config, name)]
    if diffs:
        raise TrainConfigError(
            f"{SCRIPT}: cannot resume from {source}: it was written with other options ({'; '.join(diffs)}). "
            "Resume with the original options, or start a new run with another --run-dir."
        )


def validate(config: TrainConfig) -> TrainConfig:
    """Raise TrainConfigError naming the option and the fix for every inconsistent setting."""
    problems = []
    for name in ("checkpoint", "data", "out", "run_dir"):
        if not getattr(config, name):
            problems.append(f"--{name.replace('_', '-')} is required")
    if config.train not in TRAIN_MODES:
        problems.append(f"--train must be one of {TRAIN_MODES}, got {config.train!r}")
    if config.mixed_precision not in MIXED_PRECISION:
        problems.append(f"--mixed-precision must be one of {MIXED_PRECISION}")
    if config.lr_schedule not in LR_SCHEDULES:
        problems.append(f"--lr-schedule must be one of {LR_SCHEDULES}")
    if config.resolution < 8 or config.resolution % 8:
        problems.append(f"--resolution must be a positive multiple of 8, got {config.resolution}")
    for name in ("batch_size", "steps", "grad_accum", "max_foregrounds", "keep_checkpoints", "log_every"):
        if getattr(config, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be at least 1, got {getattr(config, name)}")
    if not 0.0 <= config.prompt_dropout < 1.0:
        problems.append(f"--prompt-dropout must be in [0, 1), got {config.prompt_dropout}")
    if not 0.0 <= config.ema_decay < 1.0:
        problems.append(f"--ema-decay must be in [0, 1) (0 = no EMA), got {config.ema_decay}")
    if config.lr <= 0:
        problems.append(f"--lr must be positive, got {config.lr}")
    if config.composites and config.trains_modules:
        problems.append("--composites trains the base model on whole images: use it with --train unet")
    if config.layer_images and not config.composites:
        problems.append("--layer-images adds layer images to base-model training: use it with --composites")
    if not config.composites and config.train == "unet":
        problems.append("--train unet without --composites would train the UNet with LayerDiff disabled: add "
                        "--composites (base-model training) or use --train modules+unet")
    if config.min_snr_gamma < 0 or config.high_noise_weight < 0:
        problems.append("--min-snr-gamma and --high-noise-weight must be >= 0 (0 = off)")
    if not 0.0 <= config.mask_follow_prob <= 1.0:
        problems.append(f"--mask-follow-prob must be between 0 and 1, got {config.mask_follow_prob}")
    if config.mask_follow_prob > 0 and config.composites:
        problems.append("--mask-follow-prob acts on mask slots: it needs layered training (drop --composites)")
    if config.stop_after < 0 or config.checkpoint_every < 0 or config.validate_every < 0:
        problems.append("--stop-after, --checkpoint-every and --validate-every must be >= 0")
    if problems:
        raise TrainConfigError(f"{SCRIPT}: " + "; ".join(problems) + f". See `{SCRIPT} --help`.")
    return config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=SCRIPT,
        description="Train LayerDiff on an SD1.5 single-file checkpoint (the .safetensors/.ckpt in "
                    "ComfyUI/models/checkpoints). The checkpoint is loaded by ComfyUI's own model code and patched by "
                    "the same adapter that inference uses; VAE and text encoder stay frozen. Writes the LayerDiff "
                    "weights file that 'LayerDiff Load Weights' reads (or, with --train unet --composites, a full "
                    "SD1.5 checkpoint). Multi-GPU: launch this script with torchrun (see docs/TRAINING.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = TrainConfig()
    g = p.add_argument_group("inputs and outputs")
    g.add_argument("--checkpoint", required=True, help="SD1.5 single-file checkpoint (.safetensors or .ckpt)")
    g.add_argument("--data", required=True, help="layered dataset: a folder of sample folders, or a .tar shard / "
                                                 "folder of WebDataset .tar shards (layerdiff_model/data/shards.py)")
    g.add_argument("--out", required=True, help="output file: LayerDiff weights .safetensors (put it in "
                                                "ComfyUI/models/layerdiff/), or an SD1.5 checkpoint with --train unet")
    g.add_argument("--run-dir", required=True, help="folder for checkpoints, logs (metrics.jsonl, TensorBoard) "
                                                    "and validation grids")
    g.add_argument("--init-weights", default=d.init_weights,
                   help="start the LayerDiff modules from this weights file instead of zero-initialised outputs")
    g.add_argument("--comfyui", default=d.comfyui, help="ComfyUI folder (default: $COMFYUI_PATH, else the repo's "
                                                        ".cache/comfyui from scripts/setup_comfyui.sh)")
    g.add_argument("--toy-model", action="store_true",
                   help="register the toy SD1.5 family (layerdiff_toy/toy_model.py; the training script does it, the product never imports the toy) so toy checkpoints load")
    g = p.add_argument_group("what is trained")
    g.add_argument("--train", choices=TRAIN_MODES, default=d.train,
                   help="'modules': the new LayerDiff modules only; 'modules+unet': also the full UNet (the output "
                        "is still a LayerDiff weights file, the UNet is saved next to it as <out>.unet.safetensors); "
                        "'unet' with --composites: base-model training, output = full SD1.5 checkpoint")
    g.add_argument("--composites", action="store_true",
                   help="train on each sample's composite image with its global prompt, without the LayerDiff patch")
    g.add_argument("--layer-images", action="store_true",
                   help="with --composites: also train on each sample's background and foreground layer images with "
                        "their own layer prompts (a base model that can draw each layer alone)")
    g.add_argument("--max-foregrounds", type=int, default=d.max_foregrounds,
                   help="most foreground layers the weights support (role embeddings); larger samples are an error")
    g.add_argument("--no-inter-layer", dest="inter_layer", action="store_false",
                   help="build without inter-layer attention (ablation)")
    g.add_argument("--no-intra-layer", dest="intra_layer", action="store_false",
                   help="build without text-guided intra-layer attention (ablation)")
    g.add_argument("--no-enhancer", dest="enhancer", action="store_false", help="build without the prompt enhancer")
    g.add_argument("--no-role-modulation", dest="role_modulation", action="store_false",
                   help="build without the slot-role conditioning (per-role scale/shift of each block's hidden "
                        "states, per-role inter-layer attention bias); ablation: slots then learn their role only "
                        "through attention")
    g.add_argument("--enhancer-width", type=int, default=d.enhancer_width,
                   help="prompt enhancer width (0 = CLIP width 768; smaller = bottleneck)")
    g.add_argument("--enhancer-depth", type=int, default=d.enhancer_depth, help="prompt enhancer layers")
    g = p.add_argument_group("optimisation")
    g.add_argument("--resolution", type=int, default=d.resolution, help="training image side (multiple of 8)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="layered samples per GPU per micro-batch")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    g.add_argument("--steps", type=int, default=d.steps, help="total optimizer steps of the run")
    g.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate")
    g.add_argument("--lr-warmup", type=int, default=d.lr_warmup, help="linear warm-up steps")
    g.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=d.lr_schedule, help="after warm-up")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="gradient clipping (0 = off)")
    g.add_argument("--prompt-dropout", type=float, default=d.prompt_dropout,
                   help="probability of replacing all prompts of a sample by empty prompts (for CFG)")
    g.add_argument("--min-snr-gamma", type=float, default=d.min_snr_gamma,
                   help="Min-SNR loss weighting (Hang et al. 2023): weight each sample's epsilon loss by "
                        "min(1, gamma / SNR(t)), i.e. less weight on low-noise steps; 5 is the paper's value "
                        "(0 = plain epsilon MSE)")
    g.add_argument("--high-noise-weight", type=float, default=d.high_noise_weight,
                   help="add this weight times sigma(t)^2 to each sample's epsilon-loss weight, so that errors of "
                        "the predicted clean image at high noise count (1 = the v-prediction objective's SNR+1 "
                        "weighting; 0 = off). Helps small models whose early sampling steps are otherwise untrained")
    g.add_argument("--mask-loss-weight", type=float, default=d.mask_loss_weight,
                   help="weight of the mask read-out loss (the 1x1 latent->mask probe self-mask guidance uses, "
                        "trained on the clean mask-slot latents)")
    g.add_argument("--mask-follow-prob", type=float, default=d.mask_follow_prob,
                   help="per sample, the probability that the layer slots are noised less than the mask slots (a "
                        "timestep drawn uniformly below the masks'), so that the masks learn to follow their "
                        "layers through inter-layer attention (docs/DESIGN.md 2.8; 0 = one timestep for all slots)")
    g.add_argument("--ema-decay", type=float, default=d.ema_decay,
                   help="keep an EMA of the trained weights with this decay (0 = off); the output file gets the EMA")
    g.add_argument("--mixed-precision", choices=MIXED_PRECISION, default=d.mixed_precision,
                   help="autocast dtype; master weights stay fp32 (fp16 uses a gradient scaler on CUDA)")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute UNet res/transformer blocks in backward: less memory, ~30%% more time")
    g.add_argument("--cache-latents", action="store_true",
                   help="VAE-encode each distinct training image once and keep its latent in memory (exact: the VAE "
                        "is frozen and images are not augmented; memory grows with the dataset: 64 KiB per slot at "
                        "512x512)")
    g.add_argument("--cache-text", action="store_true",
                   help="run the frozen text encoder once per distinct prompt and keep the embedding in memory "
                        "(exact; worth it when prompts repeat, e.g. the shapes benchmark)")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of module init, data order, noise and timesteps")
    g = p.add_argument_group("checkpoints, logging, validation")
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="write a resumable checkpoint every N steps (0 = only at the end)")
    g.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints, help="newest checkpoints kept")
    g.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --run-dir (starts fresh when there is none)")
    g.add_argument("--stop-after", type=int, default=d.stop_after,
                   help="end this session after step N with a checkpoint (time-limited jobs); --resume continues")
    g.add_argument("--validate-every", type=int, default=d.validate_every,
                   help="every N steps sample the first dataset prompts and save a layer grid PNG (0 = off)")
    g.add_argument("--validation-samples", type=int, default=d.validation_samples, help="prompts per grid")
    g.add_argument("--validation-steps", type=int, default=d.validation_steps, help="sampler steps per image")
    g.add_argument("--validation-cfg", type=float, default=d.validation_cfg, help="CFG scale of validation images")
    g.add_argument("--log-every", type=int, default=d.log_every, help="log loss and LR every N steps")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bar")
    g = p.add_argument_group("machine")
    g.add_argument("--device", default=d.device, help="'auto' (CUDA when present, with torchrun: cuda:LOCAL_RANK), "
                                                      "'cpu' or 'cuda'")
    g.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (0 = torch default)")
    g.add_argument("--workers", type=int, default=d.workers,
                   help="DataLoader worker processes for folder datasets (0 = load in the training process; "
                        "bad-sample counts are exact only with 0)")
    return p


def config_from_args(argv: Sequence[str] | None = None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    return validate(TrainConfig.from_dict(vars(args)))


def as_config(args_or_config: Any) -> TrainConfig:
    """A TrainConfig from a TrainConfig, a mapping of options, an argparse Namespace, or an argv list."""
    if isinstance(args_or_config, TrainConfig):
        return validate(args_or_config)
    if isinstance(args_or_config, argparse.Namespace):
        return validate(TrainConfig.from_dict(vars(args_or_config)))
    if isinstance(args_or_config, Mapping):
        return validate(TrainConfig.from_dict({k.replace("-", "_"): (str(v) if isinstance(v, Path) else v)
                                               for k, v in args_or_config.items()}))
    return config_from_args([str(a) for a in args_or_config])
