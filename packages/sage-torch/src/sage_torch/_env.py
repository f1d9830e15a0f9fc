"""Environment switches of sage_torch (everything environment-facing starts with ``SAGE_``).

Read at call time (not at import), so a test or a user can flip them between calls.

| variable | values | effect |
|---|---|---|
| ``SAGE_FORCE_RECIPE`` | a recipe name, or ``torch`` | replaces ``recipe="auto"`` (an explicit ``recipe=`` argument wins); ``torch`` forces PyTorch SDPA |
| ``SAGE_FORCE_EMULATION`` | ``1``/``0`` | run the recipe's emulation (sage_quant) even where a kernel exists |
| ``SAGE_STRICT`` | ``1``/``0`` | raise instead of falling back (to PyTorch SDPA or to emulation) |
"""

from __future__ import annotations

import os

ENV_FORCE_RECIPE = "SAGE_FORCE_RECIPE"
ENV_FORCE_EMULATION = "SAGE_FORCE_EMULATION"
ENV_STRICT = "SAGE_STRICT"

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def env_flag(name: str) -> bool:
    """A boolean environment switch; anything but the accepted spellings is an error."""
    raw = os.environ.get(name, "")
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"environment variable {name}={raw!r} is not a boolean; "
                     f"accepted: {', '.join(_TRUE)} (on) or {', '.join(repr(f) for f in _FALSE)} (off)")


def env_forced_recipe() -> str | None:
    """The value of SAGE_FORCE_RECIPE, or None when unset/empty (validated by the dispatcher)."""
    value = os.environ.get(ENV_FORCE_RECIPE, "").strip()
    return value or None


def env_snapshot() -> dict[str, str | None]:
    return {name: os.environ.get(name) for name in (ENV_FORCE_RECIPE, ENV_FORCE_EMULATION, ENV_STRICT)}
