"""The autocast a run can use here: bf16 on a CPU without native bf16 matrix multiply trains in fp32.

On such a CPU (no AVX512-BF16 or AMX: e.g. an AVX2-only AMD EPYC) torch's bf16 GEMM is a reference loop,
measured 24x slower than fp32 on 2 cores, so `ift train` runs fp32 and says so; `ift estimate --device cpu`
estimates what that run holds. One rule for both, so the estimate describes the run that happens.
"""

from __future__ import annotations

import contextlib

from ift.recipe import Recipe


def runnable_precision(recipe: Recipe, device_type: str) -> tuple[Recipe, str | None]:
    """The recipe as it can run on `device_type` here, and why its precision changed (None when it did not)."""
    t = recipe.training
    if t.mixed_precision != "bf16" or device_type != "cpu":
        return recipe, None
    import torch  # only here: `ift estimate` of other recipes never loads torch for this

    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return recipe, None
    why = (f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bf16 matrix multiply, "
           "so bf16 autocast would run many times slower than fp32")
    return recipe.model_copy(update={"training": t.model_copy(update={"mixed_precision": "no"})}), why


def evaluation_autocast(mixed_precision: str, device_type: str):
    """The run's autocast around an evaluation outside the training loop (`ift eval`), as the loop's own test
    evaluation ran under Accelerate's: the same figures for the same weights."""
    if mixed_precision not in ("bf16", "fp16"):
        return contextlib.nullcontext()
    import torch

    return torch.autocast(device_type, dtype=torch.bfloat16 if mixed_precision == "bf16" else torch.float16)


def precision_record(model, mixed_precision: str) -> str:
    """What an evaluated forward ran in, for the evaluation record: the weights' dtype, and the autocast."""
    weights = str(next(model.parameters()).dtype).removeprefix("torch.")
    return f"{weights} weights, {mixed_precision} autocast" if mixed_precision in ("bf16", "fp16") else weights


def runnable_here(recipe: Recipe, say=print) -> Recipe:
    """The recipe as this machine runs it (`runnable_precision` on the device Accelerate will pick): its saved
    copy and the records then say what ran."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # The state as the Accelerator built next will see it: `accelerate launch` marks CPU runs with
    # ACCELERATE_USE_CPU, and a PartialState made without it is, since accelerate 1.16, one process per rank on
    # a CPU-only machine (every rank its own main process: two processes fought over the run folder's lock).
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    recipe, why = runnable_precision(recipe, state.device.type)
    if why and state.is_main_process:
        say(f"note: {why}: training in fp32 (training.mixed_precision: no)")
    return recipe
