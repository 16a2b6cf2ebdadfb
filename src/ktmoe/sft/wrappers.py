"""The concrete wrappers, one per mode: `AMXSFTMoEWrapper` trains LoRA, `InferenceMoEWrapper` only runs
forward (LoRA applied if given). The factory (ktmoe.experts) picks the class from the method's mode and
passes the method's weight format to its constructor, so one class serves every format.
The instruction set (AMX, AVX-512-BF16, AVX-512, AVX2, portable C) is chosen at run time by the engine;
the "AMX" in the name is the method family, as in kt-kernel's naming."""
from __future__ import annotations

from .base import BaseSFTMoEWrapper


class AMXSFTMoEWrapper(BaseSFTMoEWrapper):
    trains = True


class InferenceMoEWrapper(BaseSFTMoEWrapper):
    trains = False

    def forward_sft(self, *args, **kwargs):
        raise RuntimeError(f"{self.method} is an inference method: use forward(); for training pick an "
                           f"*_SFT method with mode='sft'")

    def backward(self, grad_output):
        raise RuntimeError(f"{self.method} is an inference method and keeps nothing for backward")
