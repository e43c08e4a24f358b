"""Headless ComfyUI harness for the tests.

Boots a real ComfyUI (the one at ``COMFYUI_PATH``, else the pinned copy in ``.cache/comfyui`` that
``scripts/setup_comfyui.sh`` unpacks) inside the test process, loads this repository as a custom node the way
ComfyUI does, builds tiny SD1.5-architecture models that ComfyUI's own loaders accept, converts UI-format
workflows to API prompts and runs prompts through ComfyUI's validator and executor.

Works on the pinned 2024 ComfyUI (synchronous node loading and validation) and on 0.3.x (``async``). Every
difference is bridged by feature detection (``_call``), never by parsing version strings.

Nothing here imports ComfyUI at module import time: call :func:`boot` first (the conftest fixtures do).
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import sys
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch

LOG = logging.getLogger("LayerDiff.tests.comfy_host")

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(__file__).resolve().parent / "data"
PACKAGE_DIR_NAME = "ComfyUI-LayerDiff"
TINY_SD15_NAME = "tiny_sd15.safetensors"
TINY_CONTROLNET_NAME = "tiny_controlnet_sd15.safetensors"
DEFAULT_SEED = 20240301


def toy_model() -> ModuleType:
    """The extension's ``nodes.toy_model`` module, imported from the repository (ComfyUI must be on sys.path)."""
    import importlib.util

    name = "layerdiff_toy_model"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "nodes" / "toy_model.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


# A tiny SDXL-family UNet (context 2048, pooled "adm" input): a model LayerDiff must refuse.
TINY_SDXL_UNET_YAML = {
    **toy_model().TOY_UNET_YAML,
    "context_dim": 2048,
    "use_linear_in_transformer": True,
    "adm_in_channels": 2816,
    "num_classes": "sequential",
}


# ------------------------------------------------------------------------------------------------- errors
class HarnessError(RuntimeError):
    """The harness could not do what was asked (bad ComfyUI path, package import failure, ...)."""


class UnknownNodeTypeError(HarnessError):
    """A workflow uses a node type that is not registered in this ComfyUI."""


class PromptValidationError(HarnessError):
    """ComfyUI's ``validate_prompt`` refused the prompt; ``node_errors`` is ComfyUI's per-node report."""

    def __init__(self, message: str, error: dict | None, node_errors: dict):
        super().__init__(message)
        self.error = error
        self.node_errors = node_errors


class NodeExecutionError(HarnessError):
    """A node raised while ComfyUI executed the prompt; the fields mirror ComfyUI's ``execution_error`` message."""

    def __init__(self, data: dict):
        self.node_id = str(data.get("node_id"))
        self.node_type = data.get("node_type")
        self.exception_type = data.get("exception_type", "")
        self.exception_message = data.get("exception_message", "")
        self.traceback = "".join(data.get("traceback") or [])
        super().__init__(
            f"{self.node_type} (node {self.node_id}) failed: {self.exception_type}: {self.exception_message}\n"
            f"{self.traceback}"
        )


# ------------------------------------------------------------------------------------------------- host state
@dataclass
class HostInfo:
    """Where the booted ComfyUI lives and where it reads and writes files during the test session."""

    comfy_root: Path
    work_dir: Path
    models_dir: Path
    input_dir: Path
    output_dir: Path
    temp_dir: Path
    custom_nodes_dir: Path
    async_api: bool
    version: str
    package: ModuleType | None = None
    node_mappings: dict = field(default_factory=dict)

    def model_path(self, folder: str, name: str) -> Path:
        """Path of model file ``name`` in this session's models folder ``folder`` (e.g. ``checkpoints``)."""
        return self.models_dir / folder / name


_HOST: HostInfo | None = None
_DEFAULT_WORK_DIR: Callable[[], os.PathLike] | None = None


def set_default_work_dir(provider: Callable[[], os.PathLike] | None) -> None:
    """Where :func:`boot` puts ComfyUI's folders when called without ``work_dir`` (called lazily, once).

    The conftest points it at pytest's session temp dir, so any test or helper may call ``boot()`` first.
    """
    global _DEFAULT_WORK_DIR
    _DEFAULT_WORK_DIR = provider


def default_comfyui_path() -> Path:
    """``COMFYUI_PATH`` when set, else the pinned copy unpacked by ``scripts/setup_comfyui.sh``."""
    env = os.environ.get("COMFYUI_PATH")
    return Path(env).expanduser().resolve() if env else REPO_ROOT / ".cache" / "comfyui"


def boot(work_dir: str | os.PathLike | None = None, comfy_root: str | os.PathLike | None = None) -> dict:
    """Boot ComfyUI headless once per process and load this repository as a custom node.

    ``work_dir`` receives ComfyUI's models/input/output/temp folders (a fresh temporary folder when omitted).
    Later calls return the first call's result. Returns the package's ``NODE_CLASS_MAPPINGS`` (empty while the
    repository root has no ``__init__.py``); they are also merged into ``nodes.NODE_CLASS_MAPPINGS``.
    """
    global _HOST
    if _HOST is None:
        root = Path(comfy_root).expanduser().resolve() if comfy_root else default_comfyui_path()
        _HOST = _boot(root, _work_dir(work_dir))
    return _HOST.node_mappings


def host() -> HostInfo:
    """The booted host (boots with defaults when nothing has booted yet)."""
    boot()
    return _HOST


def _work_dir(work_dir: str | os.PathLike | None) -> Path:
    if work_dir is None and _DEFAULT_WORK_DIR is not None:
        work_dir = _DEFAULT_WORK_DIR()
    if work_dir is None:
        import tempfile

        work_dir = tempfile.mkdtemp(prefix="layerdiff-comfyui-")
    path = Path(work_dir).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _boot(comfy_root: Path, work_dir: Path) -> HostInfo:
    _put_comfy_on_path(comfy_root)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    _import_cli_args_on_cpu()
    _preimport_utils_package(comfy_root)
    import comfy.model_management  # noqa: F401  (must come after args.cpu = True)

    info = _redirect_folders(comfy_root, work_dir)
    import nodes

    info.async_api = inspect.iscoroutinefunction(nodes.load_custom_node)
    _init_builtin_nodes(nodes)
    register_test_model_configs()
    info.package, info.node_mappings = _load_package(info)
    LOG.info("ComfyUI %s booted from %s (%d node types)", info.version, comfy_root, len(nodes.NODE_CLASS_MAPPINGS))
    return info


def _put_comfy_on_path(comfy_root: Path) -> None:
    """Put the ComfyUI root first on ``sys.path`` and make sure ``nodes`` will be ComfyUI's ``nodes.py``."""
    if not (comfy_root / "nodes.py").is_file() or not (comfy_root / "comfy").is_dir():
        raise HarnessError(
            f"no ComfyUI at {comfy_root}: set COMFYUI_PATH or run `bash scripts/setup_comfyui.sh` "
            "(it unpacks the pinned copy into .cache/comfyui)"
        )
    loaded = sys.modules.get("nodes")
    if loaded is not None and Path(getattr(loaded, "__file__", "")).resolve() != comfy_root / "nodes.py":
        raise HarnessError(
            f"a module named 'nodes' was imported before ComfyUI booted ({getattr(loaded, '__file__', loaded)}); "
            "import this repository's packages relatively, never as top-level 'nodes'"
        )
    root = str(comfy_root)
    if root in sys.path:
        sys.path.remove(root)
    sys.path.insert(0, root)


def _import_cli_args_on_cpu() -> None:
    """Import ``comfy.cli_args`` without letting it see pytest's argv, then force CPU."""
    saved_argv = sys.argv
    sys.argv = [saved_argv[0] if saved_argv else "pytest"]
    try:
        import comfy.cli_args
    finally:
        sys.argv = saved_argv
    comfy.cli_args.args.cpu = True
    if "comfy.model_management" in sys.modules:
        import comfy.model_management

        if comfy.model_management.get_torch_device().type != "cpu":
            raise HarnessError("comfy.model_management was imported before boot() and did not pick the CPU")


def _preimport_utils_package(comfy_root: Path) -> None:
    """0.3.x ships a top-level ``utils`` package; ComfyUI's ``nodes.py`` puts ``comfy/`` first on ``sys.path``, so
    a later ``import utils.install_util`` would find ``comfy/utils.py`` instead. ``main.py`` imports the package
    early; do the same."""
    if (comfy_root / "utils" / "__init__.py").is_file():
        import utils  # noqa: F401


def _redirect_folders(comfy_root: Path, work_dir: Path) -> HostInfo:
    """Point ComfyUI's model, input, output, temp, user and custom_nodes folders into ``work_dir``."""
    import folder_paths

    models = work_dir / "models"
    original_models = os.path.realpath(folder_paths.models_dir)
    for name, (paths, extensions) in list(folder_paths.folder_names_and_paths.items()):
        if name == "configs":  # shipped yaml configs stay readable
            continue
        new_paths = [_relocate(p, original_models, models) for p in paths]
        folder_paths.folder_names_and_paths[name] = (new_paths, extensions)
    folder_paths.models_dir = str(models)
    custom_nodes = work_dir / "custom_nodes"
    folder_paths.folder_names_and_paths["custom_nodes"] = ([str(custom_nodes)], set())
    info = HostInfo(
        comfy_root=comfy_root,
        work_dir=work_dir,
        models_dir=models,
        input_dir=work_dir / "input",
        output_dir=work_dir / "output",
        temp_dir=work_dir / "temp",
        custom_nodes_dir=custom_nodes,
        async_api=False,
        version=_comfy_version(comfy_root),
    )
    _set_directories(folder_paths, info, work_dir / "user")
    for paths, _ in folder_paths.folder_names_and_paths.values():
        for path in paths:
            if str(path).startswith(str(work_dir)):
                Path(path).mkdir(parents=True, exist_ok=True)
    getattr(folder_paths, "filename_list_cache", {}).clear()
    return info


def _relocate(path: str, old_root: str, new_root: Path) -> str:
    real = os.path.realpath(path)
    if real == old_root or real.startswith(old_root + os.sep):
        return str(new_root / os.path.relpath(real, old_root))
    return path


def _set_directories(folder_paths: ModuleType, info: HostInfo, user_dir: Path) -> None:
    for path in (info.input_dir, info.output_dir, info.temp_dir, user_dir, info.custom_nodes_dir):
        path.mkdir(parents=True, exist_ok=True)
    folder_paths.set_input_directory(str(info.input_dir))
    folder_paths.set_output_directory(str(info.output_dir))
    folder_paths.set_temp_directory(str(info.temp_dir))
    if hasattr(folder_paths, "set_user_directory"):
        folder_paths.set_user_directory(str(user_dir))
    else:
        folder_paths.user_directory = str(user_dir)


def _comfy_version(comfy_root: Path) -> str:
    """``comfyui_version.py``'s version (0.3.x); the 2024 copy has no version file."""
    import re

    version_file = Path(comfy_root) / "comfyui_version.py"
    if version_file.is_file():
        match = re.search(r"__version__\s*=\s*[\"']([^\"']+)", version_file.read_text())
        return match.group(1) if match else "unknown"
    return "pre-0.1 (2024)"


def _call(func: Callable, *args, **kwargs):
    """Call a ComfyUI function that is synchronous in 2024 and ``async`` in 0.3.x."""
    result = func(*args, **kwargs)
    if inspect.isawaitable(result):
        return asyncio.run(_await(result))
    return result


async def _await(awaitable):
    return await awaitable


def _init_builtin_nodes(nodes: ModuleType) -> None:
    """Load the ``comfy_extras`` nodes without scanning any user custom_nodes folder."""
    if hasattr(nodes, "init_extra_nodes"):  # 0.3.x
        params = inspect.signature(nodes.init_extra_nodes).parameters
        kwargs = {k: False for k in ("init_custom_nodes", "init_api_nodes") if k in params}
        _call(nodes.init_extra_nodes, **kwargs)
    else:  # 2024: init_custom_nodes() also scans the "custom_nodes" folders: hide them meanwhile
        import folder_paths

        saved = folder_paths.folder_names_and_paths["custom_nodes"]
        folder_paths.folder_names_and_paths["custom_nodes"] = ([], set())
        try:
            nodes.init_custom_nodes()
        finally:
            folder_paths.folder_names_and_paths["custom_nodes"] = saved


# ------------------------------------------------------------------------------------------------- our package
def _load_package(info: HostInfo) -> tuple[ModuleType | None, dict]:
    """Load the repository as ComfyUI loads a custom node folder and return (module, its NODE_CLASS_MAPPINGS)."""
    import nodes

    init_file = REPO_ROOT / "__init__.py"
    if not init_file.is_file():
        LOG.warning("%s has no __init__.py yet: no LayerDiff nodes are registered", REPO_ROOT)
        return None, {}
    module_path = _package_link(info.custom_nodes_dir)
    builtin_names = set(nodes.NODE_CLASS_MAPPINGS)
    with _captured_logs() as records:
        ok = _call(nodes.load_custom_node, str(module_path), builtin_names)
    if not ok:
        details = "\n".join(r.getMessage() for r in records)
        raise HarnessError(f"ComfyUI could not load {module_path} as a custom node:\n{details}")
    module = _find_loaded_module(module_path / "__init__.py")
    mappings = dict(getattr(module, "NODE_CLASS_MAPPINGS", None) or {})
    clashes = sorted(set(mappings) & builtin_names)
    if clashes:
        raise HarnessError(f"node names clash with ComfyUI built-ins (ComfyUI would ignore them): {clashes}")
    return module, mappings


def _package_link(custom_nodes_dir: Path) -> Path:
    """A ``custom_nodes/ComfyUI-LayerDiff`` symlink to the repository, so the module name does not depend on
    the checkout folder's name (2024 ComfyUI names the module after the folder)."""
    link = custom_nodes_dir / PACKAGE_DIR_NAME
    if not link.exists():
        try:
            link.symlink_to(REPO_ROOT, target_is_directory=True)
        except OSError:
            return REPO_ROOT
    return link


def _find_loaded_module(init_file: Path) -> ModuleType:
    for module in list(sys.modules.values()):
        if getattr(module, "__file__", None) and Path(module.__file__) == init_file:
            return module
    raise HarnessError(f"ComfyUI reported success but no module was loaded from {init_file}")


@contextlib.contextmanager
def _captured_logs():
    """Collect log records of WARNING and above emitted on the root logger inside the block."""
    records: list[logging.LogRecord] = []

    class _Collector(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = _Collector(level=logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield records
    finally:
        root.removeHandler(handler)


# ------------------------------------------------------------------------------------------------- test model configs
# The toy SD1.5 family (UNet width 32, 2-layer CLIP, TAESD VAE) is product code: nodes/toy_model.py. The harness
# adds only what tests need on top (an SDXL-family model that must be refused, the tiny ControlNet).
_TEST_CONFIGS: dict[str, type] = {}


def register_test_model_configs() -> dict[str, type]:
    """Register the toy SD1.5 config with ComfyUI's model detection (idempotent) and return the test configs.

    ``TinySD15`` is the toy config (subclass of ``comfy.supported_models.SD15``). ``TinySDXL`` is not
    registered: it is only built directly.
    """
    if _TEST_CONFIGS:
        return _TEST_CONFIGS
    import comfy.supported_models as supported

    _TEST_CONFIGS.update(TinySD15=toy_model().register_toy_sd15(), TinySDXL=_make_tiny_sdxl_class(supported))
    return _TEST_CONFIGS


def _make_tiny_sdxl_class(supported: ModuleType) -> type:
    class TinySDXL(supported.SDXL):
        """Test-only SDXL-family config for a tiny UNet; never registered for detection."""

        unet_config = {**supported.SDXL.unet_config, "model_channels": 32, "transformer_depth": [1, 1]}
        unet_extra_config = {"num_heads": -1, "num_head_channels": 16}

    return TinySDXL


def tiny_unet_config(yaml_config: dict | None = None) -> dict:
    return toy_model().toy_unet_config(yaml_config)


def init_weights_(module: torch.nn.Module, seed: int = DEFAULT_SEED, std: float | str = 0.02, prefix: str = "") -> None:
    toy_model().init_weights_(module, seed, std, prefix)


def build_tiny_sd15_model(seed: int = DEFAULT_SEED):
    register_test_model_configs()
    return toy_model().build_toy_sd15_model(seed)


def make_tiny_sd15_checkpoint(path: str | os.PathLike, seed: int = DEFAULT_SEED, vae: str = "taesd",
                              dtype: torch.dtype = torch.float32) -> Path:
    """Write a toy SD1.5 checkpoint with random weights (loads after :func:`register_test_model_configs`)."""
    register_test_model_configs()
    return toy_model().make_toy_sd15_checkpoint(path, seed, vae, dtype)


def make_tiny_controlnet(path: str | os.PathLike, seed: int = DEFAULT_SEED + 1, zero_conv_std: float = 0.2) -> Path:
    """Write a ControlNet for the tiny UNet (keys as in ``control_v11*.safetensors``: no prefix).

    Built with ComfyUI's ``comfy.cldm.cldm.ControlNet`` from the config ComfyUI detects for the tiny UNet, so the
    core ControlNetLoader loads it. Zero convs get non-zero weights (std ``zero_conv_std``) so the control
    visibly changes the result.
    """
    import comfy.cldm.cldm
    from safetensors.torch import save_file

    config = dict(build_tiny_sd15_model(seed).model_config.unet_config)
    config.pop("out_channels", None)
    config["hint_channels"] = 3
    with torch.no_grad():
        control = comfy.cldm.cldm.ControlNet(**config)
    init_weights_(control, seed)
    _randomise_zero_convs_(control, seed, zero_conv_std)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().contiguous() for k, v in control.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "pt", "layerdiff_test_model": "tiny_controlnet"})
    return path


def _randomise_zero_convs_(control: torch.nn.Module, seed: int, std: float) -> None:
    with torch.no_grad():
        for name, param in control.named_parameters():
            if name.startswith(("zero_convs.", "middle_block_out.")):
                generator = torch.Generator().manual_seed(seed + zlib.crc32(name.encode()))
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def make_tiny_sdxl_like_unet_model(seed: int = DEFAULT_SEED):
    """A ComfyUI ``ModelPatcher`` around a tiny SDXL-family model (context 2048, pooled input): not SD1.5.

    For "wrong model family" tests; it is not a checkpoint and has no text encoder or VAE.
    """
    import comfy.model_management
    import comfy.model_patcher

    config_class = register_test_model_configs()["TinySDXL"]
    with torch.no_grad():
        model = toy_model().cpu_model_config(config_class, tiny_unet_config(TINY_SDXL_UNET_YAML)).get_model({})
    init_weights_(model.diffusion_model, seed)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))


def ensure_tiny_sd15_checkpoint(name: str = TINY_SD15_NAME, **kwargs) -> str:
    """Write the tiny checkpoint into this session's ``checkpoints`` folder (once) and return its name."""
    return _ensure_model("checkpoints", name, make_tiny_sd15_checkpoint, **kwargs)


def ensure_tiny_controlnet(name: str = TINY_CONTROLNET_NAME, **kwargs) -> str:
    """Write the tiny ControlNet into this session's ``controlnet`` folder (once) and return its name."""
    return _ensure_model("controlnet", name, make_tiny_controlnet, **kwargs)


def _ensure_model(folder: str, name: str, maker: Callable, **kwargs) -> str:
    import folder_paths

    path = host().model_path(folder, name)
    if not path.is_file():
        maker(path, **kwargs)
    getattr(folder_paths, "filename_list_cache", {}).pop(folder, None)
    if name not in folder_paths.get_filename_list(folder):
        raise HarnessError(f"{path} is not listed by folder_paths for {folder!r}")
    return name


def load_checkpoint(name: str = TINY_SD15_NAME):
    """(MODEL, CLIP, VAE) from the core CheckpointLoaderSimple node, called outside the executor.

    Runs under ``torch.no_grad()``: the executor runs nodes under ``torch.inference_mode()`` and 2024's CLIP
    constructor relies on it (an in-place copy into a parameter); ``no_grad`` keeps the weights usable for
    autograd later, which inference tensors are not.
    """
    import nodes

    with torch.no_grad():
        return nodes.CheckpointLoaderSimple().load_checkpoint(name)[:3]


# ------------------------------------------------------------------------------------------------- UI -> API
UI_ONLY_TYPES = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
CONTROL_AFTER_GENERATE = frozenset({"fixed", "increment", "decrement", "randomize"})
MODE_MUTED, MODE_BYPASSED = 2, 4


def load_workflow(path: str | os.PathLike) -> dict:
    """Read a UI-format workflow JSON file."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def ui_to_api(workflow: dict | str | os.PathLike, node_class_mappings: dict | None = None) -> dict:
    """Convert a UI-format workflow (what the frontend saves) into an API prompt ``{id: {class_type, inputs}}``.

    Widget values are mapped to the widget inputs in ``INPUT_TYPES`` order (required, then optional); the
    "control after generate" value that follows seed widgets is skipped; links become ``[source_id, slot]``;
    a link into a converted widget overrides the widget value. Reroutes are resolved, links from primitive nodes
    keep the widget value, muted nodes (mode 2) are dropped and bypassed nodes (mode 4) pass their input of the
    same type through, as the frontend does. ``node_class_mappings`` defaults to ComfyUI's registry.
    """
    if isinstance(workflow, (str, os.PathLike)):
        workflow = load_workflow(workflow)
    mappings = node_class_mappings if node_class_mappings is not None else _comfy_mappings()
    graph = _Graph(workflow)
    prompt = {}
    for node in workflow.get("nodes", []):
        if node.get("type") in UI_ONLY_TYPES or node.get("mode", 0) in (MODE_MUTED, MODE_BYPASSED):
            continue
        cls = mappings.get(node.get("type"))
        if cls is None:
            raise UnknownNodeTypeError(_unknown_type_message(workflow, node))
        inputs = widget_inputs(cls, node.get("widgets_values"))
        inputs.update(graph.linked_inputs(node))
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def _unknown_type_message(workflow: dict, node: dict) -> str:
    kind = node.get("type")
    message = f"workflow node {node.get('id')} has type {kind!r}, which is not a registered node type"
    subgraphs = ((workflow.get("definitions") or {}).get("subgraphs")) or []
    if any(isinstance(g, dict) and g.get("id") == kind for g in subgraphs):
        message += " (it is a frontend subgraph; ui_to_api does not expand subgraphs)"
    return message


def _comfy_mappings() -> dict:
    boot()
    import nodes

    return nodes.NODE_CLASS_MAPPINGS


def widget_specs(cls) -> list[tuple[str, dict]]:
    """(name, options) of every widget input of node class ``cls``, in the order the frontend creates them."""
    input_types = cls.INPUT_TYPES()
    specs = []
    for section in ("required", "optional"):
        for name, spec in (input_types.get(section) or {}).items():
            if not isinstance(spec, (list, tuple)) or not spec:
                continue
            kind = spec[0]
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            is_widget = isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES
            if is_widget and not options.get("forceInput"):
                specs.append((name, options))
    return specs


def widget_inputs(cls, widgets_values) -> dict:
    """Map a node's ``widgets_values`` (list, or dict in newer frontends) to its widget input names."""
    specs = widget_specs(cls)
    if isinstance(widgets_values, dict):
        return {name: widgets_values[name] for name, _ in specs if name in widgets_values}
    values = list(widgets_values or [])
    inputs, index = {}, 0
    for name, options in specs:
        if index >= len(values):
            break
        inputs[name] = values[index]
        index += 1
        if _has_control_widget(name, options) and index < len(values) and values[index] in CONTROL_AFTER_GENERATE:
            index += 1
    return inputs


def _has_control_widget(name: str, options: dict) -> bool:
    return name in ("seed", "noise_seed") or bool(options.get("control_after_generate"))


class _Graph:
    """Link lookup for :func:`ui_to_api`: resolves reroutes, primitives, muted and bypassed nodes."""

    def __init__(self, workflow: dict):
        self.nodes = {str(n["id"]): n for n in workflow.get("nodes", [])}
        self.links = {}
        for link in workflow.get("links", []) or []:
            if isinstance(link, dict):
                self.links[link["id"]] = (str(link["origin_id"]), int(link["origin_slot"]), link.get("type"))
            else:
                self.links[link[0]] = (str(link[1]), int(link[2]), link[5] if len(link) > 5 else None)

    def linked_inputs(self, node: dict) -> dict:
        inputs = {}
        for socket in node.get("inputs", []) or []:
            link_id = socket.get("link")
            if link_id is None:
                continue
            source = self.resolve(link_id, socket.get("type"))
            if source is not None:
                inputs[socket["name"]] = source
        return inputs

    def resolve(self, link_id, wanted_type, depth: int = 0):
        """``[node_id, slot]`` that really feeds ``link_id``, or None when nothing does (muted, primitive)."""
        if depth > 100 or link_id not in self.links:
            return None
        origin_id, origin_slot, _ = self.links[link_id]
        origin = self.nodes.get(origin_id)
        if origin is None:
            return None
        kind, mode = origin.get("type"), origin.get("mode", 0)
        if kind == "Reroute":
            return self._follow_input(origin, 0, wanted_type, depth)
        if kind == "PrimitiveNode" or kind in UI_ONLY_TYPES or mode == MODE_MUTED:
            return None
        if mode == MODE_BYPASSED:
            return self._bypass(origin, origin_slot, wanted_type, depth)
        return [origin_id, origin_slot]

    def _follow_input(self, node: dict, index: int, wanted_type, depth: int):
        sockets = node.get("inputs") or []
        if index >= len(sockets) or sockets[index].get("link") is None:
            return None
        return self.resolve(sockets[index]["link"], wanted_type, depth + 1)

    def _bypass(self, node: dict, origin_slot: int, wanted_type, depth: int):
        """The frontend's bypass rule: the input at the output's index if its type matches, else the first
        input of the same type."""
        sockets = node.get("inputs") or []
        for index in [origin_slot, *range(len(sockets))]:
            if index < len(sockets) and sockets[index].get("type") == wanted_type:
                return self._follow_input(node, index, wanted_type, depth)
        return None


# ------------------------------------------------------------------------------------------------- running prompts
class FakeServer:
    """The part of ComfyUI's PromptServer that ``PromptExecutor`` uses; records every message it is sent."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata: dict = {}
        self.messages: list[tuple[str, Any]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass

    def send_progress_text(self, text, node_id, sid=None):
        self.messages.append(("progress_text", {"text": text, "node": node_id}))


@dataclass
class PromptRun:
    """What one :func:`run_prompt` produced."""

    prompt_id: str
    ui: dict
    messages: list
    executor: Any

    def output(self, node_id, slot: int = 0):
        """The value a node produced on output ``slot`` (a list when the node returned a list output)."""
        outputs = _executor_outputs(self.executor, str(node_id))
        if outputs is None:
            raise KeyError(f"node {node_id} produced no cached output")
        value = outputs[slot]
        return value[0] if isinstance(value, list) and len(value) == 1 else value

    def files(self, kind: str = "images") -> list[Path]:
        """Files listed in the ui outputs (e.g. SaveImage results), as paths in this session's folders."""
        import folder_paths

        paths = []
        for node_ui in self.ui.values():
            for item in node_ui.get(kind, []) or []:
                base = folder_paths.get_directory_by_type(item.get("type", "output"))
                paths.append(Path(base) / item.get("subfolder", "") / item["filename"])
        return paths


def _executor_outputs(executor, node_id: str):
    if hasattr(executor, "caches"):  # 0.3.x
        entry = executor.caches.outputs.get(node_id)
        return getattr(entry, "outputs", entry)
    return executor.outputs.get(node_id)  # 2024


def validate(api_prompt: dict, prompt_id: str | None = None) -> list[str]:
    """Validate with ComfyUI's ``execution.validate_prompt``; return the output node ids, raise if any is invalid."""
    import execution
    import nodes

    unknown = {k: v.get("class_type") for k, v in api_prompt.items() if v.get("class_type") not in nodes.NODE_CLASS_MAPPINGS}
    if unknown:
        raise PromptValidationError(f"ComfyUI refused the prompt: unregistered node types {unknown}", None, {})
    prompt_id = prompt_id or str(uuid.uuid4())
    params = inspect.signature(execution.validate_prompt).parameters
    if len(params) >= 2:  # 0.3.x: (prompt_id, prompt, partial_execution_list)
        result = _call(execution.validate_prompt, prompt_id, api_prompt, None)
    else:  # 2024: (prompt)
        result = execution.validate_prompt(api_prompt)
    valid, error, good_outputs, node_errors = result[:4]
    if not valid or node_errors:
        raise PromptValidationError(_validation_message(error, node_errors), error, node_errors)
    return list(good_outputs)


def _validation_message(error: dict | None, node_errors: dict) -> str:
    lines = ["ComfyUI refused the prompt"]
    if error:
        lines.append(f"{error.get('message')}: {error.get('details')}")
    for node_id, report in (node_errors or {}).items():
        for reason in report.get("errors", []):
            lines.append(f"  {report.get('class_type')} (node {node_id}): {reason.get('message')}: {reason.get('details')}")
    return "\n".join(lines)


def run_prompt(api_prompt: dict, extra_data: dict | None = None) -> PromptRun:
    """Validate and execute an API prompt with ComfyUI's own ``PromptExecutor`` (fresh executor, no cache).

    Returns a :class:`PromptRun` (ui outputs, recorded server messages, node outputs); raises
    :class:`PromptValidationError` or :class:`NodeExecutionError` with ComfyUI's error text.
    """
    import execution

    boot()
    prompt = {str(k): v for k, v in api_prompt.items()}
    prompt_id = str(uuid.uuid4())
    outputs = validate(prompt, prompt_id)
    server = FakeServer()
    executor = execution.PromptExecutor(server)
    extra = {"client_id": "layerdiff-tests", **(extra_data or {})}
    executor.execute(prompt, prompt_id, extra, outputs)
    _raise_on_failure(executor)
    return PromptRun(prompt_id, _ui_outputs(executor), list(server.messages), executor)


def _raise_on_failure(executor) -> None:
    for event, data in executor.status_messages:
        if event == "execution_error":
            raise NodeExecutionError(data)
        if event == "execution_interrupted":
            raise HarnessError(f"execution interrupted at node {data.get('node_id')} ({data.get('node_type')})")
    if not executor.success:
        raise HarnessError("ComfyUI reported failure without an execution_error message")


def _ui_outputs(executor) -> dict:
    history = getattr(executor, "history_result", None)
    if history is not None:  # 0.3.x
        return dict(history.get("outputs", {}))
    return {node_id: ui for node_id, ui in executor.outputs_ui.items()}  # 2024
