"""granet_fx: GraNet sparse training as a torch.fx pass, exported to ONNX."""

from .config import GraNetConfig
from .controller import GraNet
from .plots import plot_report
from .report import LayerReport, SparsityReport
from .runs import RunRecorder
from .sparsify import SparseLayer, SparseModelInfo, sparse_info, sparsify

__version__ = "0.1.0"

__all__ = [
    "GraNet", "GraNetConfig", "LayerReport", "SparseLayer", "SparseModelInfo",
    "SparsityReport", "sparse_info", "sparsify",
    "RunRecorder", "plot_report",
]
