"""The §3.5 learning-rate schedule against the formula."""

import pytest

from brats_tf.schedules import poly_lr


@pytest.mark.parametrize(
    "epoch,want",
    [
        (0, 1e-4),
        (1, 1e-4 * (299 / 300) ** 0.9),
        (150, 1e-4 * 0.5**0.9),
        (299, 1e-4 * (1 / 300) ** 0.9),
    ],
)
def test_poly_lr_paper_values(epoch, want):
    assert poly_lr(epoch, 1e-4, 300, 0.9) == pytest.approx(want, rel=1e-12)


def test_poly_lr_is_strictly_decreasing_and_positive():
    values = [poly_lr(e, 2e-4, 10, 0.9) for e in range(10)]
    assert all(a > b > 0 for a, b in zip(values, values[1:]))


@pytest.mark.parametrize(
    "kwargs",
    [dict(epoch=-1), dict(epoch=300), dict(epoch=0, total_epochs=0), dict(epoch=0, initial_lr=0.0)],
)
def test_poly_lr_rejects_out_of_range(kwargs):
    with pytest.raises(ValueError):
        poly_lr(**{**dict(initial_lr=1e-4, total_epochs=300, power=0.9), **kwargs})
