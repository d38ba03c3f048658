"""Validated options of one demo run, shared by every task."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")
MAX_SEED = 2**32 - 1
"""Largest seed: scikit-learn's ``random_state`` accepts integers in ``[0, 2**32 - 1]``."""


@dataclasses.dataclass(frozen=True)
class DemoOptions:
    """Settings of one demo run, already checked.

    Attributes:
        task: Name of the task in :data:`macfn.demo.TASKS`.
        epochs: Passes over the training data per run, >= 1.
        out: Folder that receives the plot, CSV and JSON files.
        device: Device every run trains on.
        seed: Seed of the data split, the initial weights and the batch order.
        quiet: Hide the progress bar.
        threads: Intra-op CPU threads (``torch.set_num_threads``) while the task trains.
    """

    task: str
    epochs: int
    out: Path
    device: torch.device
    seed: int
    quiet: bool
    threads: int = 1


def check_epochs(epochs: object) -> int:
    """Check that ``epochs`` is an integer >= 1 and return it; raise ValueError otherwise."""
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"Invalid epochs={epochs!r}: expected an integer >= 1, e.g. 20.")
    return epochs


def check_threads(threads: object) -> int:
    """Check that ``threads`` is an integer >= 1 and return it; raise ValueError otherwise."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"Invalid threads={threads!r}: expected an integer >= 1, e.g. 1.")
    return threads


def check_seed(seed: object) -> int:
    """Check that ``seed`` is an integer in ``[0, 2**32 - 1]`` and return it; raise ValueError otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"Invalid seed={seed!r}: expected an integer in [0, {MAX_SEED}], e.g. 0.")
    return seed


def resolve_device(name: object) -> torch.device:
    """Turn ``"auto"``, ``"cpu"`` or ``"cuda"`` into a device that this process can use.

    ``"auto"`` picks CUDA when a GPU is visible and the CPU otherwise.

    Raises:
        ValueError: An unknown name, or ``"cuda"`` without a usable GPU.
    """
    if name not in DEVICE_CHOICES:
        raise ValueError(f"Invalid device={name!r}: expected one of {', '.join(DEVICE_CHOICES)}.")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        if torch.version.cuda is None:
            reason = f"this PyTorch build ({torch.__version__}) has no CUDA support"
        else:
            reason = f"PyTorch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU"
        raise ValueError(f"Invalid device='cuda': {reason}. Use device 'cpu' or 'auto' (--device cpu or --device auto) instead.")
    return torch.device(str(name))


def check_out_dir(out: object) -> Path:
    """Create the folder ``out`` if needed and return it as a Path; raise ValueError if that fails."""
    if not isinstance(out, (str, Path)) or str(out) == "":
        raise ValueError(f"Invalid out={out!r}: expected a folder path, e.g. 'macfn-demo'.")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"Invalid out='{path}': it exists and is not a folder. Choose another path.")
    # The folder is created now, so that an unwritable path fails before any training.
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"Invalid out='{path}': the folder cannot be created ({error.strerror}). Choose another path.") from error
    return path
