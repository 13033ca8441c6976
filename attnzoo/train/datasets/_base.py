"""The base of the embedded builders: array_record by default, and no ``importlib_resources``."""

from __future__ import annotations

import inspect

import tensorflow_datasets as tfds
from etils import epath


def is_prepared(builder: tfds.core.DatasetBuilder) -> bool:
    """Whether ``builder``'s version/config directory holds a finished dataset (dataset_info.json)."""
    return (epath.Path(builder.data_path) / "dataset_info.json").exists()


class ArrayRecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A ``GeneratorBasedBuilder`` that writes array_record unless told otherwise.

    array_record is what ``tfds.data_source`` / ``builder.as_data_source()`` read, without
    TensorFlow. Each subclass also gets ``code_path`` as a plain path: TFDS 4.9's own lookup of it
    (used to find checksums when preparing) needs the ``importlib_resources`` backport on Python
    >= 3.9 for builders defined inside a package.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.code_path = epath.Path(inspect.getfile(cls))

    def __init__(self, *, file_format=None, **kwargs):
        super().__init__(file_format=file_format, **kwargs)
        if file_format is None and not is_prepared(self):
            # Not on disk yet: write array_record (a prepared copy keeps the format it has).
            self.info.set_file_format("array_record", override=True)
