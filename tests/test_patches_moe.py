"MoE upcycling: exactness (and its negative control), balancing losses, training, LoRA, checkpoints, bad input."
import json, math
import pytest, torch
from torch import nn
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM, MixtralForCausalLM
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
from typhoon_nb.config import RunConfig
from typhoon_nb.patches.core import apply_patches
from typhoon_nb.patches.moe import (apply_moe, load_balancing_loss, load_entropy, load_moe, moe_lora_kwargs,
                                    router_load, router_z_loss, routers, to_mixtral, upcycle_to_mixtral)

V = 96
IDS = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(5))


def tiny(layers=2, hidden=64, seed=0, **kw):
    torch.manual_seed(seed)
    c = MistralConfig(vocab_size=V, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128, **kw)
    return MistralForCausalLM(c).eval()


def logits(m, ids=IDS):
    with torch.no_grad(): return m(ids).logits


def ce(out, ids=IDS):
    return nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))


def randomise_routers(m, std=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for r in routers(m): r.weight.copy_(torch.randn(r.weight.shape, generator=g) * std)


@pytest.mark.parametrize('E,k', [(8, 2), (4, 1), (4, 3)])
def test_upcycled_equals_dense_random_router(E, k):
    m = tiny(layers=3); ref = logits(m)
    mx, r = upcycle_to_mixtral(m, num_experts=E, top_k=k)
    randomise_routers(mx, std=2.0)
    assert type(mx) is MixtralForCausalLM
    assert (logits(mx) - ref).abs().max().item() < 1e-5


class NoRenorm(MixtralTopKRouter):
    def forward(self, h):
        lg = nn.functional.linear(h.reshape(-1, self.hidden_dim), self.weight)
        w, i = lg.float().softmax(-1).topk(self.top_k, -1)
        return lg, w, i


def test_negative_control_without_renormalisation_differs():
    m = tiny(layers=3); ref = logits(m)
    mx, _ = upcycle_to_mixtral(m, num_experts=8, top_k=2)
    randomise_routers(mx, std=2.0)
    for r in routers(mx): r.__class__ = NoRenorm
    assert (logits(mx) - ref).abs().max().item() > 1e-3  # 100x the 1e-5 bound the exact upcycling meets


def test_noise_breaks_exactness_and_is_reported():
    m = tiny(); r = apply_moe(m, num_experts=4, noise=0.05, probe_ids=IDS)
    assert r.equivalence_error > 1e-5
    e = m.model.layers[0].mlp.experts.gate_up_proj.detach()
    assert (e[1] - e[0]).abs().max() > 0


def test_aux_loss_uniform_and_skewed():
    E, k = 8, 2
    assert load_balancing_loss((torch.zeros(32, E), torch.zeros(32, E)), E, k).item() == pytest.approx(1.0, abs=1e-6)
    skew = torch.zeros(32, E); skew[:, 0] = 5.0
    assert load_balancing_loss((skew,), E, k).item() > 1.5
    onehot = torch.full((32, E), -20.0); onehot[:, 0] = onehot[:, 1] = 20.0  # all mass on experts 0, 1
    assert load_balancing_loss((onehot,), E, k).item() == pytest.approx(E / 2, rel=1e-4)


def test_aux_loss_excludes_padding():
    E, k = 4, 1
    lg = torch.zeros(2, 3, E); lg[1, 2, 0] = 30.0  # only the padded token is skewed
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert load_balancing_loss((lg.reshape(-1, E),), E, k, mask).item() == pytest.approx(1.0, abs=1e-5)


def test_mixtral_loss_adds_aux_times_coef():
    mx, _ = upcycle_to_mixtral(tiny(), num_experts=4, top_k=2, aux_coef=0.2)
    randomise_routers(mx, std=3.0)
    out = mx(IDS, labels=IDS)
    aux = load_balancing_loss(out.router_logits, 4, 2)
    assert aux.item() > 1.0
    assert (out.loss - ce(out) - 0.2 * aux).abs().item() < 1e-5


def test_z_loss_added_and_gradient_reaches_router():
    mx, _ = upcycle_to_mixtral(tiny(), num_experts=4, top_k=2, aux_coef=0.0, z_coef=1.0)
    out = mx(IDS, labels=IDS)
    z = torch.cat([l for l in out.router_logits]).logsumexp(-1).pow(2).mean()
    assert (out.loss - ce(out) - z).abs().item() < 1e-5 and out.z_loss.item() == pytest.approx(z.item(), rel=1e-6)
    assert router_z_loss((torch.zeros(3, 4),)).item() == pytest.approx(math.log(4) ** 2)


def test_partial_model_gets_aux_and_z():
    m = tiny(layers=3)
    apply_moe(m, num_experts=4, top_k=2, layers=[2], aux_coef=0.1, z_coef=0.01)
    out = m(IDS, labels=IDS)
    assert (out.loss - ce(out) - 0.1 * out.aux_loss - 0.01 * out.z_loss).abs().item() < 1e-6
    assert out.aux_loss.item() >= 1.0 - 1e-6


def test_router_gradient_and_experts_diverge():
    mx, _ = upcycle_to_mixtral(tiny(), num_experts=4, top_k=2)
    mx.train()
    opt = torch.optim.SGD(mx.parameters(), lr=0.5)
    for step in range(4):
        mx(IDS, labels=IDS).loss.backward()
        if step == 0:
            assert all(r.weight.grad is not None and r.weight.grad.abs().sum() > 0 for r in routers(mx))
        opt.step(); opt.zero_grad()
    for layer in mx.model.layers:
        e = layer.mlp.experts.down_proj.detach()
        assert max((e[i] - e[0]).abs().max().item() for i in range(1, 4)) > 1e-4


def test_lora_on_experts_and_router_trains():
    from peft import LoraConfig, get_peft_model
    mx, _ = upcycle_to_mixtral(tiny(), num_experts=4, top_k=2, z_coef=0.01)
    gate0 = mx.model.layers[1].mlp.gate.weight.detach().clone()
    pm = get_peft_model(mx, LoraConfig(r=4, lora_alpha=8, **moe_lora_kwargs(attention=False)))
    pm.train()
    out = pm(IDS, labels=IDS)
    assert 'z_loss' in out  # the loss hooks run under PEFT
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-2)
    for _ in range(4):
        pm(IDS, labels=IDS).loss.backward(); opt.step(); opt.zero_grad()
    merged = pm.merge_and_unload()
    assert (merged.model.layers[1].mlp.gate.weight.detach() - gate0).abs().max() > 1e-3
    e = merged.model.layers[1].mlp.experts.gate_up_proj.detach()
    assert max((e[i] - e[0]).abs().max().item() for i in range(1, 4)) > 1e-5


def test_save_reload_vanilla_mixtral(tmp_path):
    mx, _ = upcycle_to_mixtral(tiny(), num_experts=4, top_k=2, z_coef=0.05)
    randomise_routers(mx)
    ref = logits(mx)
    mx.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / 'config.json').read_text())
    assert cfg['model_type'] == 'mixtral' and cfg['architectures'] == ['MixtralForCausalLM']
    assert cfg['num_local_experts'] == 4 and cfg['num_experts_per_tok'] == 2
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(m2) is MixtralForCausalLM and (logits(m2) - ref).abs().max().item() < 1e-6
    m3 = load_moe(tmp_path)  # through typhoon_nb: the z-loss comes back
    assert 'z_loss' in m3(IDS, labels=IDS)


def test_partial_format_roundtrip(tmp_path):
    m = tiny(layers=3)
    apply_moe(m, num_experts=4, top_k=1, layers=[1], z_coef=0.02)
    randomise_routers(m)
    ref = logits(m)
    m.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / 'config.json').read_text())
    assert cfg['model_type'] == 'mistral' and cfg['moe_upcycling']['layers'] == [1]
    m2 = load_moe(tmp_path)
    assert torch.equal(logits(m2), ref)
    assert 'z_loss' in m2(IDS, labels=IDS)


def test_router_load_statistics():
    mx, _ = upcycle_to_mixtral(tiny(layers=3), num_experts=4, top_k=2)
    load = router_load(mx, IDS)
    assert load.shape == (3, 4) and torch.allclose(load.sum(-1), torch.ones(3))
    randomise_routers(mx, std=3.0)
    load = router_load(mx, IDS)
    with torch.no_grad(): out = mx(IDS, output_router_logits=True)
    for l, lg in enumerate(out.router_logits):  # the same counts from the router logits, by hand
        c = torch.bincount(lg.topk(2, -1).indices.reshape(-1), minlength=4).float()
        assert torch.allclose(load[l], c / c.sum())
    assert load_entropy(torch.tensor([[0.5, 0.5, 0.0, 0.0]])).item() == pytest.approx(0.5)
    mask = torch.ones_like(IDS); mask[1, 5:] = 0
    counts = router_load(mx, IDS, mask) * (mask.sum() * 2)
    assert torch.allclose(counts, counts.round(), atol=1e-4)  # whole assignments of the 15 real tokens


def test_apply_patches_from_config_then_to_mixtral():
    m = tiny(); ref = logits(m)
    reports = apply_patches(m, RunConfig(use_moe=True, moe_experts=4, moe_top_k=2, moe_z_coef=0.001))
    assert [r.name for r in reports] == ['moe']
    mx = to_mixtral(m)
    assert type(mx) is MixtralForCausalLM and (logits(mx) - ref).abs().max().item() < 1e-5
    assert mx.config.router_aux_loss_coef == pytest.approx(0.01 / 2)


def test_llama3_gqa_then_moe_is_a_mixtral():
    m = tiny()
    reports = apply_patches(m, RunConfig(use_llama3=True, gqa_kv_heads=2, moe_experts=4, moe_top_k=2))
    assert [r.name for r in reports] == ['gqa', 'moe']
    mx = to_mixtral(m)
    assert mx.config.num_key_value_heads == 2 and mx.model.layers[0].self_attn.k_proj.weight.shape == (16, 64)
    assert (logits(mx) - logits(m)).abs().max().item() < 1e-5


@pytest.mark.parametrize('kw,msg', [
    (dict(num_experts=1), 'moe_experts: must be an integer >= 2, got 1'),
    (dict(num_experts=4, top_k=5), r'moe_top_k: must be an integer in 1..moe_experts \(4\), got 5'),
    (dict(num_experts=4, top_k=0), 'moe_top_k'),
    (dict(num_experts=4, layers=[0, 7]), r'moe layers: \[7\] out of range 0..1'),
])
def test_bad_arguments(kw, msg):
    m = tiny()
    with pytest.raises(ValueError, match=msg): apply_moe(m, **kw)
    assert type(m.model.layers[0].mlp).__name__ == 'MistralMLP'


def test_twice_and_partial_to_mixtral_refused():
    m = tiny(layers=3)
    apply_moe(m, num_experts=4, layers=[0])
    with pytest.raises(ValueError, match=r'moe layers: \[0\] are already upcycled'): apply_moe(m, num_experts=4, layers=[0])
    with pytest.raises(ValueError, match=r'to_mixtral: layers \[1, 2\] are dense'): to_mixtral(m)
    with pytest.raises(ValueError, match=r'moe: layers \[0\] already have 4 experts, top-2'):
        apply_moe(m, num_experts=8, layers=[1])
    r = apply_moe(m, num_experts=4, layers=[1, 2])  # the rest, same shape: now a full Mixtral
    assert m.config.moe_upcycling['layers'] == [0, 1, 2] and 'to_mixtral' in r.notes[0]
    assert type(to_mixtral(m)) is MixtralForCausalLM


def test_refuses_quantized_mlp():
    bnb = pytest.importorskip('bitsandbytes')
    m = tiny()
    m.model.layers[1].mlp.up_proj = bnb.nn.Linear8bitLt(64, 128, bias=False, has_fp16_weights=False)
    with pytest.raises(TypeError, match='mlp.up_proj is Linear8bitLt.*before quantizing'): apply_moe(m, num_experts=4)
    assert type(m.model.layers[0].mlp).__name__ == 'MistralMLP'  # nothing swapped


def test_load_moe_refuses_dense_folder(tmp_path):
    tiny().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"config.json has no `moe_upcycling` entry"): load_moe(tmp_path)


def test_qlora_path_patch_then_quantize_then_lora():
    pytest.importorskip('bitsandbytes')
    from peft import LoraConfig, get_peft_model
    from typhoon_nb.loader import quantization_config, quantize_in_place
    mx, _ = upcycle_to_mixtral(tiny(), num_experts=4, top_k=2)
    quantize_in_place(mx, quantization_config('4bit', torch.float32), 'cpu')
    assert type(mx.model.layers[0].self_attn.q_proj).__name__ == 'Linear4bit'
    assert mx.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.float32  # fused experts are not nn.Linear
    pm = get_peft_model(mx, LoraConfig(r=4, lora_alpha=8, **moe_lora_kwargs()))
    pm.train()
    pm(IDS, labels=IDS).loss.backward()
    trainable = [(n, p) for n, p in pm.named_parameters() if p.requires_grad]
    assert any('experts' in n for n, _ in trainable) and all(p.grad is not None for _, p in trainable)
