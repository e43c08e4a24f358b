"""Headless LayerDiff: prompts in, a layered picture out, through ComfyUI's own executor (no UI, no server).

    bash scripts/generate.sh [options]                   # sets up .venv and ComfyUI first (scripts/setup_env.sh)
    .venv/bin/python scripts/generate_layers.py [options]  # ComfyUI at COMFYUI_PATH, else .cache/comfyui

Runs a shipped workflow (``workflows/text_to_2_layers.json`` for one foreground prompt, ``text_to_3_layers.json``
for more; or ``--workflow``) with the prompts and settings given here. Without ``--checkpoint``/``--weights`` it
runs the bundled toy shapes model (``assets/toy_shapes``; its full checkpoint is assembled once into
``.cache/toy_shapes``); with them, a real SD1.5 checkpoint and real LayerDiff weights, on the GPU when there is
one. Writes the composite, the background, every foreground as an RGBA PNG, the masks and a layered PSD/ORA file
into ``--out`` and lists them. User errors (a wrong path, a file of another kind or another model family) end in
one line on stderr and exit status 1.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

# the repository root, for comfy_headless, layerdiff_toy and scripts (the one sys.path line; README "Code map")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from comfy_headless import boot as headless  # noqa: E402
from comfy_headless import prompts  # noqa: E402
from comfy_headless.nodes_api import expose_model_file  # noqa: E402
from comfy_headless.product import product_names  # noqa: E402
from layerdiff_toy import toy_model  # noqa: E402

REPO_ROOT = headless.REPO_ROOT
WORKFLOWS = REPO_ROOT / "workflows"
TOY_CACHE = REPO_ROOT / ".cache" / "toy_shapes"
FILE_PREFIX = "layerdiff"

# In the toy shapes model's vocabulary (layerdiff_toy/shapes.py: vocabulary()), pairs it was trained on.
DEFAULT_PROMPT = "a red circle and a blue square on a plain green background"
DEFAULT_BACKGROUND = "a plain green background"
DEFAULT_FOREGROUNDS = ("a red circle", "a blue square")
# The toy shapes model is trained on small images; real checkpoints keep the workflow's settings (512 px, 25 steps).
TOY_SIZE = 64
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
CHECKPOINT_HINT = "pass a single-file SD1.5 checkpoint (e.g. v1-5-pruned-emaonly.safetensors) with --checkpoint"
WEIGHTS_HINT = "pass a LayerDiff weights .safetensors written by scripts/train_layerdiff.py with --weights"

LOG = logging.getLogger("LayerDiff.generate")


class RunError(Exception):
    """A problem the user can fix; printed as one line, without a traceback."""


# ------------------------------------------------------------------------------------------------- arguments
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="generate_layers", description=__doc__.splitlines()[0])
    p.add_argument("--prompt", "-p", default=DEFAULT_PROMPT, help="global prompt: the whole scene")
    p.add_argument("--background", "-b", default=DEFAULT_BACKGROUND, help="background layer prompt")
    p.add_argument("--foreground", "-f", action="append", dest="foregrounds", metavar="PROMPT",
                   help="one foreground layer prompt; repeat for more layers, top layer first "
                        f"(default: {' / '.join(DEFAULT_FOREGROUNDS)})")
    p.add_argument("--negative", help="negative prompt (default: the workflow's)")
    p.add_argument("--checkpoint", type=Path, help="SD1.5 single-file checkpoint (default: the bundled toy model)")
    p.add_argument("--weights", type=Path, help="LayerDiff weights .safetensors for --checkpoint")
    p.add_argument("--workflow", type=Path, help="UI-format workflow to run instead of the shipped one")
    p.add_argument("--width", type=int, help=f"image width in pixels, a multiple of 8 (default: {TOY_SIZE} for the toy "
                   "model, else the workflow's, 512)")
    p.add_argument("--height", type=int, help="image height in pixels (default: as --width)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the workflow's, 25)")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: the workflow's, 7.0)")
    p.add_argument("--seed", type=int, help="noise seed (default: the workflow's, 42)")
    p.add_argument("--smg-scale", type=float, help="self-mask guidance scale, 0 = plain CFG (default: the workflow's)")
    p.add_argument("--layered-file", default="psd+ora",
                   help="layered file(s) to write: one of the Save Layers node's choices (default: %(default)s)")
    p.add_argument("--out", type=Path, default=Path("layerdiff_output"), help="output folder (default: %(default)s)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is present")
    p.add_argument("--verbose", "-v", action="store_true", help="show ComfyUI's log and full tracebacks")
    args = p.parse_args(argv)
    args.foregrounds = [f.strip() for f in (args.foregrounds or DEFAULT_FOREGROUNDS)]
    return args


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked before ComfyUI boots (seconds saved on every typo)."""
    if not all(args.foregrounds):
        raise RunError("a --foreground prompt is empty; give each foreground layer a prompt")
    if (args.checkpoint is None) != (args.weights is None):
        given, missing = ("--checkpoint", "--weights") if args.weights is None else ("--weights", "--checkpoint")
        raise RunError(f"{given} needs {missing} too: the bundled toy weights only fit the bundled toy checkpoint "
                       "(pass both, or neither for the toy model)")
    for flag in ("width", "height", "steps"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise RunError(f"--{flag} must be positive, got {value}")
    if args.workflow is not None:
        _existing_file(args.workflow, "--workflow", "pass a UI-format workflow .json (e.g. workflows/text_to_3_layers.json)")
    if args.checkpoint is not None:
        _existing_file(args.checkpoint, "--checkpoint", CHECKPOINT_HINT)
        problem = checkpoint_problem(args.checkpoint, context_dim=None)
        if problem:
            raise RunError(f"--checkpoint {args.checkpoint}: {problem}; {CHECKPOINT_HINT}")
        _existing_file(args.weights, "--weights", WEIGHTS_HINT)
        if args.weights.suffix != ".safetensors":
            raise RunError(f"--weights {args.weights} is not a .safetensors file; {WEIGHTS_HINT}")
    if args.out.exists() and not args.out.is_dir():
        raise RunError(f"--out {args.out} is a file; pass a folder (it is created when missing)")


def _existing_file(path: Path, flag: str, hint: str) -> None:
    if not path.exists():
        raise RunError(f"{flag} {path}: no such file; {hint}")
    if not path.is_file():
        raise RunError(f"{flag} {path} is a folder, not a file; {hint}")


def checkpoint_problem(path: Path, context_dim: int | None) -> str | None:
    """Why ``path`` cannot be an SD1.5 checkpoint, read from the safetensors header only (no weights loaded);
    None when it looks right or cannot be told without loading (pickled .ckpt files). ``context_dim``: SD1.5's
    text context width, checked once ComfyUI has booted (None: the file checks only)."""
    if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
        return f"{path.suffix or 'a file without extension'} is not a checkpoint format"
    if path.suffix.lower() != ".safetensors":
        return None
    header = _safetensors_header(path)
    if header is None:
        return "not a readable .safetensors file"
    keys = {k: v for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
    unet_keys = [k for k in keys if k.startswith("model.diffusion_model.")]
    if not unet_keys:
        return "not a single-file Stable Diffusion checkpoint (it has no model.diffusion_model.* weights)"
    contexts = {keys[k]["shape"][-1] for k in unet_keys if k.endswith("attn2.to_k.weight")}
    if context_dim is not None and contexts and contexts != {context_dim}:
        return (f"a checkpoint of another model family (text context width {max(contexts)}, e.g. SDXL or SD2), "
                f"but LayerDiff works with SD1.5-family checkpoints only (context width {context_dim})")
    return None


def _safetensors_header(path: Path) -> dict | None:
    """Tensor names -> {"shape"} plus ``__metadata__`` of a .safetensors file, read by safetensors itself without
    loading a tensor (before ComfyUI boots, so a wrong file fails at once); None when it cannot be read."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            header: dict = {name: {"shape": list(fh.get_slice(name).get_shape())} for name in fh.keys()}
            header["__metadata__"] = fh.metadata() or {}
    except (OSError, ValueError, SafetensorError):
        return None
    return header


def is_toy_checkpoint(path: Path) -> bool:
    """Checkpoints of the toy SD1.5 family (layerdiff_toy/toy_model.py) say so in their safetensors metadata."""
    header = _safetensors_header(path) if path.suffix.lower() == ".safetensors" else None
    return "layerdiff_toy_model" in ((header or {}).get("__metadata__") or {})


# ------------------------------------------------------------------------------------------------- model files
def toy_sources() -> tuple[Path, Path]:
    """(assets folder, LayerDiff weights) of the bundled toy shapes model (``layerdiff_toy/toy_model.py``)."""
    toy = toy_model
    assets = Path(getattr(toy, "TOY_ASSETS_DIR", REPO_ROOT / "assets" / "toy_shapes"))
    weights = toy.toy_layerdiff_weights_path(assets) if hasattr(toy, "assemble_toy_checkpoint") else None
    if weights is None or not assets.is_dir() or not weights.is_file():
        raise RunError(f"the bundled toy shapes model is missing ({assets} is not in this checkout); "
                       "pass --checkpoint and --weights to run your own SD1.5 checkpoint and LayerDiff weights")
    return assets, weights


def toy_checkpoint_path() -> Path:
    return TOY_CACHE / toy_model.TOY_CHECKPOINT_NAME


def toy_files() -> tuple[Path, Path]:
    """(checkpoint, weights) of the bundled toy shapes model. The full checkpoint is assembled from the assets into
    .cache/toy_shapes once, and again only when the assets change (host-free: safetensors and torch only)."""
    assets, weights = toy_sources()
    checkpoint = toy_checkpoint_path()
    newest_asset = max((p.stat().st_mtime for p in assets.rglob("*") if p.is_file()), default=0.0)
    if checkpoint.is_file() and checkpoint.stat().st_mtime >= newest_asset:
        progress(f"toy checkpoint: {checkpoint} (assembled before)")
        return checkpoint, weights
    progress(f"assembling the toy checkpoint from {assets} into {checkpoint}")
    toy = toy_model
    try:
        toy.assemble_toy_checkpoint(checkpoint, assets_dir=assets)
    except toy.ToyAssetError as exc:
        raise RunError(str(exc)) from exc
    return checkpoint, weights


def expose_model(folder: str, path: Path) -> str:
    """Make ``path`` (anywhere on disk) a file of ComfyUI's model folder ``folder``; returns the name to select.
    A symlink in this run's private models folder: no user folder is scanned and names never clash."""
    return expose_model_file(folder, path)


def warn_unknown_toy_words(args: argparse.Namespace) -> None:
    """One line when a prompt has words or phrasing the toy model never saw (its text encoder is random and frozen,
    so it reads nothing else), listing the words it knows."""
    from layerdiff_toy import shapes

    prompts_by_flag = {"--prompt": (args.prompt, "global"), "--background": (args.background, "background"),
                       **{f"--foreground {i + 1}": (p, "foreground") for i, p in enumerate(args.foregrounds)}}
    problems = {flag: problem for flag, (text, kind) in prompts_by_flag.items()
                if (problem := shapes.prompt_problem(text, kind))}
    if problems:
        where = "; ".join(f"{flag}: {problem}" for flag, problem in problems.items())
        progress(f"warning: the toy model cannot read these prompts ({where}); it knows only the words "
                 f"{' '.join(shapes.vocabulary())}")


# ------------------------------------------------------------------------------------------------- the prompt
def workflow_path(args: argparse.Namespace) -> Path:
    if args.workflow is not None:
        return args.workflow
    return WORKFLOWS / ("text_to_2_layers.json" if len(args.foregrounds) == 1 else "text_to_3_layers.json")


def build_prompt(args: argparse.Namespace, ckpt_name: str, weights_name: str, toy: bool) -> dict:
    """The workflow as an API prompt with the command line's files, prompts and settings in its widgets."""
    try:
        api = prompts.ui_to_api(workflow_path(args))
    except (OSError, ValueError) as exc:
        raise RunError(f"cannot read workflow {workflow_path(args)}: {exc}") from exc
    default_size = TOY_SIZE if toy else None  # None: the workflow's size
    size = {"width": args.width or default_size, "height": args.height or args.width or default_size}
    settings = {
        "CheckpointLoaderSimple": {"ckpt_name": ckpt_name},
        "LayerDiffLoadWeights": {"weights_name": weights_name},
        "LayerDiffPromptEncode": {"global_prompt": args.prompt, "background_prompt": args.background,
                                  "foreground_prompts": "\n".join(args.foregrounds), "negative_prompt": args.negative},
        "LayerDiffEmptyLatent": size,
        "LayerDiffSMGSampler": {"seed": args.seed, "steps": args.steps, "cfg": args.cfg, "smg_scale": args.smg_scale},
        "LayerDiffSaveLayers": {"filename_prefix": FILE_PREFIX, "layered_file": args.layered_file},
    }
    for class_type, values in settings.items():
        matching = [n for n in api.values() if n["class_type"] == class_type]
        if not matching:
            raise RunError(f"workflow {workflow_path(args)} has no {class_type} node; start from a shipped workflow "
                           f"in {WORKFLOWS}")
        for node in matching:
            node["inputs"].update({k: v for k, v in values.items() if v is not None})
    return api


# ------------------------------------------------------------------------------------------------- running
def progress(message: str) -> None:
    print(f"==> {message}", file=sys.stderr, flush=True)


class NodeProgress:
    """Prints one line per executed node ("[3/13] LayerDiff Apply (UNet patch)"); ComfyUI's sampler shows its
    own step bar (tqdm) meanwhile."""

    def __init__(self, api: dict):
        import nodes

        self.names = {nid: nodes.NODE_DISPLAY_NAME_MAPPINGS.get(n["class_type"], n["class_type"])
                      for nid, n in api.items()}
        self.done = 0

    def __call__(self, event: str, data) -> None:
        if event == "executing" and isinstance(data, dict) and data.get("node") is not None:
            self.done += 1
            progress(f"[{self.done}/{len(self.names)}] {self.names.get(str(data['node']), data['node'])}")


def on_cpu(asked: bool) -> bool:
    """True when ComfyUI must be pinned to the CPU: asked (--cpu), or no GPU that torch can use."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    return asked or not (torch.cuda.is_available() or (mps is not None and mps.is_available()))


def boot_comfyui(args: argparse.Namespace, work_dir: Path, out_dir: Path) -> None:
    import torch

    threads = int(os.environ.get("LAYERDIFF_TORCH_THREADS", "0"))
    if threads > 0:
        torch.set_num_threads(threads)
    cpu = on_cpu(args.cpu)
    progress(f"starting ComfyUI from {headless.default_comfyui_path()} "
             f"({'CPU' if cpu else 'GPU'}, torch {torch.__version__})")
    headless.boot(work_dir=work_dir, cpu=cpu)
    NOISE.booting = False
    import folder_paths

    folder_paths.set_output_directory(str(out_dir))
    headless.host().output_dir = out_dir


def run(args: argparse.Namespace) -> list[Path]:
    """Generate one layered picture; returns the files written (composite first)."""
    check_args(args)
    checkpoint, weights = (args.checkpoint, args.weights) if args.checkpoint is not None else toy_files()
    toy = is_toy_checkpoint(checkpoint)
    out_dir = args.out.expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="layerdiff-run-") as work:
        boot_comfyui(args, Path(work), out_dir)
        problem = checkpoint_problem(checkpoint, product_names("layerdiff_model.modules.config", "SD15_CONTEXT_DIM"))
        if problem:
            raise RunError(f"--checkpoint {checkpoint}: {problem}; {CHECKPOINT_HINT}")
        if toy:  # ComfyUI's model detection knows SD1.5 at width 320 only
            toy_model.register_toy_sd15()
            warn_unknown_toy_words(args)
        api = build_prompt(args, expose_model("checkpoints", checkpoint), expose_model("layerdiff", weights), toy)
        progress(f"running {workflow_path(args).name}: {len(args.foregrounds)} foreground layer(s), "
                 f"checkpoint {checkpoint.name}, weights {weights.name}")
        run_result = prompts.run_prompt(api, on_message=NodeProgress(api))
    return written_files(run_result)


def written_files(run_result) -> list[Path]:
    """Every file LayerDiffSaveLayers wrote for this run: the stem of its composite(s), all suffixes."""
    composites = [p for p in run_result.files() if p.name.endswith("_composite.png")]
    if not composites:
        raise RunError("the workflow ran but saved no layers (does it end in a LayerDiff Save Layers node?)")
    files = []
    for composite in composites:
        stem = composite.name[: -len("_composite.png")]
        files += [composite] + sorted(p for p in composite.parent.glob(f"{stem}[._]*") if p != composite)
    return files


def user_message(exc: BaseException) -> str | None:
    """The one-line message for an error the user can fix, or None for a bug (then the traceback is shown)."""
    if isinstance(exc, RunError):
        return str(exc)
    if isinstance(exc, prompts.NodeExecutionError):
        hint = {"CheckpointLoaderSimple": CHECKPOINT_HINT, "LayerDiffApply": CHECKPOINT_HINT,
                "LayerDiffLoadWeights": WEIGHTS_HINT}.get(exc.node_type)
        message = " ".join(str(exc.exception_message).split())
        return f"{message.rstrip('. ')}; {hint}" if hint else message
    if isinstance(exc, headless.HarnessError):  # no ComfyUI at the path, workflow refused by validation
        return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return None


class HostNoise(logging.Filter):
    """What ComfyUI logs that a user of this command does not need (shown with --verbose): warnings while it boots
    (built-in nodes whose optional dependencies are missing; a workflow that needs one fails validation by name)
    and the traceback its executor logs for a failing node (reported here as one line)."""

    def __init__(self):
        super().__init__()
        self.booting = True

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return Path(record.pathname).name != "execution.py"
        return not self.booting


NOISE = HostNoise()


def _configure_logging(verbose: bool) -> None:
    """ComfyUI logs through the root logger: warnings and errors only by default, everything with --verbose."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    if not verbose:
        handler.addFilter(NOISE)
        warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler], force=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    _configure_logging(args.verbose)
    started = time.monotonic()
    try:
        files = run(args)
    except KeyboardInterrupt:
        print("generate_layers: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001  (user errors: one line; anything else is a bug: traceback)
        message = user_message(exc)
        if message is None or args.verbose:
            raise
        print(f"generate_layers: error: {message}", file=sys.stderr)
        return 1
    print(f"LayerDiff: {len(files)} files in {files[0].parent} ({time.monotonic() - started:.1f} s)")
    for path in files:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
