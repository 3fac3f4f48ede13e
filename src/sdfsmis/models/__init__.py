"""Models: frozen VAEs, image encoders, backbones and the segmentation methods built on them."""

from sdfsmis.models.backbones import Backbone, BackboneConfig, build_backbone, widen_conv_in
from sdfsmis.models.image_encoders import masked_average
from sdfsmis.models.vae import FrozenVAE, load_autoencoder_kl, load_taesd
from sdfsmis.models.config import ModelConfig
from sdfsmis.models.io import load_pretrained, save_pretrained
from sdfsmis.models.registry import build_model as build

# the built-in methods register themselves (sdfsmis.models.registry) when imported
from sdfsmis.models import diffews, sdfsmis, sdseg  # noqa: E402,F401  isort: skip

__all__ = [
    "Backbone", "BackboneConfig", "FrozenVAE", "ModelConfig", "build", "build_backbone", "load_autoencoder_kl",
    "load_pretrained", "load_taesd", "masked_average", "save_pretrained", "widen_conv_in",
]
