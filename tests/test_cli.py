"""The CLI as a user meets it: help, the README smoke command, one-line errors."""

import os
import subprocess
import sys

import pytest

BIN = [sys.executable, "-m", "bonsai_mlx.cli"]


def run(*args, env=None):
    e = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.run([*BIN, *args], capture_output=True, text=True, env=e, timeout=300)


def test_help_lists_commands():
    r = run("--help")
    assert r.returncode == 0 and "init" in r.stdout and "forward" in r.stdout
    for cmd in ("init", "forward"):
        r = run(cmd, "--help")
        assert r.returncode == 0 and ("--out" in r.stdout or "--model" in r.stdout)


def test_pico_init_and_forward(tmp_path):
    r = run("init", "--pico", "--out", str(tmp_path / "pico"))
    assert r.returncode == 0, r.stderr
    r = run("forward", "--model", str(tmp_path / "pico"), "--prompt", "What colour is the square?")
    assert r.returncode == 0, r.stderr
    assert "next-token top-5" in r.stdout and "16 image tokens" in r.stdout


@pytest.mark.parametrize(
    "args,needle",
    [
        (["forward", "--model", "someone/not-cached-here"], "someone/not-cached-here"),
        (["forward", "--model", "./no/such/dir"], "not found"),
        (["init", "--vision", "google/siglip-base-patch16-224", "--language", "Qwen/Qwen2.5-0.5B-Instruct",
          "--out", "OUT"], "google/siglip-base-patch16-224"),
    ],
)
def test_user_mistakes_are_one_line_errors(tmp_path, args, needle):
    args = [a.replace("OUT", str(tmp_path / "o")) for a in args]
    r = run(*args)
    assert r.returncode != 0
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_forward_bad_image_is_one_line(tmp_path):
    assert run("init", "--pico", "--out", str(tmp_path / "p")).returncode == 0
    (tmp_path / "x.png").write_text("not a png")
    r = run("forward", "--model", str(tmp_path / "p"), "--image", str(tmp_path / "x.png"))
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "x.png" in r.stderr


def test_prompting_module_imports_without_mlx(tmp_path):
    # the teacher tool (PyTorch, no mlx) imports bonsai_mlx.prompting: it must not pull mlx in
    code = (
        "import sys, builtins\n"
        "real = builtins.__import__\n"
        "def guard(name, *a, **k):\n"
        "    if name == 'mlx' or name.startswith('mlx.') or name.startswith('mlx_lm'):\n"
        "        raise ImportError('mlx is not installed here')\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = guard\n"
        "import bonsai_mlx.prompting as p\n"
        "assert 'mlx' not in sys.modules\n"
        "print(p.IMAGE_TOKEN)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and "<image>" in r.stdout, r.stderr


def test_doctor_measures(tmp_path):
    import json

    r = run("doctor", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["gemm_f32_gflops"] > 0 and d["q4_matmul_gflops"] > 0 and d["read_bandwidth_gbs"] > 0
    assert d["decode_ceiling_4bit_tok_s"] > d["decode_ceiling_f32_tok_s"]
    r = run("doctor", "--json", env={"BONSAI_BLAS": "none"})
    assert json.loads(r.stdout)["blas"].startswith("disabled")
