from advisor.store import ProfileStore, StoreKey
from tests.factories import make_profile


def test_profiles_round_trip_through_parquet_and_survive_a_restart(tmp_path):
    profile = make_profile()
    ProfileStore(tmp_path).put_profile(profile)
    again = ProfileStore(tmp_path)  # a new process would do exactly this
    assert again.get_profile(StoreKey.of(profile)) == profile
    df = again.points(StoreKey.of(profile))
    assert list(df["batch"]) == [p.batch for p in profile.points]


def test_same_key_replaces_other_keys_stay(tmp_path):
    store = ProfileStore(tmp_path)
    a = make_profile()
    b = make_profile(device_name="other")
    store.put_profile(a)
    store.put_profile(b)
    newer = a.model_copy(update={"seconds": 123.0})
    store.put_profile(newer)
    assert len(store.profiles()) == 2
    assert store.get_profile(StoreKey.of(a)).seconds == 123.0


def test_find_falls_back_to_another_bucket_of_the_same_model_and_device(tmp_path):
    store = ProfileStore(tmp_path)
    p = make_profile()
    store.put_profile(p)
    assert store.find("m", "dev", "0.0", "bfloat16", "p1024-o64") == p
    assert store.find("m", "elsewhere", "0.0", "bfloat16", "p1024-o64") is None
