"""Host code: the only part of the extension that imports ComfyUI's model code. ``inference`` installs the UNet
patch and hooks the sampler, ``training`` trains through the same patch, ``compat`` bridges ComfyUI versions,
``unet_checkpointing`` adds gradient checkpointing to ComfyUI's UNet blocks and ``layered_input`` reads layered
files from ComfyUI's input folder."""
