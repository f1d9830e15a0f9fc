"""sage_train: 8-bit attention for training (recipe ``train_s8``, SageAttention3's SageBwd).

* :func:`attention` — differentiable 8-bit attention: the custom ops
  ``torch.ops.sage_train.attention_fwd`` / ``attention_bwd`` (fake implementations and a
  registered autograd formula, so ``torch.compile`` traces a training step without graph breaks).
* :func:`scaled_dot_product_attention` — drop-in for PyTorch's SDPA (falls back to PyTorch
  where it cannot match its semantics, warning once per reason).
* :func:`patch_model` / :func:`unpatch_model` / :func:`patched` — route the SDPA calls of a model.
* :class:`TrainKernel`, :func:`register_kernel` — where GPU kernels plug in
  (``sage_train.backends.sm90``); ``sage_train._dispatch`` decides per call.

Training runs no GPU kernel of the recipe yet (the Hopper forward exists in
``sage_train.backends.sm90``, the backward does not): every call runs the exact emulation from
``sage_quant.emulation.train_s8`` (a warning says so once).
"""

from ._dispatch import TrainKernel, kernel_module_status, register_kernel, registered_kernels, unregister_kernel
from ._function import attention, kernel_available
from ._ops import DOUBLE_BACKWARD_MESSAGE
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
    "TrainKernel",
    "register_kernel",
    "unregister_kernel",
    "registered_kernels",
    "kernel_module_status",
    "DOUBLE_BACKWARD_MESSAGE",
    "SageTrainFallbackWarning",
    "reset_warnings",
]
__version__ = "0.1.0"
