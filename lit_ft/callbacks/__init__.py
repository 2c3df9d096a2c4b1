"""Layer 7, Lightning callbacks: W&B logging, learning rate and throughput (`logging`), the adapter export at the
end of fit (`export`), the held-out task metric before and after training (`heldout`), plain-text progress and
step-bounded bars (`progress`), metric plots (`plots`), and `predict`'s generations written and scored
(`predictions`). Configs name them from `lit_ft` (`lit_ft.ExportAdapter`).

May import: everything below it (`errors` ... `stages`).
"""

from lit_ft.callbacks.export import ExportAdapter  # noqa: F401
from lit_ft.callbacks.heldout import SampleGenerations, paired_change, score_prompts  # noqa: F401
from lit_ft.callbacks.logging import LearningRateMonitor, ThroughputLogger, WandbLogger  # noqa: F401
from lit_ft.callbacks.plots import MetricsPlot  # noqa: F401
from lit_ft.callbacks.predictions import WritePredictions  # noqa: F401
from lit_ft.callbacks.progress import PrintMetrics  # noqa: F401
