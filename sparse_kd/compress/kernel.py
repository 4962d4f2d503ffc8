"""Which serving kernel: ``torch_quantized`` on CPU (:mod:`sparse_kd.serve.cpu_model`) or FBGEMM's
TBE on a GPU (:mod:`sparse_kd.compress.tbe`), chosen by ``compress.serve_device``."""

from typing import Optional

import torch
from torch import nn

from sparse_kd.compress.cpu_kernel import packed_tables
from sparse_kd.serve.cpu_model import CpuServingDLRM
from sparse_kd.serve.format import KERNEL_CPU, KERNEL_TBE, KERNELS

#: serve_device -> kernel
SERVE_DEVICE_KERNEL = {"cpu": KERNEL_CPU, "cuda": KERNEL_TBE}



def require_device(serve_device: str, what: str = "compress.serve_device") -> None:
    """Refuse a ``cuda`` serving device where no CUDA GPU is visible, before any work: the TBE
    kernel's tables are built, and the compressed model evaluated, on the GPU."""
    if serve_device == "cuda" and not torch.cuda.is_available():
        from sparse_kd.config import ConfigError

        raise ConfigError(
            f"{what}: 'cuda' needs a visible CUDA GPU (torch.cuda.is_available() is False here). Build a GPU "
            "artifact on a GPU machine (copy the run folder there; docs/GPU.md, 'Compressing on a CPU box for GPU "
            "serving'), or use compress.serve_device=cpu")


def kernel_for(serve_device: str, kernel: Optional[str] = None) -> str:
    """The kernel for a serving device (``kernel`` overrides it, e.g. a CPU TBE to compare against)."""
    if serve_device not in SERVE_DEVICE_KERNEL:
        raise ValueError(f"compress.serve_device: {serve_device!r} is not valid; expected cpu or cuda")
    k = kernel or SERVE_DEVICE_KERNEL[serve_device]
    if k not in KERNELS:
        raise ValueError(f"kernel {k!r} is not valid; expected one of {', '.join(KERNELS)}")
    if k == KERNEL_CPU and serve_device != "cpu":
        raise ValueError(f"kernel {KERNEL_CPU} serves on cpu only, not {serve_device!r}")
    return k



def kernel_of(serving: nn.Module) -> str:
    """The kernel of an eager or scripted serving model."""
    if isinstance(serving, torch.jit.ScriptModule):
        return KERNEL_CPU if packed_tables(serving) else KERNEL_TBE
    return KERNEL_CPU if isinstance(serving, CpuServingDLRM) else KERNEL_TBE

