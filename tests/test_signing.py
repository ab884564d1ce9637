"""What a race vouches for (pipelines.signing): the digest of a model's files, the HMAC over a
version's claims, and every way a check refuses a version before any of its code runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipelines import registry, signing
from pipelines.signing import Untrusted

NAME, VERSION, KEY = "m", 3, b"a shared secret"


def model_folder(root: Path) -> Path:
    folder = root / "model"
    (folder / "artifacts").mkdir(parents=True)
    (folder / "MLmodel").write_text("flavors: {}\n")
    (folder / "pyfunc_model.py").write_text("print('the model code')\n")
    (folder / "artifacts" / "estimator.pkl").write_bytes(b"\x80\x05pickled")
    return folder


def vouched_tags(folder: Path, key: bytes | None, valid: str = "true") -> dict[str, str]:
    """The tags a race writes on a version whose files are ``folder``."""
    claims = {signing.TAG_FILES: signing.files_digest(folder), registry.TAG_VALID: valid}
    return {**claims, **signing.vouch(NAME, VERSION, claims, key)}


def test_the_manifest_hashes_every_file(tmp_path: Path) -> None:
    folder = model_folder(tmp_path)
    manifest = signing.file_manifest(folder)
    assert sorted(manifest) == ["MLmodel", "artifacts/estimator.pkl", "pyfunc_model.py"]
    assert all(len(digest) == 64 for digest in manifest.values())
    before = signing.files_digest(folder)
    # MLflow's marker of a models:/ download is not part of the model
    (folder / signing.DOWNLOAD_MARKER).write_text("model_name: m\n")
    assert signing.files_digest(folder) == before


@pytest.mark.parametrize("key", [None, KEY], ids=["unsigned", "signed"])
def test_a_vouched_version_passes(tmp_path: Path, key: bytes | None) -> None:
    folder = model_folder(tmp_path)
    tags = vouched_tags(folder, key)
    assert tags[registry.TAG_COMPLETE] == "true"
    assert (tags[signing.TAG_SIGNATURE] == "") == (key is None)
    signing.verify(folder, NAME, VERSION, tags, key)


@pytest.mark.parametrize("change", ["edit", "add", "remove", "pycache", "link"])
@pytest.mark.parametrize("key", [None, KEY], ids=["unsigned", "signed"])
def test_changed_files_are_refused(tmp_path: Path, key: bytes | None, change: str) -> None:
    folder = model_folder(tmp_path)
    tags = vouched_tags(folder, key)
    code = folder / "pyfunc_model.py"
    if change == "edit":
        code.write_text("open('/tmp/pwned', 'w')\n")
    elif change == "add":
        (folder / "artifacts" / "extra.py").write_text("")
    elif change == "remove":
        (folder / "artifacts" / "estimator.pkl").unlink()
    elif change == "pycache":  # bytecode Python would run instead of the hashed source
        (folder / "__pycache__").mkdir()
        (folder / "__pycache__" / "pyfunc_model.cpython-311.pyc").write_bytes(b"\x00")
    else:
        code.unlink()
        os.symlink("/etc/hostname", code)
    with pytest.raises(Untrusted) as refused:
        signing.verify(folder, NAME, VERSION, tags, key)
    assert refused.value.reason == "files"


@pytest.mark.parametrize(("tags", "reason", "words"), [
    ({}, "incomplete", "lacks the tag race_complete=true"),
    ({registry.TAG_COMPLETE: "true", registry.TAG_VALID: "false"}, "invalid",
     "is not tagged valid=true"),
    ({registry.TAG_COMPLETE: "true", registry.TAG_VALID: "true"}, "no_digest",
     "has no tag files_sha256"),
])
def test_the_claims_are_checked_before_any_download(tags: dict, reason: str,
                                                    words: str) -> None:
    with pytest.raises(Untrusted, match=words) as refused:
        signing.check_claims(NAME, VERSION, tags)
    assert refused.value.reason == reason


def test_with_a_key_forged_or_missing_signatures_are_refused(tmp_path: Path) -> None:
    folder = model_folder(tmp_path)
    # anyone who can write tags can hash files: without the key, no valid signature
    unsigned = vouched_tags(folder, None)
    with pytest.raises(Untrusted, match="is not signed") as refused:
        signing.verify(folder, NAME, VERSION, unsigned, KEY)
    assert refused.value.reason == "unsigned"
    for tags in (vouched_tags(folder, b"another key"),
                 # a version its race found invalid, its tag flipped afterwards
                 {**vouched_tags(folder, KEY, valid="false"), registry.TAG_VALID: "true"}):
        with pytest.raises(Untrusted, match="signature does not match") as refused:
            signing.verify(folder, NAME, VERSION, tags, KEY)
        assert refused.value.reason == "signature"
    # the signature names its version: the tags of v3 do not vouch for v4
    with pytest.raises(Untrusted, match="signature does not match"):
        signing.verify(folder, NAME, VERSION + 1, vouched_tags(folder, KEY), KEY)


def test_the_key_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(signing.KEY_VARIABLE, "s3cret")
    assert signing.signing_key() == b"s3cret"
    monkeypatch.setenv(signing.KEY_VARIABLE, "")
    assert signing.signing_key() is None
    monkeypatch.delenv(signing.KEY_VARIABLE)
    assert signing.signing_key() is None
