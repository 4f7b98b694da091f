"""Image classifiers of Chen et al. 2018, §3 and Table 1: ODE-Net, ResNet, RK-Net and MLP.

All three convolutional models share one architecture (Table 1 compares only the middle part):

    downsampling:  conv3x3 (1 -> C, no padding), then two pre-activation residual blocks with
                   stride 2 (He et al. 2016) whose shortcut is the strided identity (option A),
    features:      resnet: ``num_blocks`` (6) residual blocks;
                   odenet: one ODE block dh/dt = f(h, t), t ∈ [0, 1], f = GN-ReLU-ConcatConv-
                   GN-ReLU-ConcatConv-GN with t concatenated as an extra input channel, solved with
                   the configured solver, gradients by the adjoint (or backprop through the solver);
                   rknet: the same block, backpropagated through a fixed-step Runge–Kutta solve,
    head:          GroupNorm, ReLU, global average pooling, linear C -> 10.

With C = 64 and 28x28 inputs this gives 0.225M parameters (odenet, rknet), 0.593M (resnet); the MLP
(one hidden layer of 300) has 0.239M — the paper's 0.22M, 0.60M, 0.22M, 0.24M.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from node_engine.adjoint import odeint_adjoint
from node_engine.odeint import odeint
from node_engine.solvers import FIXED
from node_engine.specs import MLPSection, ODENetSection, ResNetSection, SolverSection
from node_engine.stats import SolverStats

RKNET_DEFAULT_STEP = 0.1  #: RK-Net's step when the spec gives none: 10 steps of RK4 = 40 evaluations


def group_norm(channels: int, min_per_group: int = 2) -> nn.GroupNorm:
    """GroupNorm (Wu & He 2018) with at most 32 groups of at least ``min_per_group`` (2) channels each.

    The paper's code uses min(32, C) groups; for C <= 32 that is one channel per group, and on the
    2x2 feature maps of 8x8 digits each group then normalizes 4 numbers: the block's output no longer
    depends on the input and training stays at chance (measured: odenet, C = 16, digits, 5 epochs:
    9% test accuracy with 16 groups, 68% with 8). For C = 64 both rules give the paper's 32 groups.
    The group count is the largest divisor of C not above min(32, C // min_per_group);
    ``min_per_group=1`` is the paper's rule, kept for checkpoints written before this one.
    """
    groups = max(1, min(32, channels // min_per_group))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels)


class ResBlock(nn.Module):
    """Pre-activation residual block x + conv(ReLU(GN(conv(ReLU(GN(x)))))); stride 2 subsamples the shortcut.

    Shapes: (N, C, H, W) -> (N, C, ceil(H/stride), ceil(W/stride)).
    """

    def __init__(self, channels: int, stride: int = 1, norm: Callable[[int], nn.Module] = group_norm):
        super().__init__()
        self.stride = stride
        self.norm1 = norm(channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.norm2 = norm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x
        out = self.conv1(F.relu(self.norm1(x)))
        out = self.conv2(F.relu(self.norm2(out)))
        return out + shortcut


class ConcatConv2d(nn.Module):
    """3x3 convolution of [t, h] with t broadcast as one extra input channel. (N, C, H, W) -> (N, C', H, W)."""

    def __init__(self, channels_in: int, channels_out: int):
        super().__init__()
        self.conv = nn.Conv2d(channels_in + 1, channels_out, 3, 1, 1)

    def forward(self, t: Tensor, h: Tensor) -> Tensor:
        # t: 0-dim (joint stepping) or (N,) (per-sample stepping: each image at its own time)
        time = t.to(h).reshape(-1, 1, 1, 1).expand(h.shape[0], 1, h.shape[2], h.shape[3])
        return self.conv(torch.cat([time, h], dim=1))


class ConvODEFunc(nn.Module):
    """The ODE-Net vector field f(t, h): GN-ReLU-ConcatConv-GN-ReLU-ConcatConv-GN. (N, C, H, W) -> same.

    t is 0-dim or (N,); GroupNorm normalizes each image on its own, so row i of f depends on image i only.
    """

    def __init__(self, channels: int, norm: Callable[[int], nn.Module] = group_norm):
        super().__init__()
        self.norm1 = norm(channels)
        self.conv1 = ConcatConv2d(channels, channels)
        self.norm2 = norm(channels)
        self.conv2 = ConcatConv2d(channels, channels)
        self.norm3 = norm(channels)

    def forward(self, t: Tensor, h: Tensor) -> Tensor:
        out = self.conv1(t, F.relu(self.norm1(h)))
        out = self.conv2(t, F.relu(self.norm2(out)))
        return self.norm3(out)


class ODEBlock(nn.Module):
    """h(1) = h(0) + ∫_0^1 f(t, h) dt (Chen et al. 2018, eq. 1), solved by ``node_engine.odeint``.

    Args:
        func: the vector field.
        solver: method, tolerances, adjoint settings (job spec ``solver`` section).
        fixed_step: RK-Net mode — a fixed-step Runge–Kutta solve, always backpropagated directly.
        stats: shared :class:`SolverStats` every solve adds to.
    """

    def __init__(self, func: ConvODEFunc, solver: SolverSection, *, fixed_step: bool, stats: SolverStats):
        super().__init__()
        self.func = func
        self.solver = solver
        self.fixed_step = fixed_step
        self.stats = stats

    def forward(self, h: Tensor) -> Tensor:
        t = torch.tensor([0.0, 1.0], dtype=h.dtype, device=h.device)
        cfg = self.solver
        if self.fixed_step:
            method = cfg.method if cfg.method in FIXED else "rk4"
            return odeint(self.func, h, t, rtol=cfg.rtol, atol=cfg.atol, method=method,
                          options=cfg.solver_options(method, default_step=RKNET_DEFAULT_STEP), stats=self.stats)[-1]
        # served predictions (no grad, per-sample solver): each image its own steps
        options = cfg.solver_options(default_step=RKNET_DEFAULT_STEP)
        kwargs = dict(rtol=cfg.rtol, atol=cfg.atol, method=cfg.method, options=options, stats=self.stats)
        if cfg.adjoint and torch.is_grad_enabled():
            adjoint_options = {"norm": "seminorm"} if cfg.adjoint_norm == "seminorm" else None
            return odeint_adjoint(self.func, h, t, adjoint_params=tuple(self.func.parameters()),
                                  adjoint_options=adjoint_options, adjoint_mode=cfg.adjoint_mode, **kwargs)[-1]
        return odeint(self.func, h, t, **kwargs)[-1]


class ImageClassifier(nn.Module):
    """Downsampling -> features -> head. Input (N, C_in, H, W) normalized pixels; output (N, 10) logits.

    Attributes:
        stats: :class:`SolverStats` accumulated by every ODE solve of this model (zero for resnet/mlp).
        input_shape: (C_in, H, W) the model was built for.
    """

    def __init__(self, body: nn.Module, input_shape: tuple[int, int, int], solver: SolverSection,
                 stats: SolverStats):
        super().__init__()
        self.body = body
        self.input_shape = tuple(input_shape)
        self.solver = solver
        self.stats = stats
        self._blocks = [m for m in body.modules() if isinstance(m, ODEBlock)]

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)

    def set_tolerances(self, rtol: float, atol: float) -> None:
        """Use ``rtol``/``atol`` for subsequent solves (e.g. tighter at evaluation)."""
        self.use_solver(self.solver.with_tolerances(rtol, atol))

    def use_solver(self, solver: SolverSection) -> None:
        """Solve every ODE block with ``solver`` from now on (e.g. ``solver.served()`` for inference)."""
        self.solver = solver
        for block in self._blocks:
            block.solver = solver

    def regularization(self) -> dict[str, Tensor]:
        """No regularizers for classifiers (kept for the trainer's uniform interface)."""
        return {}


def _conv_classifier(kind: str, spec: ODENetSection | ResNetSection, solver: SolverSection,
                     input_shape: tuple[int, int, int], min_per_group: int) -> ImageClassifier:
    channels = spec.channels
    norm = partial(group_norm, min_per_group=min_per_group)
    stats = SolverStats()
    downsampling = [nn.Conv2d(input_shape[0], channels, 3, 1), ResBlock(channels, 2, norm), ResBlock(channels, 2, norm)]
    if isinstance(spec, ResNetSection):
        features: list[nn.Module] = [ResBlock(channels, 1, norm) for _ in range(spec.num_blocks)]
    else:
        features = [ODEBlock(ConvODEFunc(channels, norm), solver, fixed_step=(kind == "rknet"), stats=stats)]
    head = [norm(channels), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(channels, 10)]
    return ImageClassifier(nn.Sequential(*downsampling, *features, *head), input_shape, solver, stats)


def _mlp(spec: MLPSection, solver: SolverSection, input_shape: tuple[int, int, int]) -> ImageClassifier:
    c, h, w = input_shape
    body = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, spec.hidden), nn.ReLU(inplace=True),
                         nn.Linear(spec.hidden, 10))
    return ImageClassifier(body, input_shape, solver, SolverStats())


_SECTIONS = {"odenet": ODENetSection, "rknet": ODENetSection, "resnet": ResNetSection, "mlp": MLPSection}


def build_classifier(model_spec: Mapping[str, Any], solver_spec: Mapping[str, Any] | None,
                     input_shape: tuple[int, ...], *, min_channels_per_group: int = 2) -> ImageClassifier:
    """Build ``odenet``, ``rknet``, ``resnet`` or ``mlp`` for inputs of ``input_shape`` = (C, H, W) or (H, W).

    Missing sizes take the defaults of ``node_engine.specs`` (ODENetSection, ResNetSection, MLPSection).
    ``min_channels_per_group``: see :func:`group_norm` (1 rebuilds models of older checkpoints).

    Raises:
        ValueError: unknown type, non-square or too small input (H < 5), invalid sizes.
    """
    kind = model_spec.get("type")
    if kind not in _SECTIONS:
        raise ValueError(f"unknown classifier type {kind!r}; expected one of {', '.join(_SECTIONS)}")
    spec = _SECTIONS[kind].from_spec(model_spec, strict=False)  # the job spec was checked by normalize_spec
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3 or shape[1] != shape[2] or shape[1] < 5:
        raise ValueError(f"classifiers need square images (C, H, H) with H >= 5, got input_shape {input_shape}")
    solver = SolverSection.from_spec(solver_spec, strict=False)
    if isinstance(spec, MLPSection):
        return _mlp(spec, solver, shape)  # type: ignore[arg-type]
    return _conv_classifier(kind, spec, solver, shape, min_channels_per_group)  # type: ignore[arg-type]
