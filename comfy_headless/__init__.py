"""Headless ComfyUI for the scripts, tests and benchmarks: ``boot`` starts a real ComfyUI in this process and
loads this repository as its custom node, ``product`` hands out the extension's modules from that one loaded
copy, ``prompts`` turns UI workflows into API prompts and runs them through ComfyUI's validator and executor.
Not product code: the extension itself never imports it."""
