"""verm-local: quantized, verified local inference for the Visual-ERM reward model.

import verm_local
j = verm_local.judge("gt.png", "pred.png", task="chart", model="models/tiny-gguf")
with verm_local.Judge(model="models/tiny-gguf") as judge: ...
"""

import logging as _logging

# `judge` the function shadows the `verm_local.judge` module on purpose: the public API is
# `verm_local.judge(gt, pred, task=..., model=...)`. Import the module's contents with
# `from verm_local.judge import ...`, which reads sys.modules, not this attribute.
from .constants import package_version
from .judge import Judge, judge
from .schema import Judgement

# llama.cpp's own log (routed into logging by verm_local.backends.native) is internal
# chatter; it reaches a terminal only where an application asks for it (`-v -v`).
_logging.getLogger("verm_local.llama_cpp").addHandler(_logging.NullHandler())

__version__ = package_version()

__all__ = ["Judge", "Judgement", "judge", "__version__"]
