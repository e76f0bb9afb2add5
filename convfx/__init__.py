"""convfx: low-rank factorization of trained CNNs as a torch.fx compiler pass.

>>> import torch, torchvision, convfx
>>> gm = convfx.compress(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224))
>>> print(gm.convfx_report.to_table())  # doctest: +SKIP

MAC convention: 1 multiply-add = 1 (fvcore). GFLOPs = 2 x MACs.
"""
from passes.errors import ConvfxError

from .api import Analysis, LayerStats, analyze, compress
from .report import LayerReport, Report

__all__ = ["compress", "analyze", "Analysis", "LayerStats", "Report", "LayerReport", "ConvfxError"]
__version__ = "0.1.0"
