"""The persistent compilation cache (lark_jax.compile_cache): a CLI run leaves its compiled
programs in the cache directory, a second run with the same settings reads them instead
of compiling, and --no-compile-cache neither reads nor writes."""

import json
import os
import subprocess
import sys

import jax
import pytest
from conftest import write_pool

from lark_jax import compile_cache as cc
from lark_jax.cli import main as cli_main

# A fresh process runs the real CLI and reports JAX's compilation-cache events (JAX records
# one per cache hit, and one per executable written).
CHILD = """
import json, sys
import jax
events = {}
jax.monitoring.register_event_listener(
    lambda name, **kw: events.__setitem__(name, events.get(name, 0) + 1))
from lark_jax.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "events": events}))
"""
HITS, WRITES = "/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"


def run_cli(args, cache_root):
    env = {**os.environ, cc.ROOT_ENV: str(cache_root)}
    env.pop(cc.JAX_DIR_ENV, None)
    r = subprocess.run([sys.executable, "-c", CHILD, *map(str, args)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Warning" not in r.stderr, r.stderr  # a failed cache read or write warns
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["rc"] == 0
    return out["events"]


def files(d):
    return sorted(p.relative_to(d) for p in d.rglob("*") if p.is_file()) if d.exists() else []


@pytest.fixture(scope="module")
def score_args(tmp_path_factory):
    from lark_jax.models.tiny import make_tiny_student

    d = tmp_path_factory.mktemp("cc")
    student = make_tiny_student(d / "student", "llama")
    pool = write_pool(d / "pool.jsonl", n_problems=2)
    return d, ["score", "--pool", pool, "--student", student, "-q"]


def test_second_run_reads_what_the_first_compiled(score_args, tmp_path):
    d, args = score_args
    root = tmp_path / "cache"
    first = run_cli([*args, "--out", tmp_path / "a.json"], root)
    stored = files(root / cc.SUBDIR)
    assert stored and first.get(WRITES, 0) >= 1 and first.get(HITS, 0) == 0
    second = run_cli([*args, "--out", tmp_path / "b.json"], root)
    # Every program of the second run came from the disk, none was compiled and written.
    assert second.get(HITS, 0) == first[WRITES] and second.get(WRITES, 0) == 0
    assert files(root / cc.SUBDIR) == stored
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["scores"] == b["scores"]


def test_no_compile_cache_leaves_the_directory_empty(score_args, tmp_path):
    d, args = score_args
    root = tmp_path / "cache"
    events = run_cli([*args, "--out", tmp_path / "a.json", "--no-compile-cache"], root)
    assert files(root) == [] and events.get(HITS, 0) == 0 and events.get(WRITES, 0) == 0
    assert (tmp_path / "a.json").exists()


def test_directory_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv(cc.JAX_DIR_ENV, raising=False)
    monkeypatch.delenv(cc.ROOT_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cc.compile_cache_dir() == tmp_path / "home" / ".cache" / "lark-jax" / cc.SUBDIR
    monkeypatch.setenv(cc.ROOT_ENV, str(tmp_path / "root"))
    assert cc.compile_cache_dir() == tmp_path / "root" / cc.SUBDIR
    monkeypatch.setenv(cc.JAX_DIR_ENV, str(tmp_path / "jax"))
    assert cc.compile_cache_dir() == tmp_path / "jax"


def test_settings_come_back_after_the_command(monkeypatch, tmp_path):
    # In-process callers (these tests) must not keep writing every later compile to disk.
    monkeypatch.setenv(cc.ROOT_ENV, str(tmp_path / "root"))
    before = {name: getattr(jax.config, name) for name in cc._OPTIONS}
    with cc.compile_cache() as path:
        assert path == tmp_path / "root" / cc.SUBDIR and path.is_dir()
        assert jax.config.jax_compilation_cache_dir == str(path)
        assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
    assert {name: getattr(jax.config, name) for name in cc._OPTIONS} == before
    with cc.compile_cache(False) as path:
        assert path is None and not jax.config.jax_enable_compilation_cache
    assert {name: getattr(jax.config, name) for name in cc._OPTIONS} == before


def test_unusable_cache_root_is_a_user_error(monkeypatch, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv(cc.ROOT_ENV, str(blocker))
    monkeypatch.delenv(cc.JAX_DIR_ENV, raising=False)
    rc = cli_main(["make-tiny", "--out", str(tmp_path / "m"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "compile cache" in err and "--no-compile-cache" in err
    assert not (tmp_path / "m").exists()
    # Opting out needs no directory at all.
    assert cli_main(["make-tiny", "--out", str(tmp_path / "m"), "-q", "--no-compile-cache"]) == 0
