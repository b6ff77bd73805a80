"""The `--device` of qrun and qeval, checked before anything loads: `cpu` (the reference ops)
or `cuda[:N]` (the CUTLASS kernels), with a one-line reason and remedy for each way a CUDA
request cannot be met (a CPU-only torch build, no visible GPU, an index past the last GPU)."""
from __future__ import annotations

import torch


class DeviceError(ValueError):
    """The requested device cannot be used; the message says what to do."""


def parse_device(text: str) -> torch.device:
    """`text` as a torch.device that this machine can run, or DeviceError."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise DeviceError(f"unknown device {text!r}: use cpu or cuda (cuda:N for GPU N)") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise DeviceError(f"device {text!r} is not supported: qcompile runs on cpu or cuda")
    if torch.version.cuda is None:
        raise DeviceError(f"--device {text} needs a CUDA build of torch, but torch "
                          f"{torch.__version__} is CPU-only: install a CUDA build "
                          "(https://pytorch.org/get-started) or use --device cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"--device {text}: no CUDA GPU is visible (torch.cuda.is_available() "
                          "is False): check nvidia-smi and CUDA_VISIBLE_DEVICES, or use "
                          "--device cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise DeviceError(f"--device {text}: this machine has {count} GPU(s), numbered "
                          f"0..{count - 1}")
    return device
