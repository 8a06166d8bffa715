"""The model on the Triton backends (chunk for training/prefill, fused recurrent for decode
steps) agrees with the PyTorch backend. On CPU the kernels run in the Triton interpreter,
which must be switched on before they are imported: hence a fresh subprocess."""

import os
import subprocess
import sys
import textwrap

import torch

SCRIPT = textwrap.dedent("""
    import os
    if not __import__("torch").cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from deltanet.models import DeltaNetConfig, DeltaNetForCausalLM

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    cfg = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_heads=2, intermediate_size=64,
               pad_token_id=0, layer_types=["delta_net", "sliding_attention"], sliding_window=6)
    tri = DeltaNetForCausalLM(DeltaNetConfig(delta_backend="triton", **cfg)).to(dev).eval()
    ref = DeltaNetForCausalLM(DeltaNetConfig(delta_backend="torch", **cfg)).to(dev).eval()
    ref.load_state_dict(tri.state_dict())
    ids = torch.randint(1, 50, (2, 20), device=dev)

    def err(a, b):
        return ((a - b).norm() / b.norm()).item()

    with torch.no_grad():
        e = err(tri(ids, use_cache=False).logits, ref(ids, use_cache=False).logits)
        assert e < 1e-5, f"forward: {e}"
        cu = torch.tensor([0, 7, 20], device=dev)
        e = err(tri(ids[:1], cu_seqlens=cu).logits, ref(ids[:1], cu_seqlens=cu).logits)
        assert e < 1e-5, f"packed: {e}"
        a = tri.generate(ids, max_new_tokens=4, do_sample=False)
        b = ref.generate(ids, max_new_tokens=4, do_sample=False)
        assert torch.equal(a, b), f"generate: {a} != {b}"
    tri.train(); ref.train()
    tri(ids, labels=ids).loss.backward()
    ref(ids, labels=ids).loss.backward()
    for (name, p), q in zip(tri.named_parameters(), ref.parameters()):
        assert err(p.grad, q.grad) < 1e-4, f"grad {name}: {err(p.grad, q.grad)}"
    print("OK")
""")


def test_model_on_triton_backends_matches_torch_backend():
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-1500:]


def test_decode_steps_choose_the_recurrent_form():
    from deltanet.layers.delta_net import resolve_backend

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_backend("auto", 1, cuda, decoding=True) == "recurrent"
    assert resolve_backend("auto", 1, cpu, decoding=True) == "reference"
    assert resolve_backend("triton", 1, cpu, decoding=True) == "recurrent"
    assert resolve_backend("auto", 5, cuda, decoding=True) == "auto"  # multi-token steps: chunkwise
    assert resolve_backend("auto", 1, cuda, decoding=False) == "auto"  # a one-token prompt
