"""PySpark's worker daemon, minus one per-task cost (``spark.python.daemon.module``).

Spark puts its own ``spark-core`` jar on the Python workers' ``PYTHONPATH`` (for running PySpark
from an assembly jar; a pip-installed PySpark never imports from it), and PySpark's worker calls
``importlib.invalidate_caches()`` at the start of every task. On Python 3.10 and 3.11 that call
re-reads the central directory of every zip file on ``sys.path`` (CPython issue 103200, fixed in
3.12; SPARK-54744 stops the call in Spark 4.1): the jar holds about 5,200 entries, so each Python
task (a ``mapInPandas`` / ``mapInArrow`` batch, a UDF) paid 15 ms of CPU here, and about half of a
streaming micro-batch's Python time on a loaded machine.

This module drops ``.jar`` entries from ``sys.path`` (and their cached importers) before
PySpark's daemon starts; the workers it forks inherit that. Everything else is PySpark's own
``pyspark.daemon``. Rayline's sessions set ``spark.python.daemon.module`` to this module
(:func:`rayline.session.spark_conf`).
"""

from __future__ import annotations

import os
import sys

__all__ = ["drop_jar_paths"]


def drop_jar_paths() -> list[str]:
    """Remove ``.jar`` entries from ``sys.path`` and their importers from
    ``sys.path_importer_cache``; returns the jars."""
    jars = [p for p in sys.path if p.endswith(".jar")]
    for p in jars:
        while p in sys.path:
            sys.path.remove(p)

    def in_jar(path: str) -> bool:
        return any(path == j or path.startswith(j + os.sep) for j in jars)

    # Also the directories inside a jar that imports have seen: the standard library's ``copy``
    # looks for Jython's ``org.python.core``, which made ``org`` (the jar's) a namespace package.
    for key in [k for k in sys.path_importer_cache if in_jar(k)]:
        del sys.path_importer_cache[key]
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__path__", None)
        if path is not None and list(path) and all(in_jar(str(p)) for p in path):
            del sys.modules[name]
    return jars


if __name__ == "__main__":
    drop_jar_paths()
    from pyspark.daemon import manager

    manager()
