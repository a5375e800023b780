"""Built-in identities: held-out corpus identities rendered on demand (no image files needed).

Names map to (seed, index) in the held-out split's identity stream, which training never sees.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError

IDENTITIES = {"demo": (1234, 0), "ada": (1234, 1), "bo": (1234, 2), "cy": (1234, 3), "dee": (1234, 4),
              "eli": (1234, 5), "fay": (1234, 6), "gus": (1234, 7)}


def identity_image(name: str, size: int = 128) -> np.ndarray:
    """uint8 [size, size, 3] neutral portrait of a built-in identity."""
    from .data.render import Renderer, sample_identity

    if name not in IDENTITIES:
        raise InputError(f"unknown identity {name!r}; built-in identities: {sorted(IDENTITIES)}")
    seed, index = IDENTITIES[name]
    ident = sample_identity(np.random.default_rng([seed, 1, index]))
    return Renderer(ident, size).render({"opening": 0.02, "width": 0.5, "rounding": 0.2, "teeth": 0, "tongue": 0})
