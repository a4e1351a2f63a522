"""An export argument whose module the worker imports, but without the name the client pickled by
reference (another version of the user's module: "Can't get attribute"), is named with the advice to
install the same modules on the workers, as a module missing there is (r385 hand mutant E32: only an
ImportError got the advice)."""

from __future__ import annotations

import importlib
import io
import uuid

import pytest

from tracin.distributed import _export
from tracin.distributed._export import unpickle_arguments


def test_a_name_the_workers_module_lacks_gets_the_modules_advice(tmp_path, monkeypatch):
    name = f"tracin_r385_versioned_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text("class Loss:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(name)
    into = io.BytesIO()
    _export.pickle_arguments((("model", [], "data", module.Loss()), {}), into, "torch")  # Loss by reference
    monkeypatch.delattr(module, "Loss")  # the module as another version of it defines it: no Loss
    with pytest.raises(
        ValueError, match=r"^args\[3\] \(loss_fn\) cannot be unpickled on .*\(AttributeError: .*Loss"
    ) as e:
        unpickle_arguments(into.getvalue(), "torch")
    assert "the workers must import the modules the model, loss and data are defined in" in str(e.value)
    assert "client.upload_file" in str(e.value)
