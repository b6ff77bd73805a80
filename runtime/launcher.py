"""Load kernel binaries (fatbin or cubin) and launch their `extern "C"` entries with
`cuda.bindings.driver`, on PyTorch's current stream, so `torch.cuda.graph` captures them.

Arguments are passed already typed, one helper per C type of the kernel's signature:

    kernel.launch(grid, (256, 1, 1), smem, [ptr(y), ptr(x), f32(a), i32(n)])

`ptr(tensor | None | int)` -> `void*` (None -> nullptr), `i32`/`i64` -> `int32_t`/`int64_t`,
`f32` -> `float`. The driver copies the values at launch (and at capture), so nothing has to
outlive the call. Every driver call is checked and raises `CudaDriverError` naming the call
and the CUresult.

Modules are loaded into PyTorch's context (the device's primary context), so pointers from
PyTorch tensors and PyTorch's streams are valid for them.
"""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Sequence

import torch

_DEFAULT_SMEM_LIMIT = 48 * 1024  # dynamic smem allowed without opting in (every arch)


class CudaDriverError(RuntimeError):
    def __init__(self, call: str, result):
        self.call, self.result = call, result
        name = getattr(result, "name", str(result))
        super().__init__(f"{call} failed: {name} ({int(result)}){_describe(result)}")


def _describe(result) -> str:
    try:
        from cuda.bindings import driver
        err, text = driver.cuGetErrorString(result)
        return f": {text.decode()}" if err == driver.CUresult.CUDA_SUCCESS and text else ""
    except Exception:  # no driver library: the name alone must do
        return ""


def _check(call: str, out):
    """cuda.bindings returns (CUresult, *values): raise on error, else return the values."""
    from cuda.bindings import driver
    result, *values = out if isinstance(out, tuple) else (out,)
    if result != driver.CUresult.CUDA_SUCCESS:
        raise CudaDriverError(call, result)
    return values[0] if len(values) == 1 else tuple(values) or None


# ---------------------------------------------------------------- typed kernel arguments

def ptr(value) -> ctypes.c_void_p:
    """A device pointer: a CUDA tensor's data_ptr(), None -> nullptr, or a raw int address."""
    if value is None:
        return ctypes.c_void_p(None)
    if isinstance(value, torch.Tensor):
        if value.device.type != "cuda":
            raise ValueError(f"ptr() needs a CUDA tensor, got one on {value.device}")
        return ctypes.c_void_p(value.data_ptr() or None)
    if isinstance(value, int) and not isinstance(value, bool):
        return ctypes.c_void_p(value or None)
    raise TypeError(f"ptr() takes a tensor, None or an int address, not {type(value).__name__}")


def _int(value, bits: int, ctype):
    if isinstance(value, torch.Tensor) or isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"i{bits}() takes a Python int, not {type(value).__name__}")
    if not -(1 << (bits - 1)) <= value < (1 << (bits - 1)):
        raise OverflowError(f"{value} does not fit in int{bits}_t")
    return ctype(value)


def i32(value: int) -> ctypes.c_int32:
    return _int(value, 32, ctypes.c_int32)


def i64(value: int) -> ctypes.c_int64:
    return _int(value, 64, ctypes.c_int64)


def f32(value: float) -> ctypes.c_float:
    if isinstance(value, torch.Tensor) or not isinstance(value, (int, float)):
        raise TypeError(f"f32() takes a Python float, not {type(value).__name__}")
    return ctypes.c_float(value)


def pack_args(args: Sequence) -> tuple[ctypes.Array, list]:
    """The `void**` array cuLaunchKernel reads (one pointer to each value), and the list of
    values it points into (keep it alive until the launch returns)."""
    values = list(args)
    for i, v in enumerate(values):
        if not isinstance(v, (ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_float)):
            raise TypeError(f"kernel argument {i} is a {type(v).__name__}; wrap each argument "
                            "in ptr(tensor | None), i32(int), i64(int) or f32(float)")
    array = (ctypes.c_void_p * max(len(values), 1))(*[ctypes.addressof(v) for v in values])
    return array, values


# ---------------------------------------------------------------- tensor checks

def check_tensor(t, *, name: str, dtype: torch.dtype, shape: Sequence[int | None] | None = None,
                 device=None, contiguous: bool = True, align: int = 16) -> None:
    """Raise ValueError saying what is wrong with `t` for a kernel launch. `shape` entries
    may be None (any size); `device` None means any CUDA device."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise ValueError(f"{name}: expected dtype {dtype}, got {t.dtype}")
    if shape is not None and (t.dim() != len(shape) or any(
            want is not None and got != want for got, want in zip(t.shape, shape))):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name}: expected shape {want}, got {list(t.shape)}")
    if device is None:
        if t.device.type != "cuda":
            raise ValueError(f"{name}: expected a CUDA tensor, got one on {t.device}")
    else:
        want_dev = torch.device(device)
        if want_dev.type == "cuda" and want_dev.index is None:
            want_dev = torch.device("cuda", torch.cuda.current_device())
        if t.device != want_dev:
            raise ValueError(f"{name}: expected device {want_dev}, got {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {t.stride()} for "
                         f"shape {list(t.shape)} (call .contiguous())")
    if align > 1 and t.numel() and t.data_ptr() % align:
        raise ValueError(f"{name}: data_ptr {t.data_ptr():#x} is not {align}-byte aligned "
                         f"(offset {t.data_ptr() % align}; a view at storage offset "
                         f"{t.storage_offset()}? clone it)")


# ---------------------------------------------------------------- modules and kernels

def _ensure_context(device: int):
    """Make PyTorch's context for `device` (its primary context) current; return it."""
    from cuda.bindings import driver
    torch.cuda.init()
    _check("cuInit(0)", driver.cuInit(0))
    dev = _check(f"cuDeviceGet({device})", driver.cuDeviceGet(device))
    ctx = _check("cuDevicePrimaryCtxRetain", driver.cuDevicePrimaryCtxRetain(dev))
    current = _check("cuCtxGetCurrent", driver.cuCtxGetCurrent())
    if current is None or int(current) != int(ctx):
        _check("cuCtxSetCurrent", driver.cuCtxSetCurrent(ctx))
    return ctx


class CudaModule:
    """A loaded fatbin/cubin. `image`: bytes, or the path of a file."""

    def __init__(self, image: bytes | str | Path, device: int | None = None):
        from cuda.bindings import driver
        if isinstance(image, (str, Path)):
            self.source = str(image)
            image = Path(image).read_bytes()
        else:
            self.source = f"<{len(image)} bytes>"
        self.device = torch.cuda.current_device() if device is None else int(device)
        self._ctx = _ensure_context(self.device)
        self._image = bytes(image)  # the driver reads it during the call only; kept for clarity
        self.handle = _check(f"cuModuleLoadData({self.source})",
                             driver.cuModuleLoadData(self._image))
        self._functions: dict[str, CudaKernel] = {}

    def function(self, name: str) -> CudaKernel:
        from cuda.bindings import driver
        if name not in self._functions:
            fn = _check(f'cuModuleGetFunction({self.source}, "{name}")',
                        driver.cuModuleGetFunction(self.handle, name.encode()))
            self._functions[name] = CudaKernel(fn, name, self)
        return self._functions[name]

    def __repr__(self) -> str:
        return f"CudaModule({self.source}, device={self.device})"


class CudaKernel:
    """One entry point of a CudaModule."""

    def __init__(self, handle, name: str, module: CudaModule):
        from cuda.bindings import driver
        self.handle, self.name, self.module = handle, name, module
        # without opting in, static + dynamic shared memory must fit in 48 KB
        attr = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES
        self.static_smem = _check(f"cuFuncGetAttribute({name}, SHARED_SIZE_BYTES)",
                                  driver.cuFuncGetAttribute(attr, handle))
        self.max_dynamic_smem = _DEFAULT_SMEM_LIMIT - self.static_smem

    def set_max_dynamic_smem(self, nbytes: int) -> None:
        """Opt in to more than 48 KB of shared memory, static + dynamic (once; a no-op below)."""
        from cuda.bindings import driver
        if nbytes <= self.max_dynamic_smem:
            return
        attr = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        try:
            _check(f"cuFuncSetAttribute({self.name}, MAX_DYNAMIC_SHARED_SIZE_BYTES, {nbytes})",
                   driver.cuFuncSetAttribute(self.handle, attr, nbytes))
        except CudaDriverError as e:
            optin = driver.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
            dev = _check("cuDeviceGet", driver.cuDeviceGet(self.module.device))
            limit = _check("cuDeviceGetAttribute", driver.cuDeviceGetAttribute(optin, dev))
            raise CudaDriverError(f"{e.call} (the device allows at most {limit} bytes per "
                                  "block, static shared memory included)", e.result) from None
        self.max_dynamic_smem = nbytes

    def launch(self, grid: Sequence[int], block: Sequence[int], smem: int, args: Sequence,
               cluster: Sequence[int] | None = None, pdl: bool = False) -> None:
        """Launch on torch.cuda.current_stream() of the module's device. `args`: ptr()/i32()/
        i64()/f32() values in the order of the kernel's parameters. sm_90+ only (through
        cuLaunchKernelEx): `cluster`, thread-block cluster dims, each dividing the grid's;
        `pdl`, programmatic dependent launch: the kernel may start before the previous one on
        the stream finishes, and must wait for it itself (`griddepcontrol.wait`)."""
        from cuda.bindings import driver
        grid, block = _dim3(grid, "grid"), _dim3(block, "block")
        if cluster is not None:
            cluster = _dim3(cluster, "cluster")
            if any(g % c for g, c in zip(grid, cluster)):
                raise ValueError(f"{self.name}: cluster {cluster} does not divide grid {grid}")
        if smem > self.max_dynamic_smem:
            raise ValueError(f"{self.name}: launch asks for {smem} bytes of dynamic shared "
                             f"memory, above the {self.max_dynamic_smem} allowed; call "
                             f"set_max_dynamic_smem({smem}) first")
        array, values = pack_args(args)
        ctx = self.module._ctx
        current = _check("cuCtxGetCurrent", driver.cuCtxGetCurrent())
        if current is None or int(current) != int(ctx):  # e.g. a thread PyTorch has not used
            _check("cuCtxSetCurrent", driver.cuCtxSetCurrent(ctx))
        stream = driver.CUstream(torch.cuda.current_stream(self.module.device).cuda_stream)
        if cluster is None and not pdl:
            _check(f"cuLaunchKernel({self.name}, grid={grid}, block={block}, smem={smem})",
                   driver.cuLaunchKernel(self.handle, *grid, *block, smem, stream,
                                         ctypes.addressof(array), 0))
        else:
            config = driver.CUlaunchConfig()
            config.gridDimX, config.gridDimY, config.gridDimZ = grid
            config.blockDimX, config.blockDimY, config.blockDimZ = block
            config.sharedMemBytes, config.hStream = smem, stream
            attrs = []
            if cluster is not None:
                attr = driver.CUlaunchAttribute()
                attr.id = driver.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
                attr.value.clusterDim.x, attr.value.clusterDim.y, attr.value.clusterDim.z = cluster
                attrs.append(attr)
            if pdl:
                attr = driver.CUlaunchAttribute()
                attr.id = (driver.CUlaunchAttributeID
                           .CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION)
                attr.value.programmaticStreamSerializationAllowed = 1
                attrs.append(attr)
            config.attrs, config.numAttrs = attrs, len(attrs)
            _check(f"cuLaunchKernelEx({self.name}, grid={grid}, block={block}, smem={smem}, "
                   f"cluster={cluster}, pdl={pdl})",
                   driver.cuLaunchKernelEx(config, self.handle, ctypes.addressof(array), 0))
        del values  # kept alive until here: the driver copies the values during the call

    def __repr__(self) -> str:
        return f"CudaKernel({self.name!r} of {self.module.source})"


def _dim3(dims: Sequence[int], what: str) -> tuple[int, int, int]:
    dims = tuple(int(d) for d in dims)
    if not 1 <= len(dims) <= 3 or any(d < 1 for d in dims):
        raise ValueError(f"{what} must be 1 to 3 positive sizes, got {dims}")
    return dims + (1,) * (3 - len(dims))
