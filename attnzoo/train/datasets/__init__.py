"""TFDS builders embedded in attnzoo, written as array_record and read without TensorFlow.

Importing this package registers them with TFDS, so ``tfds.builder(name)`` and
``tfds.data_source(name)`` find them:

* ``mqar/<config>``: Zoology's multi-query associative recall (:mod:`.mqar`), default config
  ``v256_t64_kv8``; ``inputs`` / ``labels`` int32 [seq_len], splits ``train`` / ``test``.
* ``python_stdlib_text``: byte windows of the running Python's standard library
  (:mod:`.python_stdlib_text`); ``bytes`` uint8 [4097], splits ``train`` / ``validation``.
* ``digits``: scikit-learn's 8x8 digits (:mod:`.digits`, needs the ``digits`` extra to build);
  ``image`` uint8 [8,8,1] in 0..16, ``label`` 0..9, splits ``train`` (1437) / ``test`` (360).
"""

from attnzoo.train.datasets.digits import Digits
from attnzoo.train.datasets.mqar import Mqar, MqarConfig, multiquery_ar
from attnzoo.train.datasets.python_stdlib_text import PythonStdlibText

EMBEDDED = ("mqar", "python_stdlib_text", "digits")

__all__ = ["Digits", "Mqar", "MqarConfig", "PythonStdlibText", "multiquery_ar", "EMBEDDED"]
