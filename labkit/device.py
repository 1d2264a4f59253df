"""Pick where tensors live: CUDA when present, else CPU; `LABKIT_DEVICE` or an argument overrides."""

import os

import torch


def pick_device(override: str | None = None) -> torch.device:
    choice = (
        override
        or os.environ.get("LABKIT_DEVICE")
        or ("cuda" if torch.cuda.is_available() else "cpu")
    )
    device = torch.device(choice)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {choice!r} requested but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}); install a CUDA build of torch or use 'cpu'"
        )
    return device


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"cuda: {props.name}, {props.total_memory / 2**30:.0f} GiB"
    return f"cpu: {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
