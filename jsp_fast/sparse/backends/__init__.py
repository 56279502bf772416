"""The built-in block-sparse backends; importing this package registers them (``registry.py``).

====== ==================== ======== =================================== ===============================
name   module               priority per-layer ops                        fused field
====== ==================== ======== =================================== ===============================
torch  ``torch_ref``        0        pure torch reference, every device  --
cpu    ``cpu``              10       ``csrc/cpu`` (fp32/fp64)             ``csrc/cpu/field.cpp``
triton ``triton``           20       ``jsp_fast.kernels`` (CUDA; the CPU   ``kernels/fused_field.py``
                            (-10)    under TRITON_INTERPRET=1 at -10)     (widths <= 512)
cuda   ``cuda``             30       --                                  ``csrc/cuda/fused_mlp.cu``
                                                                         (fp32, widths <= 512)
====== ==================== ======== =================================== ===============================

Neither triton nor the CUDA build is imported here: the Triton kernels load on their first call.
"""
from . import cpu, cuda, torch_ref, triton  # noqa: F401  (each registers itself)

__all__: list[str] = []
