"""sage_train: 8-bit attention for training (recipe ``train_s8``, SageAttention3's SageBwd).

* :func:`attention` — differentiable 8-bit attention (``torch.autograd.Function``).
* :func:`scaled_dot_product_attention` — drop-in for PyTorch's SDPA (falls back to PyTorch
  where it cannot match its semantics, warning once per reason).
* :func:`patch_model` / :func:`unpatch_model` / :func:`patched` — route the SDPA calls of a model.

No GPU kernel of the recipe exists yet: everything runs the exact emulation from
``sage_quant.emulation.train_s8`` (a warning says so once).
"""

from ._function import attention, kernel_available
from ._patch import is_patched, patch_model, patched, scaled_dot_product_attention, torch_sdpa, unpatch_model
from ._warn import SageTrainFallbackWarning, reset_warnings

__all__ = [
    "attention",
    "kernel_available",
    "scaled_dot_product_attention",
    "patch_model",
    "unpatch_model",
    "is_patched",
    "patched",
    "torch_sdpa",
    "SageTrainFallbackWarning",
    "reset_warnings",
]
__version__ = "0.1.0"
