"""The LayerDiff networks added to SD1.5: inter- and intra-layer attention, the prompt enhancer, the mask read-out,
the module container that holds them per transformer site, their config dataclass and the weights file I/O."""
