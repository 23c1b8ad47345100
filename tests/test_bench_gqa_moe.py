"The GQA and MoE benchmark notebooks, executed by papermill with their smoke parameters (micro model, few steps): the records they write."
import json, math, os, shutil
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / 'nbs' / 'benchmarks'

from conftest import execute_bench as execute

@pytest.fixture(scope='module')
def gqa(tmp_path_factory):
    return execute(tmp_path_factory.mktemp('gqa'), 'gqa_bench', model='micro-typhoon', context=64, new_tokens=8, n_eval=8,
                   uptrain_steps=2, uptrain_lines=64, timing_rounds=1)

@pytest.fixture(scope='module')
def moe(tmp_path_factory):
    return execute(tmp_path_factory.mktemp('moe'), 'moe_bench', model='micro-typhoon', max_steps=2, eval_samples=4, experts=4,
                   top_k=2, timing_rounds=1)

def test_gqa_kv_bytes_halve_with_the_heads(gqa):
    rows = {r['kv_heads']: r for r in gqa['pooled']}
    assert sorted(rows) == [1, 2, 4]  # the micro model's 4 query heads: expanded to 4 KV heads, pooled to 2 and 1
    for h in (4, 2):
        assert rows[h // 2]['kv_bytes_per_token_measured'] == rows[h]['kv_bytes_per_token_measured'] / 2
        assert rows[h // 2]['cache_bytes'] * 2 == rows[h]['cache_bytes']
    for h, r in rows.items():  # measured from the cache = 2 x layers x heads x head dim x 4 bytes (fp32)
        assert r['kv_bytes_per_token_measured'] == r['kv_bytes_per_token_formula'] == 2 * gqa['layers'] * h * gqa['head_dim'] * 4
        assert r['cache_tokens'] == gqa['context'] + gqa['new_tokens'] - 1
    assert rows[4]['typhoon7b_kib_per_token'] == 512 and rows[1]['typhoon7b_kib_per_token'] == 128  # Typhoon-7B with 32 and 8 KV heads, bf16

def test_gqa_expansion_and_pooling_back_are_exact(gqa):
    assert gqa['expansion_max_logit_diff'] < 1e-4
    for r in gqa['pooled']:  # the micro model has one KV head: every pooled model is the original function
        assert r['perplexity'] == pytest.approx(gqa['original_perplexity'], rel=1e-4)

def test_gqa_uptraining_runs_through_the_stages(gqa):
    u = gqa['uptrain']['1']  # the control at the original head count
    assert u['status'] == 'done' and u['steps'] == 2 and u['tokens'] > 0
    assert u['perplexity_before'] == pytest.approx(gqa['original_perplexity'], rel=1e-3)  # same held-out lines, same model
    assert u['perplexity_after'] < u['perplexity_before']

def test_moe_parameters(moe):
    p = moe['params']
    X = 3 * 128 * 384  # one expert (SwiGLU MLP) of the micro model: hidden 128, intermediate 384; 2 layers
    assert p['moe_total'] - p['dense'] == 2 * (3 * X + 4 * 128)  # 3 more experts and a 4 x 128 router per layer
    assert p['moe_total'] - p['moe_active'] == 2 * (4 - 2) * X  # top-2 of 4: two experts per layer idle per token
    assert round(p['typhoon7b_dense'] / 1e9, 2) == 7.24

def test_moe_load_histograms_sum_to_the_routed_tokens(moe):
    for stage in ('pretrain', 'sft'):
        r = moe['router'][stage]
        seen = moe['runs']['moe']['stages'][stage]['tokens']
        assert seen > 0
        for counts, tokens, ent in zip(r['counts'], r['tokens'], r['entropy']):
            assert len(counts) == moe['experts'] == 4
            assert sum(counts) == moe['top_k'] * tokens  # every routed token gives top_k assignments
            assert tokens == seen  # the router saw exactly the tokens the stage trained on (packed, no padding)
            assert 0 < ent <= 1

def test_moe_runs_and_metrics(moe):
    for name in ('dense', 'moe'):
        run = moe['runs'][name]
        assert run['status'] == 'done'
        assert set(run['stages']) == {'pretrain', 'sft'}
        assert math.isfinite(run['stages']['pretrain']['perplexity_after'])
        assert 0 <= run['stages']['sft']['exact_match_after'] <= 1 and 0 <= run['logp_preference_accuracy'] <= 1
        assert all(v > 0 for v in run['tokens_per_s'].values())
    assert moe['throughput_fwd_bwd_tokens_per_s']['dense'] > 0 and moe['throughput_fwd_bwd_tokens_per_s']['moe'] > 0
