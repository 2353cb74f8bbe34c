"""Figure output shared by the claim modules: a PNG saver that writes atomically into a directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class FigureSaver:
    """``saver(fig, name)`` writes ``out_dir/name`` atomically (a reader never sees a half-written
    PNG), closes the figure and records the name in ``saver.files``."""

    def __init__(self, out_dir: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.plt = plt
        self.out_dir = Path(out_dir)
        self.files: list[str] = []

    def __call__(self, fig: Any, name: str) -> None:
        fig.tight_layout()
        tmp = self.out_dir / f".{name}.tmp.png"
        fig.savefig(tmp, dpi=110)
        self.plt.close(fig)
        tmp.replace(self.out_dir / name)
        self.files.append(name)
