"""Train the tiny model's VAE into a real (if blurry) autoencoder: `python -m clarity.testing.train_tiny_vae`.

A randomly initialised VAE is no autoencoder: its activations depend wildly on content, so
no statement about VAE tiling, colour or seams can be tested on it. A few minutes of CPU
training on synthetic images (gradients, discs, stripes, noise) make it smooth like a trained
VAE, with the same SD1.5 topology. The result is shipped as `tiny_vae.safetensors` next to
this file and loaded by `build_tiny_pipeline`; rerun this script only to change it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clarity.testing.tiny import TRAINED_VAE_FILE, build_tiny_vae


def synthetic_image(rng: np.random.Generator, height: int, width: int) -> torch.Tensor:
    """A random image (3, H, W) in [-1, 1] with the ingredients photos have: smooth shading,
    edges, periodic texture and fine noise, in random colours."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.zeros((3, height, width), dtype=np.float32)
    for channel in range(3):
        angle = rng.uniform(0, 2 * np.pi)
        gradient = (np.cos(angle) * x + np.sin(angle) * y) / max(height, width)
        image[channel] = rng.uniform(0.1, 0.9) + rng.uniform(-0.5, 0.5) * gradient
    for _ in range(int(rng.integers(1, 4))):  # discs with hard edges
        cy, cx, radius = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(4, max(height, width) / 2)
        inside = (y - cy) ** 2 + (x - cx) ** 2 < radius**2
        image[:, inside] = rng.uniform(0, 1, size=(3, 1))
    period, phase = rng.uniform(2, 16), rng.uniform(0, 2 * np.pi)
    image += rng.uniform(0, 0.15) * np.sin(x / period * 2 * np.pi + phase)[None]
    image += rng.normal(0, rng.uniform(0, 0.05), size=image.shape).astype(np.float32)
    return torch.from_numpy(np.clip(image, 0, 1) * 2 - 1)


def train(steps: int, batch_size: int = 8, crop: int = 64, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vae = build_tiny_vae(seed, trained=False).train()
    optimizer = torch.optim.Adam(vae.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    started = time.perf_counter()
    for step in range(steps):
        batch = torch.stack([synthetic_image(rng, crop, crop) for _ in range(batch_size)])
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        # A light KL term keeps the latent well scaled without costing reconstruction.
        loss = F.l1_loss(reconstruction, batch) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step}: L1 {loss.item():.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
    return vae.eval().requires_grad_(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)  # what the shipped file was trained with
    parser.add_argument("--output", type=Path, default=TRAINED_VAE_FILE)
    args = parser.parse_args()
    from safetensors.torch import save_file

    vae = train(args.steps)
    # SD scales latents to unit variance for the UNet (0.18215 for SD1.5's VAE); measure ours.
    rng = np.random.default_rng(1)
    with torch.no_grad():
        sample = torch.stack([synthetic_image(rng, 128, 128) for _ in range(16)])
        latent_std = vae.encode(sample).latent_dist.mean.std().item()
    metadata = {"scaling_factor": f"{1 / latent_std:.5f}"}
    state = {name: tensor.contiguous() for name, tensor in vae.state_dict().items()}
    save_file(state, str(args.output), metadata=metadata)
    print(f"wrote {args.output} with {metadata}")


if __name__ == "__main__":
    main()
