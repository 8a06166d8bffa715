"""Tokenizers (BPE training, bytes, tokenizer.json) and the typed config."""

from __future__ import annotations

import pytest

from deltanet.training.config import ConfigError, RunConfig, load_config_file
from deltanet.training.tokenizer import (ByteTokenizer, TokenizerError, load_tokenizer, make_tokenizer,
                                         train_bpe)

TEXT = "def naïve(x):\n    return x ** 2  # ünïcödé ✓\n"


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(iter([TEXT * 3, "class A:\n    pass\n"] * 30), vocab_size=320)


def test_bpe_roundtrip_and_token_bytes(bpe):
    ids = bpe.encode_batch([TEXT])[0]
    assert bpe.decode(ids) == TEXT
    assert len(ids) < len(TEXT.encode())  # merges happened
    assert bpe.token_bytes()[ids].sum() == len(TEXT.encode())  # exact bytes per token
    assert bpe.token_bytes()[bpe.eos_id] == 0 and bpe.vocab_size <= 320


def test_bytes_tokenizer():
    t = ByteTokenizer()
    ids = t.encode_batch([TEXT])[0]
    assert t.decode(ids + [t.eos_id]) == TEXT and t.token_bytes()[ids].sum() == len(ids)


def test_save_load_roundtrip(bpe, tmp_path):
    bpe.save(tmp_path / "run")
    back = load_tokenizer(tmp_path / "run")
    assert back.encode_batch([TEXT]) == bpe.encode_batch([TEXT]) and back.eos_id == bpe.eos_id
    assert back.fingerprint() == bpe.fingerprint()
    via_file = make_tokenizer(str(tmp_path / "run" / "tokenizer.json"))  # any tokenizer.json path
    assert via_file.eos_id == bpe.eos_id and via_file.encode_batch([TEXT]) == bpe.encode_batch([TEXT])
    ByteTokenizer().save(tmp_path / "b")
    assert isinstance(load_tokenizer(tmp_path / "b"), ByteTokenizer)


def test_bad_tokenizer_specs(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        make_tokenizer(str(tmp_path / "nope.json"))
    (tmp_path / "tokenizer_meta.json").write_text('{"kind": "bpe", "eos_id": 0}')
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="corrupt tokenizer"):
        load_tokenizer(tmp_path)


def test_config_flat_nested_and_errors(tmp_path):
    cfg = RunConfig.from_dict({"seq_len": 64, "optim": {"lr": 1}, "train": {"model": {"hidden_size": 32}}})
    assert cfg.data.seq_len == 64 and cfg.optim.lr == 1.0 and cfg.train.model == {"hidden_size": 32}
    with pytest.raises(ConfigError, match="unknown key 'sequence_length'"):
        RunConfig.from_dict({"sequence_length": 64})
    with pytest.raises(ConfigError, match="unknown key 'data.lr'"):
        RunConfig.from_dict({"data": {"lr": 1.0}})
    with pytest.raises(ConfigError, match="seq_len .* must be int"):
        RunConfig.from_dict({"seq_len": "64"})
    with pytest.raises(ConfigError, match="val_fraction"):
        RunConfig.from_dict({"val_fraction": 1.5}).validate()


@pytest.mark.parametrize("name,text", [
    ("run.toml", 'preset = "tiny"\n[data]\nseq_len = 48\n'),
    ("run.yaml", "preset: tiny\ndata:\n  seq_len: 48\n"),
    ("run.json", '{"preset": "tiny", "data": {"seq_len": 48}}'),
], ids=["toml", "yaml", "json"])
def test_config_files(tmp_path, name, text):
    if name.endswith(".yaml"):
        pytest.importorskip("yaml")
    (tmp_path / name).write_text(text)
    assert RunConfig.from_dict(load_config_file(tmp_path / name)).data.seq_len == 48


def test_config_file_errors(tmp_path):
    (tmp_path / "bad.toml").write_text("seq_len = = 3\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config_file(tmp_path / "bad.toml")
    (tmp_path / "x.ini").write_text("")
    with pytest.raises(ConfigError, match="must end in"):
        load_config_file(tmp_path / "x.ini")
    with pytest.raises(ConfigError, match="not found"):
        load_config_file(tmp_path / "missing.toml")


def test_cli_precedence(tmp_path):
    from deltanet.cli.train import build_train_config

    (tmp_path / "c.toml").write_text("seq_len = 48\nlr = 0.01\n")
    cfg = build_train_config(["--config", str(tmp_path / "c.toml"), "--lr", "0.02", "--model", "num_heads=4"])
    assert (cfg.data.seq_len, cfg.optim.lr, cfg.train.model) == (48, 0.02, {"num_heads": 4})
    default = build_train_config([])  # the no-argument run: tiny preset, stdlib, a wall-clock cap
    assert (default.train.preset, default.data.data, default.train.max_time_s) == ("tiny", "stdlib", 150.0)
    assert build_train_config(["--max-steps", "5"]).train.max_time_s == 0.0  # asked for a length: no cap
