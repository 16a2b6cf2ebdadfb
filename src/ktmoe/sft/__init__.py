"""The wrappers: the stage composition (base.py) and the concrete training and inference classes
(wrappers.py). The PyTorch binding lives in ktmoe.torch_module."""
from .base import BaseSFTMoEWrapper
from .wrappers import AMXSFTMoEWrapper, InferenceMoEWrapper

__all__ = ["BaseSFTMoEWrapper", "AMXSFTMoEWrapper", "InferenceMoEWrapper"]
