"""The model on one CPU process: document masking, chunked CE, RoPE, GQA shapes, bad inputs."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megalong.attention.context_parallel import local_token_index
from megalong.attention.module import DocumentParams
from megalong.data.batch import PackedSample, make_micro_batch
from megalong.model.build import build_model, output_head
from megalong.model.config import RopeScaling, preset
from megalong.model.head import chunked_cross_entropy
from megalong.model.rope import inv_frequencies
from megalong.runtime.distributed import ParallelConfig, init_distributed


@pytest.fixture(scope="module", autouse=True)
def dist():
    os.environ.setdefault("MASTER_PORT", str(29600 + os.getpid() % 300))
    init_distributed(ParallelConfig())
    yield


def _model(**kw):
    torch.manual_seed(0)
    return build_model(preset("tiny", **kw)).eval()


def _logits(model, tokens, lengths, position_mode="continuous"):
    S = len(tokens)
    mb = make_micro_batch([PackedSample(np.asarray(tokens), np.ones(S), np.asarray(lengths))],
                          position_mode=position_mode)
    with torch.no_grad():
        return model(mb.tokens, mb.position_ids, None, packed_seq_params=DocumentParams.for_micro_batch(mb))[0]


@pytest.mark.parametrize("position_mode", ["continuous", "reset"])
def test_packed_sequence_equals_documents_run_alone(position_mode):
    model = _model()
    rng = np.random.default_rng(1)
    lengths = [7, 19, 1, 13]
    tokens = rng.integers(0, 256, sum(lengths))
    packed = _logits(model, tokens, lengths, position_mode)
    start = 0
    for n in lengths:
        doc = torch.as_tensor(tokens[start:start + n])[None]
        pos = torch.arange(n)[None] + (start if position_mode == "continuous" else 0)
        mb_params = DocumentParams(qkv_format="sbhd", cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32),
                                   cu_seqlens_kv=torch.tensor([0, n], dtype=torch.int32), max_seqlen_q=n,
                                   max_seqlen_kv=n, position_ids=pos, batch=1, seq_len=n)
        with torch.no_grad():
            alone = model(doc, pos, None, packed_seq_params=mb_params)[0]
        torch.testing.assert_close(packed[start:start + n], alone, atol=1e-5, rtol=1e-5)
        start += n


def test_without_masking_documents_would_interact():
    """Guards the test above: one document of the same tokens gives different later logits."""
    model = _model()
    tokens = np.random.default_rng(2).integers(0, 256, 24)
    split, whole = _logits(model, tokens, [12, 12]), _logits(model, tokens, [24])
    torch.testing.assert_close(split[:12], whole[:12], atol=1e-5, rtol=1e-5)
    assert (split[12:] - whole[12:]).abs().max() > 1e-3


def test_chunked_cross_entropy_equals_full_value_and_gradient():
    torch.manual_seed(0)
    s, b, h, vocab, true_vocab = 37, 2, 16, 256, 200
    hidden = torch.randn(s, b, h, requires_grad=True)
    weight = torch.randn(vocab, h, requires_grad=True)
    labels = torch.randint(0, true_vocab, (s, b))
    w = torch.rand(s, b)
    ce = chunked_cross_entropy(hidden, weight, labels, chunk_tokens=10, true_vocab=true_vocab)
    (ce * w).sum().backward()
    g_hidden, g_weight = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    logits = (hidden @ weight.t())[..., :true_vocab]
    ref = F.cross_entropy(logits.reshape(-1, true_vocab), labels.reshape(-1), reduction="none").reshape(s, b)
    (ref * w).sum().backward()
    torch.testing.assert_close(ce, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_hidden, hidden.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_weight, weight.grad, atol=1e-5, rtol=1e-5)


def test_model_head_ce_matches_logits_with_padded_vocab():
    model = _model(vocab_size=200)  # padded to 256 inside the model
    assert model.embedding.word_embeddings.weight.shape[0] == 256
    rng = np.random.default_rng(3)
    S = 24
    mb = make_micro_batch([PackedSample(rng.integers(0, 200, S), np.ones(S), np.array([S]))])
    p = DocumentParams.for_micro_batch(mb)
    with torch.no_grad():
        logits = model(mb.tokens, mb.position_ids, None, packed_seq_params=p)
        with output_head(model).targets(mb.labels):
            ce = model(mb.tokens, mb.position_ids, None, packed_seq_params=p).squeeze(-1)
    assert torch.all(logits[..., 200:] == torch.finfo(logits.dtype).min)
    ref = F.cross_entropy(logits[..., :200].reshape(-1, 200), mb.labels.reshape(-1), reduction="none")
    torch.testing.assert_close(ce.reshape(-1), ref, atol=1e-5, rtol=1e-5)


def test_rope_base_change_changes_all_but_the_first_position():
    a, b = _model(rope_base=5e5), _model(rope_base=8e6)
    b.load_state_dict(a.state_dict())
    tokens = np.random.default_rng(4).integers(0, 256, 32)
    la, lb = _logits(a, tokens, [32]), _logits(b, tokens, [32])
    torch.testing.assert_close(la[0], lb[0])  # position 0: no rotation
    assert (la[1:] - lb[1:]).abs().amax(-1).min() > 1e-6


def test_llama31_rope_scaling_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = LlamaConfig(hidden_size=2048, num_attention_heads=32, head_dim=64, rope_theta=500000.0,
                     rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    ours = inv_frequencies(64, 500000.0, RopeScaling(factor=32.0)).float()
    torch.testing.assert_close(ours, ref.float(), atol=0, rtol=1e-6)


def test_gqa_parameter_shapes():
    model = _model()  # 4 query heads, 2 KV heads, head dim 16, hidden 64
    qkv = model.decoder.layers[0].self_attention.linear_qkv.weight
    assert tuple(qkv.shape) == ((4 + 2 * 2) * 16, 64)
    assert tuple(model.decoder.layers[0].mlp.linear_fc1.weight.shape) == (2 * 128, 64)


@pytest.mark.parametrize("cu, message", [
    ([1, 8, 16], "must start at 0"),
    ([0, 8, 8, 16], "strictly increasing"),
    ([0, 8, 15], "must end at the sequence length 16"),
])
def test_bad_cu_seqlens_name_the_problem(cu, message):
    from megalong.data.batch import check_cu_seqlens
    with pytest.raises(ValueError, match=message):
        check_cu_seqlens(cu, 16)
    if cu[0] == 0:  # document lengths that produce these boundaries are refused the same way
        with pytest.raises(ValueError, match=message):
            make_micro_batch([PackedSample(np.zeros(16, int), np.ones(16), np.diff(cu))])


def test_sequence_not_divisible_by_two_cp():
    with pytest.raises(ValueError, match=r"not divisible by 2·CP = 4"):
        local_token_index(30, 0, 2)


@pytest.mark.parametrize("kw, tp, pp, message", [
    (dict(num_attention_heads=6, num_kv_heads=2, hidden_size=96), 4, 1, "num_attention_heads=6 is not divisible"),
    (dict(num_kv_heads=2), 4, 1, "num_kv_heads=2 is not divisible"),
    (dict(num_layers=3), 1, 2, "num_layers=3 is not divisible"),
])
def test_parallel_divisibility_errors(kw, tp, pp, message):
    with pytest.raises(ValueError, match=message):
        preset("tiny", **kw).validate(tp=tp, pp=pp)


def test_unknown_attention_backend():
    from megalong.attention import resolve_backend
    with pytest.raises(ValueError, match="unknown attention backend 'flash3'.*auto"):
        resolve_backend("flash3", "cpu")
    assert resolve_backend("auto", "cpu") == "reference"


def test_import_without_optional_packages(tmp_path):
    """TE and apex may be absent, and flash-attn / cuDNN's frontend absent or broken (a CUDA build raises
    ImportError on a machine without CUDA): importing megalong and listing backends must not care."""
    for name in ("flash_attn", "cudnn"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('{name} is broken here')\n")
    code = ("import sys, importlib.abc\n"
            "class Absent(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name.split('.')[0] in ('transformer_engine', 'apex'):\n"
            "            raise ModuleNotFoundError(name)\n"
            "sys.meta_path.insert(0, Absent())\n"
            "import megalong.model.build, megalong.attention.backends, megalong.step\n"
            "from megalong.attention import available_backends\n"
            "print(available_backends('cpu'))\n")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "reference" in out.stdout


def test_cpu_shim_matches_this_megatron_core():
    from megalong.runtime import cpu_shim
    cpu_shim.check()
    assert cpu_shim.is_active()
    assert torch.empty(2, device="cuda").device.type == "cpu"
    assert torch.zeros(1).cuda().device.type == "cpu"
