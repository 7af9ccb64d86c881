"""amp_optax: Adversarial Model Perturbation (AMP) as an Optax transformation.

Public API: :func:`amp` and :class:`AmpState`; :func:`drop_in_amp`,
:class:`DropInAmpState` and :func:`unperturbed_params` (AMP for a train step
that cannot change); :func:`grouped_amp`, :func:`group_batch` and
:func:`grouped_value_and_grad` (grouped ascent, one Delta per group of
examples); the norm-ball helpers :func:`project_per_tensor`, :func:`project_global` and
:func:`global_l2_norm`; :func:`covers_accumulated_batch` (gradient
accumulation); the sharpness measures in
:mod:`amp_optax.diagnostics`. The Flax helpers live in
:mod:`amp_optax.flax_linen` and :mod:`amp_optax.flax_nnx` and are imported
from there, so ``import amp_optax`` never needs Flax.
"""

from amp_optax import diagnostics
from amp_optax._amp import AmpState
from amp_optax._amp import amp
from amp_optax._call_checks import covers_accumulated_batch
from amp_optax._drop_in import DropInAmpState
from amp_optax._drop_in import drop_in_amp
from amp_optax._drop_in import unperturbed_params
from amp_optax._grouped import group_batch
from amp_optax._grouped import grouped_amp
from amp_optax._grouped import grouped_value_and_grad
from amp_optax._projection import global_l2_norm
from amp_optax._projection import project_global
from amp_optax._projection import project_per_tensor

__version__ = "0.2.0"

__all__ = (
    "AmpState",
    "DropInAmpState",
    "amp",
    "covers_accumulated_batch",
    "diagnostics",
    "drop_in_amp",
    "global_l2_norm",
    "group_batch",
    "grouped_amp",
    "grouped_value_and_grad",
    "project_global",
    "project_per_tensor",
    "unperturbed_params",
)
