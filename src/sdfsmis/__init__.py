"""sdfsmis: few-shot medical image segmentation with Stable-Diffusion-style latent diffusion."""

__version__ = "0.1.0"
