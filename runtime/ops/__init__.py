"""qcompile custom ops (`torch.ops.qcompile.*`).

Every op has a reference implementation in plain PyTorch with the exact integer semantics of
DESIGN.md (it runs on CPU and GPU and reads the same packed buffers as the kernels) and a
fake implementation for export and Inductor. Importing this package registers them all.
"""
from . import attention, gemm, gemm_fp8, kv, quant  # noqa: F401  (registration side effects)
from .attention import ATTENTION_OPS
from .gemm import int_matmul
from .kv import KV_ENCODE_OPS, kv_record_bytes
from .quant import quant_a8_ref

# The GEMM ops of each quantization scheme: compiler/schemes.py (GEMM_OPS).
__all__ = ["ATTENTION_OPS", "KV_ENCODE_OPS", "int_matmul", "kv_record_bytes", "quant_a8_ref"]
