"""The methods of the common harness, each a spec defined once: which branches run and which defaults apply.

The scoring core (`core/detector.py`) reads these flags and never compares method names, so a new method (or
a variant a later issue adds) is one `MethodSpec` below, with its name then accepted by the config, the CLI
and the sweeps. A spec says:
  text         the text branch runs: A_T (patch probability of "abnormal") and s_T (image probability)
  visual       batch referencing runs: A_V (LNAMD + MSM against the references)
  text_filter  A_T filters the queries' patches out of each other's references (FiSeCLIP's mutual filtering);
               known-good references (a bank) are never filtered
  sigma        default Gaussian smoothing of the maps in px (option `sigma`)
  rscin        default of RsCIN re-scoring over the whole pool (option `rscin`)
  category_pool  the option `musc_pool` applies: `category` scores the whole category as one batch (MuSc)
  windows      window scales in patches: when given, the encoder also embeds every window of these sizes and
               the method is WinCLIP's scoring (core/winclip.py) instead of the branches above: zero-shot
               without references (the other batch images are not used), few-shot against a reference bank
The patch scores are A_V alone (visual only), A_T alone (text only), or `fusion.fuse(A_V, A_T)` (both).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodSpec:
    name: str
    text: bool
    visual: bool
    text_filter: bool
    sigma: float
    rscin: bool
    category_pool: bool
    about: str
    windows: tuple[int, ...] = ()

    @property
    def fused(self) -> bool:
        """Both branches run and their maps are fused."""
        return self.text and self.visual


METHODS: dict[str, MethodSpec] = {m.name: m for m in (
    MethodSpec("fiseclip", text=True, visual=True, text_filter=True, sigma=4.0, rscin=False, category_pool=False,
               about="FiSeCLIP: batch referencing with text-filtered references, fused with the text map (paper)"),
    MethodSpec("fiseclip-nofilter", text=True, visual=True, text_filter=False, sigma=4.0, rscin=False,
               category_pool=False, about="FiSeCLIP without the text filter of the references (ablation)"),
    MethodSpec("musc", text=False, visual=True, text_filter=False, sigma=0.0, rscin=True, category_pool=True,
               about="MuSc: batch referencing only; no smoothing and RsCIN as in MuSc's code"),
    MethodSpec("text", text=True, visual=False, text_filter=False, sigma=4.0, rscin=False, category_pool=False,
               about="the text branch alone (WinCLIP-style zero-shot without references)"),
    MethodSpec("winclip", text=True, visual=False, text_filter=False, sigma=0.0, rscin=False, category_pool=False,
               windows=(2, 3), about="WinCLIP: window embeddings and the compositional prompt ensemble, "
                                     "few-shot with a reference bank (anomalib's scores; test_winclip.py)"),
)}


def method_spec(name: str) -> MethodSpec:
    """The spec of a method name (the config validates names first, so a KeyError here is a library bug)."""
    return METHODS[name]
