"The QLoRA and PEFT benchmark notebooks, executed by papermill with their smoke parameters (micro model, few steps): the records they write."
import json, math, os
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / 'nbs' / 'benchmarks'
STEPS = 2

from conftest import execute_bench as execute

@pytest.fixture(scope='module')
def qlora(tmp_path_factory):
    return execute(tmp_path_factory.mktemp('qlora'), 'qlora_bench', model='micro-typhoon', max_steps=STEPS, eval_samples=2)

@pytest.fixture(scope='module')
def peft(tmp_path_factory):
    return execute(tmp_path_factory.mktemp('peft'), 'peft_bench', model='micro-typhoon', max_steps=STEPS, eval_samples=2, shape='small')

def _machine_ok(m):
    from typhoon_nb.loader import resolve_precision, cpu_flags
    assert m['cores'] == os.cpu_count() and m['cpu'] and m['torch']
    assert set(m['cpu_flags']) == {'avx2', 'avx512f', 'avx512_bf16', 'amx_tile', 'amx_bf16'}
    assert m['cpu_flags']['avx512_bf16'] == ('avx512_bf16' in cpu_flags())
    assert m['precision'] == str(resolve_precision('auto')[0]).replace('torch.', '')  # the precision this CPU has, nothing else

def _nf4(n):  # bytes of one NF4 + double-quant layer of n weights: codes, 8-bit absmax per 64, fp32 absmax per 256 blocks, offset
    b = -(-n // 64)
    return -(-n // 2) + b + 4 * -(-b // 256) + 4

def test_qlora_weight_bytes_at_typhoon_7b(qlora):
    _machine_ok(qlora['machine'])
    assert qlora['model_build'].startswith('micro-typhoon')  # which build of the embedded model was measured
    for q, c in qlora['tiny_weight_bytes'].items():  # the rule reproduces the loader's quantized model byte for byte
        assert c['loaded_bytes'] == c['computed_bytes'] > 0, q
    t = qlora['tiny_weight_bytes']
    assert t['4bit']['loaded_bytes'] < t['8bit']['loaded_bytes'] < t['none']['loaded_bytes']
    V, h, I, L, hd = 35219, 4096, 14336, 32, 128
    lin = [h * 32 * hd, h * 8 * hd, h * 8 * hd, 32 * hd * h, h * I, h * I, I * h]  # q k v o gate up down
    rows = [32 * hd, 8 * hd, 8 * hd, h, I, I, h]
    other = 2 * V * h + (2 * L + 1) * h  # embeddings, LM head, norms: bf16
    ty = qlora['typhoon7b']
    assert ty['params'] == L * sum(lin) + other == 7_268_102_144
    w = ty['weights']
    assert w['none']['weight_bytes_bf16'] == 2 * ty['params']
    assert w['8bit']['weight_bytes_bf16'] == L * sum(n + 4 * r for n, r in zip(lin, rows)) + 2 * other
    assert w['4bit']['weight_bytes_bf16'] == L * sum(map(_nf4, lin)) + 2 * other
    assert round(w['4bit']['weight_bytes_bf16'] / 2**30, 2) == 3.89

def test_qlora_runs_per_quantization(qlora):
    assert list(qlora['runs']) == ['none', '8bit', '4bit']
    for q, r in qlora['runs'].items():
        assert r['status'] == 'done' and r['steps'] == STEPS and r['tokens'] > 0, q
        assert [s for s, _ in r['loss']] == list(range(1, STEPS + 1)) and all(math.isfinite(l) for _, l in r['loss']), q
        assert r['tokens_per_s'] > 0 and r['peak_rss_bytes'] >= r['rss_before_bytes'] > 0, q
        assert r['completion_loss_after'] < r['completion_loss_before'], q  # two steps at the demo's SFT learning rate help
    assert qlora['stage']['kind'] == 'sft' and qlora['stage']['max_steps'] == STEPS

def test_peft_trainable_parameters(peft):
    _machine_ok(peft['machine'])
    assert peft['model_build'].startswith('micro-typhoon')
    from typhoon_nb.gpu_check import SMALL
    h, I, L, nh, kv = SMALL['hidden_size'], SMALL['intermediate_size'], SMALL['num_hidden_layers'], SMALL['num_attention_heads'], SMALL['num_key_value_heads']
    hd, r, p = h // nh, peft['lora_r'], peft['prefix_tokens']
    io_ = [(h, nh * hd), (h, kv * hd), (h, kv * hd), (nh * hd, h), (h, I), (h, I), (I, h)]
    lora, prefix = L * r * sum(a + b for a, b in io_), p * L * 2 * kv * hd  # A and B of every linear; a key and a value per KV head
    big = {m: peft['params'][m]['large'] for m in ('lora', 'prefix', 'both')}
    assert (big['lora']['trainable'], big['prefix']['trainable'], big['both']['trainable']) == (lora, prefix, lora + prefix)
    tiny = {m: peft['params'][m]['tiny']['trainable'] for m in ('lora', 'prefix', 'both')}
    assert tiny['both'] == tiny['lora'] + tiny['prefix'] and 0 < tiny['prefix'] < tiny['lora']

def test_peft_loss_curves(peft):
    assert list(peft['runs']) == ['lora', 'prefix', 'both']
    for m, r in peft['runs'].items():
        assert r['status'] == 'done' and r['steps'] == STEPS and r['tokens_per_s'] > 0, m
        assert [s for s, _ in r['loss']] == list(range(1, STEPS + 1)) and all(math.isfinite(l) for _, l in r['loss']), m
    assert peft['runs']['lora']['completion_loss_after'] < peft['runs']['lora']['completion_loss_before']
    from typhoon_nb.config import RunConfig
    assert peft['quantization'] == RunConfig().quantization  # the demo's base
