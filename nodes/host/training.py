"""ComfyUI side of training (docs/DESIGN.md 2.6): implements ``layerdiff_model.training.TrainableModel`` with ComfyUI's
own model code, so what is trained is exactly what runs in the nodes.

- The SD1.5 single-file checkpoint is loaded by ``comfy.sd.load_checkpoint_guess_config``; VAE and text encoder are
  frozen. LayerDiff modules are built or loaded with :func:`inference.build_modules` / ``load_modules`` and
  installed with :func:`inference.apply_patch` (the apply_model object patch + middle_patch +
  attn2_output_patch inference uses). ``comfy.model_management.load_models_gpu`` installs the object patch.
- Layer prompts go through :func:`inference.encode_layered` and, when the weights have one, the enhancer
  (:func:`inference.enhance` with autograd on, so the enhancer is trained), then through the sampler's own cond
  pipeline (``convert_cond`` -> ``encode_model_conds`` -> ``process_cond`` -> ``concat``) into ``apply_model``.
- ComfyUI's ``apply_model`` takes ``x = latent + sigma * noise`` and returns the denoised ``x - sigma * eps`` for
  eps models; the predicted noise is ``(x - denoised) / sigma`` with ``sigma = model_sampling.sigmas[t]``,
  t uniform over the 1000 DDPM steps (the DDPM epsilon objective in ComfyUI's parametrisation).
- 2024 ComfyUI adds attention residuals in place: the transformer blocks' norm1/norm2 get a copy of their input
  (forward pre-hooks); any other in-place autograd error switches the run to
  ``torch.autograd.graph.allow_mutation_on_saved_tensors()`` (exact, slower) and repeats that micro-step.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
from pathlib import Path
from typing import Any, Sequence

import torch

import comfy.model_management
import comfy.ops
import comfy.sample
import comfy.samplers
import comfy.sd

from ...layerdiff_model.safetensors_file import save_safetensors
from ...layerdiff_model.errors import LayerDiffError, ModelFamilyError
from ...layerdiff_model.training.loop import Distributed, Trainer, distributed_from_env
from ...layerdiff_model.training.config import SCRIPT, TrainConfig, as_config
from ...layerdiff_model.training.data import open_dataset
from ...layerdiff_model.modules.weights import load_modules, save_weights
from . import compat, inference, unet_checkpointing

LOG = logging.getLogger("LayerDiff.train")
NODE = SCRIPT


class CheckpointLoadError(LayerDiffError):
    """The base checkpoint given to the training script is missing or is not an SD1.5 model."""


def load_base_checkpoint(path: str):
    """(ModelPatcher, CLIP, VAE) of a single-file SD1.5 checkpoint, loaded by ComfyUI; raises with the fix.

    Model detection is ComfyUI's: a toy checkpoint loads only once the caller registered the toy family
    (``layerdiff_toy.toy_model.register_toy_sd15``; ``scripts/train_layerdiff.py --toy-model`` does).
    """
    file = Path(path)
    if not file.is_file():
        raise CheckpointLoadError(f"{SCRIPT}: --checkpoint {file} does not exist. Pass the SD1.5 .safetensors/.ckpt "
                                  "file you use in ComfyUI (ComfyUI/models/checkpoints/<name>).")
    import folder_paths

    try:
        with torch.no_grad():  # 2024's CLIP constructor copies into parameters; no_grad keeps them trainable-safe
            out = comfy.sd.load_checkpoint_guess_config(str(file), output_vae=True, output_clip=True,
                                                        embedding_directory=folder_paths.get_folder_paths("embeddings"))
    except Exception as exc:  # noqa: BLE001 - ComfyUI raises plain RuntimeError/KeyError for unknown files
        raise CheckpointLoadError(
            f"{SCRIPT}: ComfyUI could not load {file.name} as a checkpoint ({type(exc).__name__}: {exc}). LayerDiff "
            "trains on SD1.5-family single-file checkpoints (SD1.5 and its fine-tunes); for the toy model add "
            "--toy-model.") from exc
    model, clip, vae = out[:3]
    if model is None or clip is None or vae is None:
        raise CheckpointLoadError(f"{SCRIPT}: {file.name} lacks a UNet, text encoder or VAE; use a full SD1.5 "
                                  "checkpoint (all three in one file).")
    try:
        inference.check_sd15(model, SCRIPT)
    except ModelFamilyError as exc:
        raise CheckpointLoadError(f"{exc} (--checkpoint {file.name})") from exc
    return model, clip, vae


class EncoderOutputCache:
    """Frozen-encoder outputs for --cache-latents / --cache-text, keyed by a fingerprint of the encoder and the
    image / prompt. A run makes its own; a caller that trains several runs on one dataset (the shapes benchmark's
    base, full and ablation runs) passes one cache to all of them."""

    def __init__(self):
        self.latents: dict[tuple[str, bytes], torch.Tensor] = {}
        self.texts: dict[tuple[str, str], tuple] = {}


def _fingerprint(module: torch.nn.Module) -> str:
    """Identifies an encoder's weights (every tensor's shape and a sample of its values) for the caches."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().reshape(-1)[:256].float().cpu().numpy().tobytes())
    return h.hexdigest()


class ComfyTrainingModel:
    """LayerDiff (or, with --composites, plain SD1.5) training through ComfyUI's patched model."""

    num_timesteps = 1000

    def __init__(self, config: TrainConfig, parts: tuple | None = None, cache: EncoderOutputCache | None = None):
        """Loads ``config.checkpoint``; ``parts`` = (ModelPatcher, CLIP, VAE) already loaded instead (benchmarks
        pass a random-weight UNet and no CLIP/VAE, feeding latents and conditioning themselves). ``cache``: the
        encoder outputs to share with other runs (a new one when omitted)."""
        self.config = config
        self.cache = cache if cache is not None else EncoderOutputCache()
        self.base, self.clip, self.vae = parts or load_base_checkpoint(config.checkpoint)
        self.device = comfy.model_management.get_torch_device()
        if self.clip is not None:
            self.clip.cond_stage_model.requires_grad_(False)
        if self.vae is not None:
            self.vae.first_stage_model.requires_grad_(False)
        self.unet = inference.unet_of(self.base)
        self.unet.requires_grad_(config.trains_unet)
        self.modules = self.mask_readout = None
        self.patched = self.base.clone()
        if config.trains_modules:
            self.modules = self._build_modules(config)
            self.modules.requires_grad_(True)
            self.mask_readout = self.modules.mask_readout
            self.patched = inference.apply_patch(self.base, self.modules, SCRIPT, inter=config.inter_layer,
                                                    intra=config.intra_layer)
        if config.grad_checkpointing:
            blocks = self.modules.blocks if self.modules is not None else None
            LOG.info("Gradient checkpointing on %d UNet layers", unet_checkpointing.enable(self.unet, blocks))
        self._mutation_safe_autograd = False
        self._fingerprints: dict[int, str] = {}
        self._residual_hooks = self._protect_in_place_residuals()
        self._ensure_loaded()

    def _build_modules(self, config: TrainConfig):
        if config.init_weights:
            modules = load_modules(config.init_weights, operations=comfy.ops.manual_cast, dtype=torch.float32)
            inference.check_weights_fit(modules, self.base, SCRIPT)
            return modules.to(self.device)
        cfg = inference.config_for_model(
            self.base, max_foregrounds=config.max_foregrounds, use_inter_layer=config.inter_layer,
            use_intra_layer=config.intra_layer, use_enhancer=config.enhancer, enhancer_width=config.enhancer_width,
            use_role_modulation=config.role_modulation,
            enhancer_depth=config.enhancer_depth)
        return inference.build_modules(cfg, seed=config.seed).to(self.device)

    def _ensure_loaded(self) -> None:
        """Load (and so patch) the model for the forward pass; the object patch must be in place."""
        comfy.model_management.load_models_gpu([self.patched])
        if self.modules is not None and not isinstance(self.patched.model.apply_model,
                                                       inference.LayeredApplyModel):
            raise LayerDiffError(f"{SCRIPT}: ComfyUI did not install the LayerDiff apply_model patch when loading "
                                 "the model; this ComfyUI version is not supported for training.")

    # ------------------------------------------------------------------------------------------- protocol
    def trainable_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        params = []
        if self.modules is not None:
            params += [(f"modules.{k}", p) for k, p in self.modules.named_parameters()]
        if self.config.trains_unet:
            params += [(f"unet.{k}", p) for k, p in self.unet.named_parameters()]
        return params

    def autograd_context(self):
        if self._mutation_safe_autograd:
            return torch.autograd.graph.allow_mutation_on_saved_tensors()
        return contextlib.nullcontext()

    def use_mutation_safe_autograd(self) -> bool:
        """Fallback after an in-place autograd error: run forward and backward under
        ``allow_mutation_on_saved_tensors`` (exact; every op then goes through a Python dispatch mode: about 30% slower
        per step on the toy UNet, a little faster on SD1.5 on CPU; benchmarks/README.md). Returns False when it is
        already on."""
        if self._mutation_safe_autograd:
            return False
        self._mutation_safe_autograd = True
        return True

    def _protect_in_place_residuals(self) -> list:
        """2024 ComfyUI's BasicTransformerBlock adds its attention outputs in place (``x += n``) into the tensor
        that ``norm1`` / ``norm2`` saved for backward. A forward pre-hook hands those norms a copy, so backward reads
        the values they saw (numerically identical; same state-dict keys)."""
        if not compat.transformer_blocks_mutate_in_place():
            return []
        from comfy.ldm.modules.attention import BasicTransformerBlock

        def copy_input(_module, args):
            return (args[0].clone(), *args[1:])

        return [getattr(block, name).register_forward_pre_hook(copy_input)
                for block in self.unet.modules() if isinstance(block, BasicTransformerBlock)
                for name in ("norm1", "norm2") if isinstance(getattr(block, name, None), torch.nn.Module)]

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        if not self.config.cache_latents:
            return self._encode_images(images)
        vae = self._fingerprint(self.vae.first_stage_model)
        keys = [(vae, hashlib.blake2b(img.float().cpu().numpy().tobytes(), digest_size=16).digest())
                for img in images]
        missing = [i for i, k in enumerate(keys) if k not in self.cache.latents]
        if missing:
            with torch.no_grad():
                for i, latent in zip(missing, self._encode_images(images[missing])):
                    self.cache.latents[keys[i]] = latent.cpu()
        return torch.stack([self.cache.latents[k] for k in keys]).to(self.device)

    def _encode_images(self, images: torch.Tensor) -> torch.Tensor:
        latents = self.vae.encode(images.movedim(1, -1).float().cpu())
        return self.base.model.process_latent_in(latents.to(self.device)).float()

    def _fingerprint(self, module: torch.nn.Module) -> str:
        if id(module) not in self._fingerprints:
            self._fingerprints[id(module)] = _fingerprint(module)
        return self._fingerprints[id(module)]

    def _encode_text(self, clip, text: str):
        """The frozen text encoder's (cond, pooled), once per distinct prompt with ``--cache-text``."""
        if not self.config.cache_text:
            return inference.encode_text(clip, text)
        key = (self._fingerprint(clip.cond_stage_model), text)
        if key not in self.cache.texts:
            with torch.no_grad():
                self.cache.texts[key] = inference.encode_text(clip, text)
        return self.cache.texts[key]

    def _conditioning(self, global_prompt: str, layer_prompts: Sequence[str] | None, track_grad: bool) -> list:
        if layer_prompts is None:
            cond, pooled = self._encode_text(self.clip, global_prompt)
            return [[cond, {"pooled_output": pooled}]]
        conditioning = inference.encode_layered(self.clip, global_prompt, list(layer_prompts),
                                                   encode=self._encode_text)
        if self.modules is not None and self.modules.enhancer is not None:
            conditioning = inference.enhance(conditioning, self.modules, SCRIPT, track_grad=track_grad)
        return conditioning

    def encode_prompts(self, global_prompts, layer_prompts=None) -> list:
        if layer_prompts is None:
            return [self._conditioning(g, None, True) for g in global_prompts]
        return [self._conditioning(g, lp, True) for g, lp in zip(global_prompts, layer_prompts)]

    def sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        sigmas = self.base.model.model_sampling.sigmas
        return sigmas.to(timesteps.device)[timesteps.long()].float()

    def noise_latents(self, latents, noise, timesteps):
        return latents + noise * self.sigmas(timesteps).view(-1, 1, 1, 1)

    def predict_noise(self, noisy, timesteps, conds):
        self._ensure_loaded()
        sigma = self.sigmas(timesteps)
        denoised = inference.apply_model_with_conds(self.patched, noisy, sigma, conds, SCRIPT)
        return (noisy - denoised.float()) / sigma.view(-1, 1, 1, 1)

    @torch.no_grad()
    def sample_layers(self, global_prompt, layer_prompts, seed, steps, cfg) -> torch.Tensor:
        size = self.config.resolution // 8
        if layer_prompts is None:
            rows, positive = 1, self._conditioning(global_prompt, None, False)
            negative = self._conditioning("", None, False)
        else:
            rows = 2 * len(layer_prompts) - 1
            positive = self._conditioning(global_prompt, layer_prompts, False)
            negative = self._conditioning("", [""] * len(layer_prompts), False)
        latent = torch.zeros(rows, 4, size, size)
        noise = comfy.sample.prepare_noise(latent, seed)
        samples = comfy.sample.sample(self.patched, noise, steps, cfg, "euler", "normal", positive, negative, latent,
                                      disable_pbar=True, seed=seed)
        self._ensure_loaded()
        return self.vae.decode(samples).movedim(-1, 1).float().clamp(0, 1)

    def export(self, path: str, metadata: dict) -> Path:
        path = Path(path)
        if self.modules is not None:
            save_weights(path, self.modules, extra_metadata=metadata)
            if self.config.trains_unet:
                save_checkpoint_file(path.with_suffix(".unet.safetensors"), self, metadata)
            return path
        return save_checkpoint_file(path, self, metadata)


def save_checkpoint_file(path: Path, model: ComfyTrainingModel, metadata: dict) -> Path:
    """The trained UNet with the original text encoder and VAE as a single-file SD1.5 checkpoint, atomically
    (the keys ComfyUI's CheckpointSave writes, via ``state_dict_for_saving``)."""
    state = model.base.model.state_dict_for_saving(model.clip.get_sd(), model.vae.get_sd())
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return save_safetensors(path, tensors, {"format": "pt", **metadata})


def train(args_or_config: Any, dist: Distributed | None = None, cache: EncoderOutputCache | None = None
          ) -> dict[str, Any]:
    """Run (or resume) a training run in this process; ComfyUI must already be importable (booted).

    Accepts a TrainConfig, a dict of options, an argparse Namespace or an argv list. Returns a summary dict
    (final step, whether the run finished, output path, last loss, skipped samples). ``cache``: encoder outputs
    shared with other runs of this process (see :class:`EncoderOutputCache`)."""
    config = as_config(args_or_config)
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    device = comfy.model_management.get_torch_device()
    dist = dist or distributed_from_env(device.type)
    dataset = open_dataset(config.data, config.resolution, config.seed, dist.rank, dist.world_size)
    model = ComfyTrainingModel(config, cache=cache)
    return Trainer(config, model, dist, dataset=dataset).run()
