"""visibility.py's figures on images whose answer is known."""

from __future__ import annotations

import numpy as np

import visibility


def disc(shape: tuple[int, int], centre: tuple[int, int], radius: int) -> np.ndarray:
    yy, xx = np.ogrid[:shape[0], :shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2


def test_region_cnr_is_the_step_over_the_noise():
    rng = np.random.default_rng(0)
    lesion = disc((200, 200), (100, 100), 20)
    image = 0.5 + 0.01 * rng.standard_normal((200, 200)) + 0.03 * lesion
    around = visibility.ring(lesion, lesion)
    assert not (around & lesion).any() and around.any()
    assert abs(visibility.region_cnr(image, lesion, around) - 3.0) < 0.3


def test_specks_score_above_ordinary_tissue_and_a_blank_region_does_not():
    rng = np.random.default_rng(1)
    image = 0.5 + 0.01 * rng.standard_normal((200, 200))
    lesion = disc((200, 200), (100, 100), 25)
    around = visibility.ring(lesion, lesion)
    blank, tissue = visibility.speck_cnr(image, lesion, around)
    assert abs(blank - tissue) < 1.0
    ys, xs = np.nonzero(lesion)
    picked = rng.choice(len(ys), 20, replace=False)
    image[ys[picked], xs[picked]] += 0.08  # 20 one-pixel specks at 8x the noise
    specks, _ = visibility.speck_cnr(image, lesion, around)
    assert specks > tissue + 2
