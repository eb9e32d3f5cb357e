"""The markers that name a weights folder or single-file checkpoint as a meaningless model.

Two randomly initialised models exist: the tiny test model (`clarity.testing.tiny`, the test
suite's) and the full-size random SD1.5 (`clarity.testing.random_sd15`, the benchmarks'). Both
load like real weights and neither produces meaningful detail; the loaders and the catalogue
only need to recognise them, so that the CLI, the API and `clarity weights list` can say
whenever one is used. This module imports nothing, so the catalogue can read it without
paying for torch.
"""

from __future__ import annotations

#: Marker file in a diffusers folder, and metadata key in a single-file checkpoint, that names it
#: as the tiny test model wherever it is loaded.
TINY_MARKER = "CLARITY_TINY_MODEL"
#: Marker file in a diffusers folder, and metadata key in a single-file checkpoint, that names it
#: as the full-size random model: real SD1.5 sizes and speed, random weights.
RANDOM_MARKER = "CLARITY_RANDOM_MODEL"
