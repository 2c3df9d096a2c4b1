"""Layer 8, the memory plan: the peak GPU memory of a fit by component, before any weights are loaded
(`memory.estimate`), from the stage's real PEFT structure on the meta device (`stages`, `online`, `weights`), commented
activation arithmetic (`activations`) and the data's real longest rows (`rows`); `MemoryPlanLog` (`log`) puts it
beside the measured peak of every run. The command is `lit-ft plan` (`lit_ft.cli.plan`).

May import: everything below it (`errors` ... `callbacks`).
"""

from lit_ft.plan.memory import Plan, Settings, estimate, estimate_settings  # noqa: F401
from lit_ft.plan.log import MemoryPlanLog  # noqa: F401
from lit_ft.plan.sizes import fmt, parse_size  # noqa: F401
