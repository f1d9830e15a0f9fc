"""Kernel modules of sage_train (each registers a :class:`sage_train.TrainKernel` on import).

``sage_train._dispatch`` imports :data:`sage_train._dispatch.BUILTIN_KERNEL_MODULES` lazily, on
the first call; a module that fails to import is skipped (``sage_train.kernel_module_status()``
says why) and the emulation runs.
"""
