"""The method table: every kind of surgery registers here under its name.

Adding a method means adding one file in this folder that defines a `Method`
subclass decorated with `@register`, and importing it at the bottom of this file.
"""

from __future__ import annotations

from surgery.methods import adapter as _adapter  # noqa: E402,F401  (registers "adapter")
from surgery.methods import fusion as _fusion  # noqa: E402,F401  (registers "fusion")
from surgery.methods import lora as _lora  # noqa: E402,F401  (registers "lora")
from surgery.methods import lora_moe as _lora_moe  # noqa: E402,F401  (registers "lora_moe")
from surgery.methods import moe as _moe  # noqa: E402,F401  (registers "moe")
from surgery.methods import prefix as _prefix  # noqa: E402,F401  (registers "prefix")
from surgery.methods import prompt as _prompt  # noqa: E402,F401  (registers "prompt")
from surgery.methods.base import METHODS, Method, get_method, register

__all__ = ["METHODS", "Method", "get_method", "register"]
