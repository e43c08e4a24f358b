"""Headless ComfyUI: boot a real ComfyUI inside this Python process and load this repository as a custom node.

Used by every script, test and benchmark that needs ComfyUI; ``comfy_headless.prompts`` converts UI workflows and
runs prompts through ComfyUI's own executor, ``comfy_headless.product`` hands out our package's modules.

Boots the ComfyUI at ``COMFYUI_PATH`` (else the pinned copy in ``.cache/comfyui`` that ``scripts/setup_comfyui.sh``
unpacks), with its models/input/output/temp folders redirected into one work folder. Works on the pinned 2024
ComfyUI (synchronous node loading) and on 0.3.x (``async``); every difference is bridged by feature detection
(:func:`call`), never by parsing version strings. Nothing here imports ComfyUI at module import time.
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Callable

LOG = logging.getLogger("LayerDiff.headless")

REPO_ROOT = Path(__file__).resolve().parents[1]
PRODUCT_PACKAGES = ("layerdiff_model", "nodes")  # our package's subpackages: only ever imported through it
PACKAGE_DIR_NAME = "ComfyUI-LayerDiff"


# ------------------------------------------------------------------------------------------------- errors
class HarnessError(RuntimeError):
    """ComfyUI could not be booted or could not do what was asked (bad ComfyUI path, package import failure...)."""


# ------------------------------------------------------------------------------------------------- host state
@dataclass
class HostInfo:
    """Where the booted ComfyUI lives and where it reads and writes files in this process."""

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
        """Path of model file ``name`` in this host's models folder ``folder`` (e.g. ``checkpoints``)."""
        return self.models_dir / folder / name


_HOST: HostInfo | None = None
_DEFAULT_WORK_DIR: Callable[[], os.PathLike] | None = None
_BOOT_HOOKS: list[Callable[[], object]] = []


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


def add_boot_hook(hook: Callable[[], object]) -> None:
    """Call ``hook()`` once ComfyUI's built-in nodes are loaded, before our package loads (now if booted already).

    The test harness registers its test-only model configs this way, whoever boots first.
    """
    if hook in _BOOT_HOOKS:
        return
    _BOOT_HOOKS.append(hook)
    if _HOST is not None:
        hook()


def boot(work_dir: str | os.PathLike | None = None, comfy_root: str | os.PathLike | None = None,
         cpu: bool = True, force_fp32: bool = False) -> dict:
    """Boot ComfyUI headless once per process and load this repository as a custom node.

    ``work_dir`` receives ComfyUI's models/input/output/temp folders (a fresh temporary folder when omitted).
    ``cpu=False`` lets ComfyUI pick its device (a GPU when there is one); ``force_fp32`` keeps weights in fp32
    (training: mixed precision is autocast). Later calls return the first call's
    result. Returns the package's ``NODE_CLASS_MAPPINGS`` (empty while the repository root has no
    ``__init__.py``); they are also merged into ``nodes.NODE_CLASS_MAPPINGS``.
    """
    global _HOST
    if _HOST is None:
        root = Path(comfy_root).expanduser().resolve() if comfy_root else default_comfyui_path()
        _refuse_second_copy()
        _HOST = _boot(root, _work_dir(work_dir), cpu, force_fp32)
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


def _refuse_second_copy() -> None:
    """Our package is loaded once per process, by ComfyUI: a top-level ``layerdiff_model`` imported before would
    be a second copy of every class (errors that ``except`` misses, configs that compare unequal)."""
    early = [name for name in PRODUCT_PACKAGES if name in sys.modules
             and Path(getattr(sys.modules[name], "__file__", "") or "").resolve().parent == REPO_ROOT / name]
    if early:
        raise HarnessError(
            f"{', '.join(early)} was imported as a top-level package before ComfyUI booted; get the extension's "
            "modules from comfy_headless.product (product_module / product_names) so the package is loaded once")


def _boot(comfy_root: Path, work_dir: Path, cpu: bool, force_fp32: bool) -> HostInfo:
    _put_comfy_on_path(comfy_root)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    _import_cli_args(cpu, force_fp32)
    _preimport_utils_package(comfy_root)
    import comfy.model_management  # noqa: F401  (must come after args.cpu is set)

    info = _redirect_folders(comfy_root, work_dir)
    import nodes

    info.async_api = inspect.iscoroutinefunction(nodes.load_custom_node)
    _init_builtin_nodes(nodes)
    for hook in _BOOT_HOOKS:
        hook()
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


def _import_cli_args(cpu: bool, force_fp32: bool) -> None:
    """Import ``comfy.cli_args`` without letting it see our argv (pytest's, the runner's), then force CPU if asked."""
    saved_argv = sys.argv
    sys.argv = [saved_argv[0] if saved_argv else "pytest"]
    try:
        import comfy.cli_args
    finally:
        sys.argv = saved_argv
    if force_fp32:
        comfy.cli_args.args.force_fp32 = True
    if not cpu:
        return
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


def call(func: Callable, *args, **kwargs):
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
        call(nodes.init_extra_nodes, **kwargs)
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
        ok = call(nodes.load_custom_node, str(module_path), builtin_names)
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

