"""WinCLIP (Jeong et al., CVPR 2023), zero-shot and few-shot, with the scores anomalib's `WinClipModel` computes.

Notation: for an embedding e and the two class text embeddings (t_n, t_a), the abnormal probability is
    p(e) = softmax([cos(e, t_n), cos(e, t_a)] / T)[1],  T = 0.07.
The text embeddings come from the compositional prompt ensemble: every state word (7 normal, 4 anomalous)
inside every template (21, one of them listed twice as in anomalib), each class the mean of its prompts' raw
(not normalised) text embeddings.

Zero-shot, per image:
  * image score s = p(global embedding);
  * per window scale k (2 and 3 patches): p(window embedding) for every k x k window (stride 1), spread to the
    patches by harmonic aggregation: a patch gets  n / sum_w 1/p_w  over the n windows covering it;
  * patch map: the harmonic mean of s (every patch), and the per-scale maps.
Few-shot (k reference images of the category, a `ReferenceBank`), added when references are given:
  * visual association of an embedding e with the references R:  min_{r in R} (1 - cos(e, r)) / 2, over every
    position of every reference; for patch embeddings (last block, `ln_post`, not projected) directly, for
    window embeddings per scale followed by harmonic aggregation;
  * few-shot map: the mean of the patch map and the per-scale maps;
  * final map = (zero-shot map + few-shot map) / 2; image score = (s + max of the few-shot map) / 2.
Maps are upsampled bilinearly (align_corners=False) to the input size; no smoothing by default.

Window embeddings are each window embedded as its own sequence (encoder/windows.py), as the paper defines them.
anomalib 2.7 with open_clip 3.x computes them otherwise (module doc of tests/test_winclip.py): there every
window's class token attends to the class tokens of all windows, so all window embeddings are equal and its
maps are flat. The test compares with anomalib's own code with that one step set right.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from fiseclip_lib.encoder.windows import patch_embeddings, raw_text_embeddings, window_index
from fiseclip_lib.errors import FiseclipError

TEMPERATURE = 0.07  # WinCLIP's softmax temperature (CLIP's)
NORMAL_STATES = ("{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
                 "{} without damage")
ANOMALOUS_STATES = ("damaged {}", "{} with flaw", "{} with defect", "{} with damage")
TEMPLATES = (
    "a cropped photo of the {}.", "a close-up photo of a {}.", "a close-up photo of the {}.",
    "a bright photo of a {}.", "a bright photo of the {}.", "a dark photo of the {}.", "a dark photo of a {}.",
    # listed twice in anomalib's ensemble (so weighted twice in the class mean): kept for equal embeddings
    "a jpeg corrupted photo of the {}.", "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.", "a blurry photo of a {}.", "a photo of a {}.", "a photo of the {}.",
    "a photo of a small {}.", "a photo of the small {}.", "a photo of a large {}.", "a photo of the large {}.",
    "a photo of the {} for visual inspection.", "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.", "a photo of a {} for anomaly detection.",
)


def prompt_ensemble(phrase: str) -> tuple[list[str], list[str]]:
    """WinCLIP's compositional prompts for one object phrase.

    Args:
        phrase: the object's words, e.g. "metal nut".
    Returns:
        (normal prompts, anomalous prompts): each state word filled with the phrase, then put into each template.
    """
    fill = lambda states: [t.format(s.format(phrase)) for s in states for t in TEMPLATES]  # noqa: E731
    return fill(NORMAL_STATES), fill(ANOMALOUS_STATES)


def class_text(encoder, phrase: str) -> torch.Tensor:
    """The normal and anomalous text embeddings `[2, D]` (means of raw prompt embeddings), memoised on the encoder.

    Args:
        encoder: a CLIP encoder with a text tower.
        phrase: the object's words.
    Returns:
        `[2, D]` float32 on the CPU: rows normal, anomalous (not normalised).
    """
    key = ("winclip", phrase, encoder.weights_id, encoder.precision, bool(encoder.quick_gelu))
    memo = getattr(encoder, "text_memo", None)
    if memo is not None and key in memo:
        return memo[key]
    emb = torch.stack([raw_text_embeddings(encoder, prompts).mean(0) for prompts in prompt_ensemble(phrase)])
    if memo is not None:
        memo[key] = emb
    return emb


def abnormal_probability(embeddings: torch.Tensor, text: torch.Tensor,
                         temperature: float = TEMPERATURE) -> torch.Tensor:
    """p(e): softmax over the cosines with (t_n, t_a) divided by the temperature, the anomalous entry.

    Args:
        embeddings: `[..., D]`.
        text: `[2, D]` normal and anomalous text embeddings.
        temperature: the softmax temperature.
    Returns:
        `[...]` probabilities.
    """
    cos = F.normalize(embeddings.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T
    return torch.softmax(cos / temperature, dim=-1)[..., 1]


def harmonic_aggregation(window_scores: torch.Tensor, index: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Window scores spread to patches: each patch the harmonic mean of the windows that cover it.

    Args:
        window_scores: `[N, W]` one score per window.
        index: `[W, k]` the patches of each window (`encoder.windows.window_index`).
        grid: (h, w) of the patch grid.
    Returns:
        `[N, h, w]`; a patch covered by a window of score 0 (or by none) gets 0.
    """
    n, p = window_scores.shape[0], grid[0] * grid[1]
    inverse = (1.0 / window_scores.float())[:, :, None].expand(-1, -1, index.shape[1]).reshape(n, -1)
    total = torch.zeros(n, p).scatter_add_(1, index.reshape(1, -1).expand(n, -1), inverse)
    count = torch.bincount(index.reshape(-1), minlength=p).float()
    return (count / total).nan_to_num(nan=0.0, posinf=0.0).reshape(n, *grid)


def visual_association(embeddings: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Each embedding's smallest cosine distance to the references, halved: min_r (1 - cos(e, r)) / 2.

    Args:
        embeddings: `[N, M, D]` (patches or windows of N images).
        references: `[K, M', D]` those of K reference images; every position of every reference counts.
    Returns:
        `[N, M]` in [0, 1].
    """
    refs = F.normalize(references.reshape(-1, references.shape[-1]).float(), dim=-1)
    cos = F.normalize(embeddings.float(), dim=-1) @ refs.T
    return (1.0 - cos).amin(dim=-1) / 2.0


def harmonic_mean(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Elementwise harmonic mean of equally shaped maps (0 where any map is 0)."""
    return len(maps) / torch.stack([1.0 / m for m in maps]).sum(0)


def winclip_scores(image_embeddings: torch.Tensor, windows: dict, text: torch.Tensor, grid: tuple[int, int],
                   patches: torch.Tensor | None = None, reference_windows: dict | None = None,
                   reference_patches: torch.Tensor | None = None,
                   temperature: float = TEMPERATURE) -> tuple[torch.Tensor, torch.Tensor]:
    """WinCLIP's patch maps and image scores (module doc), zero-shot or, with references, few-shot.

    Args:
        image_embeddings: `[N, D]` global image embeddings.
        windows: {scale: `[N, W, D]`} window embeddings (`encoder.windows.window_embeddings`).
        text: `[2, D]` (`class_text`).
        grid: (h, w) of the patch grid.
        patches: `[N, P, C]` patch embeddings (`encoder.windows.patch_embeddings`); few-shot only.
        reference_windows: {scale: `[K, W, D]`} of the K reference images (None: zero-shot).
        reference_patches: `[K, P, C]` of the reference images.
        temperature: the softmax temperature.
    Returns:
        (patch maps `[N, h, w]`, image scores `[N]`).
    """
    grid = (int(grid[0]), int(grid[1]))
    index = {s: window_index(grid, s) for s in windows}
    image = abnormal_probability(image_embeddings, text, temperature)
    per_scale = [harmonic_aggregation(abnormal_probability(windows[s], text, temperature), index[s], grid)
                 for s in windows]
    zero = harmonic_mean([image[:, None, None].expand(-1, *grid)] + per_scale)
    if reference_windows is None:
        return zero, image
    few = [visual_association(patches, reference_patches).reshape(-1, *grid)]
    few += [harmonic_aggregation(visual_association(windows[s], reference_windows[s]), index[s], grid)
            for s in windows]
    few_map = torch.stack(few).mean(0)
    return (zero + few_map) / 2, (image + few_map.flatten(1).amax(1)) / 2


def upsample(maps: torch.Tensor, size: int) -> torch.Tensor:
    """`[N, h, w]` -> `[N, size, size]`, bilinear with align_corners=False (as WinCLIP's maps are resized)."""
    return F.interpolate(maps[:, None].float(), size=(size, size), mode="bilinear", align_corners=False)[:, 0]


def winclip_batch(encoder, feats, phrase: str, references: Sequence = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """WinCLIP on encoded images: zero-shot, or few-shot against the references' features.

    Args:
        encoder: the `ClipEncoder` that made the features.
        feats: `Features` of the N queries with window embeddings (`Features.windows`).
        phrase: the object's words for the prompts.
        references: `Features` of the reference images (each with windows); empty: zero-shot.
    Returns:
        (patch maps `[N, h, w]`, image scores `[N]`), float32 on the CPU.
    """
    def need_windows(f, what):
        if f is None or not getattr(f, "windows", None):
            raise FiseclipError(f"{what} has no WinCLIP window embeddings: encode it with a Detector whose method "
                                f"is winclip (build a reference bank with ReferenceBank.from_images)")
        return f

    need_windows(feats, "the query batch")
    refs = [need_windows(f, f"reference #{i}") for i, f in enumerate(references)]
    grid = tuple(feats.grid)
    text = class_text(encoder, phrase)
    image = feats.global_embedding.float().cpu()
    if not refs:
        return winclip_scores(image, feats.windows, text, grid)
    last = encoder.num_layers
    if any(last not in f.layers for f in [feats, *refs]):
        raise FiseclipError(f"few-shot WinCLIP compares the last block's patch tokens: add layer {last} to the "
                            f"layers option (--set layers=...)")
    if any(tuple(f.grid) != grid or set(f.windows) != set(feats.windows) for f in refs):
        raise FiseclipError("the references were encoded at another image size or window scales than the queries: "
                            "encode both with one Detector")
    return winclip_scores(
        image, feats.windows, text, grid, patches=patch_embeddings(encoder, feats.layers[last]),
        reference_windows={s: torch.cat([f.windows[s] for f in refs]) for s in feats.windows},
        reference_patches=torch.cat([patch_embeddings(encoder, f.layers[last]) for f in refs]))
