"""Learning-rate schedule of §3.5: lr = lr0 * (1 - e / N_e) ** 0.9, per epoch."""

from __future__ import annotations

from data_pipeline.checks import positive_int


def poly_lr(epoch: int, initial_lr: float, total_epochs: int, power: float) -> float:
    """The learning rate for epoch ``epoch`` (0-based) of ``total_epochs``.

    Epoch 0 trains at ``initial_lr``; the last epoch (N_e - 1) at
    lr0 * (1 / N_e) ** 0.9, never 0. Raises ValueError outside [0, N_e).
    """
    positive_int("total_epochs", total_epochs)
    if not 0 <= epoch < total_epochs:
        raise ValueError(f"epoch must be in [0, {total_epochs}), got {epoch!r}")
    if not initial_lr > 0:
        raise ValueError(f"initial_lr must be > 0, got {initial_lr!r}")
    return initial_lr * (1.0 - epoch / total_epochs) ** power
