"""Smoke run of the performance suite (nbs/benchmarks/perf_suite.ipynb) with tiny sizes, and the CPU-runnable parts of
nbs/benchmarks/gpu_perf.py at a tiny shape."""
import json, os, subprocess, sys
from pathlib import Path
import pytest

BENCH = Path(__file__).resolve().parents[1] / 'nbs' / 'benchmarks'
sys.path.insert(0, str(BENCH))
FIELDS = ('case', 'ours_tokens_per_s', 'baseline_tokens_per_s', 'ratio', 'mfu', 'peak_memory_bytes', 'machine', 'repeats')
SMOKE = dict(shape='tiny', steps=2, repeats=1, batch_size=4, max_length=48, n_train=64, dpo_steps=2, memory_steps=2,
             memory_configs=['4bit/lora'], levers=['packing'], profile_steps=2)

@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    pm = pytest.importorskip('papermill')
    td = tmp_path_factory.mktemp('perf')
    params = SMOKE | {'out_json': str(td / 'perf.json'), 'plot_png': str(td / 'perf.png')}
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    pm.execute_notebook(str(BENCH / 'perf_suite.ipynb'), str(td / 'perf_suite.ipynb'), parameters=params, cwd=str(BENCH),
                        kernel_name='python3', progress_bar=False)
    return td, json.loads((td / 'perf.json').read_text())

def test_smoke_records(smoke):
    td, res = smoke
    cases = [r['case'] for r in res['records']]
    assert cases == ['sft_lora', 'dpo_lora', 'lever_packing', 'memory_4bit_lora']
    for r in res['records']:
        for f in FIELDS: assert f in r, f"{r['case']}: no {f}"
        for f in ('ours_tokens_per_s', 'baseline_tokens_per_s', 'ratio', 'mfu', 'peak_memory_bytes', 'repeats'):
            assert r[f] > 0, f"{r['case']}: {f} = {r[f]}"
        assert abs(r['ratio'] - r['ours_tokens_per_s'] / r['baseline_tokens_per_s']) < 1e-9
        assert 0 < r['mfu'] < 1
        assert {'cpu', 'cores', 'torch'} <= set(r['machine'])
    assert res['bf16_peak_flops_per_s'] > 0 and (td / 'perf.png').stat().st_size > 1000

def test_smoke_sides_differ_as_documented(smoke):
    "Our SFT side packs padding-free without checkpointing; plain TRL keeps its defaults (bf16 autocast, checkpointing, padding)."
    head = smoke[1]['records'][0]
    ours = [r for r in head['runs'] if r['path'] == 'ours'][0]
    trl = [r for r in head['runs'] if r['path'] == 'trl'][0]
    assert ours['padding_free'] and not ours['gradient_checkpointing']
    assert trl['bf16'] and trl['gradient_checkpointing'] and not trl['padding_free']

def test_flops_convention():
    import gpu_perf as g, torch
    m = g.build_model('tiny', torch.float32, 'cpu')
    s = g.SHAPES['tiny']
    h, i, L, V, kv = s['hidden_size'], s['intermediate_size'], s['num_hidden_layers'], s['vocab_size'], s['num_key_value_heads']
    hd = h // s['num_attention_heads']
    n = L * (2 * h * h + 2 * h * kv * hd + 3 * h * i) + V * h  # attention, MLP, LM head; not the input embeddings
    assert g.matmul_params(m) == n
    assert g.flops_per_token(n, 'lora') == 4 * n and g.flops_per_token(n, 'full') == 6 * n

def test_typhoon_7b_shape():
    import gpu_perf as g
    from transformers import MistralConfig
    c = MistralConfig(**g.SHAPES['7b'])
    s = g.SHAPES['7b']
    hd = s['hidden_size'] // s['num_attention_heads']
    n = s['num_hidden_layers'] * (2 * s['hidden_size'] ** 2 + 2 * s['hidden_size'] * s['num_key_value_heads'] * hd
                                  + 3 * s['hidden_size'] * s['intermediate_size']) + 2 * s['vocab_size'] * s['hidden_size']
    assert 7.2e9 < n < 7.3e9  # Typhoon-7B: about 7.27 B weights in the matrices and embeddings
    assert c.num_key_value_heads == 8 and c.intermediate_size == 14336

def test_cli_tiny_qlora(tmp_path):
    "The GPU script's command line at a tiny shape on CPU: 4-bit LoRA, both paths, JSON with rates, ratio, MFU and memory."
    out = tmp_path / 'g.json'
    cp = subprocess.run([sys.executable, str(BENCH / 'gpu_perf.py'), '--shape', 'tiny', '--steps', '2', '--batch_size', '4',
                         '--max_length', '48', '--n_train', '64', '--no_install', '--out', str(out)],
                        capture_output=True, text=True, env=os.environ | {'HF_HUB_OFFLINE': '1'}, timeout=300)
    assert cp.returncode == 0, cp.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res['quantization'] == '4bit' and res['peft'] == 'lora' and {r['path'] for r in res['runs']} == {'ours', 'trl'}
    assert res['tokens_per_s']['ours'] > 0 and res['tokens_per_s']['trl'] > 0 and res['ratio'] > 0
    assert 0 < res['mfu']['ours'] < 1 and res['bf16_peak_flops_per_s'] > 0
    assert all(r['peak_memory_bytes'] > 0 and r['peak_rss_bytes'] > 0 for r in res['runs'])

def test_clock_needs_steps():
    import gpu_perf as g
    c = g.Clock(warmup=1)
    c.marks = [(0.0, 100)]
    with pytest.raises(RuntimeError, match='only 1 steps ran: need more than 1 warm-up'): c.rate()
    c.marks = [(0.0, 100), (2.0, 500)]
    assert c.rate() == (200.0, 400, 2.0)
