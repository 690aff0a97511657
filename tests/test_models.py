"""The de-quantized GGUF cache: keyed by the file's content, created with the umask's mode."""

from __future__ import annotations

import os
import stat

import pytest

from lit_heads import models


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIT_HEADS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake_dequantize(monkeypatch):
    """Stands in for the 15-second de-quantization: records each call and writes a config.json."""
    calls = []

    def dequantize(gguf, target):
        calls.append(target)
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_dequantize_to", dequantize)
    return calls


def test_the_cache_is_keyed_by_content_not_by_modification_time(tmp_path, cache, fake_dequantize):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + os.urandom(4096))
    first = models.resolve(str(gguf)).path
    os.utime(gguf, ns=(1, 1))  # e.g. the package was reinstalled: same bytes, new mtime
    assert models.resolve(str(gguf)).path == first
    moved = tmp_path / "elsewhere" / "m.gguf"
    moved.parent.mkdir()
    moved.write_bytes(gguf.read_bytes())
    assert models.resolve(str(moved)).path == first
    assert len(fake_dequantize) == 1  # one copy in the cache, not one per mtime or path

    gguf.write_bytes(b"GGUF" + os.urandom(4096))  # other bytes: another model
    assert models.resolve(str(gguf)).path != first
    assert len(fake_dequantize) == 2
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == sorted(p.name for p in fake_dequantize)


def test_the_digest_is_computed_once_per_change_of_the_file(tmp_path, cache, fake_dequantize, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"x" * 100)
    hashed = []
    real = models.hashlib.sha256
    monkeypatch.setattr(models.hashlib, "sha256", lambda *a: hashed.append(1) or real(*a))
    for _ in range(3):
        models.resolve(str(gguf))
    assert len(hashed) == 1
    os.utime(gguf, ns=(5, 5))
    models.resolve(str(gguf))
    assert len(hashed) == 2
    import hashlib

    assert models.gguf_digest(gguf) == hashlib.sha256(gguf.read_bytes()).hexdigest()


def test_the_cache_copy_gets_the_umask_mode(tmp_path, cache, monkeypatch, tiny_llama_dir):
    """De-quantize (transformers' GGUF loading stubbed by a tiny model) under umask 022: the shared
    cache folder is readable by others, as mkdir would make it (mkdtemp made it 0700)."""
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: transformers.AutoModelForCausalLM.from_config(
                            transformers.AutoConfig.from_pretrained(tiny_llama_dir)))
    real_tok = transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: real_tok(tiny_llama_dir))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"x" * 100)
    old = os.umask(0o022)
    try:
        target = models.resolve(str(gguf)).path
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o755
    assert (cache / os.path.basename(target) / "config.json").is_file()


def test_resolve_without_dequantizing_names_the_file_and_its_future_cache_folder(tmp_path, cache, fake_dequantize):
    """What the checks before the expensive work use: nothing is de-quantized until a load asks."""
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + os.urandom(256))
    pending = models.resolve(str(gguf), dequantize=False)
    assert pending.gguf_file == str(gguf) and not os.path.exists(pending.path) and fake_dequantize == []
    loaded = models.resolve(str(gguf))
    assert loaded.path == pending.path and loaded.gguf_file is None and len(fake_dequantize) == 1
    assert models.resolve(str(gguf), dequantize=False) == loaded  # de-quantized now: the cache folder
