"""ckpt-rtn: streaming Round-To-Nearest W8A16 quantization of MindSpore checkpoints."""
from __future__ import annotations

__version__ = "0.1.0"
