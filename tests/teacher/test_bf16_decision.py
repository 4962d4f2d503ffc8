"""precision=auto on CUDA: bf16 only where the teacher's own GPU runs it natively (issue 20, item 8).

torch.cuda is faked (no GPU here): two GPUs, cuda:0 a pre-Ampere card that only *emulates* bf16
(what ``is_bf16_supported()`` counts by default), cuda:1 an Ampere card. The decision must follow
the teacher's device, not the current one, and must not count emulation.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from sparse_kd.teacher import encoder as E


class FakeCuda:
    """cuda:0 emulates bf16 (capability 7.0), cuda:1 has it natively (8.0); current device 0."""

    major = {0: 7, 1: 8}

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.current = 0
        self.asked: list[tuple[int, bool]] = []
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "device", self.device)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", self.is_bf16_supported)

    @contextlib.contextmanager
    def device(self, index):
        prev, self.current = self.current, int(index)
        try:
            yield
        finally:
            self.current = prev

    def is_bf16_supported(self, including_emulation: bool = True) -> bool:
        # torch's rule: capability >= 8 natively; below it, emulated bf16 counts unless excluded
        self.asked.append((self.current, including_emulation))
        return self.major[self.current] >= 8 or including_emulation


def test_emulated_bf16_is_not_native(monkeypatch):
    fake = FakeCuda(monkeypatch)
    assert torch.cuda.is_bf16_supported() is True  # what the old check saw on the pre-Ampere GPU
    assert E.native_bf16(torch.device("cuda:0")) is False
    assert E.resolve_precision("auto", torch.device("cuda:0")) == "fp32"
    assert fake.asked[-1] == (0, False)


def test_the_teachers_device_decides_not_the_current_one(monkeypatch):
    fake = FakeCuda(monkeypatch)  # current device: 0 (emulated only)
    assert E.resolve_precision("auto", torch.device("cuda:1")) == "bf16"
    assert fake.asked[-1] == (1, False) and fake.current == 0  # asked about cuda:1, current restored
    fake.current = 1  # and the other way round: current cuda:1, teacher on cuda:0
    assert E.resolve_precision("auto", torch.device("cuda:0")) == "fp32"
    # "cuda" without an index is the current device, where model.to("cuda") puts the teacher
    assert E.native_bf16(torch.device("cuda")) is True and fake.asked[-1] == (1, False)


def test_explicit_precision_is_kept(monkeypatch):
    FakeCuda(monkeypatch)
    assert E.resolve_precision("bf16", torch.device("cuda:0")) == "bf16"
    assert E.resolve_precision("fp32", torch.device("cuda:1")) == "fp32"


def test_older_torch_without_including_emulation(monkeypatch):
    """A torch whose is_bf16_supported takes no argument: capability 8.0+ of the teacher's GPU."""
    FakeCuda(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)  # counts emulation, no argument
    props = {0: 7, 1: 8}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: type("P", (), {"major": props[i]})())
    assert E.native_bf16(torch.device("cuda:0")) is False
    assert E.native_bf16(torch.device("cuda:1")) is True


def test_no_cuda_means_no_bf16_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert E.native_bf16(torch.device("cuda:0")) is False
