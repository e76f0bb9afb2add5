"""convfx: low-rank factorization of trained CNNs as a torch.fx compiler pass.

>>> import torch, torchvision, convfx
>>> gm = convfx.compress(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224))
>>> print(gm.convfx_report.to_table())  # doctest: +SKIP

MAC convention: 1 multiply-add = 1 (fvcore). GFLOPs = 2 x MACs.
"""
from passes.errors import ConvfxError

from . import data, zoo
from .api import Analysis, CompressOptions, LayerStats, analyze, compress
from .report import LayerReport, Report
from .serialize import load, load_state_dict, save, save_state_dict
from .train import evaluate, finetune, recalibrate_bn
from . import backend as _backend
from .export import export

_backend.register()  # torch.compile(model, backend="convfx")

__all__ = [
    "compress", "analyze", "CompressOptions", "Analysis", "LayerStats", "Report", "LayerReport", "ConvfxError",
    "save", "load", "save_state_dict", "load_state_dict", "evaluate", "finetune", "recalibrate_bn",
    "zoo", "data", "export",
]
__version__ = "0.1.0"
