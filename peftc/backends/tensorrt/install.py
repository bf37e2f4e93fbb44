"""What TensorRT this machine has: the module (``tensorrt`` or ``tensorrt_rtx``) and the GPU it builds
engines for, found through the CUDA driver API (no torch needed) and checked against what the installed
TensorRT can build for."""

from __future__ import annotations

import ctypes
import dataclasses
import importlib
import importlib.util
from typing import Any

from peftc.errors import BackendUnavailable

MODULES = ("tensorrt", "tensorrt_rtx")
INSTALL_HINT = "pip install 'peftc[tensorrt]' (installs tensorrt-rtx-cu13), or NVIDIA's tensorrt wheel"


def find_module() -> str | None:
    """The TensorRT module installed here (``tensorrt`` preferred), or None."""
    for name in MODULES:
        if importlib.util.find_spec(name) is not None:
            return name
    return None


def import_trt(name: str | None = None) -> Any:
    """Import ``name`` (default: :func:`find_module`).

    Raises:
        BackendUnavailable: neither module imports; the message names the extra.
    """
    name = name or find_module()
    if name is None:
        raise BackendUnavailable(f"neither tensorrt nor tensorrt_rtx is installed ({INSTALL_HINT})")
    try:
        return importlib.import_module(name)
    except (ImportError, OSError) as e:
        raise BackendUnavailable(f"{name} is installed but does not import ({e}); {INSTALL_HINT}") from e


@dataclasses.dataclass(frozen=True)
class Device:
    """The CUDA device engines are built for and run on."""

    name: str
    compute_capability: tuple[int, int]


def cuda_device() -> tuple[Device | None, str]:
    """The first CUDA device, through the driver API (no torch or TensorRT needed), or why there is none."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        return None, f"no GPU (the CUDA driver is not installed: {e})"
    status = lib.cuInit(0)
    if status != 0:
        return None, f"no GPU (cuInit failed with CUDA error {status})"
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return None, "no GPU (the CUDA driver reports no device)"
    device = ctypes.c_int(0)
    lib.cuDeviceGet(ctypes.byref(device), 0)
    name = ctypes.create_string_buffer(256)
    lib.cuDeviceGetName(name, 256, device)
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    lib.cuDeviceGetAttribute(ctypes.byref(major), 75, device)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
    lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, device)  # ..._MINOR
    return Device(name.value.decode(errors="replace"), (major.value, minor.value)), ""


def unbuildable(device: Device, module: str | None = None) -> str:
    """Why the installed TensorRT cannot build engines for ``device`` ("" when it can): TensorRT-RTX
    builds only for the compute capabilities its ``ComputeCapability`` enum names (on an H100, 9.0, its
    builder fails in Myelin); NVIDIA's full ``tensorrt`` has no such enum."""
    trt = import_trt(module)
    names = getattr(getattr(trt, "ComputeCapability", None), "__members__", {})
    supported = sorted((int(n[2:-1]), int(n[-1])) for n in names if n.startswith("SM") and n[2:].isdigit())
    if not supported or tuple(device.compute_capability) in supported:
        return ""
    listed = ", ".join(f"{major}.{minor}" for major, minor in supported)
    have = ".".join(map(str, device.compute_capability))
    return (
        f"{trt.__name__} {trt.__version__} builds engines for compute capability {listed}; {device.name} is "
        f"{have} (install NVIDIA's tensorrt wheel for this GPU, or use --target aoti --device cuda)"
    )


def build_device(module: str | None = None) -> tuple[Device | None, str]:
    """The GPU the installed TensorRT builds engines for here, or why there is none."""
    device, why = cuda_device()
    if device is not None and (why := unbuildable(device, module)):
        return None, why
    return device, why
