"""DeltaNetForCausalLM for every layer mix: cache, generate, save/load, padding, packing, training."""

import pytest
import torch

import deltanet.models  # noqa: F401  (registers the Auto classes)
from deltanet.models import DeltaNetCache, DeltaNetConfig, DeltaNetForCausalLM
from tests.utils import assert_close

VOCAB = 61
MIXES = {
    "delta": ["delta_net"] * 2,
    "swa_hybrid": ["delta_net", "sliding_attention", "delta_net", "sliding_attention"],
    "global_hybrid": ["delta_net", "full_attention", "delta_net"],
    "transformer": ["full_attention"] * 2,
    "linear": ["linear_attention"] * 2,
    "all": ["delta_net", "sliding_attention", "linear_attention", "full_attention"],
    "gated": ["gated_delta_net"] * 2,
    "gated_product": ["gated_delta_product", "gated_delta_product"],
    "gated_swa_hybrid": ["gated_delta_net", "sliding_attention", "gated_delta_product"],
    "product_global_hybrid": ["delta_product", "full_attention"],
}


def make_model(mix: str, dtype=torch.float64, **kw) -> DeltaNetForCausalLM:
    types = MIXES[mix]
    cfg = DeltaNetConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=len(types), num_heads=2,
                         num_kv_heads=1, intermediate_size=64, layer_types=types, sliding_window=5,
                         delta_backend="torch", pad_token_id=0, bos_token_id=None, eos_token_id=None, **kw)
    torch.manual_seed(0)
    return DeltaNetForCausalLM(cfg).to(dtype).eval()


def logits(model, ids, **kw):
    with torch.no_grad():
        return model(ids, use_cache=False, **kw).logits


@pytest.mark.parametrize("mix", list(MIXES))
def test_cached_decoding_matches_full_forward(mix):
    model = make_model(mix)
    ids = torch.randint(1, VOCAB, (2, 19))  # longer than the sliding window (5)
    full = logits(model, ids)
    with torch.no_grad():
        out = model(ids[:, :7], use_cache=True)
        cache, steps = out.past_key_values, [out.logits]
        assert isinstance(cache, DeltaNetCache) and cache.get_seq_length() == 7
        for t in range(7, 19):
            out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
    assert_close(mix, torch.cat(steps, 1), full)
    for layer, kind in zip(cache.layers, MIXES[mix]):
        if kind == "sliding_attention":
            assert layer.k.shape[1] == 5  # only the window is kept
        elif kind == "full_attention":
            assert layer.k.shape[1] == 19


@pytest.mark.parametrize("mix", list(MIXES))
def test_generate_equals_greedy_recomputation(mix):
    model = make_model(mix)
    prompt = torch.randint(1, VOCAB, (2, 6))
    generated = model.generate(prompt, max_new_tokens=8, do_sample=False)
    seq = prompt
    for _ in range(8):  # no cache: recompute the whole sequence each step
        nxt = logits(model, seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(generated, seq)


def test_beam_search_with_cache_equals_without():
    """Beam search reorders the cache (DeltaNetCache.reorder_cache) between steps."""
    model = make_model("all")
    prompt = torch.randint(1, VOCAB, (2, 6))
    kw = dict(max_new_tokens=6, num_beams=3, do_sample=False)
    assert torch.equal(model.generate(prompt, **kw), model.generate(prompt, use_cache=False, **kw))


@pytest.mark.parametrize("mix", ["swa_hybrid", "all"])
def test_left_padded_generation_equals_single_sequences(mix):
    model = make_model(mix)
    a, b = torch.randint(1, VOCAB, (1, 9)), torch.randint(1, VOCAB, (1, 4))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])
    mask = (torch.arange(9)[None] >= torch.tensor([[0], [5]])).long()
    out = model.generate(batch, attention_mask=mask, max_new_tokens=7, do_sample=False)
    single_a = model.generate(a, max_new_tokens=7, do_sample=False)
    single_b = model.generate(b, max_new_tokens=7, do_sample=False)
    assert torch.equal(out[0, 9:], single_a[0, 9:])
    assert torch.equal(out[1, 9:], single_b[0, 4:])


@pytest.mark.parametrize("mix", list(MIXES))
def test_padded_batch_matches_single_sequences(mix):
    model = make_model(mix)
    a, b = torch.randint(1, VOCAB, (1, 12)), torch.randint(1, VOCAB, (1, 7))
    batch = torch.cat([a, torch.cat([torch.full((1, 5), 3), b], 1)])  # left padding with a real token id
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :5] = 0
    out = logits(model, batch, attention_mask=mask)
    assert_close("row a", out[:1], logits(model, a))
    assert_close("row b", out[1:, 5:], logits(model, b))


@pytest.mark.parametrize("mix", list(MIXES))
def test_packed_documents_match_separate_documents(mix):
    model = make_model(mix)
    ids = torch.randint(1, VOCAB, (1, 23))
    bounds = [0, 3, 11, 23]  # one document shorter than the conv kernel and the window
    packed = logits(model, ids, cu_seqlens=torch.tensor(bounds))
    separate = torch.cat([logits(model, ids[:, s:e]) for s, e in zip(bounds[:-1], bounds[1:])], 1)
    assert_close(mix, packed, separate)


@pytest.mark.parametrize("mix", list(MIXES))
def test_save_load_round_trip(mix, tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_model(mix, dtype=torch.float32)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is DeltaNetForCausalLM
    ids = torch.randint(1, VOCAB, (2, 10))
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_tied_embeddings_survive_save_load(tmp_path):
    model = make_model("delta", dtype=torch.float32, tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(tmp_path)
    loaded = DeltaNetForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


@pytest.mark.parametrize("mix", list(MIXES))
def test_training_step_gives_finite_gradients(mix):
    model = make_model(mix, dtype=torch.float32).train()
    ids = torch.randint(1, VOCAB, (2, 16))
    labels = ids.clone()
    labels[:, :3] = -100
    out = model(ids, labels=labels)
    assert out.past_key_values is None  # no cache while training
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} gets no gradient"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt.step()
    assert model(ids, labels=labels).loss < out.loss


def test_loss_is_shifted_and_ignores_minus_100():
    model = make_model("delta")
    ids = torch.randint(1, VOCAB, (2, 9))
    labels = ids.clone()
    labels[0, 4] = -100
    out = model(ids, labels=labels, use_cache=False)
    lp = out.logits[:, :-1].log_softmax(-1)
    nll = -lp.gather(-1, ids[:, 1:, None])[..., 0]
    keep = labels[:, 1:] != -100
    assert_close("loss", out.loss, nll[keep].mean())


def test_fused_linear_cross_entropy_matches_plain_loss():
    plain = make_model("swa_hybrid", fuse_linear_cross_entropy=False).train()
    fused = make_model("swa_hybrid", fuse_linear_cross_entropy=True).train()
    ids = torch.randint(1, VOCAB, (2, 15))
    labels = ids.clone()
    labels[1, 2:6] = -100
    a, b = plain(ids, labels=labels), fused(ids, labels=labels)
    assert b.logits is None
    assert_close("loss", b.loss, a.loss)
    a.loss.backward()
    b.loss.backward()
    for (name, p), q in zip(plain.named_parameters(), fused.parameters()):
        assert_close(name, q.grad, p.grad, rtol=1e-9)


def test_gradient_checkpointing_gives_the_same_gradients():
    ref, ckpt = make_model("all").train(), make_model("all").train()
    enable = getattr(ckpt, "activation_checkpointing_enable", None) or ckpt.gradient_checkpointing_enable
    enable()  # transformers >= 5.2x renamed gradient_checkpointing_enable
    assert ckpt.model.gradient_checkpointing
    calls = []
    ckpt.model.layers[0].attn.register_forward_hook(lambda *_: calls.append(1))
    ids = torch.randint(1, VOCAB, (2, 12))
    ref(ids, labels=ids).loss.backward()
    ckpt(ids, labels=ids).loss.backward()
    assert len(calls) == 2  # the mixer ran again in backward: its activations were not stored
    for (name, p), q in zip(ref.named_parameters(), ckpt.parameters()):
        assert_close(name, q.grad, p.grad, rtol=1e-9)


def test_bad_calls_raise():
    model = make_model("all")
    ids = torch.randint(1, VOCAB, (2, 6))
    with pytest.raises(ValueError, match="batch size 1"):
        model(ids, cu_seqlens=torch.tensor([0, 2, 6]))
    with pytest.raises(ValueError, match="cannot be combined with a cache"):
        model(ids[:1], cu_seqlens=torch.tensor([0, 2, 6]), use_cache=True)
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        model(ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model()
    with pytest.raises(ValueError, match="cu_seqlens must end at T"):
        model(ids[:1], cu_seqlens=torch.tensor([0, 2, 5]), use_cache=False)
