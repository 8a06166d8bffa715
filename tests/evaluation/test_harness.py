"""lm-eval adapter on a local multiple-choice task, checked against a direct computation."""

import json

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install 'deltanet[eval]'")
pytest.importorskip("accelerate", reason="lm-eval's HF backend needs accelerate")

import deltanet.models  # noqa: E402,F401  (registers the Auto classes)
from deltanet.cli.eval_harness import cli_main  # noqa: E402
from deltanet.evaluation.harness import evaluate, hf_tokenizer  # noqa: E402
from deltanet.models import DeltaNetConfig, DeltaNetForCausalLM  # noqa: E402
from deltanet.training.tokenizer import ByteTokenizer, train_bpe  # noqa: E402

DOCS = [
    {"question": "2 + 2 =", "choices": ["4", "5", "22"], "answer": 0},
    {"question": "The sky is", "choices": ["green", "blue"], "answer": 1},
    {"question": "def f(x): return", "choices": ["x", "None", "x + 1", "0"], "answer": 0},
    {"question": "import numpy as", "choices": ["np", "pd"], "answer": 0},
    {"question": "Paris is in", "choices": ["France", "Spain", "Italy"], "answer": 0},
    {"question": "for i in", "choices": ["range(10):", "while:"], "answer": 0},
]

TASK_YAML = """task: tiny_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def local_task(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    data = root / "tasks" / "data.jsonl"
    data.parent.mkdir()
    data.write_text("\n".join(json.dumps(d) for d in DOCS) + "\n")
    (root / "tasks" / "tiny_local_mc.yaml").write_text(TASK_YAML.format(data=data))
    torch.manual_seed(0)
    model = DeltaNetForCausalLM(DeltaNetConfig(
        vocab_size=257, hidden_size=32, num_hidden_layers=2, num_heads=2,
        layer_types=["delta_net", "sliding_attention"], sliding_window=8,
        max_position_embeddings=256, bos_token_id=None, eos_token_id=256))
    ckpt = root / "ckpt"
    model.save_pretrained(ckpt)
    ByteTokenizer().save(ckpt)
    return root, model.eval()


def direct_loglikelihoods(model, question, choice):
    """log p(" " + choice | question) token by token (bytes), and whether it is greedy."""
    ctx = list(question.encode())
    ids = ctx + list((" " + choice).encode())
    with torch.no_grad():
        logp = model(torch.tensor([ids]), use_cache=False).logits[0].double().log_softmax(-1)
    cont = torch.tensor(ids[len(ctx):])
    rows = logp[len(ctx) - 1 : len(ids) - 1]
    return float(rows.gather(1, cont[:, None]).sum()), bool((rows.argmax(-1) == cont).all())


def test_local_task_matches_direct_computation(local_task):
    root, model = local_task
    out = evaluate(root / "ckpt", ["tiny_local_mc"], include_path=root / "tasks", device="cpu",
                   batch_size=4, log_samples=True)
    expected_correct = []
    samples = sorted(out["samples"]["tiny_local_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(DOCS)
    for doc, sample in zip(DOCS, samples):
        ours = [direct_loglikelihoods(model, doc["question"], c) for c in doc["choices"]]
        theirs = [tuple(r[0]) for r in sample["resps"]]
        for (ll, greedy), (ll_h, greedy_h) in zip(ours, theirs):
            assert ll_h == pytest.approx(ll, abs=1e-4)
            assert greedy_h == greedy
        best = max(range(len(ours)), key=lambda i: ours[i][0])
        expected_correct.append(best == doc["answer"])
    acc = out["results"]["tiny_local_mc"]["acc,none"]
    assert acc == pytest.approx(sum(expected_correct) / len(DOCS))


def test_cli(local_task, tmp_path, capsys):
    root, _ = local_task
    out = tmp_path / "res.json"
    rc = cli_main([str(root / "ckpt"), "--tasks", "tiny_local_mc", "--include-path",
                   str(root / "tasks"), "--device", "cpu", "--limit", "3", "--output", str(out)])
    assert rc == 0
    assert "tiny_local_mc" in capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["n-samples"]["tiny_local_mc"] == {"original": len(DOCS), "effective": 3}
    assert cli_main([str(root / "missing"), "--tasks", "tiny_local_mc"]) == 2
    assert cli_main([str(root / "ckpt"), "--tasks", "no_such_task_xyz", "--include-path",
                     str(root / "tasks"), "--device", "cpu"]) == 2
    with pytest.raises(SystemExit):
        cli_main([str(root / "ckpt"), "--tasks", "x", "--bogus"])


def test_hf_tokenizer_encodes_like_ours():
    byte = hf_tokenizer(ByteTokenizer())
    text = "héllo\n\tworld  ∑"
    assert byte.encode(text) == ByteTokenizer().encode_batch([text])[0]
    assert byte.decode(byte.encode(text)) == text
    bpe = train_bpe(iter(["def f(x):\n    return x + 1\n"] * 50 + ["hello world"] * 20), vocab_size=300)
    tok = hf_tokenizer(bpe)
    for t in ["def g(y):\n    return y\n", "hello  world!", "ünïcode"]:
        assert tok.encode(t) == bpe.encode_batch([t])[0]
    assert tok.eos_token_id == bpe.eos_id
    with pytest.raises(TypeError, match="tokenizer"):
        hf_tokenizer(object())


def test_registered_with_lm_eval_by_name(local_task):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from deltanet.evaluation.harness import DeltaNetLM

    root, model = local_task
    out = lm_eval.simple_evaluate(
        model="deltanet", model_args=f"pretrained={root / 'ckpt'},device=cpu,batch_size=2",
        tasks=["tiny_local_mc"],
        task_manager=TaskManager(include_path=str(root / "tasks"), include_defaults=False),
    )
    direct = [max(range(len(d["choices"])),
                  key=lambda i: direct_loglikelihoods(model, d["question"], d["choices"][i])[0])
              == d["answer"] for d in DOCS]
    assert out["results"]["tiny_local_mc"]["acc,none"] == pytest.approx(sum(direct) / len(DOCS))
    assert issubclass(DeltaNetLM, lm_eval.api.model.LM)
