"Adapters: the bad-input catalogue, and 4-bit / 8-bit bases training with each method (the loss falls)."
import logging, warnings
import pytest
import torch
from typhoon_nb.config import RunConfig, ConfigError
from typhoon_nb.adapters import (apply_peft, save_adapter, load_adapter, merge_and_save, frozen_reference,
                                 trainable_parts, quantization_of)

logging.getLogger('bitsandbytes').setLevel(logging.ERROR)

@pytest.fixture(scope='module')
def tiny_dir(tmp_path_factory):
    import transformers
    from transformers import MistralConfig, MistralForCausalLM
    transformers.logging.set_verbosity_error(); transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    c = MistralConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=1, max_position_embeddings=256)
    d = tmp_path_factory.mktemp('tiny')
    MistralForCausalLM(c).save_pretrained(d)
    return d

def load(d, q=None):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    kw = {}
    if q == '4bit': kw['quantization_config'] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    if q == '8bit': kw['quantization_config'] = BitsAndBytesConfig(load_in_8bit=True)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return AutoModelForCausalLM.from_pretrained(d, device_map='cpu', dtype=torch.float32, **kw)

def cfg(method='lora', **kw):
    return RunConfig(**(dict(peft_method=method, quantization='none', lora_r=4, lora_alpha=8.0, lora_dropout=0.0, prefix_tokens=5) | kw))

# (config changes, the specific message apply_peft must give for a config built in Python without validation)
BAD = [
    (dict(lora_r=0), 'lora_r: must be > 0 (typical: 8, 16, 64), got 0'),
    (dict(lora_r=-4), 'lora_r: must be > 0 (typical: 8, 16, 64), got -4'),
    (dict(lora_alpha=0.0), 'lora_alpha: must be > 0 (typical: 2 x lora_r), got 0.0'),
    (dict(lora_dropout=1.0), 'lora_dropout: must be in [0, 1), got 1.0'),
    (dict(lora_dropout=-0.1), 'lora_dropout: must be in [0, 1), got -0.1'),
    (dict(method='prefix', prefix_tokens=0), 'prefix_tokens: must be > 0 (typical: 10-30), got 0'),
    (dict(method='both', prefix_tokens=0), 'prefix_tokens: must be > 0 (typical: 10-30), got 0'),
    (dict(method='both', lora_r=0), 'lora_r: must be > 0'),
    (dict(method='prefix', gradient_checkpointing=True), 'gradient_checkpointing: PEFT cannot combine prefix tuning with gradient checkpointing (turn one off)'),
    (dict(method='both', gradient_checkpointing=True), 'gradient_checkpointing: PEFT cannot combine prefix tuning with gradient checkpointing'),
    (dict(method='adapter'), "peft_method: must be one of lora | prefix | both | full, got 'adapter'"),
    (dict(lora_targets=['q_proj', 'qkv_proj']), "lora_targets: no module named 'qkv_proj' in MistralForCausalLM; its linear layers are: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"),
    (dict(method='both', lora_targets=['attn']), "lora_targets: no module named 'attn'"),
]

@pytest.mark.parametrize('changes,msg', BAD, ids=[m[:40] for _, m in BAD])
def test_bad_settings(tiny_dir, changes, msg):
    changes = dict(changes)
    model = load(tiny_dir)
    with pytest.raises(ConfigError) as e: apply_peft(model, cfg(changes.pop('method', 'lora'), **changes))
    assert msg in str(e.value)
    assert all(not hasattr(m, 'lora_A') for m in model.modules())  # refused before touching the model

def test_full_refused_on_quantized(tiny_dir):
    with pytest.raises(ConfigError, match=r'full training needs a full-precision base, but the model is quantized \(8bit\)'):
        apply_peft(load(tiny_dir, '8bit'), cfg('full'))

def test_twice_refused(tiny_dir):
    m, _ = apply_peft(load(tiny_dir), cfg('lora'))
    with pytest.raises(ValueError, match='already carries adapters'): apply_peft(m, cfg('prefix'))

def test_load_errors(tiny_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match='no adapter here'): load_adapter(load(tiny_dir), tmp_path)
    (tmp_path/'typhoon_adapter.json').write_text('{"method": "both"}')
    with pytest.raises(FileNotFoundError, match=r'lora/adapter_config.json: missing part'): load_adapter(load(tiny_dir), tmp_path)

@pytest.mark.parametrize('q', ['4bit', '8bit'])
@pytest.mark.parametrize('method', ['lora', 'prefix', 'both'])
def test_quantized_base_trains(tiny_dir, q, method):
    "Six steps on one tiny batch: the loss falls at every step, in all by 5% (prefix, 640 parameters: 2%)."
    torch.manual_seed(0)
    model, rep = apply_peft(load(tiny_dir, q), cfg(method, quantization=q))
    assert quantization_of(model) == q and rep.quantization == q
    parts = {k for k, v in trainable_parts(model).items() if v}
    assert parts == {'lora': {'lora'}, 'prefix': {'prefix'}, 'both': {'lora', 'prefix'}}[method]
    x = torch.randint(1, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.2 if method == 'prefix' else 1e-2)
    model.train(); losses = []
    for _ in range(6):
        loss = model(input_ids=x, labels=x).loss
        loss.backward(); opt.step(); opt.zero_grad(); losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < (0.98 if method == 'prefix' else 0.95) * losses[0], losses

@pytest.mark.parametrize('method', ['lora', 'both'])
def test_4bit_save_load_and_reference(tiny_dir, tmp_path, method):
    "On a 4-bit base: reload gives the same logits (1e-5), and the frozen reference stays put while the policy trains."
    torch.manual_seed(0)
    model, _ = apply_peft(load(tiny_dir, '4bit'), cfg(method, quantization='4bit'))
    x = torch.randint(1, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train(); model(input_ids=x, labels=x).loss.backward(); opt.step(); opt.zero_grad(); model.eval()
    with torch.no_grad(): before = model(input_ids=x).logits
    ref = frozen_reference(model)
    reloaded = load_adapter(load(tiny_dir, '4bit'), save_adapter(model, tmp_path/'a')).eval()
    with torch.no_grad(): assert (reloaded(input_ids=x).logits - before).abs().max().item() < 1e-5
    model.train()
    for _ in range(2): model(input_ids=x, labels=x).loss.backward(); opt.step(); opt.zero_grad()
    model.eval()
    with torch.no_grad():
        assert (model(input_ids=x).logits - before).abs().max().item() > 1e-2
        assert (ref(input_ids=x).logits - before).abs().max().item() == 0.0

@pytest.mark.parametrize("method", ["prefix", "both"])
def test_load_trainable(tiny_dir, tmp_path, method):
    "`load_adapter(..., is_trainable=True)`: the same parameters train again (PEFT itself loads prefix tuning frozen only)."
    model, rep = apply_peft(load(tiny_dir), cfg(method))
    again = load_adapter(load(tiny_dir), save_adapter(model, tmp_path/'b'), is_trainable=True)
    assert trainable_parts(again) == trainable_parts(model)
    assert sum(p.numel() for p in again.parameters() if p.requires_grad) == rep.trainable

def test_8bit_merge(tiny_dir, tmp_path):
    "8-bit base: merged bf16 logits within 3% of the largest logit (LLM.int8 also quantizes activations)."
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model, _ = apply_peft(load(tiny_dir, '8bit'), cfg('lora', quantization='8bit'))
    x = torch.randint(1, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    for _ in range(3): model(input_ids=x, labels=x).loss.backward(); opt.step(); opt.zero_grad()
    model.eval()
    with torch.no_grad(): ref = model(input_ids=x).logits.float()
    merged = AutoModelForCausalLM.from_pretrained(merge_and_save(model, tmp_path/'m'), dtype=torch.bfloat16)
    with torch.no_grad(): got = merged(input_ids=x).logits.float()
    assert (got - ref).abs().max().item() / ref.abs().max().item() < 3e-2
