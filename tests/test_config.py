"RunConfig: the bad-config catalogue, round trips, light import, README in sync with index.ipynb."
import copy, subprocess, sys
from pathlib import Path
import pytest
from hypothesis import given, settings, Phase, strategies as st
from typhoon_nb.config import RunConfig, StageConfig, ConfigError

ROOT = Path(__file__).resolve().parent.parent
S = lambda **kw: {'kind': 'sft', 'data': 'demo:sft', **kw}

# (config dict or YAML text, the specific message it must produce)
BAD = [
    ({'lora_r': 'eight'}, "lora_r: expected int, got str 'eight'"),
    ({'lora_r': 8.5}, 'lora_r: expected int, got float 8.5'),
    ({'use_rwkv': 'yes'}, "use_rwkv: expected bool, got str 'yes'"),
    ({'quantisation': '4bit'}, "quantisation: unknown field (did you mean 'quantization'?)"),
    ({'peft_methd': 'lora'}, "did you mean 'peft_method'?"),
    ({'quantization': '2bit'}, "quantization: must be one of 4bit | 8bit | none, got '2bit'"),
    ({'peft_method': 'adapter'}, "peft_method: must be one of lora | prefix | both | full, got 'adapter'"),
    ({'lora_r': 0}, 'lora_r: must be > 0'),
    ({'lora_alpha': -1}, 'lora_alpha: must be > 0'),
    ({'lora_dropout': 1.0}, 'lora_dropout: must be in [0, 1), got 1.0'),
    ({'prefix_tokens': 0}, 'prefix_tokens: must be > 0'),
    ({'peft_method': 'full', 'quantization': '4bit'}, 'peft_method: full training needs a full-precision base, but quantization is 4bit'),
    ({'peft_method': 'prefix', 'gradient_checkpointing': True}, 'PEFT cannot combine prefix tuning with gradient checkpointing'),
    ({'stages': []}, 'stages: at least one stage is needed'),
    ({'stages': [{'kind': 'sft'}]}, 'stages[0].data: every stage needs data'),
    ({'stages': [S(lr=-1)]}, 'stages[0].lr: must be > 0, got -1'),
    ({'stages': [S(kind='rlhf')]}, "stages[0].kind: must be one of pretrain | sft | dpo, got 'rlhf'"),
    ({'stages': [{'kind': 'dpo', 'data': 'demo:dpo'}]}, "stages[0].reference: 'sft' needs an SFT stage before this DPO stage"),
    ({'stages': [S(), S()]}, "stages: two stages are named 'sft'"),
    ({'stages': [S(batchsize=4)]}, "stages[0].batchsize: unknown field (did you mean 'batch_size'?)"),
    ({'stages': ['sft']}, "stages[0]: expected a mapping of stage fields, got str 'sft'"),
    ({'stages': {'kind': 'sft'}}, 'stages: expected a list of stages, got dict'),
    ({'stages': [S(overrides={'lora_r': 4})]}, 'stages[0].overrides.lora_r: only refinement fields can change per stage'),
    ({'moe_top_k': 4, 'moe_experts': 2}, 'moe_top_k: must be <= moe_experts (2), got 4'),
    ({'neftune_alpha': 0}, 'neftune_alpha: must be > 0 or None (off)'),
    ({'lora_targets': []}, 'lora_targets: must be a non-empty list'),
    ('peft_method: [lora\n', 'not valid YAML at line 2'),
    ('- lora\n- prefix\n', 'expected a mapping of config fields at the top level, got a list'),
    ('42\n', 'expected a mapping of config fields at the top level, got a int'),
]

@pytest.mark.parametrize('bad,msg', BAD, ids=[m[:40] for _, m in BAD])
def test_bad_config(bad, msg, tmp_path):
    before = copy.deepcopy(bad)
    with pytest.raises(ConfigError) as e:
        if isinstance(bad, str):
            p = tmp_path / 'bad.yaml'; p.write_text(bad)
            RunConfig.from_yaml(p)
        else: RunConfig.from_dict(bad)
    assert msg in str(e.value), str(e.value)
    assert bad == before, 'the input was changed (half-applied)'
    if isinstance(bad, str): assert str(tmp_path / 'bad.yaml') in str(e.value)

def test_catalogue_is_large_enough(): assert len(BAD) >= 15

def test_every_problem_at_once():
    with pytest.raises(ConfigError) as e:
        RunConfig.from_dict({'lora_r': 0, 'quantization': '3bit', 'stages': [S(lr=-1), {'kind': 'pretrain'}]})
    assert len(e.value.problems) == 4, e.value.problems

def test_validate_object_changed_in_python():
    cfg = RunConfig(); cfg.stages[0].batch_size = 0
    with pytest.raises(ConfigError, match=r'stages\[0\]\.batch_size: must be > 0, got 0'): cfg.validate()

# --- round trips: YAML <-> RunConfig <-> flat dict <-> flags --------------------------------------------------
floats = st.floats(min_value=1e-6, max_value=10, allow_nan=False, allow_infinity=False)
stages = st.lists(st.builds(lambda k, lr, bs, n, b: dict(kind=k, data=f'demo:{k}', name=n, lr=lr, batch_size=bs, beta=b,
                                                          reference='entering'),
                            st.sampled_from(['pretrain', 'sft', 'dpo']), floats, st.integers(1, 64),
                            st.text('abcxyz_ก', min_size=1, max_size=8), floats),
                  min_size=1, max_size=3, unique_by=lambda s: s['name'])
configs = st.builds(lambda pm, q, r, rw, l3, neft, lt, sd, stg, rn: RunConfig.from_dict(dict(
        peft_method=pm, quantization=q, lora_r=r, use_rwkv=rw, use_llama3=l3, neftune_alpha=neft, lora_targets=lt,
        seed=sd, stages=stg, run_name=rn)),
    st.sampled_from(['lora', 'prefix', 'both']), st.sampled_from(['4bit', '8bit', 'none']), st.integers(1, 256),
    st.booleans(), st.booleans(), st.one_of(st.none(), floats), st.lists(st.sampled_from(['q_proj', 'k_proj', 'v_proj', 'o_proj']), min_size=1, max_size=3),
    st.integers(0, 2**31), stages, st.one_of(st.none(), st.text('abc-_1ไทย', min_size=1, max_size=10).filter(lambda s: s[0] not in '-.')))

@settings(max_examples=60, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(configs)
def test_round_trips(cfg):
    assert RunConfig.from_yaml(cfg.to_yaml()) == cfg
    assert RunConfig.from_flat(cfg.to_flat()) == cfg
    assert RunConfig.from_flags(cfg.to_flags()) == cfg
    assert RunConfig.from_flags(cfg.to_flags(defaults=True)) == cfg
    # papermill delivers strings: the flat form with every scalar stringified parses back to the same config
    strs = {k: (v if isinstance(v, (list, dict)) else str(v)) for k, v in cfg.to_flat().items()}
    assert RunConfig.from_flat(strs) == cfg

def test_original_flags():
    cfg = RunConfig.from_flags(['--peft_method', 'prefix', '--quantization', '8bit', '--use_rwkv', '--use_llama3'])
    assert (cfg.peft_method, cfg.quantization, cfg.use_rwkv, cfg.moe_on, cfg.gqa_on) == ('prefix', '8bit', True, True, True)
    d = RunConfig()
    assert (d.peft_method, d.quantization, d.use_rwkv, d.use_llama3) == ('lora', '4bit', False, False)

def test_flags_with_config_file(tmp_path):
    p = tmp_path / 'run.yaml'; RunConfig(lora_r=4, seed=7).to_yaml(p)
    cfg = RunConfig.from_flags(['--config', str(p), '--lora_r', '8'])
    assert (cfg.lora_r, cfg.seed) == (8, 7)

def test_unknown_flag():
    with pytest.raises(ConfigError, match="did you mean 'peft_method'"): RunConfig.from_flags(['--peft_methods', 'lora'])

# --- light import ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('mod', ['typhoon_nb', 'typhoon_nb.config'])
def test_import_is_light(mod):
    code = f"import sys, {mod}; heavy = [m for m in ('torch', 'transformers', 'peft', 'trl', 'datasets') if m in sys.modules]; print(heavy)"
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == '[]', out

# --- README is generated from nbs/index.ipynb ------------------------------------------------------------------
def test_readme_matches_index():
    from typhoon_nb.docs import notebook_markdown
    images = {}
    assert (ROOT / 'README.md').read_text(encoding='utf-8') == notebook_markdown(ROOT / 'nbs' / 'index.ipynb', images), \
        'README.md is out of date: run `make readme`'
    for name, png in images.items():  # the figures the README shows are the notebook's, on disk
        f = ROOT / 'nbs' / 'images' / name
        assert f.is_file() and f.read_bytes() == png, f'{f} is missing or stale: run `make readme`'
    readme = (ROOT / 'README.md').read_text()
    assert 'make demo' in readme and 'make test' in readme

@pytest.mark.parametrize('name', ['--', '../up', 'a/b', ' x', '.hidden'])
def test_run_name_is_a_plain_folder_name(name):
    with pytest.raises(ConfigError, match='run_name: must be a plain folder name'): RunConfig.from_dict({'run_name': name})

def test_nll_weight_is_checked():
    from typhoon_nb.config import RunConfig, ConfigError
    with pytest.raises(ConfigError, match=r"stages\[0\]\.nll_weight: must be >= 0 \(0: plain DPO; RPO uses 1.0\), got -1"):
        RunConfig.from_dict({'stages': [{'kind': 'dpo', 'data': 'demo:dpo', 'nll_weight': -1}]})
    assert RunConfig().stages[-1].nll_weight == 1.0  # the demo's DPO stage keeps its answers' likelihood (RPO)
