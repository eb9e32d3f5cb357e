"""Pre-upscaling: bringing the image to the output size before diffusion adds detail.

A pluggable step: anything with the `PreUpscaler` signature can replace Lanczos. The
`upscaler` parameter picks one by name: `lanczos`, or an ESRGAN-family model file in the
upscalers folder (see esrgan.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from PIL import Image

from clarity.errors import ParamError


class PreUpscaler(Protocol):
    def __call__(self, image: Image.Image, size: tuple[int, int]) -> Image.Image:
        """Return `image` resized to exactly `size` (width, height)."""
        ...


def lanczos(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Lanczos resampling: sharp, no model, no extra memory."""
    return image.resize(size, Image.Resampling.LANCZOS)


#: The name of the built-in, model-free pre-upscaler (`UpscaleParams.upscaler`).
LANCZOS = "lanczos"


class PreUpscalerRegistry:
    """Pre-upscalers by name: `lanczos`, or the file stem of a model in `folder`.

    Names are looked up among the files actually in `folder`, never joined onto it, so a
    name cannot reach outside it. Models are loaded on first use onto `device` and kept.
    """

    def __init__(self, folder: Path | None, device: torch.device | str = "cpu") -> None:
        self.folder = Path(folder) if folder is not None else None
        self.device = torch.device(device)
        self._loaded: dict[str, PreUpscaler] = {LANCZOS: lanczos}

    def available(self) -> dict[str, Path]:
        """Model files in the folder by name (file stem), sorted."""
        from clarity.engine.esrgan import MODEL_SUFFIXES

        if self.folder is None or not self.folder.is_dir():
            return {}
        files = sorted(p for p in self.folder.iterdir() if p.is_file() and p.suffix in MODEL_SUFFIXES)
        return {p.stem: p for p in files}

    def names(self) -> list[str]:
        # A model file called lanczos.pth would be shadowed by the built-in: not offered.
        return [LANCZOS, *(name for name in self.available() if name != LANCZOS)]

    def get(self, name: str) -> PreUpscaler:
        """The pre-upscaler called `name`; `ParamError("upscaler", ...)` listing the choices if none is."""
        if name in self._loaded:
            return self._loaded[name]
        path = self.available().get(name)
        if path is None:
            where = f" in {self.folder}" if self.folder is not None else " (no upscalers folder is configured)"
            raise ParamError("upscaler", f"no pre-upscaler named {name!r}{where}; available: {', '.join(self.names())}")
        from clarity.engine.esrgan import ESRGANPreUpscaler, load_esrgan

        model = load_esrgan(path).to(self.device)
        self._loaded[name] = ESRGANPreUpscaler(model, name)
        return self._loaded[name]
