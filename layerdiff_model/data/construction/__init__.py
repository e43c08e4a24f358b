"""Dataset construction: pictures, layered files and cut-outs -> layered training samples (docs/DATASET.md)."""
