"""verm-local: quantized, verified local inference for the Visual-ERM reward model.

import verm_local
j = verm_local.judge("gt.png", "pred.png", task="chart", model="models/tiny-gguf")
with verm_local.Judge(model="models/tiny-gguf") as judge: ...
"""

import logging as _logging

# `judge` and `refine` the functions shadow the modules of those names on purpose: the
# public API is `verm_local.judge(gt, pred, task=..., model=...)` and
# `verm_local.refine(gt, task=..., policy_url=..., policy_model=...)`. Import a module's
# contents with `from verm_local.judge import ...`, which reads sys.modules.
from .constants import package_version
from .judge import Judge, judge
from .refine import refine
from .schema import Judgement

# llama.cpp's own log (routed into logging by verm_local.backends.native) is internal
# chatter; it reaches a terminal only where an application asks for it (`-v -v`).
_logging.getLogger("verm_local.llama_cpp").addHandler(_logging.NullHandler())

__version__ = package_version()

__all__ = ["Judge", "Judgement", "judge", "refine", "__version__"]
