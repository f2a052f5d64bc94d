"""Registered models behind Ray Serve: batched, validated, authenticated, following aliases.

``serve run serve_configs/flights.yaml`` starts the application that
``rayline.serve:app_builder`` builds from the config's ``args:`` (:class:`ServeArgs`). The HTTP
API is in :mod:`rayline.serve.ingress`; :class:`Client` (and ``rayline predict``) call it.

Importing this package does not import Ray Serve; ``app_builder`` is loaded on first use.
"""

from typing import TYPE_CHECKING, Any

from .client import Client, ServeError
from .config import ServeArgs

if TYPE_CHECKING:
    from .app import app_builder

__all__ = ["Client", "ServeArgs", "ServeError", "app_builder"]


def __getattr__(name: str) -> Any:
    if name == "app_builder":
        from .app import app_builder

        return app_builder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
