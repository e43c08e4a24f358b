"""Host side of bringing layered files in: list and resolve files in ComfyUI's input folder (as Load Image does),
read a PSD or ORA into node outputs."""
from __future__ import annotations

import hashlib
import os
import struct
import zipfile
from xml.etree.ElementTree import ParseError

from ...layerdiff_model.errors import LayerDiffError
from ...layerdiff_model.layers import compose, layered_files


def input_files(suffixes: tuple[str, ...]) -> list[str]:
    """Files in ComfyUI's input folder (and its subfolders) ending in ``suffixes``, sorted; what the combo lists."""
    import folder_paths

    root = folder_paths.get_input_directory()
    found = []
    for folder, _, names in os.walk(root):
        for name in names:
            if name.lower().endswith(suffixes):
                found.append(os.path.relpath(os.path.join(folder, name), root).replace(os.sep, "/"))
    return sorted(found)


def input_file_path(name: str, suffixes: tuple[str, ...], node: str, input_name: str) -> str:
    """The path of input file ``name``; refuses a name outside the input folder, a missing file or another type."""
    import folder_paths

    if not str(name).lower().endswith(suffixes):
        raise LayerDiffError(f"{node}: '{input_name}' must be a {' or '.join(suffixes)} file, got '{name}'.")
    root = os.path.realpath(folder_paths.get_input_directory())
    path = os.path.realpath(folder_paths.get_annotated_filepath(name))
    if os.path.commonpath([root, path]) != root:
        raise LayerDiffError(f"{node}: '{input_name}' must name a file inside ComfyUI's input folder, got '{name}'.")
    if not os.path.isfile(path):
        raise LayerDiffError(f"{node}: '{name}' is not in ComfyUI's input folder; upload it on the node or copy it "
                             "to ComfyUI/input.")
    return path


def file_fingerprint(path: str) -> str:
    """Changes when the file's bytes change (ComfyUI's IS_CHANGED re-runs the node then)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_layered_file(path: str, node: str) -> tuple:
    """(background IMAGE [1, H, W, 3], foregrounds IMAGE [N, H, W, 3], masks MASK [N, H, W], background name,
    foreground names one per line, top first) of a PSD or ORA file."""
    reader = layered_files.read_psd if path.lower().endswith(".psd") else layered_files.read_ora
    name = os.path.basename(path)
    try:
        stack = reader(path)
        layers = compose.layers_from_file_stack(stack)
    except LayerDiffError as exc:
        raise LayerDiffError(f"{node}: {name}: {exc}") from exc
    except (OSError, ValueError, KeyError, struct.error, zipfile.BadZipFile, ParseError) as exc:  # a broken file
        raise LayerDiffError(f"{node}: {name} could not be read as a layered file ({type(exc).__name__}: {exc}); "
                             "save it again from your editor as 8-bit RGB PSD or ORA.") from exc
    fg_names = "\n".join(n.replace("\n", " ") for n in layers.names[1:])
    return layers.background, layers.foregrounds[0], layers.masks[0], layers.names[0], fg_names
