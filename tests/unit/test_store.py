import uuid

import pytest

from advisor.store import ProfileStore, StoreKey
from tests.factories import make_profile, second_writer_waits


@pytest.fixture(params=["folder", "url"])
def where(request, tmp_path):
    """A store folder, or an fsspec URL (fsspec's in-memory filesystem stands in for s3://)."""
    if request.param == "folder":
        yield str(tmp_path)
        return
    url = f"memory://plateau-{uuid.uuid4().hex}/profiles"
    yield url
    forget(url)


def forget(url: str) -> None:
    """Drop a test's bucket from fsspec's process-wide in-memory filesystem."""
    import fsspec

    fs, bucket = fsspec.filesystem("memory"), url.removeprefix("memory://").split("/")[0]
    if fs.exists(bucket):
        fs.rm(bucket, recursive=True)


def test_profiles_round_trip_through_parquet_and_survive_a_restart(where):
    profile = make_profile()
    stored_at = ProfileStore(where).put_profile(profile)
    assert stored_at == f"{where}/profiles.parquet"
    again = ProfileStore(where)  # a new process would do exactly this
    assert again.get_profile(StoreKey.of(profile)) == profile
    df = again.points(StoreKey.of(profile))
    assert list(df["batch"]) == [p.batch for p in profile.points]


def test_same_key_replaces_other_keys_stay(where):
    store = ProfileStore(where)
    a = make_profile()
    b = make_profile(device_name="other")
    store.put_profile(a)
    store.put_profile(b)
    newer = a.model_copy(update={"seconds": 123.0})
    store.put_profile(newer)
    assert len(store.profiles()) == 2
    assert store.get_profile(StoreKey.of(a)).seconds == 123.0


def test_find_falls_back_to_another_bucket_of_the_same_model_and_device(where):
    store = ProfileStore(where)
    p = make_profile()
    store.put_profile(p)
    assert store.find("m", "dev", "0.0", "bfloat16", "p1024-o64") == p
    assert store.find("m", "elsewhere", "0.0", "bfloat16", "p1024-o64") is None


def test_eager_and_cuda_graph_profiles_are_stored_and_found_apart(tmp_path):
    store = ProfileStore(tmp_path)
    eager = make_profile()
    graphs = make_profile().model_copy(update={"mode": "graphs", "seconds": 7.0})
    store.put_profile(eager)
    store.put_profile(graphs)
    assert len(store.profiles()) == 2
    assert store.get_profile(StoreKey.of(graphs)).mode == "graphs"
    assert store.find("m", "dev", "0.0", "bfloat16", "p128-o64", mode="graphs").seconds == 7.0
    assert store.find("m", "dev", "0.0", "bfloat16", "p1024-o64", mode="eager").mode == "eager"


def test_a_graphs_lookup_never_falls_back_to_an_eager_profile(tmp_path):
    store = ProfileStore(tmp_path)
    store.put_profile(make_profile())
    assert store.find("m", "dev", "0.0", "bfloat16", "p128-o64", mode="graphs") is None


def test_profiles_stored_before_the_mode_column_load_as_eager(tmp_path):
    import json

    import pandas as pd

    profile = make_profile()
    body = json.loads(profile.model_dump_json())
    del body["mode"]  # what an older version wrote
    key = StoreKey.of(profile).model_dump()
    del key["mode"]
    pd.DataFrame([{**key, "stored_at": "2026-11-01T00:00:00+00:00", "body": json.dumps(body)}]).to_parquet(
        tmp_path / "profiles.parquet", index=False)
    store = ProfileStore(tmp_path)
    old = store.find("m", "dev", "0.0", "bfloat16", "p128-o64")
    assert old is not None and old.mode == "eager" and old.points == profile.points
    assert store.find("m", "dev", "0.0", "bfloat16", "p128-o64", mode="graphs") is None
    store.put_profile(profile.model_copy(update={"mode": "graphs"}))  # writing keeps the old row, now keyed
    assert sorted(store.profiles()["mode"]) == ["eager", "graphs"]


def test_device_tasks_get_a_fresh_worker_each_time():
    """A profile's worker (and on a GPU its CUDA context) must not outlive the task."""
    from advisor.actor import device_task

    opts = device_task()._default_options
    assert opts["max_calls"] == 1 and opts["max_retries"] == 0


def test_a_shared_store_that_is_not_mounted_is_an_error_and_never_created(tmp_path):
    import pytest

    from advisor.storage import StoreMissing
    from deployments.profiling import AdvisorError, AdvisorRequest

    missing = tmp_path / "mnt" / "profiles"
    with pytest.raises(StoreMissing, match="does not exist on .*: mount the shared folder there"):
        ProfileStore(missing, create=False)
    with pytest.raises(AdvisorError, match="does not exist"):
        AdvisorRequest(model="m", store_dir=str(missing), shared_store=True).store()
    assert not missing.exists()
    AdvisorRequest(model="m", store_dir=str(missing)).store()  # `plateau profile --store` makes its folder
    assert missing.is_dir()


def test_writers_on_other_machines_wait_for_the_exclusively_created_lock_and_a_stale_one_is_taken_over(tmp_path):
    import os
    import time

    import pytest

    from advisor.locks import create_lock

    lock = tmp_path / ".write-lock"
    assert second_writer_waits(lambda: create_lock(lock), while_held=lambda: lock.is_file())
    assert not lock.exists()  # each holder removes it on release
    lock.write_text("dead-host 1\n")
    old = time.time() - 3600
    os.utime(lock, (old, old))
    with create_lock(lock, stale_s=60):  # left by a holder that died an hour ago
        pass
    assert not lock.exists()
    lock.write_text("busy-host 2\n")
    with pytest.raises(TimeoutError, match="held by another writer"):
        with create_lock(lock, timeout_s=0.3):
            pass


def test_a_url_store_admits_one_writer_at_a_time_and_takes_over_a_stale_lock():
    """The exclusive create each writer makes (here fsspec's memory filesystem: check-then-write, so
    only the waiting is shown; S3's own If-None-Match in test_store_s3.py)."""
    import json
    import time

    import fsspec

    from advisor.storage import UrlFolder

    url = f"memory://plateau-{uuid.uuid4().hex}/profiles"
    files = UrlFolder(url, timeout_s=5)
    fs, lock = fsspec.filesystem("memory"), f"{files.root}/.write-lock"
    holders = []
    assert second_writer_waits(files.writer, while_held=lambda: holders.append(json.loads(fs.cat_file(lock))))
    assert holders[0]["pid"] > 0 and holders[0]["host"]
    assert not fs.exists(lock)  # each holder removes it on release
    fs.pipe_file(lock, json.dumps({"host": "dead-host", "pid": 1, "at": time.time() - 3600}).encode())
    with files.writer():  # left by a holder that died an hour ago
        assert json.loads(fs.cat_file(lock))["host"] != "dead-host"
    fs.pipe_file(lock, json.dumps({"host": "busy-host", "pid": 2, "at": time.time()}).encode())
    busy = UrlFolder(url, timeout_s=0.3)
    with pytest.raises(TimeoutError, match=r"memory://.*/profiles/\.write-lock: held by another writer"):
        with busy.writer():
            pass
    forget(url)


def test_a_store_url_must_be_object_storage_with_an_atomic_exclusive_create():
    import importlib.util

    from advisor.storage import StoreUrlError, check_url, location
    from deployments.profiling import AdvisorError, AdvisorRequest

    check_url("memory://bucket/profiles")
    check_url("s3://bucket/profiles")  # the config's check: the package is checked where the store opens
    for url, why in [("nosuch://bucket/profiles", "nosuch:// is not supported"),
                     ("abfs://container/profiles", "abfs:// is not supported: .*atomic exclusive create"),
                     ("s3://", "name a bucket"), ("simplecache::s3://bucket/p", "chained URLs")]:
        with pytest.raises(StoreUrlError, match=why):
            check_url(url)
    with pytest.raises(StoreUrlError, match="absolute folder path"):
        location("file://relative/profiles")
    if importlib.util.find_spec("s3fs") is None:  # opening an s3:// store without s3fs names it
        with pytest.raises(AdvisorError, match=r"s3fs.*every node that profiles or plans needs it"):
            AdvisorRequest(model="m", store_dir="s3://bucket/profiles", shared_store=True).store()


def test_a_file_url_is_a_local_folder(tmp_path):
    from advisor.storage import LocalFolder

    store = ProfileStore(f"file://{tmp_path}/profiles")
    assert isinstance(store.files, LocalFolder) and (tmp_path / "profiles").is_dir()


def test_a_shared_url_store_whose_bucket_is_not_there_fails_when_opened():
    import fsspec

    from advisor.storage import StoreMissing
    from deployments.profiling import AdvisorError, AdvisorRequest

    bucket = f"plateau-{uuid.uuid4().hex}"
    with pytest.raises(StoreMissing, match=f"bucket '{bucket}' does not exist or is not visible from"):
        ProfileStore(f"memory://{bucket}/profiles", create=False)
    with pytest.raises(AdvisorError, match="does not exist"):
        AdvisorRequest(model="m", store_dir=f"memory://{bucket}/profiles", shared_store=True).store()
    fsspec.filesystem("memory").pipe_file(f"{bucket}/other", b"x")  # the bucket exists, the prefix not yet
    ProfileStore(f"memory://{bucket}/profiles", create=False)
    forget(f"memory://{bucket}")


def test_two_writers_taking_over_one_stale_lock_never_hold_it_at_once(monkeypatch):
    """Both waiters judge a dead writer's lock stale; the slower one must not delete the lock the
    faster one has just created (it deletes only the lock it judged, read again just before)."""
    import json
    import threading
    import time

    import fsspec

    from advisor.storage import UrlFolder

    url = f"memory://plateau-{uuid.uuid4().hex}/profiles"
    a, b = UrlFolder(url, timeout_s=5), UrlFolder(url, timeout_s=5)
    fs, lock = fsspec.filesystem("memory"), f"{a.root}/.write-lock"
    fs.pipe_file(lock, json.dumps({"host": "dead", "pid": 1, "at": time.time() - 3600}).encode())
    judged = UrlFolder._stale

    def slow_to_act(self, held):
        stale = judged(self, held)
        if self is b:
            time.sleep(0.3)  # b judged the dead lock stale, then a takes it over first
        return stale
    monkeypatch.setattr(UrlFolder, "_stale", slow_to_act)
    events, errors = [], []

    def write(files, name):
        try:
            with files.writer():
                events.append(("in", name))
                time.sleep(0.6)
                events.append(("out", name))
        except Exception as exc:
            errors.append(repr(exc))
    threads = [threading.Thread(target=write, args=(b, "b")), threading.Thread(target=write, args=(a, "a"))]
    threads[0].start()
    time.sleep(0.05)
    threads[1].start()
    for t in threads:
        t.join(10)
    assert errors == []
    assert [kind for kind, _ in events] == ["in", "out", "in", "out"]  # one at a time
    assert not fs.exists(lock)
    forget(url)


def test_a_writer_whose_lock_was_taken_over_does_not_release_the_new_holders(caplog):
    import json
    import logging
    import time

    import fsspec

    from advisor.storage import UrlFolder

    url = f"memory://plateau-{uuid.uuid4().hex}/profiles"
    files = UrlFolder(url)
    fs, lock = fsspec.filesystem("memory"), f"{files.root}/.write-lock"
    newer = json.dumps({"host": "other", "pid": 2, "token": "t", "at": time.time()}).encode()
    with caplog.at_level(logging.WARNING, logger="advisor.storage"), files.writer():
        fs.pipe_file(lock, newer)  # this holder stalled past stale_s and another writer took over
    assert fs.cat_file(lock) == newer  # still the new holder's
    assert "taken over by another writer" in caplog.text
    forget(url)


def test_calibrations_live_beside_the_profiles_under_a_url(where):
    from advisor.perfmodel import CalibrationFile, load_constants

    c = load_constants()
    eng = c.engine_for(c.device("l40s")).model_copy(update={"t_fixed_s": 0.05, "source": "recalibrated (test)"})
    stored = CalibrationFile(ProfileStore(where)).put("l40s", eng)
    assert stored == f"{where}/calibrations.json"
    assert CalibrationFile(ProfileStore(where)).read() == {"l40s": eng}


def test_profiles_of_each_gpu_sharing_mode_are_found_apart_and_older_tables_read_without_one(tmp_path):
    import pandas as pd

    store = ProfileStore(tmp_path)
    plain = make_profile()
    store.put_profile(plain)
    mps = make_profile().model_copy(update={"sharing": "mps", "seconds": 9.0})
    assert store.find("m", "dev", "0.0", "bfloat16", "p128-o64", sharing="mps") is None  # never the other mode's
    store.put_profile(mps)
    assert store.find("m", "dev", "0.0", "bfloat16", "p128-o64", sharing="mps").seconds == 9.0
    assert store.find("m", "dev", "0.0", "bfloat16", "p1024-o64", sharing="mps").sharing == "mps"  # other bucket
    assert store.find("m", "dev", "0.0", "bfloat16", "p128-o64", sharing="time-slice") is None
    assert store.find("m", "dev", "0.0", "bfloat16", "p128-o64").sharing is None
    table = tmp_path / "profiles.parquet"
    old = pd.read_parquet(table)
    old[old["sharing"] == ""].drop(columns=["sharing"]).to_parquet(table, index=False)  # an older table
    assert store.find("m", "dev", "0.0", "bfloat16", "p128-o64").seconds == plain.seconds


def _stale(lock, text="dead-host 1 t0\n"):
    import os
    import time

    lock.write_text(text)
    old = time.time() - 3600
    os.utime(lock, (old, old))


def test_a_holder_taken_over_as_stale_never_removes_the_new_holders_lock(tmp_path):
    """Two holders of the folder store's lock: the first held it past `stale_s`, the second took
    it over; the first's release must leave the second's lock in place."""
    from advisor.locks import create_lock

    lock = tmp_path / ".write-lock"
    first = create_lock(lock, stale_s=60)
    first.__enter__()
    _stale(lock, lock.read_text())  # the first holder stalled for an hour
    with create_lock(lock, stale_s=60, timeout_s=1):
        second = lock.read_text()
        first.__exit__(None, None, None)  # the first holder wakes up and lets go
        assert lock.read_text() == second  # the second one still holds it
    assert not lock.exists()


def test_two_waiters_that_judge_one_lock_stale_never_both_hold_it(tmp_path, monkeypatch):
    """Both waiters read the same stale lock; the first takes it over and holds a fresh lock before
    the second acts on its (now outdated) judgement: the second must keep waiting."""
    import os

    import pytest

    from advisor.locks import create_lock

    lock = tmp_path / ".write-lock"
    _stale(lock)
    real_stat, first, hooked = os.stat, create_lock(lock, stale_s=60), []

    def stat(path, *a, **kw):
        result = real_stat(path, *a, **kw)
        if os.fspath(path) == os.fspath(lock) and not hooked:
            hooked.append(True)
            first.__enter__()  # between the second waiter's look at the lock and its takeover
        return result

    monkeypatch.setattr(os, "stat", stat)
    with pytest.raises(TimeoutError, match="held by another writer"):
        with create_lock(lock, stale_s=60, timeout_s=0.5):
            pass
    monkeypatch.setattr(os, "stat", real_stat)
    assert hooked and lock.exists()
    held = lock.read_text()
    assert not held.startswith("dead-host")
    first.__exit__(None, None, None)
    assert not lock.exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no file set aside is left behind


def test_gcs_urls_are_refused_naming_what_is_supported():
    """gcsfs's exclusive create is experimental upstream and does not hold on zonal buckets: two
    writers could both take the store's lock."""
    import pytest

    from advisor.storage import StoreUrlError, check_url

    for url in ("gs://bucket/profiles", "gcs://bucket/profiles"):
        with pytest.raises(StoreUrlError, match=r"not supported.*s3://.*folder every node mounts"):
            check_url(url)


@pytest.mark.parametrize("installed,ok", [("2024.12.0", True), ("2025.3.2", True), ("2024.10.0", False),
                                          ("2023.1.0", False)])
def test_an_s3fs_older_than_its_exclusive_create_is_refused(installed, ok):
    from advisor.storage import package_too_old

    assert (package_too_old("s3", installed) is None) == ok
    if not ok:
        assert "s3fs " + installed in package_too_old("s3", installed)
