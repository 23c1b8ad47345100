"Linear attention: forms agree, causality, generation = recompute, fixed state, attention transfer, save/load, bad input."
import json, os, subprocess, sys
import pytest, torch
from transformers import AutoModelForCausalLM, DynamicCache, MistralConfig, MistralForCausalLM
from typhoon_nb.config import RunConfig
from typhoon_nb.patches.core import apply_patches
from typhoon_nb.patches.linear_attention import (
    LinearAttentionCache, apply_linear_attention, attention_transfer, la_chunked, la_parallel, la_recurrent,
    linear_attention_modules, load_linear_attention, save_linear_attention, set_form, transfer_stage)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(seed=0, layers=2, heads=4, kv=1, hidden=64, sliding_window=None):
    torch.manual_seed(seed)
    c = MistralConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                      sliding_window=sliding_window)
    return MistralForCausalLM(c).eval()


def perturbed(model):
    "Move the new parameters away from their neutral start, so every term of the forms matters."
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in linear_attention_modules(model):
            for p in m.transfer_parameters(): p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


IDS = torch.randint(0, 256, (2, 41), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize('window,token_shift,chunk', [(0, False, 64), (0, True, 7), (6, True, 8), (50, False, 16)])
def test_three_forms_agree_in_the_model(window, token_shift, chunk):
    m = tiny(); apply_linear_attention(m, window=window, token_shift=token_shift, chunk_size=chunk); perturbed(m)
    out = {}
    with torch.no_grad():
        for form in ('parallel', 'chunked', 'recurrent'):
            set_form(m, form); out[form] = m(IDS, use_cache=False).logits
    assert (out['parallel'] - out['chunked']).abs().max().item() < 1e-5
    assert (out['parallel'] - out['recurrent']).abs().max().item() < 1e-5


def test_prefill_then_steps_equals_one_pass():
    m = tiny(); apply_linear_attention(m, window=5, token_shift=True, chunk_size=8); perturbed(m)
    with torch.no_grad():
        full = m(IDS, use_cache=False).logits
        c = LinearAttentionCache(m)
        parts = [m(IDS[:, :17], cache=c, use_cache=True).logits]
        for t in range(17, IDS.shape[1]): parts.append(m(IDS[:, t:t + 1], cache=c, use_cache=True).logits)
    assert c.get_seq_length() == IDS.shape[1]
    assert (torch.cat(parts, 1) - full).abs().max().item() < 1e-5


@pytest.mark.parametrize('t', [0, 9, 39])
def test_causality(t):
    m = tiny(); apply_linear_attention(m, window=4, token_shift=True, chunk_size=8); perturbed(m)
    ids2 = IDS.clone(); ids2[:, t + 1] = (ids2[:, t + 1] + 1) % 256
    with torch.no_grad(): a, b = m(IDS, use_cache=False).logits, m(ids2, use_cache=False).logits
    assert (a[:, :t + 1] - b[:, :t + 1]).abs().max().item() == 0.0
    assert (a[:, t + 1:] - b[:, t + 1:]).abs().max().item() > 1e-4


@pytest.mark.parametrize('window,layers', [(0, None), (3, None), (0, [1])])
def test_generate_equals_full_recompute(window, layers):
    m = tiny(seed=2); apply_linear_attention(m, layers=layers, window=window, token_shift=True); perturbed(m)
    prompt, n = IDS[:1, :9], 15
    with torch.no_grad():
        out = m.generate(prompt, max_new_tokens=n, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, pad_token_id=0)
        seq, full = prompt, []
        for _ in range(n):
            lg = m(seq, use_cache=False).logits[:, -1]; full.append(lg)
            seq = torch.cat([seq, lg.argmax(-1, keepdim=True)], 1)
    assert isinstance(out.cache, LinearAttentionCache)
    assert out.sequences.tolist() == seq.tolist()
    assert max((a - b).abs().max().item() for a, b in zip(out.logits, full)) < 1e-4


def _rand(T, seed=0, B=1, Hk=2, G=2, d=8, Fd=16):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    return (r(B, Hk, G, T, d), r(B, Hk, 1, T, d), r(B, Hk, 1, T, d), r(B, Hk, G, T, Fd).softmax(-1),
            r(B, Hk, 1, T, Fd).softmax(-1), -torch.tensor([0.05, 0.01]))


def test_state_same_size_after_100_and_10000_tokens():
    sizes = []
    for n in (100, 10_000):
        _, st = la_recurrent(*_rand(n), window=4)
        sizes.append((sorted((k, tuple(v.shape)) for k, v in st.items()), sum(v.numel() * v.element_size() for v in st.values())))
    assert sizes[0] == sizes[1]
    assert sizes[0][1] == (2 * 16 * 8 + 2 * 16) * 4 + 2 * 4 * (8 + 8 + 16) * 4 + 4  # S, z, window k/v/fk (fp32), valid flags


def test_model_cache_does_not_grow_but_dynamic_cache_does():
    m = tiny(); apply_linear_attention(m, window=2)
    bytes_ = []
    for n in (100, 1500):
        c = LinearAttentionCache(m)
        with torch.no_grad(): m(torch.randint(0, 256, (1, n)), cache=c, use_cache=True)
        bytes_.append(c.state_bytes() + c.kv_bytes())
    assert bytes_[0] == bytes_[1] > 0
    ref, dc = tiny(), None
    kv = []
    for n in (100, 1500):
        dc = DynamicCache(config=ref.config)
        with torch.no_grad(): ref(torch.randint(0, 256, (1, n)), cache=dc, use_cache=True)
        kv.append(sum(l.keys.numel() + l.values.numel() for l in dc.layers))
    assert kv[1] == 15 * kv[0]


def test_attention_transfer_lowers_mse_10x():
    m = tiny(seed=3); apply_linear_attention(m)
    g = torch.Generator().manual_seed(0)
    train = [torch.randint(0, 256, (2, 32), generator=g) for _ in range(4)]
    held = [torch.randint(0, 256, (2, 32), generator=g) for _ in range(2)]
    frozen = {n: p.detach().clone() for n, p in m.named_parameters() if n.endswith('_proj.weight') or 'embed' in n}
    r = attention_transfer(m, train, steps=200, lr=5e-2, eval_batches=held)
    assert r['ratio'] >= 10, r
    assert all(torch.equal(p, frozen[n]) for n, p in m.named_parameters() if n in frozen)  # only new parameters trained


def test_transfer_stage_packs_token_lists():
    m = tiny(seed=4); apply_linear_attention(m)
    texts = [list(range(i, i + 50)) for i in range(6)]
    r = transfer_stage(m, None, texts, steps=5, lr=1e-2, max_length=32, batch_size=2)
    assert r['steps'] == 5 and r['mse_after'] < r['mse_before']


def test_save_load_and_vanilla_transformers_refuses(tmp_path):
    m = tiny(); apply_linear_attention(m, window=3, token_shift=True, feature_dim=8); perturbed(m)
    save_linear_attention(m, tmp_path)
    cfg = json.loads((tmp_path / 'config.json').read_text())
    assert cfg['model_type'] == 'typhoon_linear_mistral'
    assert cfg['linear_attention'] == dict(layers=[0, 1], window=3, feature_dim=8, token_shift=True, chunk_size=64)
    back = load_linear_attention(tmp_path).eval()
    with torch.no_grad(): assert (back(IDS).logits - m(IDS).logits).abs().max().item() == 0.0
    auto = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # registered model type
    assert len(linear_attention_modules(auto)) == 2
    code = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})"
    p = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env={**os.environ, 'HF_HUB_OFFLINE': '1'})
    assert p.returncode != 0 and 'typhoon_linear_mistral' in p.stderr


def test_apply_patches_dispatch_from_config():
    m = tiny()
    reps = apply_patches(m, RunConfig(use_rwkv=True, rwkv_window=4))
    assert [r.name for r in reps] == ['linear_attention']
    assert reps[0].details['softmax window'] == 4 and len(linear_attention_modules(m)) == 2
    assert reps[0].kv_bytes_per_token_after == 0


def test_report_numbers():
    m = tiny(layers=3, heads=8, kv=2)
    r = apply_linear_attention(m, layers=[0, 2], window=0)
    assert r.modules_replaced == ['model.layers.0.self_attn', 'model.layers.2.self_attn']
    hd = 8
    assert r.params_after - r.params_before == 2 * ((8 + 2) * (hd * hd + hd) + 2)
    assert r.kv_bytes_per_token_before == 2 * 3 * 2 * hd * 2 and r.kv_bytes_per_token_after == 2 * 1 * 2 * hd * 2
    assert r.details['state bytes per sequence (fixed)'] == 2 * (2 * 16 * hd + 2 * 16) * 2


@pytest.mark.parametrize('kw,msg', [
    (dict(layers=[2]), 'layers: [2] out of range'), (dict(layers=[]), 'layers: empty'),
    (dict(window=-2), 'window: -2'), (dict(window=1.5), 'window: 1.5'), (dict(chunk_size=0), 'chunk_size: 0'),
    (dict(feature_dim=0), 'feature_dim: 0')])
def test_bad_input(kw, msg):
    with pytest.raises(ValueError, match=msg.replace('[', r'\[').replace(']', r'\]')): apply_linear_attention(tiny(), **kw)


def test_bad_use():
    m = tiny(); apply_linear_attention(m)
    with pytest.raises(ValueError, match='already linear attention'): apply_linear_attention(m)
    with pytest.raises(ValueError, match="form must be"): set_form(m, 'fast')
    dc = DynamicCache(config=m.config)
    dc.update(torch.zeros(1, 1, 3, 16), torch.zeros(1, 1, 3, 16), 0)
    with pytest.raises(ValueError, match='LinearAttentionCache'): m(IDS[:1, :1], cache=dc, use_cache=True)
    with pytest.raises(ValueError, match='no linear-attention layers'): save_linear_attention(tiny(), '/tmp/never')
    with pytest.raises(ValueError, match='fewer than one block'): attention_transfer(m, [[1, 2, 3]], steps=1)


def test_load_refuses_plain_folder(tmp_path):
    tiny().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"config.json field model_type is 'mistral'"): load_linear_attention(tmp_path)


def test_transfer_trains_through_4bit_projections_after_an_eval_forward():
    "bitsandbytes repacks 4-bit CPU weights on an eval forward without gradients; attention transfer still trains."
    from typhoon_nb.loader import quantization_config, quantize_in_place
    m = tiny(seed=3, hidden=128); apply_linear_attention(m)  # projection sizes the repacking kernel takes (multiples of 32)
    quantize_in_place(m, quantization_config('4bit', torch.float32), 'cpu')
    m.eval()
    with torch.no_grad(): m(IDS, use_cache=False)  # the forward that repacks on AVX512-BF16 CPUs
    g = torch.Generator().manual_seed(0)
    r = attention_transfer(m, [torch.randint(0, 256, (2, 32), generator=g) for _ in range(2)], steps=30, lr=5e-2)
    assert r['ratio'] > 1.1, r  # 1.24 measured; exactly 1.0 when no gradient reaches the feature maps


def test_linear_attention_params_travel_with_the_adapter(tmp_path):
    "save_adapter writes linear_attention.safetensors beside a LoRA folder; load_adapter on a patched base restores it."
    from peft import LoraConfig, PeftModel, get_peft_model
    from typhoon_nb.adapters import load_adapter, save_adapter
    m = tiny(); apply_linear_attention(m, window=2); perturbed(m)
    pm = get_peft_model(m, LoraConfig(r=4, target_modules=['q_proj', 'v_proj']))
    save_adapter(pm, tmp_path / 'a')
    assert (tmp_path / 'a' / 'linear_attention.safetensors').is_file()
    with torch.no_grad(): want = pm(IDS, use_cache=False).logits
    base = tiny(); apply_linear_attention(base, window=2)
    with torch.no_grad(): got = load_adapter(base, tmp_path / 'a')(IDS, use_cache=False).logits
    assert (got - want).abs().max().item() == 0.0
    plain = PeftModel.from_pretrained(tiny(), tmp_path / 'a')  # vanilla peft still reads the folder
    assert isinstance(plain, PeftModel)
    with pytest.raises(ValueError, match=r"linear_attention.safetensors: field window is 2 but the model was patched with 0"):
        other = tiny(); apply_linear_attention(other); load_adapter(other, tmp_path / 'a')
