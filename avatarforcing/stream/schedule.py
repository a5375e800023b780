"""Flow-matching noise levels: x_t = (1 - s) x0 + s eps; the shift warps s -> shift s / (1 + (shift-1) s)."""

from __future__ import annotations

from torch import Tensor


def shift_sigma(s: float | Tensor, shift: float) -> float | Tensor:
    return shift * s / (1 + (shift - 1) * s)


def window_sigmas(denoising_steps: tuple[int, ...], shift: float, num_train_timesteps: int = 1000) -> list[float]:
    """Noise level of each window position, oldest first (release: [0.556, 0.769, 0.952, 1.0])."""
    return [float(shift_sigma(step / num_train_timesteps, shift)) for step in reversed(denoising_steps)]


def teacher_sigmas(steps: int, shift: float) -> list[float]:
    """The teacher's grid: ``steps`` uniform levels in (0, 1], warped by the shift, then 0.

    For 50 steps this contains the student's levels for steps [1000, 800, 400, 200] at indices
    0, 10, 30, 40 (docs/design.md s4).
    """
    return [float(shift_sigma(1 - i / steps, shift)) for i in range(steps)] + [0.0]


def add_noise(x0: Tensor, noise: Tensor, sigma: float | Tensor) -> Tensor:
    return (1 - sigma) * x0 + sigma * noise
