"""Normalization Propagation (Arpit et al., ICML 2016) for PyTorch.

Hidden layers are normalised in closed form -- weight-row norm, the activation's Gaussian
moments, ``gamma`` initialised to the inverse Jacobian factor, unit-norm projection after each
step -- so only the data layer uses data statistics. Training works at batch size 1 and serving
computes exactly the training function (and can be folded into a plain net).
"""

from .activations import (
    KNOWN_ACTIVATIONS,
    Activation,
    ActivationStats,
    activation_function,
    activation_stats,
    gaussian_expectation,
    prelu_mean_std,
)
from .data_norm import DataNorm, safe_std
from .diagnostics import (
    LayerStats,
    canonical_error_bound,
    coherence,
    jacobian_singular_values,
    layer_input_stats,
    layer_jacobian,
)
from .fold import fold
from .fused_sgd import ProjectedSGD
from .layers import NormPropConv2d, NormPropLinear, glorot_normal_
from .models import NIN_CIFAR, PRESETS, NormPropNet, SpecError, build_model, parse_spec
from .training import (
    StepResult,
    halve_lr_every,
    halve_lr_on_plateau,
    normprop_layers,
    paper_optimizer,
    project_weights_,
    scaled_lr,
    train_step,
)

__version__ = "0.1.0"

__all__ = [
    "KNOWN_ACTIVATIONS",
    "Activation",
    "ActivationStats",
    "activation_function",
    "activation_stats",
    "gaussian_expectation",
    "prelu_mean_std",
    "DataNorm",
    "safe_std",
    "LayerStats",
    "canonical_error_bound",
    "coherence",
    "jacobian_singular_values",
    "layer_input_stats",
    "layer_jacobian",
    "fold",
    "NormPropConv2d",
    "NormPropLinear",
    "glorot_normal_",
    "NIN_CIFAR",
    "PRESETS",
    "NormPropNet",
    "SpecError",
    "build_model",
    "parse_spec",
    "StepResult",
    "halve_lr_every",
    "halve_lr_on_plateau",
    "normprop_layers",
    "paper_optimizer",
    "ProjectedSGD",
    "project_weights_",
    "scaled_lr",
    "train_step",
]
