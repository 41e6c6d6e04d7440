"""Base distributions of a flow: FFJORD's standard normal, or a fitted Gaussian mixture.

A flow's density is ``log p(x) = log p_base(z) + log|det ∂z/∂x|``. FFJORD's base is
``N(0, I)``. :class:`GaussianMixture` is the alternative: ``K`` full-covariance
Gaussians fitted once by EM (:func:`fit_gaussian_mixture`) to the latents of the
untrained flow, then held fixed while the flow trains against it. Its components
give the density a global split (for MNIST, blurred digit prototypes) from the
first step, which a flow from a unimodal base builds only slowly; the flow then
learns what a mixture cannot, the local statistics of the pixels. An unfitted
mixture (zero means, identity covariances, equal weights) is exactly ``N(0, I)``.

Both bases work on flattened latents: ``log_prob`` takes ``(B, *event_shape)``
and returns ``(B,)``; ``sample`` returns ``(n, D)``.

References: Dempster, Laird and Rubin 1977 (EM); Bishop 2006, section 9.2;
Izmailov et al. 2020 (FlowGMM: a flow over a Gaussian-mixture base).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cnf.errors import ConfigError, TrainingError


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """``log N(z; 0, I)`` summed over all but the batch dimension."""
    return -0.5 * (z.pow(2) + math.log(2 * math.pi)).flatten(1).sum(1)


class StandardNormal(nn.Module):
    """``N(0, I)`` in ``dims`` dimensions (no parameters or buffers)."""

    def __init__(self, dims: int) -> None:
        super().__init__()
        self.dims = dims

    def log_prob(self, z: Tensor) -> Tensor:
        return standard_normal_log_prob(z)

    def sample(self, n: int, *, generator: torch.Generator | None = None, temperature: float = 1.0,
               dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
        """``n`` draws ``T ε``, ``(n, D)``: ``ε`` comes from ``generator`` on the CPU, so a
        seed gives the same draws on any device."""
        return torch.randn((n, self.dims), generator=generator, dtype=dtype).to(device) * temperature


class GaussianMixture(nn.Module):
    """``Σ_k w_k N(μ_k, L_k L_kᵀ)`` in ``dims`` dimensions with ``components`` terms.

    Buffers (saved with the model, not trained): ``log_weights`` ``(K,)``, ``means``
    ``(K, D)`` and ``scale_tril`` ``(K, D, D)``, the covariances' Cholesky factors.
    Built unfitted, as ``K`` copies of ``N(0, I)``; :meth:`set` fills it in.
    """

    def __init__(self, dims: int, components: int) -> None:
        super().__init__()
        self.dims = dims
        self.register_buffer("log_weights", torch.full((components,), -math.log(components)))
        self.register_buffer("means", torch.zeros(components, dims))
        self.register_buffer("scale_tril", torch.eye(dims).expand(components, dims, dims).clone())

    @property
    def components(self) -> int:
        return len(self.log_weights)

    def set(self, log_weights: Tensor, means: Tensor, covariances: Tensor) -> None:
        """Take a fitted mixture: weights as logs, means, full covariances."""
        if covariances.shape != self.scale_tril.shape or means.shape != self.means.shape:
            raise ValueError(f"a mixture of shape {tuple(covariances.shape)} does not fit "
                             f"this base's {tuple(self.scale_tril.shape)}")
        tril, info = torch.linalg.cholesky_ex(covariances.double())
        if info.any():
            raise ValueError("a fitted covariance is not positive definite")
        self.log_weights.copy_(log_weights.log_softmax(0))
        self.means.copy_(means)
        self.scale_tril.copy_(tril)

    def joint_log_prob(self, z: Tensor) -> Tensor:
        """``log w_k + log N(z_n; μ_k, Σ_k)`` for every latent and component, ``(B, K)``."""
        return mixture_joint_log_prob(z.flatten(1), self.log_weights, self.means, self.scale_tril)

    def log_prob(self, z: Tensor) -> Tensor:
        return self.joint_log_prob(z).logsumexp(1)

    def sample(self, n: int, *, generator: torch.Generator | None = None, temperature: float = 1.0,
               dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
        """``n`` draws ``μ_k + T L_k ε``, ``(n, D)``: a component ``k`` by weight, then
        its Gaussian with the spread scaled by the temperature ``T``. The component
        indices and ``ε`` come from ``generator`` on the CPU, as for :class:`StandardNormal`."""
        k = torch.multinomial(self.log_weights.double().exp().cpu(), n, replacement=True, generator=generator)
        noise = torch.randn((n, self.dims), generator=generator, dtype=dtype).to(device)
        k = k.to(device)
        out = torch.empty_like(noise)
        for j in k.unique().tolist():
            rows = k == j
            out[rows] = self.means[j].to(dtype) + temperature * noise[rows] @ self.scale_tril[j].to(dtype).T
        return out


def fit_gaussian_mixture(
    x: Tensor, k: int, *, iterations: int, seed: int, ridge: float = 1e-3
) -> tuple[tuple[Tensor, Tensor, Tensor], list[float]]:
    """EM for a ``k``-component full-covariance mixture of the rows of ``x`` ``(N, D)``.

    Starts from ``k`` distinct random rows as means, the data covariance for every
    component and equal weights, and adds ``ridge`` to every covariance, which keeps
    components with few points invertible. Returns ``((log_weights, means,
    covariances), history)``, ``history`` being the mean log-likelihood before each
    M step (non-decreasing for ``ridge = 0``). Run it in float64.
    """
    n, d = x.shape
    if not 1 <= k <= n:
        raise ConfigError(f"a mixture of {k} components needs 1 to {n} points")
    generator = torch.Generator().manual_seed(seed)
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    centred = x - x.mean(0)
    log_weights = torch.full((k,), -math.log(k), dtype=x.dtype, device=x.device)
    means = x[torch.randperm(n, generator=generator)[:k].to(x.device)].clone()
    covariances = (centred.T @ centred / n + ridge * eye).expand(k, d, d).clone()
    history = []
    for _ in range(iterations):
        joint = mixture_joint_log_prob(x, log_weights, means, torch.linalg.cholesky(covariances))
        total = joint.logsumexp(1, keepdim=True)
        history.append(total.mean().item())
        resp = (joint - total).exp()                       # (N, K) responsibilities
        counts = resp.sum(0).clamp_min(torch.finfo(x.dtype).tiny)
        means = resp.T @ x / counts[:, None]
        covariances = torch.stack([
            (resp[:, j, None] * (x - means[j])).T @ (x - means[j]) / counts[j] for j in range(k)
        ]) + ridge * eye
        log_weights = (counts / n).log()
    return (log_weights, means, covariances), history


def mixture_joint_log_prob(
    x: Tensor, log_weights: Tensor, means: Tensor, scale_tril: Tensor, batch_size: int = 4096
) -> Tensor:
    """``log w_k + log N(x_n; μ_k, L_k L_kᵀ)`` ``(N, K)`` for ``x`` ``(N, D)``, in batches
    of ``batch_size`` rows (each batch holds ``(batch, K, D)`` whitened residuals)."""
    gaussians = torch.distributions.MultivariateNormal(means, scale_tril=scale_tril, validate_args=False)
    return torch.cat([gaussians.log_prob(x[i:i + batch_size, None]) for i in range(0, len(x), batch_size)]) \
        + log_weights


def fit_base(
    flow, data, *, size: int, seed: int, iterations: int = 30, batch_size: int = 500
) -> tuple[list[float], int]:
    """Fit ``flow.base``, a :class:`GaussianMixture`, to the flow's latents of up to
    ``size`` training examples of ``data`` (a :class:`~cnf.data.DataSource`).

    The examples are preprocessed as for training (images: dequantized with a
    generator seeded by ``seed``) and pushed through the flow as it is, without
    log-densities; EM runs in float64 on the flow's device. Returns EM's history of
    the mean log-likelihood of the latents (see :func:`fit_gaussian_mixture`) and
    the number of examples used.
    """
    device = next(flow.parameters()).device
    x = data.training_sample(size, seed)
    if len(x) < flow.base.components:
        raise ConfigError(f"model.base_components={flow.base.components} needs at least as many training "
                          f"examples; the training set has {len(x)}")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        latents = []
        for chunk in x.split(batch_size):
            chunk, _ = data.preprocess(chunk, generator)
            latents.append(flow.trace(chunk.to(device), density=False).out.flatten(1).double())
        latents = torch.cat(latents)
        if not torch.isfinite(latents).all():
            raise TrainingError("the untrained flow maps some training examples to non-finite latents, so the "
                                "mixture base cannot be fitted; check the data, or set model.base_components=0")
        params, history = fit_gaussian_mixture(latents, flow.base.components, iterations=iterations, seed=seed)
    try:
        flow.base.set(*params)
    except ValueError:
        raise TrainingError(f"EM left a component of the {flow.base.components}-component mixture base without a "
                            "valid covariance; use fewer model.base_components or a larger model.base_fit_size") \
            from None
    return history, len(x)
