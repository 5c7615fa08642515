"""Pickled dictionaries load only as plain data: a pickle that would run code is refused before it runs."""

import os
import pickle

import numpy as np
import pytest

from scpeft_cli.errors import UserError
from scpeft_cli.safe_pickle import load_pickled_data


def test_plain_dictionaries_with_numpy_scalars_load(tmp_path):
    data = {"<pad>": 0, "<mask>": 1, "ENSG00000000003": np.int64(2), "median": np.float32(1.5), "ids": [1, 2], "t": (1, "a")}
    path = tmp_path / "token_dictionary.pkl"
    path.write_bytes(pickle.dumps(data))
    assert load_pickled_data(path) == data


class Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_a_pickle_that_runs_code_is_refused_and_nothing_runs(tmp_path):
    target = tmp_path / "created_by_pickle"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"genes": Exploit(str(target))}))
    with pytest.raises(UserError, match="refusing to load posix.mkdir|refusing to load os.mkdir"):
        load_pickled_data(path)
    assert not target.exists()


def test_arbitrary_classes_and_corrupt_files_are_refused(tmp_path):
    path = tmp_path / "array.pkl"
    path.write_bytes(pickle.dumps(np.arange(3)))  # arrays need numpy's reconstruct hook: not plain data
    with pytest.raises(UserError, match="plain-data pickle"):
        load_pickled_data(path)
    truncated = tmp_path / "truncated.pkl"
    truncated.write_bytes(pickle.dumps({"a": 1})[:5])
    with pytest.raises(UserError, match="truncated.pkl"):
        load_pickled_data(truncated)
