"""Layers as images: split/compose a layered batch into background, foregrounds and masks, and write or read
layered PSD and OpenRaster files."""
