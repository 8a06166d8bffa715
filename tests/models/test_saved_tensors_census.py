"""benchmarks/saved_tensors_census.py on the CPU: the census counts what autograd keeps, once per
storage, charged to the right block; bad options are refused."""

import importlib
import json
from pathlib import Path

import pytest
import torch


@pytest.fixture
def census(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    return importlib.import_module("saved_tensors_census")


class _Toy(torch.nn.Module):
    """Two blocks (Linear layers, each saving its input) and, between them at the root, a product
    that saves h and a view of h (one storage)."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4, bias=False) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            h = layer(x)           # saves x (the block input) for the weight gradient
            x = h * h[:, :4]       # saves h once: the view shares its storage
        return x.sum()


def test_census_counts_each_storage_once_and_charges_blocks(census):
    model = _Toy()
    x = torch.randn(5, 4, requires_grad=True)
    r = census.census(model, lambda: model(x), tokens=5, autocast=False, device=torch.device("cpu"))
    per_block = {k: v for k, v in r["sites"].items() if k.startswith("layers.*")}
    # each block keeps its input, the root keeps each h once ([5, 4] float32, 80 B each)
    total = sum(v[0] for v in r["sites"].values())
    assert total == 4 * 80, r["sites"]
    assert sum(v[0] for v in per_block.values()) == 2 * 80
    assert set(per_block) == {"layers.* | torch"}  # no package frame: torch's own Linear
    assert r["allocated"] is None  # CPU: no allocator count
    assert all(v[2] == ["float32"] for v in r["sites"].values())


def test_census_end_to_end_on_cpu(census, tmp_path):
    rc = census.main(["--out", str(tmp_path), "--models", "deltanet-340m", "--regimes", "bf16",
                      "--tokens", "32", "--layers", "1", "--device", "cpu"])
    assert rc == 0
    data = json.loads((tmp_path / "census.json").read_text())
    r = data["results"]["deltanet-340m bf16"]
    assert r["per_layer_total"] > 0 and r["outside_total"] > 0
    # bf16 parameters: the two ways of finding one layer's share agree
    assert r["per_layer_total"] == pytest.approx(r["hooked_diff_per_layer"], rel=0.05)
    sites = " ".join(r["sites"])
    assert "layers.*.mlp" in sites and "deltanet/layers/mlp.py" in sites
    assert "| deltanet-340m | bf16 |" in (tmp_path / "census.md").read_text()


@pytest.mark.parametrize("argv, match", [
    (["--regimes", "fp8"], "--regimes takes bf16 and/or autocast"),
    (["--tokens", "0"], "--tokens and --layers must be >= 1"),
])
def test_census_rejects_bad_options(census, tmp_path, argv, match):
    with pytest.raises(ValueError, match=match):
        census.main(["--out", str(tmp_path), *argv])


def test_census_records_a_missing_model_and_fails(census, tmp_path):
    rc = census.main(["--out", str(tmp_path), "--models", "no-such-preset", "--regimes", "bf16",
                      "--tokens", "8", "--layers", "1", "--device", "cpu"])
    assert rc == 1
    assert "error" in json.loads((tmp_path / "census.json").read_text())["results"]["no-such-preset bf16"]


def test_storage_rule_counts_a_released_address_again(census):
    """A storage counts once while a tensor saved from it is alive; once every such tensor is gone
    (the forward released it), the same address holds a new buffer and counts again."""
    from activation_memory import StorageSorter

    model = torch.nn.Linear(3, 3)
    sorter = StorageSorter(model, tokens=5)
    buf = torch.zeros(5, 4)
    first = buf[:, :2]
    assert sorter.sort(first) == "token"
    view = buf[:, 2:]
    assert sorter.sort(view) is None  # same storage, first still alive
    del first, view
    assert sorter.sort(buf[:, :1]) == "token"  # every earlier saver released: a new buffer
    assert sorter.sort(model.weight) is None  # parameters never count
    assert sorter.sort(torch.zeros(3, 3)) == "step"  # weight-shaped, no token dimension
