"""Sampling maths: self-mask guidance (SMG), layered conditioning (which prompt each slot row reads) and the
per-run cache of prompt keys/values. Pure functions on tensors; the host adapter wires them into ComfyUI."""
