"""pytest only (ComfyUI never reads this file): the repository root is ComfyUI's custom-node package, not a test
package. pytest would import its ``__init__.py`` as a package named after the checkout folder, which loads a second
copy of the extension beside the one ComfyUI loads; collect the root as a plain folder instead."""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)
def pytest_collect_directory(path, parent):
    if Path(path).resolve() == ROOT:
        return pytest.Dir.from_parent(parent, path=path)
    return None
