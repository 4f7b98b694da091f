"""The eight 2-D toy densities of FFJORD (Grathwohl et al. 2019), with FFJORD's scalings.

Each generator draws ``n`` points from its own ``numpy.random.Generator`` seeded by ``seed`` (FFJORD
draws from the global numpy RNG, which makes runs irreproducible). The shapes and scales follow
FFJORD's ``lib/toy_data.py`` so that NLLs compare with the literature; for example the entropy of
``8gaussians`` is log 8 + log(2πe·0.125) ≈ 2.84 nats and of ``checkerboard`` log 32 ≈ 3.47 nats.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import sklearn.datasets


def swissroll(n: int, seed: int) -> np.ndarray:
    """Swiss roll (noise 1.0), first and third coordinates, divided by 5. Returns (n, 2) float64."""
    points, _ = sklearn.datasets.make_swiss_roll(n_samples=n, noise=1.0, random_state=seed)
    return points[:, [0, 2]] / 5.0


def circles(n: int, seed: int) -> np.ndarray:
    """Two concentric circles (radius ratio 0.5, noise 0.08), times 3. Returns (n, 2)."""
    points, _ = sklearn.datasets.make_circles(n_samples=n, factor=0.5, noise=0.08, random_state=seed)
    return points * 3.0


def rings(n: int, seed: int) -> np.ndarray:
    """Four concentric rings of radii 3, 2.25, 1.5, 0.75 with Gaussian noise 0.08. Returns (n, 2)."""
    rng = np.random.default_rng(seed)
    per_ring = [n // 4] * 3
    per_ring.append(n - sum(per_ring))  # the innermost ring takes the remainder
    radii = (1.0, 0.75, 0.5, 0.25)
    parts = []
    for count, radius in zip(per_ring, radii):
        angle = np.linspace(0.0, 2.0 * np.pi, count, endpoint=False)  # endpoint=False: no duplicate
        parts.append(np.stack([np.cos(angle), np.sin(angle)], axis=1) * radius)
    points = np.concatenate(parts) * 3.0
    points = points[rng.permutation(n)]
    return points + rng.normal(scale=0.08, size=points.shape)


def moons(n: int, seed: int) -> np.ndarray:
    """Two interleaving half moons (noise 0.1), scaled by 2 and shifted by (-1, -0.2). Returns (n, 2)."""
    points, _ = sklearn.datasets.make_moons(n_samples=n, noise=0.1, random_state=seed)
    return points * 2.0 + np.array([-1.0, -0.2])


def eight_gaussians(n: int, seed: int) -> np.ndarray:
    """Mixture of 8 Gaussians (std 0.5) on a circle of radius 4, all divided by 1.414. Returns (n, 2)."""
    rng = np.random.default_rng(seed)
    angles = np.arange(8) * (np.pi / 4.0)
    centers = 4.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    component = rng.integers(0, 8, size=n)
    points = centers[component] + 0.5 * rng.standard_normal((n, 2))
    return points / 1.414  # FFJORD's constant, not sqrt(2): keeps the literature's scale exactly


def pinwheel(n: int, seed: int) -> np.ndarray:
    """Pinwheel of 5 arms (radial std 0.3, tangential std 0.1, rate 0.25), times 2. Returns (n, 2)."""
    rng = np.random.default_rng(seed)
    arms = 5
    labels = np.arange(n) % arms
    features = rng.standard_normal((n, 2)) * np.array([0.3, 0.1])
    features[:, 0] += 1.0
    angles = labels * (2.0 * np.pi / arms) + 0.25 * np.exp(features[:, 0])
    cos, sin = np.cos(angles), np.sin(angles)
    # row vector times rotation [[cos, -sin], [sin, cos]]
    x = features[:, 0] * cos + features[:, 1] * sin
    y = -features[:, 0] * sin + features[:, 1] * cos
    points = np.stack([x, y], axis=1)
    return 2.0 * points[rng.permutation(n)]


def two_spirals(n: int, seed: int) -> np.ndarray:
    """Two interleaved spirals of 1.5 turns with uniform jitter 0.5, divided by 3, plus noise 0.1."""
    rng = np.random.default_rng(seed)
    half = n // 2
    other = n - half
    turn = np.sqrt(rng.random(n)) * (540.0 * 2.0 * np.pi / 360.0)
    x = -np.cos(turn) * turn + rng.random(n) * 0.5
    y = np.sin(turn) * turn + rng.random(n) * 0.5
    sign = np.concatenate([np.ones(half), -np.ones(other)])
    points = np.stack([x * sign, y * sign], axis=1) / 3.0
    return points + 0.1 * rng.standard_normal(points.shape)


def checkerboard(n: int, seed: int) -> np.ndarray:
    """Uniform on the 8 black squares of a 4x4 checkerboard over [-4, 4]^2 (area 32). Returns (n, 2)."""
    rng = np.random.default_rng(seed)
    x1 = rng.random(n) * 4.0 - 2.0
    x2 = rng.random(n) - rng.integers(0, 2, size=n) * 2.0 + (np.floor(x1) % 2)
    return np.stack([x1, x2], axis=1) * 2.0


TOY_GENERATORS: dict[str, Callable[[int, int], np.ndarray]] = {
    "swissroll": swissroll,
    "circles": circles,
    "rings": rings,
    "moons": moons,
    "8gaussians": eight_gaussians,
    "pinwheel": pinwheel,
    "2spirals": two_spirals,
    "checkerboard": checkerboard,
}
