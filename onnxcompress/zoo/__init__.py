"""Batch conversion of a model zoo: a TOML manifest of models and recipes, every (model,
recipe) task in its own worker process under memory/time limits, resumable through a content-
keyed state file, run locally or on Ray, with one consolidated report.

    from onnxcompress.zoo import load_manifest, run_zoo
    result = run_zoo("models/zoo.toml", "zoo_out", jobs=2)

Command line: ``onnxcompress zoo MANIFEST --out DIR`` (see :mod:`onnxcompress.cli_zoo`).
"""

from .manifest import Manifest, ManifestError, ModelEntry, Recipe, load_manifest, options_from_dict
from .runner import STATE_NAME, ZooResult, ZooRunError, run_zoo, task_key
from .report import stable_table

__all__ = ["Manifest", "ManifestError", "ModelEntry", "Recipe", "load_manifest", "options_from_dict",
           "run_zoo", "task_key", "ZooResult", "ZooRunError", "STATE_NAME", "stable_table"]
