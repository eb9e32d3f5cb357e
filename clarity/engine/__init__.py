"""The upscaling engine: no HTTP, no forms, only images and `UpscaleParams`."""
