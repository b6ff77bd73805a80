"""The launcher: tensor checks and argument packing on the CPU; on a GPU, kernels built by
cutlass_templates/build.py from a test template load, launch on the current stream, are
captured by CUDA graphs, use > 48 KB of dynamic shared memory, and fail clearly."""
import ctypes
import shutil
import threading
from dataclasses import dataclass

import pytest
import torch

from qcompile.runtime.launcher import (CudaDriverError, CudaModule, _check, check_tensor, f32,
                                       i32, i64, pack_args, ptr)

# ---------------------------------------------------------------- CPU


def test_check_tensor_messages():
    x = torch.zeros(4, 32, dtype=torch.int8)
    check_tensor(x, name="x", dtype=torch.int8, shape=(4, None), device="cpu")  # fine
    cases = [
        (dict(dtype=torch.float16), "x: expected dtype torch.float16, got torch.int8"),
        (dict(dtype=torch.int8, shape=(4, 16)), r"x: expected shape \[4, 16\], got \[4, 32\]"),
        (dict(dtype=torch.int8, shape=(None, 32, 1)), r"expected shape \[\*, 32, 1\]"),
        (dict(dtype=torch.int8), "x: expected a CUDA tensor, got one on cpu"),
        (dict(dtype=torch.int8, device="cuda:0"), "x: expected device cuda:0, got cpu"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(ValueError, match=msg):
            check_tensor(x, name="x", **kwargs)
    with pytest.raises(ValueError, match=r"w: expected a contiguous tensor, got strides \(1, 32\)"):
        check_tensor(x.t(), name="w", dtype=torch.int8, device="cpu")
    check_tensor(x.t(), name="w", dtype=torch.int8, device="cpu", contiguous=False, align=1)
    base = torch.zeros(64, dtype=torch.int8)
    assert base.data_ptr() % 16 == 0
    with pytest.raises(ValueError, match="s: data_ptr 0x[0-9a-f]+ is not 16-byte aligned"):
        check_tensor(base[4:], name="s", dtype=torch.int8, device="cpu")
    check_tensor(base[4:], name="s", dtype=torch.int8, device="cpu", align=4)
    with pytest.raises(ValueError, match="y: expected a tensor, got NoneType"):
        check_tensor(None, name="y", dtype=torch.int8)


def test_pack_args_points_at_typed_values():
    args = [ptr(None), ptr(0x7F0000001000), i32(-7), i64(1 << 40), f32(0.5)]
    array, keep = pack_args(args)
    assert len(array) == 5 and keep == args

    def read(i, ctype):
        return ctypes.cast(array[i], ctypes.POINTER(ctype)).contents.value
    assert read(0, ctypes.c_void_p) is None
    assert read(1, ctypes.c_void_p) == 0x7F0000001000
    assert read(2, ctypes.c_int32) == -7
    assert read(3, ctypes.c_int64) == 1 << 40
    assert read(4, ctypes.c_float) == 0.5
    assert len(pack_args([])[0]) == 1  # a kernel without parameters still gets a valid array


def test_argument_helpers_refuse_wrong_values():
    with pytest.raises(TypeError, match=r"kernel argument 1 is a int; wrap each argument"):
        pack_args([i32(1), 2])
    with pytest.raises(TypeError, match="kernel argument 0 is a Tensor"):
        pack_args([torch.zeros(1)])
    with pytest.raises(ValueError, match="ptr\\(\\) needs a CUDA tensor, got one on cpu"):
        ptr(torch.zeros(1))
    with pytest.raises(TypeError, match="ptr\\(\\) takes a tensor, None or an int"):
        ptr(1.5)
    with pytest.raises(OverflowError, match="does not fit in int32_t"):
        i32(1 << 31)
    assert i32(-(1 << 31)).value == -(1 << 31)
    with pytest.raises(TypeError, match="i32\\(\\) takes a Python int, not bool"):
        i32(True)
    with pytest.raises(TypeError, match="f32\\(\\) takes a Python float, not str"):
        f32("1")


def test_driver_error_names_call_and_result():
    from cuda.bindings import driver
    err = driver.CUresult.CUDA_ERROR_NOT_FOUND
    with pytest.raises(CudaDriverError, match=r'cuModuleGetFunction\(m, "k"\) failed: '
                                              r"CUDA_ERROR_NOT_FOUND \(500\)") as e:
        _check('cuModuleGetFunction(m, "k")', (err, None))
    assert e.value.result == err
    assert _check("cuX", (driver.CUresult.CUDA_SUCCESS, 42)) == 42
    assert _check("cuY", (driver.CUresult.CUDA_SUCCESS,)) is None


# ---------------------------------------------------------------- GPU

TEMPLATE = r"""
extern "C" __global__ void axpb_f32(float* y, const float* x, float a, float b, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = a * x[i] + b;
}
extern "C" __global__ void axpb_i32(int* y, const int* x, int a, int b, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = a * x[i] + b;
}
extern "C" __global__ void add_i64(long long* y, long long a, const int* maybe_null, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = a + i + (maybe_null == nullptr ? 0 : maybe_null[i]);
}
// one block reverses n floats through n * 4 bytes of dynamic shared memory
extern "C" __global__ void reverse_smem(float* y, const float* x, int n) {
  extern __shared__ float buf[];
  for (int i = threadIdx.x; i < n; i += blockDim.x) buf[i] = x[i];
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x) y[i] = buf[n - 1 - i];
}
"""


@dataclass(frozen=True)
class _Cfg:
    split_k: int = 1

    def name(self, kind):
        return "axpb_f32"

    def defines(self, kind):
        return []

    def threads(self):
        return 256

    def smem_bytes(self, kind):
        return 0


def _targets() -> list[str]:
    """sm80 (on a Hopper GPU its compute_80 PTX is JIT-compiled) and, on cc 9.0, sm90."""
    if not torch.cuda.is_available():
        return ["sm80"]
    return ["sm80", "sm90"] if torch.cuda.get_device_capability() == (9, 0) else ["sm80"]


@pytest.fixture(scope="module", params=_targets())
def module(request, tmp_path_factory):
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH: the test kernels are built at test time")
    from qcompile.cutlass_templates.build import (build_kernel, read_kernel_table,
                                                  write_kernel_table)
    d = tmp_path_factory.mktemp("launcher")
    (d / "test_kernels.cu").write_text(TEMPLATE)
    binary = build_kernel("test", _Cfg(), request.param, d / "cache", template_dir=d,
                          kinds={"test": ("test_kernels.cu", None)})
    write_kernel_table([binary], d / "kernels")  # load as the runtime does: through the table
    (entry,) = read_kernel_table(d / "kernels")
    return CudaModule(d / "kernels" / entry["file"])


def _grid(n, block=256):
    return ((n + block - 1) // block, 1, 1), (block, 1, 1)


@pytest.mark.gpu
def test_launch_float_and_int(module):
    n = 1000
    grid, block = _grid(n)
    x = torch.randn(n, device="cuda")
    y = torch.full_like(x, float("nan"))
    module.function("axpb_f32").launch(grid, block, 0, [ptr(y), ptr(x), f32(2.5), f32(-1.0), i32(n)])
    torch.testing.assert_close(y, 2.5 * x - 1.0)

    xi = torch.randint(-1000, 1000, (n,), device="cuda", dtype=torch.int32)
    yi = torch.full_like(xi, -1)
    module.function("axpb_i32").launch(grid[:1], block[:1], 0, [ptr(yi), ptr(xi), i32(3), i32(7), i32(n - 1)])
    assert torch.equal(yi[:-1], 3 * xi[:-1] + 7) and yi[-1].item() == -1  # n - 1: last untouched

    y64 = torch.zeros(n, device="cuda", dtype=torch.int64)
    add = module.function("add_i64")
    add.launch(grid, block, 0, [ptr(y64), i64(1 << 40), ptr(None), i32(n)])
    assert torch.equal(y64, (1 << 40) + torch.arange(n, device="cuda"))
    add.launch(grid, block, 0, [ptr(y64), i64(5), ptr(xi), i32(n)])
    assert torch.equal(y64, 5 + torch.arange(n, device="cuda") + xi)


@pytest.mark.gpu
def test_launch_follows_current_stream_and_threads(module):
    n = 4096
    grid, block = _grid(n)
    k = module.function("axpb_f32")
    x = torch.randn(n, device="cuda")
    y = torch.zeros_like(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(1_000_000)  # keep the side stream busy: the launch must queue behind
        k.launch(grid, block, 0, [ptr(y), ptr(x), f32(1.0), f32(1.0), i32(n)])
    side.synchronize()
    torch.testing.assert_close(y, x + 1.0)

    y2 = torch.zeros_like(x)
    errors = []

    def worker():  # a thread PyTorch never used: the launcher makes the context current
        try:
            k.launch(grid, block, 0, [ptr(y2), ptr(x), f32(-1.0), f32(0.0), i32(n)])
            torch.cuda.current_stream().synchronize()
        except Exception as e:  # reported below, not swallowed
            errors.append(e)
    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert not errors, errors
    torch.cuda.synchronize()
    torch.testing.assert_close(y2, -x)


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay(module):
    n = 3000
    grid, block = _grid(n)
    k = module.function("axpb_f32")
    x = torch.randn(n, device="cuda")
    y = torch.empty_like(x)
    args = [ptr(y), ptr(x), f32(3.0), f32(0.25), i32(n)]
    side = torch.cuda.Stream()  # warm up off the default stream, as torch's docs advise
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        k.launch(grid, block, 0, args)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        k.launch(grid, block, 0, args)
    for _ in range(2):
        new = torch.randn(n, device="cuda")
        x.copy_(new)
        y.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(y, 3.0 * new + 0.25)


@pytest.mark.gpu
def test_large_dynamic_smem(module):
    smem = 100 * 1024
    n = smem // 4
    k = module.function("reverse_smem")
    x = torch.randn(n, device="cuda")
    y = torch.zeros_like(x)
    args = [ptr(y), ptr(x), i32(n)]
    with pytest.raises(ValueError, match="call set_max_dynamic_smem"):
        k.launch((1,), (1024,), smem, args)
    k.set_max_dynamic_smem(smem)
    k.set_max_dynamic_smem(smem)  # once is enough; again is a no-op
    k.launch((1,), (1024,), smem, args)
    torch.cuda.synchronize()
    assert torch.equal(y, x.flip(0))
    with pytest.raises(CudaDriverError, match="MAX_DYNAMIC_SHARED_SIZE_BYTES.*at most"):
        k.set_max_dynamic_smem(1 << 20)  # 1 MiB: more than any GPU allows


@pytest.mark.gpu
def test_missing_entry_and_bad_image(module, tmp_path):
    with pytest.raises(CudaDriverError, match='"no_such_kernel".*CUDA_ERROR_NOT_FOUND'):
        module.function("no_such_kernel")
    assert module.function("axpb_f32") is module.function("axpb_f32")
    bad = tmp_path / "bad.fatbin"
    bad.write_bytes(b"not a cubin, nor PTX\n" * 8)
    with pytest.raises(CudaDriverError, match="cuModuleLoadData.*bad.fatbin"):
        CudaModule(bad)
