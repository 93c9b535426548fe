"""phalanx.lightning: a Lightning strategy on phalanx's fault-tolerant runtime.

    from phalanx.lightning import PhalanxStrategy
    trainer = lightning.Trainer(strategy=PhalanxStrategy())

Importing this package imports Lightning (`pip install lightning`); `import phalanx` does not.
"""

from __future__ import annotations

from .strategy import PhalanxStrategy

__all__ = ["PhalanxStrategy"]
