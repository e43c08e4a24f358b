"""The training loop and what it needs: its config and CLI options, checkpoint state and exact resume, the
metrics log, EMA, the data stream and validation grids. The ComfyUI side is ``nodes/host/training.py``."""
