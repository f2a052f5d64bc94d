"""Checks of a spec's locations before any engine starts.

Starting Ray and Spark-on-Ray takes a minute on a loaded machine; a misspelt bucket, wrong
credentials, an unreachable endpoint or a missing source file should fail in seconds, with
the location and what to check, before that.
"""

from __future__ import annotations

from .config import PipelineSpec
from .sources import SourceError, resolve_paths
from .storage import StorageError, check_location

__all__ = ["check_locations"]


def check_locations(
    spec: PipelineSpec, *, sources: bool = True, registry: bool = False, stream: bool = False
) -> None:
    """Check every location a run of ``spec`` reads or writes.

    Args:
        spec: The validated spec.
        sources: The run reads the sources (batch runs): each must match a file.
        registry: The run reads or writes the model registry (training, streaming).
        stream: A streaming run: check its checkpoint location.

    Raises:
        StorageError: naming the key of the spec, the location and what to check.
    """
    check_location(spec.run_store, "run_store")
    check_location(spec.warehouse, "warehouse")
    if registry and spec.ml is not None:
        check_location(spec.ml.registry, "ml.registry")
    if stream and spec.streaming is not None:
        check_location(spec.streaming.checkpoint_location, "streaming.checkpoint_location")
    if not sources:
        return
    for name, source in spec.sources.items():
        try:
            resolve_paths(name, source)
        except SourceError as e:
            raise StorageError(f"sources.{name}: {e}") from None
