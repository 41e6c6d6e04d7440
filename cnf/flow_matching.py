"""Flow matching: regress a vector field onto the velocity of a straight probability path.

The project's direction is kept: data ``x`` at ``t = 0``, a base draw ``z`` at
``t = T`` (``T`` = the block's ``end_time``). With ``s = t / T`` and ``σ_min ≥ 0``
the straight (optimal-transport) conditional path is

    x_t = a(s) x + b(s) z,     a(s) = 1 − s,     b(s) = σ_min + (1 − σ_min) s,

so ``x_0 = x + σ_min z`` and ``x_T = z``: the base end is exactly the base and
the data end is the data smoothed by ``σ_min``-scaled base noise (Lipman et al.'s
OT path with its two ends swapped; their noise sits at ``t = 0``). The target is
the time derivative of the path,

    u_t(x_t | x, z) = d x_t / dt = (a'(s) x + b'(s) z) / T = ((1 − σ_min) z − x) / T,

which scales with ``1/T``; the loss therefore scales with ``1/T²``. The loss is

    L(θ) = E_{t ~ U[0, T], (x, z) ~ π} ‖f_θ(t, x_t) − u_t(x_t | x, z)‖²,

the squared norm *summed* over the event dimensions and averaged over the batch.
``π`` is the independent coupling ``p_data ⊗ p_base`` or the minibatch optimal
transport coupling (:func:`minibatch_ot_coupling`). Its minimizer over all fields
is the marginal velocity ``u*(t, y) = E[u_t | x_t = y]``, whose flow carries the
(smoothed) data distribution at ``t = 0`` to ``p_base`` at ``t = T``; a CNF block
integrating it gives ``log p(x) = log p_base(z(T)) + ∫_0^T tr(∂f/∂z) dt`` for
``p_data ∗ σ_min z``. For Gaussian data the minimizer is linear in ``y``
(:func:`gaussian_optimal_field`), which the tests use as ground truth.

The fields of :mod:`cnf.fields` take one time for the whole batch;
:func:`evaluate_field` evaluates them at one time per example with ``torch.func.vmap``.

References: Lipman et al. 2023, "Flow Matching for Generative Modeling";
Tong et al. 2024, "Improving and generalizing flow-based generative models with
minibatch optimal transport"; Liu et al. 2023, "Flow Straight and Fast" (rectified flow).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from cnf.errors import ConfigError
from cnf.fields import VectorField


@dataclass(frozen=True)
class StraightPath:
    """The straight path ``x_t = (1 − s) x + (σ_min + (1 − σ_min) s) z``, ``s = t / T``.

    Args:
        end_time: ``T > 0``, the time at which the path reaches the base draw.
        sigma_min: ``σ_min ∈ [0, 1)``, the base-noise scale left at ``t = 0``.

    References: Lipman et al. 2023 (OT conditional path, eqs. 20-23, ends swapped).
    """

    end_time: float = 1.0
    sigma_min: float = 0.0

    def __post_init__(self) -> None:
        if not self.end_time > 0:
            raise ConfigError(f"flow matching end_time must be positive (got {self.end_time})")
        if not 0.0 <= self.sigma_min < 1.0:
            raise ConfigError(f"flow matching sigma_min must be in [0, 1) (got {self.sigma_min})")

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(a, b, da/dt, db/dt)`` at times ``t`` (any shape; the rates are constants
        ``−1/T`` and ``(1 − σ_min)/T`` broadcast to ``t``'s shape)."""
        s = t / self.end_time
        a = 1.0 - s
        b = self.sigma_min + (1.0 - self.sigma_min) * s
        da = torch.full_like(s, -1.0 / self.end_time)
        db = torch.full_like(s, (1.0 - self.sigma_min) / self.end_time)
        return a, b, da, db

    def sample(self, x: Tensor, z: Tensor, t: Tensor) -> Tensor:
        """``x_t = a x + b z`` for ``x, z`` of shape ``(B, *event)`` and ``t`` of shape ``(B,)``."""
        a, b, _, _ = self.coefficients(_per_example(t, x))
        return a * x + b * z

    def velocity(self, x: Tensor, z: Tensor, t: Tensor) -> Tensor:
        """The conditional target ``u_t(x_t | x, z) = a'(t) x + b'(t) z``, shape ``(B, *event)``."""
        _, _, da, db = self.coefficients(_per_example(t, x))
        return da * x + db * z


def _per_example(t: Tensor, x: Tensor) -> Tensor:
    """``t`` of shape ``(B,)`` or ``()`` as ``(B, 1, ..., 1)`` to broadcast against ``x``."""
    if t.dim() == 0:
        t = t.expand(x.shape[0])
    if t.shape != x.shape[:1]:
        raise ValueError(f"times of shape {tuple(t.shape)} do not match a batch of {x.shape[0]}")
    return t.to(x).view(-1, *([1] * (x.dim() - 1)))


def sample_times(
    n: int,
    end_time: float,
    *,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Tensor:
    """``n`` times ``t ~ U[0, T]``, shape ``(n,)``. Drawn on the CPU (from ``generator``
    if given, else the global RNG), so a seed gives the same times on any device."""
    return (torch.rand(n, generator=generator, dtype=dtype) * end_time).to(device)


@torch.no_grad()
def minibatch_ot_coupling(x: Tensor, z: Tensor) -> Tensor:
    """The permutation ``σ`` minimizing ``Σ_i ‖x_i − z_σ(i)‖²`` over a batch.

    ``x`` and ``z`` have shape ``(B, *event)`` with the same ``B``; the cost is the
    squared Euclidean distance of the flattened examples, solved exactly (Hungarian /
    Jonker-Volgenant, ``O(B³)``) in float64 on the CPU. Returns ``σ`` as indices of
    shape ``(B,)`` on ``z``'s device: ``z[σ]`` is the draw paired with ``x``.

    References: Tong et al. 2024 (OT-CFM); Pooladian et al. 2023 (multisample flow matching).
    """
    if x.shape[0] != z.shape[0]:
        raise ValueError(f"the OT coupling pairs equal batches (got {x.shape[0]} and {z.shape[0]})")
    cost = torch.cdist(
        x.flatten(1).double().cpu(), z.flatten(1).double().cpu(), compute_mode="donot_use_mm_for_euclid_dist"
    ).pow(2)
    _, columns = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(columns, dtype=torch.long, device=z.device)


def evaluate_field(
    field: VectorField, t: Tensor, x: Tensor, weights: Mapping[str, Tensor] | None = None
) -> Tensor:
    """``f(t_i, x_i)`` for every example, shape ``(B, *event)``, with ``t`` of shape ``(B,)``.

    Fields that take one time per example (``field.per_example_time``: the MLP, conv
    and U-Net fields) are called once on the batch; the others take one time for the
    whole batch and are called once per example under ``torch.func.vmap`` (one batched
    call in effect). ``weights`` are the effective prunable weights (``weight * mask * gate``, see
    :meth:`cnf.odeblock.CNFBlock.solve_weights`); default: ``field.masked_weights()``.
    """
    if weights is None:
        weights = field.masked_weights()
    if field.per_example_time:
        return field(t.to(x), x, None, weights)[0]

    def one(ti: Tensor, xi: Tensor) -> Tensor:
        return field(ti, xi.unsqueeze(0), None, weights)[0].squeeze(0)

    return torch.func.vmap(one)(t.to(x), x)


def flow_matching_loss(
    field: VectorField,
    x: Tensor,
    z: Tensor,
    t: Tensor,
    *,
    path: StraightPath = StraightPath(),
    weights: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """``(1/B) Σ_i ‖f(t_i, x_{t_i}) − u_{t_i}(x_{t_i} | x_i, z_i)‖²`` (a scalar).

    Args:
        field: the vector field ``f(t, z)``.
        x: data, ``(B, *event)`` (the ``t = 0`` end).
        z: base draws paired with ``x`` (already permuted if coupled), ``(B, *event)``.
        t: times in ``[0, T]``, ``(B,)`` (see :func:`sample_times`).
        path: the straight path and its ``T`` and ``σ_min``.
        weights: effective prunable weights; default ``field.masked_weights()``.

    The squared norm is summed over the event dimensions and averaged over the batch.

    References: Lipman et al. 2023 (conditional flow matching, eq. 9).
    """
    if x.shape != z.shape:
        raise ValueError(f"data {tuple(x.shape)} and base draws {tuple(z.shape)} must have the same shape")
    xt = path.sample(x, z, t)
    # .to(x): under autocast the field's output may be in a lower precision
    residual = evaluate_field(field, t, xt, weights).to(x) - path.velocity(x, z, t)
    return residual.pow(2).flatten(1).sum(1).mean()


def gaussian_optimal_field(path: StraightPath, mean: Tensor, cov: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """The minimizer of the flow matching loss for data ``N(μ, Σ)``, base ``N(0, I)``
    and the independent coupling: ``u*(t, y) = A(t) y + c(t)``.

    With ``x_t = a x + b z``, ``x_t ~ N(a μ, S)``, ``S = a² Σ + b² I``, and the target
    ``w = a' x + b' z`` jointly Gaussian with it, ``Cov(w, x_t) = C = a a' Σ + b b' I``,
    so ``E[w | x_t = y] = a' μ + C S⁻¹ (y − a μ)``:

        A = C S⁻¹ (symmetric: ``C`` and ``S`` are polynomials in ``Σ``),   c = a' μ − a A μ.

    ``mean`` is ``(D,)``, ``cov`` ``(D, D)``, ``t`` of any shape ``(*T)``; returns
    ``A`` of shape ``(*T, D, D)`` and ``c`` of shape ``(*T, D)``.

    References: Lipman et al. 2023 (marginal vector field, eq. 8); Gaussian conditioning.
    """
    a, b, da, db, s_cov, c_cov = _gaussian_moments(path, cov, t)
    gain = torch.linalg.solve(s_cov, c_cov)  # S⁻¹ C = (C S⁻¹)ᵀ = C S⁻¹
    offset = da[..., None] * mean - a[..., None] * (gain @ mean)
    return gain, offset


def gaussian_minimal_loss(path: StraightPath, mean: Tensor, cov: Tensor, t: Tensor) -> Tensor:
    """The flow matching loss of :func:`gaussian_optimal_field` at times ``t``:
    ``E ‖w − E[w | x_t]‖² = tr(a'² Σ + b'² I − C S⁻¹ C)``, shape ``t.shape``
    (its average over ``t ~ U[0, T]`` is the least attainable loss).
    ``mean`` does not enter; it is taken for symmetry with :func:`gaussian_optimal_field`."""
    del mean
    a, b, da, db, s_cov, c_cov = _gaussian_moments(path, cov, t)
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    target_cov = da[..., None, None] ** 2 * cov + db[..., None, None] ** 2 * eye
    explained = c_cov @ torch.linalg.solve(s_cov, c_cov)
    return (target_cov - explained).diagonal(dim1=-2, dim2=-1).sum(-1)


def _gaussian_moments(path: StraightPath, cov: Tensor, t: Tensor) -> tuple[Tensor, ...]:
    a, b, da, db = path.coefficients(t.to(cov))
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    a2, b2 = a[..., None, None], b[..., None, None]
    s_cov = a2**2 * cov + b2**2 * eye
    c_cov = a2 * da[..., None, None] * cov + b2 * db[..., None, None] * eye
    return a, b, da, db, s_cov, c_cov
