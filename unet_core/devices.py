"""Which device runs the network: names checked before any work, ``auto`` resolved."""

from __future__ import annotations

import torch

from unet_core.errors import ConfigError, opt

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def check_device(device: str | torch.device, indexed: bool = True, here: bool = True) -> str:
    """``device`` if it names a device this machine has, else one sentence (usage error).

    Names are ``auto``, ``cpu``, ``cuda`` and, when ``indexed``, ``cuda:N``. ``cuda`` on a
    machine without a CUDA GPU (or with fewer than N + 1) is refused here, before any
    work, rather than by the first block that loads the model. ``here=False``: the model
    runs on other machines (cluster workers), so only the name is checked."""
    name = str(device).strip().lower()
    choices = "auto, cpu, cuda or cuda:N" if indexed else "auto, cpu or cuda"
    kind, _, index = name.partition(":")
    if kind not in DEVICE_CHOICES or (index and (not indexed or kind != "cuda")):
        raise ConfigError(f"{opt('device')} {device}: unknown device; use {choices}")
    if index and not index.isdigit():
        raise ConfigError(f"{opt('device')} {device}: unknown device; use {choices}")
    if kind == "cuda" and here:
        if not torch.cuda.is_available():
            raise ConfigError(
                f"{opt('device')} {device}: no CUDA GPU is available on this machine "
                f"(use {opt('device')} cpu, or auto to take a GPU when there is one)"
            )
        if index and int(index) >= torch.cuda.device_count():
            raise ConfigError(
                f"{opt('device')} {device}: this machine has "
                f"{torch.cuda.device_count()} CUDA GPU(s)"
            )
    return name


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> CUDA when present, else CPU; 'cuda' without a GPU is a clear error."""
    if isinstance(device, torch.device):
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device 'cuda' was asked for but no CUDA GPU is available")
        return device
    name = check_device(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
