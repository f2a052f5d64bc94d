"""The Keras model: built from the spec, over the preprocessor's inputs.

tf-keras (Keras 2) is used, not Keras 3: Keras 3 fails under ``MultiWorkerMirroredStrategy``
in Ray Train (see docs/troubleshooting.md). :func:`use_tf_keras` must run before TensorFlow is
imported in a process.
"""

from __future__ import annotations

import os
from typing import Any

from .features import Preprocessor

__all__ = ["use_tf_keras", "build_model", "compile_model", "MODEL_FILE"]

MODEL_FILE = "model.keras"


def use_tf_keras(threads: int | None = None) -> Any:
    """Select tf-keras and (optionally) TensorFlow's thread pools; returns the keras module."""
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    if threads:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, threads)))
        except RuntimeError:
            pass  # already initialized in this process
    import tf_keras

    return tf_keras


def build_model(pre: Preprocessor, params: dict[str, Any]) -> Any:
    """An MLP: dense inputs plus one embedding per high-cardinality categorical.

    Args:
        pre: The fitted preprocessor (input widths, vocabularies, task, classes).
        params: Model settings: hidden_units, dropout, activation.

    Returns:
        An uncompiled ``tf_keras.Model`` taking the dict :meth:`Preprocessor.transform` returns.
    """
    keras = use_tf_keras()
    layers = keras.layers
    dense_in = keras.Input(shape=(pre.dense_width,), name="dense", dtype="float32")
    inputs = {"dense": dense_in}
    parts = [dense_in]
    for name, c in pre.embedded.items():
        inp = keras.Input(shape=(), name=f"cat_{name}", dtype="int32")
        inputs[f"cat_{name}"] = inp
        emb = layers.Embedding(
            len(c["vocabulary"]) + 1, int(c["embedding_dim"]), name=f"emb_{name}"
        )(inp)
        parts.append(emb)
    x = parts[0] if len(parts) == 1 else layers.Concatenate(name="features")(parts)
    for i, units in enumerate(params["hidden_units"]):
        x = layers.Dense(int(units), activation=params["activation"], name=f"hidden_{i}")(x)
        if params.get("dropout"):
            x = layers.Dropout(float(params["dropout"]), name=f"dropout_{i}")(x)
    if pre.task == "regression":
        out = layers.Dense(1, name="output")(x)
    elif pre.task == "binary":
        out = layers.Dense(1, activation="sigmoid", name="output")(x)
    else:
        out = layers.Dense(len(pre.classes), activation="softmax", name="output")(x)
    return keras.Model(inputs=inputs, outputs=out, name="rayline_mlp")


def compile_model(
    model: Any, task: str, learning_rate: float, steps_per_execution: int = 1
) -> None:
    keras = use_tf_keras()
    loss = {
        "regression": "mse",
        "binary": "binary_crossentropy",
        "multiclass": "sparse_categorical_crossentropy",
    }[task]
    metrics: list[Any] = ["mae"] if task == "regression" else ["accuracy"]
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss=loss,
        metrics=metrics,
        steps_per_execution=steps_per_execution,
    )
