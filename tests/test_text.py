"""core/text.py: the prompt ensemble, class phrases, and the patch and image text maps (A_T, s_T).

The disk cache of the text embeddings: tests/test_text_cache.py."""
import torch

from fiseclip_lib.core.text import (ABNORMAL_STATES, NORMAL_STATES, TEMPLATES, build_prompts, class_phrase,
                                    text_map, text_score)


def test_prompts_are_every_state_in_every_template_once():
    normal, abnormal = build_prompts("metal nut")
    for prompts, states in ((normal, NORMAL_STATES), (abnormal, ABNORMAL_STATES)):
        expected = {t.replace("{}", s.replace("{}", "metal nut")) for s in states for t in TEMPLATES}
        assert len(prompts) == len(set(prompts)) and set(prompts) == expected
    assert "a photo of a flawless metal nut." in normal and "a photo of a damaged metal nut." in abnormal
    assert not set(normal) & set(abnormal)


def test_class_phrase_overrides_then_built_in_names_then_underscores():
    assert class_phrase("metal_nut") == "metal nut"
    assert class_phrase("pcb1") == "printed circuit board"
    assert class_phrase("pcb1", {"pcb1": "circuit board"}) == "circuit board"
    assert class_phrase("metal_nut", {"pcb1": "circuit board"}) == "metal nut"


def test_text_map_is_the_softmax_of_the_two_similarities():
    dense = torch.nn.functional.normalize(torch.randn(2, 5, 8), dim=-1)
    t = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    a = text_map(dense, t, temperature=100.0)
    s_n, s_a = (dense @ t[0]).double(), (dense @ t[1]).double()
    expected = (torch.exp(100 * s_a) / (torch.exp(100 * s_n) + torch.exp(100 * s_a))).float()  # exact in float64
    torch.testing.assert_close(a, expected, rtol=1e-5, atol=1e-6)
    g = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    torch.testing.assert_close(text_score(g, t), text_map(g[:, None], t)[:, 0])
