"Loader: tiny Typhoon determinism, vanilla loading, 4-bit / 8-bit on CPU, patches before quantization, the bad-input catalogue."
import hashlib, json, shutil, sys
from pathlib import Path
import pytest
import torch
from typhoon_nb.config import RunConfig
from typhoon_nb.loader import (LoaderError, tiny_typhoon, load_model, load_tokenizer, check_safetensors, CHAT_TEMPLATE,
                               quantized_layers, SUPPORTED)

NF4_DQ_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # 4.127: NF4 codes + uint8 absmax per 64 + fp32 absmax per 256 blocks

def _hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir()) if p.is_file()}

@pytest.fixture(scope='module')
def micro_builds(tmp_path_factory):
    "Two independent builds of micro-typhoon in two cache folders."
    return [tiny_typhoon('micro', cache_dir=tmp_path_factory.mktemp(f'cache{i}')) for i in range(2)]

@pytest.fixture(scope='module')
def micro(micro_builds): return micro_builds[0]

def test_micro_is_deterministic(micro_builds):
    a, b = micro_builds
    assert a != b and a.name == b.name
    timed = ('typhoon_build.json', 'training_log.jsonl')  # these record the seconds a build took
    ha, hb = _hashes(a), _hashes(b)
    assert {'config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json', *timed} <= set(ha)
    ha, hb = {k: v for k, v in ha.items() if k not in timed}, {k: v for k, v in hb.items() if k not in timed}
    assert ha == hb, {k: (ha[k][:8], hb.get(k, '')[:8]) for k in ha if ha[k] != hb.get(k)}
    untimed = lambda d: {k: v for k, v in d.items() if k != 'seconds'}
    for f in timed:
        la, lb = ([untimed(json.loads(l)) for l in (x / f).read_text().splitlines() if l.strip().startswith('{')] if f.endswith('l')
                  else [untimed(json.loads((x / f).read_text()))] for x in (a, b))
        assert la == lb, f

def test_cache_hit_and_env_var(micro, monkeypatch):
    monkeypatch.setenv('TYPHOON_NB_CACHE', str(micro.parent))
    assert tiny_typhoon('micro') == micro  # found, not rebuilt
    assert tiny_typhoon('micro', cache_dir=micro.parent) == micro

def test_vanilla_transformers_loads_micro(micro):
    from transformers import AutoModelForCausalLM, AutoTokenizer, MistralForCausalLM
    m = AutoModelForCausalLM.from_pretrained(micro)
    tok = AutoTokenizer.from_pretrained(micro)
    c = m.config
    assert isinstance(m, MistralForCausalLM)
    assert c.num_attention_heads // c.num_key_value_heads == 4 and c.sliding_window and c.hidden_act == 'silu'
    assert sum(p.numel() for p in m.parameters()) < 1_000_000
    s = 'สวัสดีครับ ราคา ๑๒๓ บาท 4567'
    ids = tok(s)['input_ids']
    assert tok.decode(ids) == s
    assert [tok.decode([i]) for i in tok('๑๒๓')['input_ids']] == ['๑', '๒', '๓']  # one token per Thai digit
    # a digit never takes the space before it: a number is the same tokens at the start of an answer or inside a sentence
    assert tok('เลข 347', add_special_tokens=False)['input_ids'][-3:] == tok('347', add_special_tokens=False)['input_ids']
    assert tok('ว่า ๓๔๗', add_special_tokens=False)['input_ids'][-3:] == tok('๓๔๗', add_special_tokens=False)['input_ids']
    assert tok.chat_template == CHAT_TEMPLATE and tok.pad_token == '<|pad|>' and tok.pad_token != tok.eos_token
    out = tok.apply_chat_template([{'role': 'user', 'content': 'สวัสดี'}, {'role': 'assistant', 'content': 'ครับ'}],
                                  return_assistant_tokens_mask=True, return_dict=True)
    kept = [i for i, k in zip(out['input_ids'], out['assistant_masks']) if k]
    assert tok.decode(kept) == 'ครับ<|im_end|>'
    with torch.no_grad(): assert torch.isfinite(m(torch.tensor([ids])).logits).all()

def _mistral_folder(tmp, micro, hidden=512, inter=2048, model_type='mistral'):
    "A random-init model folder (saved by transformers) with micro's tokenizer."
    from transformers import AutoConfig, AutoModelForCausalLM
    kw = dict(vocab_size=512, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=1, num_attention_heads=8,
              num_key_value_heads=2, max_position_embeddings=128)
    if model_type == 'mixtral': kw.update(num_local_experts=2, num_experts_per_tok=1)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **kw))
    m.save_pretrained(tmp)
    for f in ('tokenizer.json', 'tokenizer_config.json'): shutil.copy(micro / f, tmp / f)
    return tmp

@pytest.fixture(scope='module')
def wide(tmp_path_factory, micro):
    "A one-layer Mistral with 1M-weight MLP layers: large enough to measure bits per parameter."
    return _mistral_folder(tmp_path_factory.mktemp('wide'), micro)

def test_4bit_on_cpu(wide):
    import bitsandbytes as bnb
    m, tok, rep = load_model(RunConfig(model=str(wide), quantization='4bit', precision='bf16'), device='cpu')
    lin = dict(m.named_modules())
    assert isinstance(lin['model.layers.0.mlp.up_proj'], bnb.nn.Linear4bit)
    assert isinstance(lin['model.layers.0.self_attn.k_proj'], bnb.nn.Linear4bit)
    assert type(lin['lm_head']) is torch.nn.Linear  # the LM head stays in full precision
    w = lin['model.layers.0.mlp.up_proj'].weight
    assert w.quant_type == 'nf4' and w.quant_state.nested  # NF4 with double quantization
    assert lin['model.layers.0.mlp.up_proj'].compute_dtype == torch.bfloat16
    name, n, b = max(quantized_layers(m), key=lambda t: t[1])
    assert n == 512 * 2048
    assert abs(8 * b / n - NF4_DQ_BITS) < 1e-3, 8 * b / n
    assert abs(b / (2 * n) - NF4_DQ_BITS / 16) < 1e-3  # weight bytes vs bf16: 0.258
    assert rep.quantized_layers == 7 and abs(rep.bits_per_param - NF4_DQ_BITS) < 0.01
    assert '4.127 bits/param' in rep.largest_layer and 'uint8' in rep.bytes_by_dtype
    with torch.no_grad(): assert torch.isfinite(m(torch.tensor([[1, 2, 3]])).logits).all()

def test_8bit_on_cpu(wide):
    import bitsandbytes as bnb
    m, tok, rep = load_model(RunConfig(model=str(wide), quantization='8bit', precision='fp32'), device='cpu')
    up = dict(m.named_modules())['model.layers.0.mlp.up_proj']
    assert isinstance(up, bnb.nn.Linear8bitLt) and up.weight.dtype == torch.int8
    name, n, b = max(quantized_layers(m), key=lambda t: t[1])
    assert abs(8 * b / n - (8 + 32 / 512)) < 1e-6  # int8 weights + one fp32 scale per output row
    assert rep.quantization == '8bit' and rep.precision == 'float32' and rep.precision_reason == 'fp32: asked for'

def test_patch_before_quantization_matches_direct_load(micro):
    from typhoon_nb.patches.core import PatchReport
    seen = {}
    def patch(model):
        seen['dtype'] = model.model.layers[0].mlp.up_proj.weight.dtype  # full precision when the patch runs
        return [PatchReport(name='noop', params_before=1, params_after=1)]
    cfg = RunConfig(model=str(micro), quantization='4bit', precision='bf16')
    m1, _, r1 = load_model(cfg, device='cpu')
    m2, _, r2 = load_model(cfg, patch_fn=patch, device='cpu')
    assert seen['dtype'] == torch.bfloat16 and [p.name for p in r2.patches] == ['noop'] and r1.patches == []
    w1, w2 = (dict(m.named_modules())['model.layers.1.mlp.down_proj'].weight for m in (m1, m2))
    assert torch.equal(w1.data, w2.data) and torch.equal(w1.quant_state.absmax, w2.quant_state.absmax)
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad(): assert torch.equal(m1(x).logits, m2(x).logits)
    assert r1.bytes_by_dtype == r2.bytes_by_dtype and m2.is_loaded_in_4bit and m2.hf_quantizer is not None

@pytest.mark.parametrize('model_type', ['llama', 'mixtral', 'qwen2'])
def test_supported_families_load_4bit(model_type, tmp_path, micro):
    import bitsandbytes as bnb
    assert model_type in SUPPORTED
    f = _mistral_folder(tmp_path, micro, hidden=128, inter=128, model_type=model_type)
    m, tok, rep = load_model(RunConfig(model=str(f), quantization='4bit'), device='cpu')
    assert isinstance(dict(m.named_modules())['model.layers.0.self_attn.q_proj'], bnb.nn.Linear4bit)
    assert rep.architecture == SUPPORTED[model_type]

def test_offline_hub_id_error():
    with pytest.raises(LoaderError) as e:
        load_model(RunConfig(model='scb10x/typhoon-7b', quantization='none'))
    msg = str(e.value)
    assert "model 'scb10x/typhoon-7b': not in the local Hugging Face cache and the hub is offline (HF_HUB_OFFLINE=1)" in msg
    assert 'pass the folder: model: /path/to/' in msg
    assert e.value.__cause__ is None and 'HTTP' not in msg  # one message, no chain of retries

def test_tokenizer_pad_and_template_defaults(micro, tmp_path):
    "A tokenizer without pad token and chat template gets eos as pad (no new token) and the default template."
    cfg = json.loads((micro / 'tokenizer_config.json').read_text())
    cfg.pop('pad_token', None); cfg.pop('chat_template', None)
    (tmp_path / 'tokenizer_config.json').write_text(json.dumps(cfg))
    shutil.copy(micro / 'tokenizer.json', tmp_path / 'tokenizer.json')
    tok = load_tokenizer(tmp_path)
    n = len(tok)
    assert tok.pad_token == tok.eos_token == '<|endoftext|>' and len(tok) == n
    assert tok.chat_template == CHAT_TEMPLATE
    assert "pad token: eos token '<|endoftext|>' (existing token, embeddings unchanged)" in tok.typhoon_notes

# -- the bad-input catalogue: (how to break a copy of micro, cfg fields, the message) --
def _rm(f): return lambda d: (d / f).unlink()
def _truncate(d):
    p = d / 'model.safetensors'; b = p.read_bytes(); p.write_bytes(b[:len(b) - 1000])
def _garbage(d): (d / 'model.safetensors').write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}')
def _gpt2(d):
    c = json.loads((d / 'config.json').read_text()); c.update(model_type='gpt2', architectures=['GPT2LMHeadModel'])
    (d / 'config.json').write_text(json.dumps(c))
def _pickle(d):
    (d / 'model.safetensors').unlink(); (d / 'pytorch_model.bin').write_bytes(b'\x80\x04not really')
def _no_tokenizer(d):
    for f in ('tokenizer.json', 'tokenizer_config.json'): (d / f).unlink()

BAD = [
    (_rm('config.json'), {}, 'no config.json: not a Hugging Face model folder'),
    (_truncate, {}, 'model.safetensors: truncated safetensors file: the header describes'),
    (_garbage, {}, 'model.safetensors: corrupted safetensors header'),
    (_no_tokenizer, {}, 'no tokenizer found (expected one of tokenizer.json'),
    (_gpt2, {}, "model_type 'gpt2' (GPT2LMHeadModel) is not supported; supported: llama, mistral, mixtral, qwen2"),
    (_pickle, {}, 'only pickle weights (pytorch_model.bin) found; loading pickle can run arbitrary code'),
    (_rm('model.safetensors'), {}, 'no weights found (expected model.safetensors'),
    (lambda d: None, {'precision': 'fp8'}, "precision: must be one of auto | bf16 | fp16 | fp32, got 'fp8'"),
    (lambda d: None, {'precision': 'fp16'}, 'precision: fp16 is only supported on CUDA'),
    (lambda d: None, {'quantization': '2bit'}, "quantization: must be one of 4bit | 8bit | none, got '2bit'"),
]

@pytest.mark.parametrize('breaker,fields,msg', BAD, ids=[m[:40] for *_, m in BAD])
def test_bad_input(breaker, fields, msg, micro, tmp_path):
    d = tmp_path / 'model'
    shutil.copytree(micro, d)
    breaker(d)
    with pytest.raises(LoaderError) as e:
        load_model(RunConfig(model=str(d), **{'quantization': 'none', **fields}), device='cpu')
    assert msg in str(e.value), str(e.value)
    if not fields: assert str(d) in str(e.value)  # the message names the folder or file

def test_missing_folder():
    with pytest.raises(LoaderError, match='folder not found'): load_model(RunConfig(model='/no/such/folder'))

def test_4bit_without_bitsandbytes(micro, monkeypatch):
    monkeypatch.setitem(sys.modules, 'bitsandbytes', None)  # `import bitsandbytes` now raises ImportError
    with pytest.raises(LoaderError) as e: load_model(RunConfig(model=str(micro), quantization='4bit'), device='cpu')
    assert "quantization: 4bit needs bitsandbytes, which does not import here" in str(e.value)
    m, tok, rep = load_model(RunConfig(model=str(micro), quantization='none'), device='cpu')  # none still works
    assert rep.quantized_layers == 0

def test_check_safetensors_counts_tensors(micro):
    assert check_safetensors(micro / 'model.safetensors') == 21  # 2 layers x 9 + embeddings, norm, LM head
