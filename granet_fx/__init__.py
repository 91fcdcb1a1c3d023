"""granet_fx: GraNet sparse training as a torch.fx pass, exported to ONNX."""

from .checkpoint import load_checkpoint, save_checkpoint
from .config import GraNetConfig
from .controller import GraNet
from .plots import plot_report
from .report import LayerReport, SparsityReport
from .runs import RunRecorder
from .sparsify import SparseLayer, SparseModelInfo, sparse_info, sparsify
from .fold import fold
from .export.archive import ArchiveError, SavedModel, load, save
from .passes.compact import CompactionReport, compact, compaction_report

__version__ = "0.1.0"

__all__ = [
    "CompactionReport", "compact", "compaction_report",
    "GraNet", "GraNetConfig", "LayerReport", "SparseLayer", "SparseModelInfo",
    "SparsityReport", "sparse_info", "sparsify",
    "RunRecorder", "plot_report",
    "load_checkpoint", "save_checkpoint",
    "ArchiveError", "SavedModel", "fold", "load", "save",
]
