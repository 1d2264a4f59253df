"""What is this machine? Versions, threads, GPU: the first thing to print when numbers look odd."""

import os
import platform
from importlib import metadata

import torch

from .device import describe_device, pick_device

PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "numpy", "matplotlib")


def package_versions(names=PACKAGES) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def environment_report() -> str:
    lines = [
        f"python {platform.python_version()} on {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} CPU cores"
    ]
    lines += [f"{name:13s} {version}" for name, version in package_versions().items()]
    lines.append(
        f"torch build   {'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU only'}"
    )
    lines.append(f"device        {describe_device(pick_device())}")
    lines.append(
        f"HF offline    {os.environ.get('HF_HUB_OFFLINE', '0')} (the course model needs no network)"
    )
    return "\n".join(lines)
