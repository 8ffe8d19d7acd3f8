"""``python -m onnxcompress ...``: the command line (:mod:`onnxcompress.cli`)."""

from .cli import app

app(prog_name="onnxcompress")
