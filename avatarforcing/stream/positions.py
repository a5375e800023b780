"""Where each pass puts its frames on the RoPE time axis: the position scheme, as data.

A pass of the window sampler attends over [style anchor | temporal anchor | query frames]. Only the
distances between them matter (RoPE is relative), so every scheme puts the style anchor at 0 and says
where the temporal-anchor frames and the first query frame sit. ``present`` is how many temporal-anchor
frames the pass actually sees (0 until the first block is final), ``k`` the index of the first block
of the pass (the emitted block, for a clean pass), ``B`` the latent frames per block.

==============  =========================  =============================  ===============================
scheme          window pass                clean pass of block k          distance anchor -> first query
==============  =========================  =============================  ===============================
``reindexed``   start = n_temporal + 1     same as the window pass        n_temporal + 1, always (paper)
``release``     start = present + 1        start = 1 + B k                window: present + 1;
                                                                          clean pass: 1 + B k (grows)
``absolute``    start = 1 + B k            start = 1 + B k                1 + B k (grows: the ablation)
==============  =========================  =============================  ===============================

The temporal-anchor frames always sit immediately before the first query frame. ``release`` is what the
published code does (docs/design.md s5): in warm-up windows (no temporal anchor yet) the anchor is roped
one frame before the window, and the clean-cache pass ropes it at absolute position 0. ``absolute`` is
the no-RoPE-re-indexing ablation.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import POSITION_SCHEMES as SCHEMES  # the schemes a config may name: each is laid out here


@dataclass(frozen=True)
class Layout:
    """Time positions of one pass: the style anchor, the temporal-anchor frames, the first query frame."""

    anchor: int
    temporal: tuple[int, ...]
    start: int

    @property
    def offset(self) -> int:
        """Distance from the style anchor to the first query frame."""
        return self.start - self.anchor


def _layout(start: int, present: int) -> Layout:
    return Layout(anchor=0, temporal=tuple(range(start - present, start)), start=start)


def window_layout(scheme: str, n_temporal: int, present: int, k: int, B: int) -> Layout:
    """Positions of a window pass whose oldest block is block ``k``."""
    if scheme == "reindexed":
        return _layout(n_temporal + 1, present)
    if scheme == "release":
        return _layout(present + 1, present)
    if scheme == "absolute":
        return _layout(1 + B * k, present)
    raise ValueError(f"unknown position scheme {scheme!r}; expected one of {SCHEMES}")


def clean_layout(scheme: str, n_temporal: int, present: int, k: int, B: int) -> Layout:
    """Positions of the clean pass (t=0) that writes block ``k``'s keys to the KV buffer."""
    if scheme == "reindexed":
        return _layout(n_temporal + 1, present)
    if scheme in ("release", "absolute"):
        return _layout(1 + B * k, present)
    raise ValueError(f"unknown position scheme {scheme!r}; expected one of {SCHEMES}")
