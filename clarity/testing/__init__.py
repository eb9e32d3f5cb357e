"""Test, demo and benchmark weights: the tiny SD1.5-shaped model and the small files around it.

Everything here writes weights that load through the real loaders on a machine with no GPU and
no model hub: the tiny random model in every format a studio keeps weights in (`tiny`, the one
`clarity weights tiny` writes), a LoRA and an embedding for it (`adapters`), an ESRGAN
pre-upscaler and a safety checker (`fixtures`), the full-size random SD1.5 the benchmarks run on
(`random_sd15`, the one `clarity weights random-sd15` writes), the diffusers → original-name writers the
single-file formats need (`ldm_writer`), and the training of its VAE (`train_tiny_vae`).

It sits above the engine and the loaders: it uses them, and they never import it. They only
recognise the tiny and random models, by the markers of `clarity.models.markers`.
"""
