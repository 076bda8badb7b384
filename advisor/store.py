"""Profiles and plans on disk: pandas DataFrames stored as parquet, reloaded after a restart.

One row per stored object, keyed by model, device name, engine version, dtype, workload bucket,
execution mode (eager or CUDA graphs: a profile measured in one says little about the other)
and how engines share the GPU (MPS, time-slicing: the measured gain of N engines depends on it;
empty on CPUs); the full object is kept as JSON in the `body` column, the key columns make lookups and
`pandas` analysis easy. The tables live in a folder or under an fsspec URL (`advisor/storage.py`:
whole-file replacement, one writer at a time). Tables written before the mode or sharing
columns existed are read as eager and without sharing (every profile then was).
"""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path
from typing import Optional, TypeVar, Union

import pandas as pd
from pydantic import BaseModel, ConfigDict

from advisor.profiler import ExecutionMode, Profile
from advisor.storage import Location, location

KEY_COLUMNS = ["model", "device_name", "engine_version", "dtype", "bucket", "mode", "sharing"]
LEGACY_MODE: ExecutionMode = "eager"  # the mode of rows stored before the `mode` column
T = TypeVar("T", bound=BaseModel)


class StoreKey(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    model: str
    device_name: str
    engine_version: str
    dtype: str
    bucket: str
    mode: ExecutionMode = LEGACY_MODE
    sharing: str = ""  # advisor/sharing.py's mode; "" on CPUs

    @classmethod
    def of(cls, profile: Profile) -> "StoreKey":
        return cls(model=profile.model, device_name=profile.device_name, engine_version=profile.engine_version,
                   dtype=profile.dtype, bucket=profile.shape.bucket, mode=profile.mode, sharing=profile.sharing or "")


class ProfileStore:
    """Parquet table `profiles.parquet` under one folder or URL. A folder of one's own is created;
    a shared one (`create=False`, the config's `profile_store`) must exist: a node without the
    mount must not quietly keep profiles of its own. A URL (`s3://bucket/prefix`) needs no mount."""

    def __init__(self, root: Union[str, Path], create: bool = True):
        self.files: Location = location(root, create)

    def _read(self, kind: str) -> pd.DataFrame:
        data = self.files.read(f"{kind}.parquet")
        if data is None:
            return pd.DataFrame(columns=KEY_COLUMNS + ["stored_at", "body"])
        df = pd.read_parquet(io.BytesIO(data))
        if "mode" not in df.columns:
            df["mode"] = LEGACY_MODE
        if "sharing" not in df.columns:
            df["sharing"] = ""
        return df

    def _put(self, kind: str, key: StoreKey, body: BaseModel) -> str:
        with self.files.writer():
            df = self._read(kind)
            mask = pd.Series(True, index=df.index)
            for col, val in key.model_dump().items():
                mask &= df[col] == val
            row = {**key.model_dump(), "stored_at": dt.datetime.now(dt.timezone.utc).isoformat(),
                   "body": body.model_dump_json()}
            df = pd.concat([df[~mask], pd.DataFrame([row])], ignore_index=True)
            buf = io.BytesIO()
            df.to_parquet(buf, index=False)
            self.files.write(f"{kind}.parquet", buf.getvalue())
        return self.files.name(f"{kind}.parquet")

    def _get(self, kind: str, key: StoreKey, model_type: type[T]) -> Optional[T]:
        df = self._read(kind)
        for col, val in key.model_dump().items():
            df = df[df[col] == val]
        if df.empty:
            return None
        return model_type.model_validate_json(df.sort_values("stored_at").iloc[-1]["body"])

    def put_profile(self, profile: Profile) -> str:
        return self._put("profiles", StoreKey.of(profile), profile)

    def get_profile(self, key: StoreKey) -> Optional[Profile]:
        return self._get("profiles", key, Profile)

    def find(self, model: str, device_name: str, engine_version: str, dtype: str, bucket: str,
             mode: ExecutionMode = LEGACY_MODE, sharing: Optional[str] = None) -> Optional[Profile]:
        """The profile for this bucket, else the newest for the same model/device/engine/dtype/mode/
        sharing (the step model predicts other workload shapes), else None."""
        exact = self.get_profile(StoreKey(model=model, device_name=device_name, engine_version=engine_version,
                                          dtype=dtype, bucket=bucket, mode=mode, sharing=sharing or ""))
        if exact is not None:
            return exact
        df = self._read("profiles")
        df = df[(df.model == model) & (df.device_name == device_name) & (df.engine_version == engine_version)
                & (df.dtype == dtype) & (df["mode"] == mode) & (df["sharing"] == (sharing or ""))]
        if df.empty:
            return None
        return Profile.model_validate_json(df.sort_values("stored_at").iloc[-1]["body"])

    def profiles(self) -> pd.DataFrame:
        """All stored profiles' keys (without bodies), newest last."""
        return self._read("profiles").drop(columns=["body"]).sort_values("stored_at")

    def points(self, key: StoreKey) -> pd.DataFrame:
        """One profile's points as a DataFrame (one row per batch size)."""
        profile = self.get_profile(key)
        if profile is None:
            return pd.DataFrame()
        return pd.DataFrame([p.model_dump() for p in profile.points])
