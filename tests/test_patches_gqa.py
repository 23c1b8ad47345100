"GQA regrouping: equivalence, shapes, vanilla save/reload, measured cache bytes, config dispatch, bad input."
import pytest, torch
from torch import nn
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM
from typhoon_nb.config import RunConfig
from typhoon_nb.patches.core import apply_patches, kv_bytes_per_token
from typhoon_nb.patches.gqa import apply_gqa, measured_kv_bytes_per_token, pool_heads, tie_heads_within_groups


def tiny(kv=4, heads=8, layers=3, hidden=64, attn='sdpa', seed=0):
    torch.manual_seed(seed)
    c = MistralConfig(vocab_size=96, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=128)
    c._attn_implementation = attn
    return MistralForCausalLM(c).eval()


IDS = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(3))


def logits(m, ids=IDS):
    with torch.no_grad(): return m(ids).logits


def test_same_heads_identical_logits():
    m = tiny(); ref = logits(m)
    r = apply_gqa(m, 4, probe_ids=IDS)
    assert torch.equal(logits(m), ref)
    assert r.equivalence_error == 0.0 and r.params_after == r.params_before


@pytest.mark.parametrize('attn', ['eager', 'sdpa'])
@pytest.mark.parametrize('kv,target', [(4, 2), (4, 1), (8, 2)])  # GQA -> fewer heads; multi-head -> GQA
def test_identical_heads_within_groups_equal_logits(attn, kv, target):
    m = tiny(kv=kv, attn=attn)
    tie_heads_within_groups(m, target)
    ref = logits(m)
    apply_gqa(m, target)
    assert (logits(m) - ref).abs().max().item() < 1e-5


def test_untied_heads_change_logits():
    m = tiny(); ref = logits(m)
    apply_gqa(m, 1)
    assert (logits(m) - ref).abs().max().item() > 1e-3


def test_shapes_and_pooled_values():
    m = tiny()
    k0 = m.model.layers[2].self_attn.k_proj.weight.detach().clone()
    r = apply_gqa(m, 2)
    a = m.model.layers[2].self_attn
    assert a.k_proj.weight.shape == (2 * 8, 64) and a.v_proj.weight.shape == (2 * 8, 64)
    assert a.q_proj.weight.shape == (8 * 8, 64) and a.o_proj.weight.shape == (64, 8 * 8)
    assert torch.allclose(a.k_proj.weight[:8], (k0[:8] + k0[8:16]) / 2)
    assert torch.allclose(a.k_proj.weight[8:], (k0[16:24] + k0[24:32]) / 2)
    assert a.num_key_value_groups == 4 and m.config.num_key_value_heads == 2
    assert len(r.modules_replaced) == 3
    assert r.params_before - r.params_after == 3 * 2 * 2 * 8 * 64


def test_save_reload_vanilla_same_logits(tmp_path):
    m = tiny(); apply_gqa(m, 1); ref = logits(m)
    m.save_pretrained(tmp_path)
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(m2) is MistralForCausalLM and m2.config.num_key_value_heads == 1
    assert m2.model.layers[0].self_attn.k_proj.weight.shape == (8, 64)
    assert (logits(m2) - ref).abs().max().item() < 1e-6


@pytest.mark.parametrize('target', [4, 2, 1])
def test_measured_cache_bytes_equal_formula(target):
    m = tiny(); apply_gqa(m, target)
    expected = 2 * 3 * target * 8 * 4  # 2 x layers x kv heads x head dim x fp32 bytes
    assert measured_kv_bytes_per_token(m, IDS, max_new_tokens=3) == expected == kv_bytes_per_token(3, target, 8, 4)


def test_report_typhoon_shape():
    r = apply_gqa(tiny(), 2)
    assert r.details['Typhoon-7B KV / token (bf16)'] == '128 KiB -> 32 KiB'
    assert r.kv_bytes_per_token_before == 2 * r.kv_bytes_per_token_after
    assert 'KV bytes / token' in str(r)


def test_apply_patches_dispatches_from_config():
    m = tiny()
    reports = apply_patches(m, RunConfig(use_gqa=True, gqa_kv_heads=2))
    assert [r.name for r in reports] == ['gqa'] and m.config.num_key_value_heads == 2
    assert m.generate(IDS, max_new_tokens=2, do_sample=False, pad_token_id=0).shape == (2, 12)


@pytest.mark.parametrize('target,msg', [(3, "3 does not divide the model's 4 KV heads"), (8, 'choose one of [1, 2, 4]'),
                                        (0, 'must be a positive integer'), (2.0, 'must be a positive integer')])
def test_bad_targets(target, msg):
    m = tiny()
    with pytest.raises(ValueError, match=msg.replace('[', r'\[').replace(']', r'\]')): apply_gqa(m, target)
    assert m.config.num_key_value_heads == 4  # nothing changed


def test_refuses_quantized_projections():
    bnb = pytest.importorskip('bitsandbytes')
    m = tiny()
    a = m.model.layers[1].self_attn
    a.k_proj = bnb.nn.Linear8bitLt(64, 32, bias=False, has_fp16_weights=False)
    with pytest.raises(TypeError, match=r'model.layers.1.self_attn.k_proj is a Linear8bitLt.*before quantizing'):
        apply_gqa(m, 2)
    assert m.model.layers[0].self_attn.k_proj.weight.shape == (32, 64)  # checked before anything changed


def test_pool_heads_is_a_mean():
    w = torch.randn(6 * 4, 5)
    p = pool_heads(w, 6, 2)
    assert torch.allclose(p[4:8], w.view(6, 4, 5)[3:6].mean(0))
