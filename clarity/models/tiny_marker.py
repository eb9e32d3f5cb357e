"""The marker that names a weights folder or single-file checkpoint as the tiny test model.

The tiny model itself is built and written by `clarity.testing.tiny`; the loaders and the
catalogue only need to recognise it, so that the CLI, the API and `clarity weights list` can
say whenever it is used. This module imports nothing, so the catalogue can read it without
paying for torch.
"""

from __future__ import annotations

#: Marker file in a diffusers folder, and metadata key in a single-file checkpoint, that names it
#: as the tiny test model wherever it is loaded.
TINY_MARKER = "CLARITY_TINY_MODEL"
