"""Protection at rest: encrypted checkpoints round-trip; wrong keys, changed bytes, swapped manifests fail.

The swap attacks copy cache files on disk exactly as someone with write access to the cache would.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import serialization

from heistlab import protection, training, victims
from tests.conftest import SMALL_MLP

ONE_EPOCH = training.TrainConfig(epochs=1, batch_size=64, learning_rate=1e-3)


def test_encrypt_round_trip_and_refusals():
    key = bytes.fromhex(protection.new_key())
    blob = protection.encrypt(b"weights", key, b"entry")
    assert protection.decrypt(blob, key, "blob", b"entry") == b"weights" and b"weights" not in blob
    with pytest.raises(protection.ProtectionError, match="key is wrong or the file was modified"):
        protection.decrypt(blob, bytes(32), "blob", b"entry")
    flipped = bytearray(blob)
    flipped[-1] ^= 1
    with pytest.raises(protection.ProtectionError, match="failed authentication"):
        protection.decrypt(bytes(flipped), key, "blob", b"entry")
    with pytest.raises(protection.ProtectionError, match="failed authentication"):
        protection.decrypt(blob, key, "blob", b"another entry")
    with pytest.raises(protection.ProtectionError, match="is encrypted; name its key"):
        protection.decrypt(blob, None, "blob")


def test_keys_come_from_files_or_environment(tmp_path, monkeypatch):
    hex_key = protection.new_key()
    (tmp_path / "key").write_text(hex_key + "\n")
    assert protection.load_key(key_file=tmp_path / "key") == bytes.fromhex(hex_key)
    monkeypatch.setenv("HEISTLAB_TEST_KEY", hex_key)
    assert protection.load_key(key_env="HEISTLAB_TEST_KEY") == bytes.fromhex(hex_key)
    assert protection.load_key() is None
    (tmp_path / "short").write_text("abcd")
    with pytest.raises(protection.ProtectionError, match="expected a 32-byte AES-256 key"):
        protection.load_key(key_file=tmp_path / "short")
    with pytest.raises(protection.ProtectionError, match="MISSING_KEY_VAR.*not set"):
        protection.load_key(key_env="MISSING_KEY_VAR")


@pytest.fixture
def protected(tmp_path):
    private_file, public_file = protection.generate_signing_pair(tmp_path / "keys")
    key = bytes.fromhex(protection.new_key())
    trainer = victims.AtRest(key, protection.load_signing_keys(str(private_file)))
    server = victims.AtRest(key, protection.load_signing_keys(public_file=str(public_file)))
    return trainer, server


def train_protected(splits, cache, at_rest, identity=None):
    return victims.load_or_train(
        SMALL_MLP, splits, ONE_EPOCH, 0, identity or {"protected": True}, cache, at_rest=at_rest
    )


def test_encrypted_signed_checkpoint_round_trips(digits_splits, tmp_path, protected):
    trainer, server = protected
    trained, _ = train_protected(digits_splits, tmp_path / "cache", trainer)
    stored = next((tmp_path / "cache").glob("victims/*/params.msgpack")).read_bytes()
    assert protection.is_encrypted(stored)
    loaded, hit = train_protected(digits_splits, tmp_path / "cache", server)
    assert hit
    for a, b in zip(jax.tree.leaves(trained.params), jax.tree.leaves(loaded.params), strict=True):
        np.testing.assert_array_equal(a, b)


def test_wrong_key_or_modified_byte_is_refused(digits_splits, tmp_path, protected):
    trainer, server = protected
    train_protected(digits_splits, tmp_path / "cache", trainer)
    wrong = server._replace(encryption_key=bytes(32))
    with pytest.raises(protection.ProtectionError, match="key is wrong or the file was modified"):
        train_protected(digits_splits, tmp_path / "cache", wrong)
    checkpoint = next((tmp_path / "cache").glob("victims/*/params.msgpack"))
    payload = bytearray(checkpoint.read_bytes())
    payload[len(payload) // 2] ^= 0x01
    checkpoint.write_bytes(bytes(payload))
    with pytest.raises(protection.ProtectionError, match="failed authentication"):
        train_protected(digits_splits, tmp_path / "cache", server)


def test_tampered_or_swapped_manifest_is_refused_before_loading(digits_splits, tmp_path, protected):
    trainer, server = protected
    train_protected(digits_splits, tmp_path / "cache", trainer)
    manifest_path = next((tmp_path / "cache").glob("victims/*/manifest.json"))
    manifest = json.loads(manifest_path.read_text())
    manifest["config"]["protected"] = "swapped"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(protection.ProtectionError, match="signature does not verify"):
        train_protected(digits_splits, tmp_path / "cache", server)
    del manifest["signature"]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(protection.ProtectionError, match="is not signed"):
        train_protected(digits_splits, tmp_path / "cache", server)


def test_protect_command_makes_keys_that_an_experiment_uses(tmp_path, digits_splits, capsys):
    from heistlab.compose import at_rest_from
    from heistlab.experiments.protect import main
    from tests.test_configs import composed

    main(["--out", str(tmp_path / "keys")])
    overrides = capsys.readouterr().out.split()
    assert (tmp_path / "keys" / "checkpoint.key").stat().st_mode & 0o777 == 0o600
    at_rest = at_rest_from(composed(*overrides))
    assert at_rest.encryption_key is not None and at_rest.signing.private is not None
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "keys")])


def entry_of(cache, identity) -> Path:
    return cache / "victims" / victims.config_digest(identity)


def copy_entry(source: Path, target: Path) -> None:
    for name in ("params.msgpack", "manifest.json"):
        shutil.copyfile(source / name, target / name)


VICTIM_A, VICTIM_B = {"victim": "a"}, {"victim": "b"}


def test_another_victims_entry_copied_in_is_refused_without_keys(digits_splits, tmp_path):
    cache = tmp_path / "cache"
    train_protected(digits_splits, cache, victims.UNPROTECTED, VICTIM_A)
    victims.load_or_train(SMALL_MLP, digits_splits, ONE_EPOCH, 1, VICTIM_B, cache)
    copy_entry(entry_of(cache, VICTIM_B), entry_of(cache, VICTIM_A))
    with pytest.raises(victims.TamperedCheckpointError, match="made for another victim"):
        train_protected(digits_splits, cache, victims.UNPROTECTED, VICTIM_A)


def test_two_signed_entries_swapped_are_refused_with_only_a_verify_key(digits_splits, tmp_path, protected):
    trainer, server = protected
    signer, verifier = trainer._replace(encryption_key=None), server._replace(encryption_key=None)
    cache = tmp_path / "cache"
    train_protected(digits_splits, cache, signer, VICTIM_A)
    train_protected(digits_splits, cache, signer, VICTIM_B)
    first, second = entry_of(cache, VICTIM_A), entry_of(cache, VICTIM_B)
    shutil.move(first, tmp_path / "held")
    shutil.move(second, first)
    shutil.move(tmp_path / "held", second)
    for identity in (VICTIM_A, VICTIM_B):
        with pytest.raises(victims.TamperedCheckpointError, match="made for another victim"):
            train_protected(digits_splits, cache, verifier, identity)


def test_a_manifest_naming_another_entry_is_refused(digits_splits, tmp_path, protected):
    trainer, _ = protected
    cache = tmp_path / "cache"
    train_protected(digits_splits, cache, trainer, VICTIM_A)
    folder = entry_of(cache, VICTIM_A)
    shutil.copytree(folder, cache / "victims" / "renamed")
    with pytest.raises(victims.TamperedCheckpointError, match="belongs to cache entry"):
        victims.load_checkpoint(cache / "victims" / "renamed", None, VICTIM_A, victims.UNPROTECTED)


def test_a_plaintext_checkpoint_is_refused_when_an_encryption_key_is_configured(digits_splits, tmp_path):
    key = bytes.fromhex(protection.new_key())
    encrypting = victims.AtRest(key)
    cache = tmp_path / "cache"
    train_protected(digits_splits, cache, encrypting, VICTIM_A)
    other, _ = victims.load_or_train(SMALL_MLP, digits_splits, ONE_EPOCH, 1, VICTIM_B, None)
    folder = entry_of(cache, VICTIM_A)
    plaintext = serialization.to_bytes(other.params)
    (folder / "params.msgpack").write_bytes(plaintext)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.update(sha256=hashlib.sha256(plaintext).hexdigest(), encrypted=False)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(protection.ProtectionError, match="encryption key is configured but the checkpoint"):
        train_protected(digits_splits, cache, encrypting, VICTIM_A)
    manifest["encrypted"] = True  # lying about it changes nothing
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(protection.ProtectionError, match="stored in the clear"):
        train_protected(digits_splits, cache, encrypting, VICTIM_A)


def test_a_manifest_that_is_not_one_is_refused_by_name(digits_splits, tmp_path):
    cache = tmp_path / "cache"
    train_protected(digits_splits, cache, victims.UNPROTECTED, VICTIM_A)
    manifest_path = entry_of(cache, VICTIM_A) / "manifest.json"
    for text in ("{not json", "[]", json.dumps({"format": 9, "config": {}, "sha256": ""})):
        manifest_path.write_text(text)
        with pytest.raises(victims.TamperedCheckpointError, match="manifest.json"):
            train_protected(digits_splits, cache, victims.UNPROTECTED, VICTIM_A)


# -- the server: the same protection.* keys, and a refused checkpoint stops its start-up -------------------


def serve_overrides(tmp_path: Path, cache: Path, *extra: str) -> list[str]:
    from heistlab.experiments import keys
    from tests.test_serving_cli import TINY_VICTIM

    if not (tmp_path / "tls" / "cert.pem").exists():
        keys.main(["selfsigned", "--out", str(tmp_path / "tls")])
        keys.main(
            ["create", "--store", str(tmp_path / "k.json"), "--role", "admin", "--out", str(tmp_path / "a")]
        )
    return [
        f"cache_dir={cache}",
        f"serve.key_store={tmp_path / 'k.json'}",
        f"serve.certfile={tmp_path / 'tls' / 'cert.pem'}",
        f"serve.keyfile={tmp_path / 'tls' / 'key.pem'}",
        f"serve.audit_db={tmp_path / 'audit.sqlite'}",
        *TINY_VICTIM,
        *extra,
    ]


def start_server(overrides: list[str]):
    from heistlab.serving.app import app_from_config
    from tests.test_serving_cli import composed_serve

    return app_from_config(composed_serve(*overrides))


def victim_entry(cache: Path) -> Path:
    (entry,) = (cache / "victims").iterdir()
    return entry


@pytest.mark.slow  # trains two tiny victims through the server's start-up: about 10 s on 2 busy cores
def test_the_server_takes_the_protect_overrides_verbatim_and_refuses_swapped_entries(
    tmp_path, capsys, caplog
):
    from heistlab.experiments.protect import main

    main(["--out", str(tmp_path / "keys")])
    printed = capsys.readouterr().out.split()
    assert all(override.startswith("protection.") for override in printed) and len(printed) == 3
    first, second = tmp_path / "first", tmp_path / "second"
    with caplog.at_level("WARNING", logger="heistlab.serving"):
        start_server(serve_overrides(tmp_path, first, *printed))  # trains, encrypts and signs victim seed 0
        start_server(serve_overrides(tmp_path, second, "victim.seed=1", *printed))
        start_server(serve_overrides(tmp_path, first, *printed))  # served from the cache, verified
    assert "UNSIGNED CHECKPOINT" not in caplog.text
    entry = victim_entry(first)
    assert "signature" in json.loads((entry / "manifest.json").read_text())
    assert protection.is_encrypted((entry / "params.msgpack").read_bytes())
    copy_entry(victim_entry(second), entry)
    with pytest.raises(victims.TamperedCheckpointError, match="made for another victim"):
        start_server(serve_overrides(tmp_path, first, *printed))


@pytest.mark.slow  # trains two tiny victims and starts a server process: about 15 s on 2 busy cores
def test_an_unsigned_server_warns_and_refuses_to_start_on_a_copied_entry(tmp_path, caplog):
    import subprocess
    import sys

    from tests.test_serving_cli import REPO

    first, second = tmp_path / "first", tmp_path / "second"
    with caplog.at_level("WARNING", logger="heistlab.serving"):
        start_server(serve_overrides(tmp_path, first))
    warnings = [record.message for record in caplog.records if "UNSIGNED CHECKPOINT" in record.message]
    assert len(warnings) == 1 and "protection.verify_key_file" in warnings[0]
    start_server(serve_overrides(tmp_path, second, "victim.seed=1"))
    copy_entry(victim_entry(second), victim_entry(first))
    command = [sys.executable, "-m", "experiments.serve", *serve_overrides(tmp_path, first),
               f"hydra.run.dir={tmp_path / 'hydra'}"]  # fmt: skip
    refused = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert "experiments.serve refused to start: refusing checkpoint" in refused.stderr
    assert "made for another victim" in refused.stderr and "Traceback" not in refused.stderr


def test_a_server_with_an_encryption_key_refuses_a_plaintext_checkpoint(tmp_path):
    (tmp_path / "checkpoint.key").write_text(protection.new_key())
    keyed = serve_overrides(
        tmp_path, tmp_path / "cache", f"protection.encryption_key_file={tmp_path / 'checkpoint.key'}"
    )
    start_server(keyed)
    entry = victim_entry(tmp_path / "cache")
    plaintext = serialization.to_bytes({"params": {"planted": np.zeros(3, np.float32)}})
    (entry / "params.msgpack").write_bytes(plaintext)
    manifest = json.loads((entry / "manifest.json").read_text())
    manifest.update(sha256=hashlib.sha256(plaintext).hexdigest(), encrypted=False)
    (entry / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(protection.ProtectionError, match="encryption key is configured but the checkpoint"):
        start_server(keyed)
