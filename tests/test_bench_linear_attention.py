"The linear-attention benchmark notebook, executed by papermill with its smoke parameters (micro model, short lengths): the record it writes."
import json, math
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
SMOKE = dict(variant='micro', n_layers=1, lengths=[128, 256, 512], contexts=[64, 256], decode_tokens=2, repeats=1,
             chunk_size=32, n_eval=16, n_train=200, transfer_steps=3, lora_steps=2)

@pytest.fixture(scope='module')
def res(tmp_path_factory):
    from conftest import execute_bench
    return execute_bench(tmp_path_factory.mktemp('linear_attention_bench'), 'linear_attention_bench', **SMOKE)

def test_every_training_case_is_timed(res):
    cases = {(r['attention'], r['seq_len']): r for r in res['training']}
    assert sorted(cases) == sorted((a, T) for a in ('softmax', 'linear') for T in SMOKE['lengths'])
    for r in cases.values():
        assert r['step_s'] > 0 and r['wall_s'] > 0 and len(r['all_step_s']) == SMOKE['repeats']
        assert r['step_s'] == min(r['all_step_s'])
        assert r['step_mib'] > 0 and r['peak_mib'] >= r['baseline_mib'] + r['step_mib'] - 1e-6

def test_summary_follows_the_cases(res):
    s, tr = res['summary'], {(r['attention'], r['seq_len']): r['step_s'] for r in res['training']}
    lo, hi = s['growth_from'], s['growth_to']
    assert (lo, hi) == (128, 512)  # without 2k and 16k in the lengths: the shortest and the longest
    assert s['linear_growth'] == pytest.approx(tr['linear', hi] / tr['linear', lo])
    assert s['softmax_growth'] == pytest.approx(tr['softmax', hi] / tr['softmax', lo])
    assert s['goal_limit'] == pytest.approx(9 * 4 / 8)  # 9x for 8x the tokens, scaled to 4x
    assert s['goal_met'] == (s['linear_growth'] <= s['goal_limit'] and s['softmax_growth'] > s['linear_growth'])
    faster = [T for T in SMOKE['lengths'] if all(tr['linear', U] < tr['softmax', U] for U in SMOKE['lengths'] if U >= T)]
    assert s['crossover_measured'] == (min(faster) if faster else None)

def test_generation_state_is_constant_and_the_kv_cache_grows(res):
    g = {(r['attention'], r['context']): r for r in res['generation']}
    assert sorted(g) == sorted((a, c) for a in ('softmax', 'linear') for c in SMOKE['contexts'])
    for r in g.values():
        assert r['ms_per_token'] > 0 and r['prefill_s'] > 0
        assert r['cache_tokens'] == r['context'] + SMOKE['decode_tokens']
    m = res['model']  # micro: 1 KV head of 32, Hedgehog features 2 x 32
    state = {g['linear', c]['cache_bytes'] for c in SMOKE['contexts']} | {g['linear', c]['cache_bytes_after_prefill'] for c in SMOKE['contexts']}
    F = 2 * m['head_dim']
    assert state == {m['layers'] * m['kv_heads'] * (F * m['head_dim'] + F) * 4}  # S (F x d) and z (F) per KV head, fp32
    for c in SMOKE['contexts']:  # K and V: 2 x layers x KV heads x head dim x 4 bytes per token
        assert g['softmax', c]['cache_bytes'] == (c + SMOKE['decode_tokens']) * 2 * m['layers'] * m['kv_heads'] * m['head_dim'] * 4

def test_quality_has_every_model(res):
    q = res['quality']['perplexity']
    assert list(q) == ['original', 'converted, before transfer', 'after attention transfer', 'after transfer + LoRA',
                       'original + the same LoRA (control)']
    assert all(math.isfinite(v) and v > 1 for v in q.values())
    assert q['converted, before transfer'] != q['original']  # the conversion changes the computation
    assert res['quality']['transfer']['steps'] == SMOKE['transfer_steps'] and res['quality']['transfer']['mse_before'] > 0
