"""Cross-modal alignment: prompt ensembles, text embeddings, the patch text map and the image text score.

Prompt ensemble (METHOD.md step 3, reconstruction following the zero-shot AD literature): every normal and
abnormal state is put into each of 35 photo templates; embeddings are L2-normalised, averaged per class
(normal / abnormal) and L2-normalised again.
"""
from __future__ import annotations

import torch

NORMAL_STATES = ("{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
                 "{} without damage")
ABNORMAL_STATES = ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage")
TEMPLATES = (
    "a bad photo of a {}.", "a low resolution photo of the {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a bright photo of a {}.", "a dark photo of the {}.", "a photo of my {}.",
    "a photo of the cool {}.", "a close-up photo of a {}.", "a black and white photo of the {}.",
    "a bright photo of the {}.", "a cropped photo of a {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a photo of one {}.",
    "a close-up photo of the {}.", "a photo of a {}.", "a low resolution photo of a {}.", "a photo of a large {}.",
    "a blurry photo of a {}.", "a jpeg corrupted photo of the {}.", "a good photo of a {}.",
    "a photo of the small {}.", "a photo of the large {}.", "a black and white photo of a {}.",
    "a dark photo of a {}.", "a photo of a cool {}.", "a photo of a small {}.", "there is a {} in the scene.",
    "there is the {} in the scene.", "this is a {} in the scene.", "this is the {} in the scene.",
    "this is one {} in the scene.",
)
# Category folder names that read badly as words (VisA); a user mapping overrides these.
DEFAULT_CLASS_NAMES = {
    "pcb1": "printed circuit board", "pcb2": "printed circuit board", "pcb3": "printed circuit board",
    "pcb4": "printed circuit board", "macaroni1": "macaroni", "macaroni2": "macaroni",
}
TEXT_TEMPERATURE = 100.0  # CLIP's logit scale


def class_phrase(class_name: str, overrides: dict | None = None) -> str:
    """The words used for a category in prompts: user override, built-in override, or underscores -> spaces."""
    overrides = overrides or {}
    if class_name in overrides:
        return overrides[class_name]
    return DEFAULT_CLASS_NAMES.get(class_name, class_name.replace("_", " "))


def build_prompts(phrase: str) -> tuple[list[str], list[str]]:
    """All normal and abnormal prompts for one class phrase (7 x 35 and 5 x 35)."""
    normal = [t.format(s.format(phrase)) for s in NORMAL_STATES for t in TEMPLATES]
    abnormal = [t.format(s.format(phrase)) for s in ABNORMAL_STATES for t in TEMPLATES]
    return normal, abnormal


def text_embeddings(encoder, class_name: str, overrides: dict | None = None) -> torch.Tensor:
    """`[2, D]`: rows t_n (normal) and t_a (abnormal). Cached on the encoder per (model, weights, phrase)."""
    phrase = class_phrase(class_name, overrides)
    cache = encoder.__dict__.setdefault("_text_cache", {})
    key = (encoder.model_name, encoder.weights_id, phrase)
    if key not in cache:
        rows = []
        for prompts in build_prompts(phrase):
            emb = encoder.encode_text(prompts)
            rows.append(torch.nn.functional.normalize(emb.mean(0), dim=-1))
        cache[key] = torch.stack(rows).float().cpu()
    return cache[key]


def text_map(dense: torch.Tensor, text: torch.Tensor, temperature: float = TEXT_TEMPERATURE) -> torch.Tensor:
    """A_T: probability of 'abnormal' per patch, softmax(T [F.t_n, F.t_a])[1]. dense `[N, P, D]` -> `[N, P]`."""
    logits = temperature * dense.float() @ text.to(dense.device).float().T
    return torch.softmax(logits, dim=-1)[..., 1]


def text_score(global_embedding: torch.Tensor, text: torch.Tensor, temperature: float = TEXT_TEMPERATURE) -> torch.Tensor:
    """s_T: the same probability for the global image embedding `[N, D]` -> `[N]`."""
    return text_map(global_embedding[:, None, :], text, temperature)[:, 0]
