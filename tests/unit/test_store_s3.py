"""The profile store under an s3:// URL against a real S3 API (moto's server, in this process):
exclusive creation through S3's `If-None-Match: *`, one writer at a time, no row lost to writers
racing. Needs `pip install s3fs "moto[server]"` (about 300 MB, so CI does not install them; the
rest of the URL store is checked in test_store.py on fsspec's in-memory filesystem)."""

from __future__ import annotations

import concurrent.futures as cf
import pytest

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from advisor.storage import UrlFolder  # noqa: E402
from advisor.store import ProfileStore, StoreKey  # noqa: E402
from tests.factories import make_profile, second_writer_waits  # noqa: E402


@pytest.fixture
def bucket(monkeypatch):
    server = moto_server.ThreadedMotoServer(port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for key, value in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
                       "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    import boto3
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # fsspec keeps one per options: not the last test's server
    boto3.client("s3").create_bucket(Bucket="plateau")
    yield "s3://plateau/team/profiles"
    server.stop()


def test_profiles_round_trip_through_s3_and_racing_writers_lose_no_row(bucket):
    import fsspec

    first = make_profile()
    assert ProfileStore(bucket).put_profile(first) == f"{bucket}/profiles.parquet"
    assert ProfileStore(bucket).get_profile(StoreKey.of(first)) == first
    others = [make_profile(device_name=f"dev{i}") for i in range(6)]
    with cf.ThreadPoolExecutor(len(others)) as pool:
        list(pool.map(lambda p: ProfileStore(bucket).put_profile(p), others))
    assert len(ProfileStore(bucket).profiles()) == 1 + len(others)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    assert not fs.exists(f"{bucket}/.write-lock")


def test_s3_exclusive_create_makes_the_second_writer_wait(bucket):
    assert second_writer_waits(lambda: UrlFolder(bucket).writer(), wait_s=0.5)


def test_a_shared_s3_store_names_a_missing_bucket_when_opened(bucket):
    from advisor.storage import StoreMissing

    ProfileStore(bucket, create=False)  # the bucket is there, the prefix not yet: fine
    with pytest.raises(StoreMissing, match="bucket 'no-such-bucket' does not exist or is not visible"):
        ProfileStore("s3://no-such-bucket/profiles", create=False)
