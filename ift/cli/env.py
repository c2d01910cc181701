"""`ift env`: versions and devices, for bug reports."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys

PACKAGES = ["ift", "torch", "transformers", "datasets", "peft", "accelerate", "huggingface_hub",
            "rouge_score", "bitsandbytes", "trl", "promptsource"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("env", help="print versions of Python, torch, transformers, ... and the devices seen")
    p.set_defaults(func=run)


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _devices() -> list[str]:
    import torch

    found = [f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            found.append(f"cuda:{i}: {props.name}, {props.total_memory / 2**30:.1f} GiB")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        found.append("mps")
    return found


def run(args: argparse.Namespace) -> int:
    print(f"python: {sys.version.split()[0]} ({platform.platform()})")
    for name in PACKAGES:
        print(f"{name}: {_version(name)}")
    for dev in _devices():
        print(f"device: {dev}")
    return 0
