"""Rayline: a whole ML pipeline on one Ray cluster.

The public surface is small: load a spec, run it, open a Spark-on-Ray session.

Example:
    >>> import rayline
    >>> spec = rayline.load_spec("pipelines/flights.yaml")  # doctest: +SKIP
    >>> rayline.run_pipeline(spec).status  # doctest: +SKIP
    'succeeded'
"""

__version__ = "0.1.0"

from .config import PipelineSpec, SpecError, load_spec  # noqa: E402
from .runner import RunFailed, RunResult, run_pipeline  # noqa: E402
from .session import spark_on_ray  # noqa: E402

__all__ = [
    "PipelineSpec",
    "RunFailed",
    "RunResult",
    "SpecError",
    "load_spec",
    "run_pipeline",
    "spark_on_ray",
    "__version__",
]
