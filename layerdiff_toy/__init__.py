"""The toy SD1.5-architecture model family and the shapes benchmark (dataset generator, evaluator, toy VAE
training). Not product code: scripts and tests import it and register the toy family themselves; the
extension's nodes and host code never import it."""
