"""Shared self-test helpers: how far a plugin may sit from its slot's reference, and how that is measured."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from qvl_pipeline.hardware.profile import HardwareProfile
from qvl_pipeline.slots.base import Fidelity, SelfTestError

# Largest relative error (‖got − want‖ / ‖want‖) a self-test accepts in fp32, per fidelity level.
TOLERANCE: dict[Fidelity, float] = {
    Fidelity.REFERENCE: 0.0,
    Fidelity.EXACT: 1e-5,
    Fidelity.NEAR: 2e-2,
    Fidelity.APPROXIMATE: 5e-2,
}


# Largest relative error of a whole model's first-token logits against the same model on reference plugins
# (task=validate on the tiny demo model): per-operation errors compound over the layers, a broken plugin is ~1.
END_TO_END_TOLERANCE: dict[Fidelity, float] = {
    Fidelity.REFERENCE: 1e-5,
    Fidelity.EXACT: 1e-4,
    Fidelity.NEAR: 5e-2,
    Fidelity.APPROXIMATE: 2.5e-1,
}


def tolerance(fidelity: Fidelity, dtype: torch.dtype = torch.float32) -> float:
    """The fidelity's fp32 tolerance, widened to 4 machine epsilons when the result is in a half dtype."""
    return max(TOLERANCE[fidelity], 4 * torch.finfo(dtype).eps if dtype != torch.float32 else 0.0)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ over all elements, computed in fp64 (0 when both are all-zero)."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        raise SelfTestError(f"shape {tuple(got.shape)} differs from the reference's {tuple(want.shape)}")
    denom = want.norm().item()
    diff = (got - want).norm().item()
    return diff / denom if denom > 0 else diff


def check_close(what: str, got: torch.Tensor, want: torch.Tensor, fidelity: Fidelity,
                dtype: torch.dtype = torch.float32) -> float:
    """Raise SelfTestError naming `what` and the measured error when it exceeds the fidelity's tolerance."""
    if got.shape != want.shape:
        raise SelfTestError(f"{what}: shape {tuple(got.shape)} differs from the reference's {tuple(want.shape)}")
    err = relative_error(got, want)
    limit = tolerance(fidelity, dtype)
    if not err <= limit:      # also catches NaN
        raise SelfTestError(f"{what}: relative error {err:.3g} vs the reference exceeds {limit:.3g} "
                            f"({fidelity.name} in {str(dtype).removeprefix('torch.')})")
    return err


def check_each(what: str, names: Sequence[str], got: Sequence[torch.Tensor], want: Sequence[torch.Tensor],
               fidelity: Fidelity, dtype: torch.dtype = torch.float32) -> float:
    """check_close on each pair of parallel results (e.g. cos and sin), named "<what> <name>"; the worst error."""
    return max(check_close(f"{what} {name}", g, w, fidelity, dtype)
               for name, g, w in zip(names, got, want, strict=True))


@contextmanager
def failures_as_selftest_error(what: str) -> Iterator[None]:
    """Turn any crash inside a self-test (no kernel image, CUDA unavailable, dtype errors) into SelfTestError."""
    try:
        yield
    except SelfTestError:
        raise
    except Exception as exc:
        raise SelfTestError(f"{what} failed: {type(exc).__name__}: {exc}") from exc


def self_test_devices(hw: HardwareProfile) -> list[torch.device]:
    """Where a device-agnostic plugin checks itself: the CPU, plus CUDA when the profile says it is usable
    and this process can reach it (a named target profile may describe a GPU this machine lacks)."""
    devices = [torch.device("cpu")]
    if hw.cuda_usable and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    return devices
