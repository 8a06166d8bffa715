"""The ``deltanet`` CLI: routing, generate / eval ppl on a trained run, one-line errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from deltanet.cli import main
from tests.training._helpers import make_corpus, run_cli, train_args


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 6-step run with the default BPE tokenizer (small vocab) on a small corpus."""
    root = tmp_path_factory.mktemp("cli")
    data = make_corpus(root / "data")
    args = train_args(data, root / "run", root / "cache", "--tokenizer", "bpe", "--vocab-size", "320", steps=6)
    r = run_cli(args)
    assert r.returncode == 0, r.stderr
    assert "validation loss" in r.stdout and "bits/byte" in r.stdout and "sample" in r.stdout
    return root


def _one_line_error(capsys, argv, code, needle):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == code, err
    # progress lines may precede it; the error itself is one line, the last
    assert "Traceback" not in err and [ln for ln in err.splitlines() if "error" in ln] == [err.splitlines()[-1]], err
    assert needle in err.splitlines()[-1], err
    return err


def test_data_help_names_prepare(capsys):
    assert main(["data", "--help"]) == 0
    assert "deltanet data prepare" in capsys.readouterr().out
    assert main(["data"]) == 2  # no subcommand: the same usage, on stderr
    assert "deltanet data prepare" in capsys.readouterr().err
    _one_line_error(capsys, ["data", "prep"], 2, "expected 'deltanet data prepare [flags]'")


def test_help_is_fast_and_lists_commands():
    r = run_cli(["--help"], timeout=60)
    assert r.returncode == 0
    for cmd in ("train", "generate", "eval", "bench"):
        assert cmd in r.stdout


def test_generate_streams_text(run, capsys):
    assert main(["generate", "--checkpoint", str(run / "run"), "--prompt", "def ", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("def ") and len(out) > len("def \n")
    # greedy decoding is deterministic
    main(["generate", "--checkpoint", str(run / "run"), "--prompt", "x", "--max-new-tokens", "8", "--temperature", "0"])
    first = capsys.readouterr().out
    main(["generate", "--checkpoint", str(run / "run"), "--prompt", "x", "--max-new-tokens", "8", "--temperature", "0"])
    assert capsys.readouterr().out == first


def test_generate_batch_file_and_speed_report(run, capsys, tmp_path):
    (tmp_path / "p.txt").write_text("def \nclass \n")
    assert main(["generate", "--checkpoint", str(run / "run"), "--batch-file", str(tmp_path / "p.txt"),
                 "--max-new-tokens", "6", "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("### 0\ndef ") and "### 1\nclass " in out
    assert "tokens/s" in err and "(2 x " in err


def test_eval_ppl_matches_training_validation(run, capsys):
    assert main(["eval", "ppl", "--checkpoint", str(run / "run"), "--json", "--max-tokens", "256",
                 "--batch-size", "4"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["split"] == "val" and res["tokens"] > 0 and res["bytes"] > res["tokens"] * 0.5
    assert res["ppl"] == pytest.approx(2.718281828 ** res["loss"], rel=1e-6)
    recs = [json.loads(x) for x in (run / "run/metrics.jsonl").read_text().splitlines()]
    # same weights, same val rows (eval_batches=2 x batch 4 x 32 = 256 tokens): same loss
    assert res["loss"] == pytest.approx(recs[-1]["val_loss"], rel=1e-5)


def test_eval_ppl_longer_context_and_recall_split(run, capsys):
    """``--seq-len`` (2x the run's 32) and ``--recall-split`` end to end on a trained run."""
    ck = str(run / "run")
    assert main(["eval", "ppl", "--checkpoint", ck, "--json", "--recall-split", "--batch-size", "4"]) == 0
    base = json.loads(capsys.readouterr().out)
    assert base["seq_len"] == base["train_seq_len"] == 32
    hit, other = base["recall"]["hit"], base["recall"]["other"]
    # the corpus repeats "return x * j + i" in every function: plenty of recall hits
    assert hit["tokens"] > 0 and other["tokens"] > 0 and hit["tokens"] + other["tokens"] == base["tokens"]
    mean = (hit["loss"] * hit["tokens"] + other["loss"] * other["tokens"]) / base["tokens"]
    assert base["loss"] == pytest.approx(mean, rel=1e-5)
    assert main(["eval", "ppl", "--checkpoint", ck, "--json", "--seq-len", "64", "--batch-size", "2"]) == 0
    long = json.loads(capsys.readouterr().out)
    assert long["seq_len"] == 64 and "recall" not in long
    # rows of 64 tokens: 63 targets each instead of 2 x 31
    assert long["tokens"] == base["tokens"] // 62 * 63
    assert main(["eval", "ppl", "--checkpoint", ck, "--recall-split", "--seq-len", "64"]) == 0
    text = capsys.readouterr().out
    assert "seq_len 64 (trained at 32)" in text and "recall hit" in text and "recall other" in text


@pytest.mark.parametrize("argv,code,needle", [
    (["train", "--bogus-flag"], 2, "unrecognized arguments: --bogus-flag"),
    (["train", "--seq-len", "abc"], 2, "invalid int value"),
    (["train", "--data", "/no/such/dir", "--max-steps", "1", "--out", "OUT"], 1, "data path not found: /no/such/dir"),
    (["train", "--lr", "-1"], 2, "lr must be >= 0"),
    (["train", "--preset", "nope", "--tokenizer", "bytes", "--data", "EMPTY"], 2, "unknown preset"),
    (["frobnicate"], 2, "invalid choice"),
    (["eval", "nosuchtask"], 2, "invalid choice"),
    (["generate", "--checkpoint", "/no/such/run"], 1, "checkpoint path not found"),
], ids=["unknown-flag", "bad-int", "missing-data", "bad-lr", "bad-preset", "bad-command", "bad-task", "no-ckpt"])
def test_one_line_errors(capsys, tmp_path, argv, code, needle):
    if "EMPTY" in argv:
        make_corpus(tmp_path / "d", n_files=3)
        argv = [*argv[:-1], str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c")]
    argv = [str(tmp_path / "o") if a == "OUT" else a for a in argv]
    _one_line_error(capsys, argv, code, needle)
    assert not (tmp_path / "o").exists(), "a run that failed to start left its folder behind"


def test_failed_start_leaves_no_run_folder(capsys, tmp_path, monkeypatch):
    """Without --out the run folder is runs/<preset>-<time> in the working directory: not even runs/ stays."""
    monkeypatch.chdir(tmp_path)
    make_corpus(tmp_path / "d", n_files=1)  # one file: no validation split's worth of text
    _one_line_error(capsys, ["train", "--data", "/no/such/dir", "--max-steps", "1"], 1, "data path not found")
    _one_line_error(capsys, ["train", "--data", str(tmp_path / "d"), "--tokenizer", "bytes", "--seq-len", "4096",
                             "--cache-dir", str(tmp_path / "c"), "--no-progress"], 1, "fewer than seq_len=4096")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "d"]


@pytest.mark.parametrize("how", ["flag", "config-file"])
def test_misspelt_model_field_is_an_error(capsys, tmp_path, how):
    if how == "flag":
        argv, needle = ["--model", "nosuchfield=1"], "unknown model field 'nosuchfield'"
    else:
        (tmp_path / "c.toml").write_text("[model]\nnum_hidden_layer = 2\n")
        argv, needle = ["--config", str(tmp_path / "c.toml")], "'num_hidden_layer' (did you mean 'num_hidden_layers'?)"
    _one_line_error(capsys, ["train", *argv, "--out", str(tmp_path / "o"), "--max-steps", "1"], 2, needle)
    assert not (tmp_path / "o").exists()


def test_unknown_config_section_names_the_valid_ones(capsys, tmp_path):
    (tmp_path / "c.toml").write_text("[trian]\nmax_steps = 2\n")
    _one_line_error(capsys, ["train", "--config", str(tmp_path / "c.toml")], 2,
                    "unknown section [trian] in the config file (valid sections: data, optim, train, model)")


@pytest.mark.parametrize("flag,value,needle", [
    ("--max-new-tokens", "-3", "--max-new-tokens must be >= 1"),
    ("--temperature", "-1", "--temperature must be >= 0"),
    ("--top-p", "0", "--top-p must be in (0, 1]"),
    ("--top-k", "-1", "--top-k must be >= 0"),
], ids=["max-new-tokens", "temperature", "top-p", "top-k"])
def test_generate_checks_arguments_before_loading(capsys, run, flag, value, needle):
    rc = main(["generate", "--checkpoint", str(run / "run"), "--prompt", "hello", flag, value])
    out, err = capsys.readouterr()
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert out == ""  # the prompt was not echoed: nothing was loaded


def _fresh_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_cli_import_does_not_load_torch_or_transformers():
    """`deltanet --help` and `deltanet train --help` must not pay for torch + transformers (~4 s)."""
    code = ("import sys\nfrom deltanet.cli import main\n"
            "for argv in (['--help'], ['train', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print('HEAVY', sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    r = _fresh_python(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "HEAVY []"


def test_import_deltanet_still_registers_auto_classes():
    code = ("import deltanet\nfrom transformers import AutoConfig, AutoModelForCausalLM\n"
            "c = AutoConfig.for_model('deltanet', vocab_size=64, hidden_size=32, num_hidden_layers=1, num_heads=2)\n"
            "m = AutoModelForCausalLM.from_config(c)\n"
            "print(type(c).__name__, type(m).__name__, deltanet.DeltaNetForCausalLM is type(m))")
    r = _fresh_python(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["DeltaNetConfig", "DeltaNetForCausalLM", "True"]


def test_unknown_config_key(capsys, tmp_path):
    (tmp_path / "c.toml").write_text("seq_len = 32\nlearning_rate = 0.1\n")
    _one_line_error(capsys, ["train", "--config", str(tmp_path / "c.toml")], 2, "unknown key 'learning_rate'")


def test_empty_corpus(capsys, tmp_path):
    (tmp_path / "d").mkdir()
    for i in range(3):
        (tmp_path / "d" / f"{i}.bin").write_bytes(b"\xff\xfe\x00binary")
    _one_line_error(capsys, ["train", "--data", str(tmp_path / "d"), "--tokenizer", "bytes", "--out",
                             str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c"), "--no-progress"],
                    1, "no usable training text")


def test_corrupt_checkpoint(capsys, run, tmp_path):
    bad = tmp_path / "run"
    shutil.copytree(run / "run", bad)
    ckpt = bad / "checkpoints" / (bad / "checkpoints/latest").read_text().strip()
    (ckpt / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    _one_line_error(capsys, ["generate", "--checkpoint", str(bad)], 1, "corrupt checkpoint")
    _one_line_error(capsys, ["eval", "ppl", "--checkpoint", str(bad)], 1, "corrupt checkpoint")


def test_mismatched_resume(capsys, run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run / "run", out)
    _one_line_error(capsys, ["train", "--out", str(out), "--resume", "--seq-len", "64"], 1,
                    "cannot resume: seq_len is 64 but the run was started with 32")
    _one_line_error(capsys, ["train", "--out", str(out), "--resume", "--model", "hidden_size=96"], 1,
                    "cannot resume: model is")
    _one_line_error(capsys, ["train", "--out", str(out), "--max-steps", "1"], 1, "already holds a run")


def test_resume_may_change_activation_checkpointing_and_the_loss_path(run, tmp_path):
    """Recomputing changes no step's result, only its memory and time: a run that ran out of
    memory can resume with ``--activation-checkpointing block``; likewise the loss may switch
    between fused and ``--plain-loss`` (other model fields may not change)."""
    out = tmp_path / "run"
    shutil.copytree(run / "run", out)
    first = out / "checkpoints" / (out / "checkpoints/latest").read_text().strip()
    assert json.loads((first / "config.json").read_text())["fuse_linear_cross_entropy"] is True  # the default
    r = run_cli(["train", "--out", str(out), "--resume", "--max-steps", "7", "--activation-checkpointing", "block",
                 "--plain-loss", "--sample-tokens", "0", "--no-progress"])
    assert r.returncode == 0, r.stderr
    latest = out / "checkpoints" / (out / "checkpoints/latest").read_text().strip()
    assert latest.name.endswith("7")
    saved = json.loads((latest / "config.json").read_text())
    assert saved["activation_checkpointing"] == "block" and saved["fuse_linear_cross_entropy"] is False
    model = json.loads((out / "config.json").read_text())["train"]["model"]
    assert model["activation_checkpointing"] == "block" and model["fuse_linear_cross_entropy"] is False


def test_plain_loss_flag_sets_the_model_field():
    from deltanet.cli import UsageError
    from deltanet.cli.train import build_train_config

    assert "fuse_linear_cross_entropy" not in build_train_config([]).train.model  # the config default: fused
    assert build_train_config(["--plain-loss"]).train.model == {"fuse_linear_cross_entropy": False}
    # agreeing spellings are fine; contradicting ones are a usage error, not a silent pick
    assert build_train_config(["--plain-loss", "--model", "fuse_linear_cross_entropy=false"]).train.model == {
        "fuse_linear_cross_entropy": False}
    with pytest.raises(UsageError, match="--plain-loss contradicts --model fuse_linear_cross_entropy=true"):
        build_train_config(["--plain-loss", "--model", "fuse_linear_cross_entropy=true"])


def test_missing_delegate_is_a_clear_error(capsys, monkeypatch):
    import deltanet.cli as cli

    monkeypatch.setitem(cli.BENCHES, "kernels", ("deltanet.bench.does_not_exist", False))
    _one_line_error(capsys, ["bench", "kernels"], 2, "not available in this installation")


def test_delegation_passes_argv(monkeypatch):
    import sys
    import types

    import deltanet.cli as cli

    seen = {}
    fake = types.ModuleType("fake_bench")
    fake.cli_main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "fake_bench", fake)
    monkeypatch.setitem(cli.BENCHES, "decode", ("fake_bench", True))
    assert main(["bench", "decode", "--batch", "4"]) == 0
    assert seen["argv"] == ["decode", "--batch", "4"]


@pytest.mark.parametrize("task,flags", [("mqar", ["--vocab-size", "--lr", "--train-size", "--widths"]),
                                        ("state-tracking", ["--train-len", "--lr", "--width", "--train-size"])])
def test_eval_task_help_shows_defaults(capsys, task, flags):
    with pytest.raises(SystemExit):
        main(["eval", task, "--help"])
    blocks = {b.split()[0]: " ".join(b.split()) for b in re.split(r"\n  (?=-)", capsys.readouterr().out)}
    for flag in flags:
        assert "(default: " in blocks[flag], blocks[flag]


def test_data_prepare_reads_data_settings_as_train_does(tmp_path):
    """`deltanet data prepare` and `deltanet train` share the data flags and the config-file merge:
    the same flags and file give the same DataConfig (so train reuses the cache prepare built)."""
    from deltanet.cli.data import build_data_config, data_parser
    from deltanet.cli.train import build_train_config, train_parser

    def data_flags(p):
        return {a.option_strings[0]: (a.dest, a.type, a.help) for a in p._actions
                if a.option_strings and a.dest not in ("help", "config", "progress")}

    assert data_flags(data_parser()).items() <= data_flags(train_parser()).items()
    (tmp_path / "c.toml").write_text('tokenizer = "bytes"\n[data]\nseq_len = 64\nval_fraction = 0.2\n'
                                     '[optim]\nlr = 0.5\n[train]\nmax_steps = 3\n')
    flags = ["--config", str(tmp_path / "c.toml"), "--data", str(tmp_path), "--vocab-size", "300", "--no-doc-mask"]
    data_cfg, progress = build_data_config([*flags, "--no-progress"])
    assert data_cfg == build_train_config(flags).data and progress is False
    assert (data_cfg.tokenizer, data_cfg.seq_len, data_cfg.val_fraction, data_cfg.doc_mask) == ("bytes", 64, 0.2, False)
