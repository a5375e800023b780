"""The paper's ablations as switches of the window sampler (no torch here: the CLI builds its flags from it)."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Options:
    """The paper's ablations, one switch each: the one table the CLI (``--no-<name>``) and the long-form
    evaluation (mode ``no-<name>``) read."""

    style_anchor: bool = True
    rope_reindex: bool = True  # off: the ``absolute`` position scheme, whatever stream.positions says
    audio_zero_pad: bool = True
    temporal_anchor: bool = True

    @staticmethod
    def names() -> tuple[str, ...]:
        """The ablations' names as the CLI and eval spell them: ``style-anchor``, ..."""
        return tuple(f.name.replace("_", "-") for f in fields(Options))

    @classmethod
    def without(cls, *names: str) -> Options:
        """Every switch on except ``names`` (spelt as ``names()``)."""
        unknown = [n for n in names if n not in cls.names()]
        if unknown:
            raise ValueError(f"unknown ablation(s) {unknown}; expected among {list(cls.names())}")
        return cls(**{n.replace("-", "_"): False for n in names})
