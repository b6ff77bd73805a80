"""The lowered program creates no tensor on a fixed device: a constant traced as a CPU tensor
(e.g. the 1.0 of `torch.where(s > 0, s, 1.0)`, which torch.export records as a CPU
`scalar_tensor`) is copied from the host on every CUDA call, a synchronisation that breaks
CUDA-graph capture. Found on an H100 by tests/runtime/test_cuda_graphs_gpu.py; guarded here on
the CPU for every precision's program."""
import pytest

from qcompile.compiler.config import CompileConfig
from qcompile.runtime.artifact import load_program


@pytest.mark.parametrize("precision,kv", [("fp16", "fp16"), ("w8a8", "int4"), ("w4a8", "int4"),
                                          ("w4a8-g128", "int4"), ("fp8", "int4")])
def test_program_has_no_device_constants(tiny_artifact, precision, kv):
    cfg = CompileConfig(target="sm90", precision=precision, kv=kv, dtype="float16",
                        kernels="skip", quantizer="rtn")
    graph = load_program(tiny_artifact(cfg)).module().graph
    fixed = [f"{n.name}: {n.target}" for n in graph.nodes if n.op == "call_function"
             and ("scalar_tensor" in str(n.target) or n.kwargs.get("device") is not None)]
    assert not fixed, f"tensors created on a fixed device: {fixed}"
