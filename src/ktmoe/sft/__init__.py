"""LoRA fine-tuning wrappers: the stage composition and its PyTorch autograd binding."""
from .base import BaseSFTMoEWrapper
from .wrappers import AMXSFTMoEWrapper, InferenceMoEWrapper
from .autograd import KTMoEExperts, KTMoEFunction

__all__ = ["BaseSFTMoEWrapper", "AMXSFTMoEWrapper", "InferenceMoEWrapper", "KTMoEExperts", "KTMoEFunction"]
