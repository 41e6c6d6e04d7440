"""Seeded two-dimensional toy distributions.

The eight densities used to illustrate FFJORD, with the same shapes, scales and noise
levels. All randomness comes from the :class:`numpy.random.Generator` passed in, so a
seed fixes the sample; rows are returned in random order, so any prefix of a sample is
itself a sample.

References:
    Grathwohl et al., "FFJORD: Free-form Continuous Dynamics for Scalable Reversible
    Generative Models", ICLR 2019 (toy densities of Section 5.1).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from cnf.errors import DataError

__all__ = ["TOY_DATASETS", "sample_toy"]

_Sampler = Callable[[int, np.random.Generator], np.ndarray]


def _eight_gaussians(n: int, rng: np.random.Generator) -> np.ndarray:
    r"""Equal mixture of eight isotropic Gaussians on a circle.

    Centres :math:`4(\cos\theta_k, \sin\theta_k)` with :math:`\theta_k = k\pi/4`, component
    standard deviation 0.5, and the whole sample divided by 1.414, so the centres lie at
    radius :math:`4/1.414 \approx 2.83` and the spread is :math:`0.5/1.414`.
    """
    angles = rng.integers(0, 8, size=n) * (np.pi / 4)
    centres = 4.0 * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return (centres + 0.5 * rng.standard_normal((n, 2))) / 1.414


def _checkerboard(n: int, rng: np.random.Generator) -> np.ndarray:
    r"""Uniform density on the "black" squares of a 4 x 4 board covering :math:`[-4, 4]^2`.

    With squares of side 2, a point lies on a black square when
    :math:`\lfloor x/2 \rfloor + \lfloor y/2 \rfloor` is even.
    """
    x = rng.uniform(-2.0, 2.0, size=n)
    # Pick one of the two black squares in the column of x: rows [-2, -1) and [0, 1)
    # on even columns, shifted up by one on odd columns.
    y = rng.uniform(0.0, 1.0, size=n) - 2.0 * rng.integers(0, 2, size=n) + np.floor(x) % 2
    return 2.0 * np.stack([x, y], axis=1)


def _two_spirals(n: int, rng: np.random.Generator) -> np.ndarray:
    r"""Two interleaved Archimedean spirals, each the point reflection of the other.

    Along an arm :math:`t = 3\pi\sqrt{u}` with :math:`u \sim U(0, 1)`, the point is
    :math:`(-t\cos t + a,\ t\sin t + b) / 3` with :math:`a, b \sim U(0, 0.5)`; the second
    arm is its negation; then isotropic Gaussian noise of standard deviation 0.1 is added.
    """
    half = n - n // 2
    t = 3.0 * np.pi * np.sqrt(rng.uniform(size=half))
    jitter = 0.5 * rng.uniform(size=(half, 2))
    arm = np.stack([-np.cos(t) * t, np.sin(t) * t], axis=1) + jitter
    points = np.concatenate([arm, -arm])[:n] / 3.0
    points = points + 0.1 * rng.standard_normal((n, 2))
    return rng.permutation(points)


def _moons(n: int, rng: np.random.Generator) -> np.ndarray:
    r"""Two interleaving half circles (scikit-learn's ``make_moons`` with noise 0.1).

    The upper moon is :math:`(\cos\theta, \sin\theta)` and the lower one
    :math:`(1 - \cos\theta, 0.5 - \sin\theta)` for :math:`\theta` evenly spaced in
    :math:`[0, \pi]`; Gaussian noise of standard deviation 0.1 is added, then the sample
    is mapped by :math:`x \mapsto 2x + (-1, -0.2)`, as FFJORD does.
    """
    n_upper = n // 2
    n_lower = n - n_upper
    theta_upper = np.linspace(0.0, np.pi, n_upper)
    theta_lower = np.linspace(0.0, np.pi, n_lower)
    upper = np.stack([np.cos(theta_upper), np.sin(theta_upper)], axis=1)
    lower = np.stack([1.0 - np.cos(theta_lower), 0.5 - np.sin(theta_lower)], axis=1)
    points = np.concatenate([upper, lower]) + 0.1 * rng.standard_normal((n, 2))
    return rng.permutation(2.0 * points + np.array([-1.0, -0.2]))


def _pinwheel(n: int, rng: np.random.Generator) -> np.ndarray:
    r"""Five curved blades.

    Each point starts at :math:`f = (1 + 0.3\,\epsilon_1,\ 0.1\,\epsilon_2)` with standard
    normal :math:`\epsilon`, and is rotated by :math:`-\alpha` where
    :math:`\alpha = 2\pi k/5 + 0.25\,e^{f_1}` for its blade :math:`k`: points farther out
    turn more, which bends the blades. The result is scaled by 2. Blades get equal shares
    of the sample (up to one point).
    """
    blade = rng.permutation(np.arange(n) % 5)
    radial = 1.0 + 0.3 * rng.standard_normal(n)
    tangential = 0.1 * rng.standard_normal(n)
    angle = 2.0 * np.pi * blade / 5 + 0.25 * np.exp(radial)
    cos, sin = np.cos(angle), np.sin(angle)
    x = radial * cos + tangential * sin
    y = tangential * cos - radial * sin
    return 2.0 * np.stack([x, y], axis=1)


def _rings(n: int, rng: np.random.Generator) -> np.ndarray:
    r"""Four concentric circles of radii 3, 2.25, 1.5 and 0.75.

    Points are evenly spaced in angle on each circle (the outer three get
    :math:`\lfloor n/4 \rfloor` points each, the innermost the rest), then isotropic
    Gaussian noise of standard deviation 0.08 is added.
    """
    quarter = n // 4
    counts = (quarter, quarter, quarter, n - 3 * quarter)
    radii = (3.0, 2.25, 1.5, 0.75)
    circles = [_circle(count, radius) for count, radius in zip(counts, radii)]
    points = rng.permutation(np.concatenate(circles))
    return points + 0.08 * rng.standard_normal((n, 2))


def _swissroll(n: int, rng: np.random.Generator) -> np.ndarray:
    r"""The swiss roll (scikit-learn's ``make_swiss_roll`` with noise 1) seen from above.

    :math:`t = \tfrac{3\pi}{2}(1 + 2u)` with :math:`u \sim U(0, 1)`; the point is
    :math:`(t\cos t,\ t\sin t)` plus isotropic Gaussian noise of standard deviation 1, all
    divided by 5. (The roll's height coordinate is discarded, as in FFJORD.)
    """
    t = 1.5 * np.pi * (1.0 + 2.0 * rng.uniform(size=n))
    points = np.stack([t * np.cos(t), t * np.sin(t)], axis=1) + rng.standard_normal((n, 2))
    return points / 5.0


def _circles(n: int, rng: np.random.Generator) -> np.ndarray:
    r"""Two concentric circles (scikit-learn's ``make_circles``, factor 0.5, noise 0.08).

    Points evenly spaced in angle on the unit circle (:math:`\lfloor n/2 \rfloor` of them)
    and on the circle of radius 0.5 (the rest), plus Gaussian noise of standard deviation
    0.08, all scaled by 3: radii 3 and 1.5, noise 0.24.
    """
    n_outer = n // 2
    points = np.concatenate([_circle(n_outer, 1.0), _circle(n - n_outer, 0.5)])
    points = rng.permutation(points) + 0.08 * rng.standard_normal((n, 2))
    return 3.0 * points


def _circle(count: int, radius: float) -> np.ndarray:
    """``count`` points evenly spaced in angle on a circle, shape ``(count, 2)``."""
    theta = np.linspace(0.0, 2.0 * np.pi, count, endpoint=False)
    return radius * np.stack([np.cos(theta), np.sin(theta)], axis=1)


_SAMPLERS: dict[str, _Sampler] = {
    "8gaussians": _eight_gaussians,
    "checkerboard": _checkerboard,
    "2spirals": _two_spirals,
    "moons": _moons,
    "pinwheel": _pinwheel,
    "rings": _rings,
    "swissroll": _swissroll,
    "circles": _circles,
}

TOY_DATASETS: tuple[str, ...] = tuple(_SAMPLERS)
"""Names accepted by :func:`sample_toy`."""


def sample_toy(name: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``n`` points from the named two-dimensional toy density.

    Args:
        name: One of :data:`TOY_DATASETS`.
        n: Number of points, at least 1.
        rng: The only source of randomness: the same seed gives the same array.

    Returns:
        A float32 array of shape ``(n, 2)``, rows in random order.

    Raises:
        DataError: If ``name`` is unknown or ``n`` is not a positive integer.
        TypeError: If ``rng`` is not a :class:`numpy.random.Generator`.

    References:
        Grathwohl et al., "FFJORD: Free-form Continuous Dynamics for Scalable Reversible
        Generative Models", ICLR 2019.
    """
    sampler = _SAMPLERS.get(name)
    if sampler is None:
        raise DataError(
            f"unknown toy data set {name!r}; valid names are: {', '.join(TOY_DATASETS)}"
        )
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise DataError(f"the number of toy samples must be a positive integer, got {n!r}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"rng must be a numpy.random.Generator (e.g. numpy.random.default_rng(seed)), "
            f"got {type(rng).__name__}"
        )
    return np.ascontiguousarray(sampler(int(n), rng), dtype=np.float32)
