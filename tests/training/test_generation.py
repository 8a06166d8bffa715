"""Text generation (deltanet/training/generation.py): batches with left padding, streaming, EOS."""

import io

import pytest
import torch

from deltanet.models import DeltaNetConfig, DeltaNetForCausalLM
from deltanet.training.generation import generate_texts, print_generation, read_prompts
from deltanet.training.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def model():
    cfg = DeltaNetConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_heads=2, intermediate_size=64,
                         layer_types=["delta_net", "sliding_attention"], sliding_window=6, delta_backend="torch")
    torch.manual_seed(0)
    return DeltaNetForCausalLM(cfg).eval()


def test_a_batch_generates_what_each_prompt_does_alone(model):
    tok = ByteTokenizer()
    prompts = ["def f(x):", "a", "class C:\n  pass"]
    batch = generate_texts(model, tok, prompts, max_new_tokens=10, temperature=0)
    for p, text in zip(prompts, batch.texts):
        assert generate_texts(model, tok, [p], max_new_tokens=10, temperature=0).texts == [text]
    assert batch.batch == 3 and batch.tokens_per_s > 0


def test_streamed_text_is_the_result_and_ids_beyond_the_tokenizer_never_appear(model):
    tok = ByteTokenizer()
    chunks = {0: [], 1: []}
    ids = []
    orig = tok.decode
    tok.decode = lambda xs: (ids.append(list(xs)), orig(xs))[1]
    report = generate_texts(model, tok, ["xy", "hello"], max_new_tokens=16, temperature=1.0, top_k=50, seed=3,
                            emit=lambda row, s: chunks[row].append(s))
    assert ["".join(chunks[i]) for i in (0, 1)] == report.texts
    assert all(0 <= i < 257 for xs in ids for i in xs)  # the model's vocab is 300: ids 257+ suppressed


def test_print_generation_streams_one_prompt_and_blocks_a_batch(model, tmp_path):
    tok = ByteTokenizer()
    out, err = io.StringIO(), io.StringIO()
    print_generation(model, tok, ["ab"], out=out, err=err, max_new_tokens=5, temperature=0)
    assert out.getvalue().startswith("ab") and "tokens/s" in err.getvalue()
    f = tmp_path / "prompts.txt"
    f.write_text("one\n\ntwo\\nlines\n")
    prompts = read_prompts(str(f))
    assert prompts == ["one", "two\nlines"]
    out = io.StringIO()
    print_generation(model, tok, prompts, out=out, err=io.StringIO(), max_new_tokens=4, temperature=0)
    assert out.getvalue().startswith("### 0\none") and "### 1\ntwo\nlines" in out.getvalue()
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(str(tmp_path / "empty.txt"))


def test_summary_names_the_steady_rate_when_a_graph_was_captured():
    from deltanet.training.generation import GenerationReport

    base = dict(texts=["x"], new_tokens=8, batch=2, prefill_s=0.1, decode_s=0.7, cuda_graph=True)
    assert "after the graph's capture" not in GenerationReport(**base).summary()
    text = GenerationReport(**base, steady_tokens_per_s=1234.5).summary()
    assert "1,234.5 after the graph's capture" in text and "decode 20.0 tokens/s" in text, text
