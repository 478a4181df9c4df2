"""Bad model directories: one clear LarkError each, and one line (no traceback) from the CLI."""

import json
import subprocess
import sys

import pytest

import lark_jax
from lark_jax import LarkError


@pytest.fixture()
def tiny_dir(tmp_path):
    from lark_jax.models.tiny import make_tiny_student

    return make_tiny_student(tmp_path / "tiny", "qwen2")


def test_missing_config(tiny_dir):
    (tiny_dir / "config.json").unlink()
    with pytest.raises(LarkError, match="config.json not found"):
        lark_jax.load_student(tiny_dir)


def test_missing_weights(tiny_dir):
    (tiny_dir / "model.safetensors").unlink()
    with pytest.raises(LarkError, match="no model.safetensors"):
        lark_jax.load_student(tiny_dir)


def test_unsupported_model_type_lists_supported(tiny_dir):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (tiny_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LarkError, match="unsupported model_type 'gpt2'.*llama, qwen2, qwen3"):
        lark_jax.load_student(tiny_dir)


def test_pickle_only_directory_is_refused_without_unpickling(tiny_dir):
    (tiny_dir / "model.safetensors").unlink()
    # A file that would execute code if unpickled: loading must never open it as pickle.
    (tiny_dir / "pytorch_model.bin").write_bytes(
        b"\x80\x04cbuiltins\nexec\n(X\x1a\x00\x00\x00open('/tmp/pwned','w')tR.")
    with pytest.raises(LarkError, match="only pickle weights.*never unpickles"):
        lark_jax.load_student(tiny_dir)


def test_wrong_shape_names_the_tensor(tiny_dir):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (tiny_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LarkError, match=r"model.layers.0.mlp.gate_proj.weight.*shape \[128, 64\]"):
        lark_jax.load_student(tiny_dir)


def test_missing_tensor_is_named(tiny_dir):
    from lark_jax.models.safetensors_io import SafetensorsFile, write_file

    f = SafetensorsFile(tiny_dir / "model.safetensors")
    kept = {k: f.get(k).copy() for k in f.keys() if k != "model.norm.weight"}
    del f
    write_file(tiny_dir / "model.safetensors", kept)
    with pytest.raises(LarkError, match="missing tensor 'model.norm.weight'"):
        lark_jax.load_student(tiny_dir)


def test_truncated_safetensors(tiny_dir):
    (tiny_dir / "model.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(LarkError, match="truncated safetensors"):
        lark_jax.load_student(tiny_dir)


def test_malformed_config_json(tiny_dir):
    (tiny_dir / "config.json").write_text("{not json")
    with pytest.raises(LarkError, match="not valid JSON"):
        lark_jax.load_student(tiny_dir)


def test_missing_tokenizer(tiny_dir):
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (tiny_dir / f).unlink(missing_ok=True)
    with pytest.raises(LarkError, match="no tokenizer files"):
        lark_jax.load_student(tiny_dir)
    assert lark_jax.load_student(tiny_dir, tokenizer=False).tokenizer is None


def test_tokenizer_without_vocabulary_is_refused(tiny_dir):
    """With tokenizer.json gone, transformers would build a tokenizer of special tokens
    only, and every trajectory would score as one token."""
    (tiny_dir / "tokenizer.json").unlink()
    with pytest.raises(LarkError, match="tokenizer has no vocabulary"):
        lark_jax.load_student(tiny_dir)


@pytest.mark.parametrize("key,value,match", [
    ("num_hidden_layers", 0, "num_hidden_layers must be >= 1"),
    ("head_dim", 7, "head_dim 7 must be even"),
    ("num_attention_heads", 0, "num_attention_heads must be >= 1"),
])
def test_impossible_configs_are_refused(tiny_dir, key, value, match):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    cfg[key] = value
    (tiny_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LarkError, match=match):
        lark_jax.load_student(tiny_dir)


@pytest.mark.parametrize("args,match", [
    (["--layers", "0"], "--layers must be >= 1"),
    (["--hidden-size", "30"], "--hidden-size must be a positive multiple of 8"),
    ([], "output path is an existing file"),
])
def test_make_tiny_bad_arguments(tmp_path, capsys, args, match):
    from lark_jax.cli import main as cli_main

    out = tmp_path / "file"
    out.write_text("not a directory")
    rc = cli_main(["make-tiny", "--out", str(out), *args])
    err = capsys.readouterr().err
    assert rc != 0 and match in err and "Traceback" not in err
    assert out.read_text() == "not a directory"


def test_saved_model_directory_gets_the_usual_permissions(tiny_dir, tmp_path):
    from lark_jax import fsio

    s = lark_jax.load_student(tiny_dir)
    lark_jax.save_student(s.model, tmp_path / "copy", s.tokenizer)
    assert (tmp_path / "copy").stat().st_mode & 0o777 == 0o777 & ~fsio.UMASK  # not 0700


def test_save_refuses_nonempty_dir_and_leaves_nothing_half_written(tiny_dir, tmp_path):
    s = lark_jax.load_student(tiny_dir)
    with pytest.raises(LarkError, match="not empty"):
        lark_jax.save_student(s.model, tiny_dir)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_cli_reports_one_line_without_traceback(tiny_dir, tmp_path):
    (tiny_dir / "model.safetensors").unlink()
    (tiny_dir / "model.bin").write_bytes(b"x")
    r = subprocess.run([sys.executable, "-m", "lark_jax", "generate", "--model", str(tiny_dir),
                        "--prompt", "hi"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "only pickle weights" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_cli_help_lists_commands():
    r = subprocess.run([sys.executable, "-m", "lark_jax", "--help"], capture_output=True,
                       text=True)
    assert r.returncode == 0
    assert "generate" in r.stdout and "make-tiny" in r.stdout


def test_cli_generate_end_to_end(tiny_dir):
    r = subprocess.run([sys.executable, "-m", "lark_jax", "generate", "--model", str(tiny_dir),
                        "--prompt", "hi", "--prompt", "there", "--max-new-tokens", "4"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    # stdout is pure JSON lines (pipeable into jq); the summary is on stderr
    assert [json.loads(x)["prompt"] for x in lines] == ["hi", "there"]
    assert r.stderr.strip().splitlines()[-1].startswith("generated 2 completion(s)")


@pytest.mark.parametrize("args,match", [
    (["--prompt", "hi", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--prompts-file", "EMPTY"], "EMPTY: no prompts"),
])
def test_generate_bad_arguments(tiny_dir, tmp_path, capsys, args, match):
    from lark_jax.cli import main as cli_main

    empty = tmp_path / "EMPTY"
    empty.write_text("\n  \n")
    args = [str(empty) if a == "EMPTY" else a for a in args]
    match = match.replace("EMPTY", str(empty))
    rc = cli_main(["generate", "--model", str(tiny_dir), *args])
    captured = capsys.readouterr()
    assert rc != 0 and match in captured.err and "Traceback" not in captured.err
    assert captured.out == ""
