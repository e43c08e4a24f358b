"""LayerDiff in pure PyTorch (arXiv 2403.11929): imports no ComfyUI, so it can be unit-tested and trained alone.

Shared basics sit here (``errors``, ``slots``: the slot layout of a layered batch, ``atomic_file``); the rest lives
in ``modules`` (the networks), ``sampling`` (SMG and layered conditioning), ``layers`` (compose and layered files),
``data`` (layered datasets) and ``training`` (the training loop). docs/DESIGN.md explains the design.
"""
