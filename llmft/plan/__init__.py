"""Peak memory per device of a training recipe, estimated before it runs (``llmft plan``).

:func:`estimate_memory` itemizes the bytes each device (GPU, or the host for CPU runs) holds at the peak of a
training step, from the recipe and the model's ``config.json`` alone (no weights are loaded), says whether that fits
a given device memory and, if not, which recipe changes would make it fit. How each term is computed, and what was
measured to check it, is in docs/memory.md. :mod:`~llmft.plan.inputs` reads the model and the recipe,
:mod:`~llmft.plan.memory` estimates.
"""

from llmft.plan.inputs import CUDA_CONTEXT_BYTES, FRAMEWORK_CPU_BYTES, GB, Setup, Shapes, parse_bytes, setup_from_recipe
from llmft.plan.memory import Item, Plan, Suggestion, estimate_memory, plan_for

__all__ = ["CUDA_CONTEXT_BYTES", "FRAMEWORK_CPU_BYTES", "GB", "Item", "Plan", "Setup", "Shapes", "Suggestion",
           "estimate_memory", "parse_bytes", "plan_for", "setup_from_recipe"]
