"""Checks of a spec's locations before any engine starts.

Starting Ray and Spark-on-Ray takes a minute on a loaded machine; a misspelt bucket, wrong
credentials, an unreachable endpoint or a missing source file should fail in seconds, with
the location and what to check, before that. On a Ray cluster of more than one node, a location
on one node's disk would leave a table's files scattered over the nodes' disks: such a run is
refused once Ray is connected, before Spark starts (:func:`check_shared`).
"""

from __future__ import annotations

from .config import PipelineSpec
from .sources import SourceError, resolve_paths
from .storage import StorageError, check_location, is_uri

__all__ = ["check_locations", "check_shared", "locations"]


def locations(
    spec: PipelineSpec, *, sources: bool = True, registry: bool = False, stream: bool = False
) -> list[tuple[str, str]]:
    """The (spec key, location) pairs a run of ``spec`` reads or writes.

    Args:
        spec: The validated spec.
        sources: The run reads the sources (batch runs).
        registry: The run reads or writes the model registry (training, streaming).
        stream: A streaming run: its checkpoint location.
    """
    out = [("run_store", spec.run_store), ("warehouse", spec.warehouse)]
    if registry and spec.ml is not None:
        out.append(("ml.registry", spec.ml.registry))
        if spec.ml.training.storage_path:
            out.append(("ml.training.storage_path", spec.ml.training.storage_path))
    if stream and spec.streaming is not None:
        out.append(("streaming.checkpoint_location", spec.streaming.checkpoint_location))
    if sources:
        out += [(f"sources.{name}", s.path) for name, s in spec.sources.items()]
    return out


def check_locations(
    spec: PipelineSpec, *, sources: bool = True, registry: bool = False, stream: bool = False
) -> None:
    """Check every location a run of ``spec`` reads or writes (see :func:`locations`): the
    scheme, the endpoint, the credentials and the bucket; each source must match a file.

    Raises:
        StorageError: naming the key of the spec, the location and what to check.
    """
    for key, value in locations(spec, sources=False, registry=registry, stream=stream):
        check_location(value, key)
    if not sources:
        return
    for name, source in spec.sources.items():
        try:
            resolve_paths(name, source)
        except SourceError as e:
            raise StorageError(f"sources.{name}: {e}") from None


def check_shared(
    spec: PipelineSpec, *, sources: bool = True, registry: bool = False, stream: bool = False
) -> None:
    """On a connected Ray cluster of more than one node, refuse node-local locations.

    Raises:
        StorageError: naming each location on a node's own disk and what to use instead.
    """
    import ray

    if not ray.is_initialized():
        return
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if nodes <= 1:
        return
    local = [
        f"{key}: {value!r}"
        for key, value in locations(spec, sources=sources, registry=registry, stream=stream)
        if not is_uri(value)
    ]
    if local:
        raise StorageError(
            f"the Ray cluster has {nodes} nodes, and these locations are on one node's disk "
            "(each node would read and write its own copy, scattering a table's files): "
            + "; ".join(local)
            + ". Use shared storage, e.g. s3://bucket/prefix (docs/operations.md, Storage)"
        )
