"""The memory plan: the `typhoon-nb plan` command line on the issue's three cases, the decisions (checkpointing, micro-batch
fallback, refusal) with a fake device capacity, the precision per GPU, the run's refusal before the model loads, the
Colab tutorial's settings on a T4, and a smoke run of the benchmark notebook."""
import dataclasses, json, subprocess, sys
from pathlib import Path
from unittest import mock

import pytest

from typhoon_nb.config import RunConfig, StageConfig, ConfigError
from typhoon_nb.memory import Device, GiB, plan_memory
import typhoon_nb.memory as memory

ROOT = Path(__file__).resolve().parents[1]
SFT = '[{kind: sft, data: "demo:sft", batch_size: 2, max_length: 2048}]'


def plan_cli(*args):
    cp = subprocess.run([sys.executable, '-m', 'typhoon_nb.jobs', 'plan', '--model', 'typhoon-7b-shape', '--stages', SFT, *args],
                        capture_output=True, text=True, timeout=300, cwd=ROOT)
    return cp.returncode, cp.stdout + cp.stderr


def test_cli_t4_fits_in_fp16_with_checkpointing():
    rc, out = plan_cli('--gpu', 't4', '--quantization', '4bit', '--peft_method', 'lora')
    assert rc == 0, out
    assert 'fp16' in out and 'decisions: precision fp16; gradient_checkpointing true' in out
    total = float(out.split('peak ')[1].split(' GiB')[0])
    assert total < 15.0, out   # the T4's 15,360 MiB


def test_cli_h100_keeps_checkpointing_off():
    rc, out = plan_cli('--gpu', 'h100', '--quantization', '4bit', '--peft_method', 'lora')
    assert rc == 0 and 'decisions: precision bf16; gradient_checkpointing false' in out, out


def test_cli_nothing_fits_exits_3():
    rc, out = plan_cli('--gpu', 't4', '--quantization', 'none', '--peft_method', 'full')
    assert rc == 3, out
    assert 'nothing fits: t4 has 15.00 GiB free; the plan needs' in out and 'peft_method: lora (now full)' in out


def test_cli_memory_gb_and_bad_card():
    rc, out = plan_cli('--memory_gb', '24', '--quantization', '4bit')
    assert rc == 0 and '24 GiB GPU' in out, out
    rc, out = plan_cli('--gpu', 'v80')
    assert rc == 2 and "invalid choice: 'v80'" in out


FAKE = lambda gib: Device('fake', 'cuda', int(gib * GiB), int(gib * GiB), True, 'given')
SHAPE = 'typhoon-7b-shape'


def cfg_with(bs=4, L=1024, accum=1, **kw):
    return RunConfig(model=SHAPE, stages=[StageConfig(kind='sft', data='demo:sft', batch_size=bs, grad_accum=accum, max_length=L)], **kw)


def test_auto_checkpointing_follows_the_capacity():
    p = plan_memory(cfg_with(), FAKE(80))
    assert p.gradient_checkpointing is False and p.fits
    p = plan_memory(cfg_with(), FAKE(20))
    assert p.gradient_checkpointing is True and p.fits and p.stages[0].micro_batch == 4
    assert p.stages[0].rows['total_off'] > 20 * GiB >= p.total


def test_micro_batch_falls_back_keeping_the_effective_batch():
    p = plan_memory(cfg_with(bs=8, L=2048, accum=2), FAKE(10))
    s = p.stages[0]
    assert p.fits and p.gradient_checkpointing and s.micro_batch < 8 and s.micro_batch * s.accum == 16
    assert 8 % s.micro_batch == 0 and p.total <= 10 * GiB
    assert any('effective batch 16 kept' in n for n in p.notes)
    cfg = p.apply(cfg_with(bs=8, L=2048, accum=2))
    assert (cfg.stages[0].batch_size, cfg.stages[0].grad_accum, cfg.gradient_checkpointing) == (s.micro_batch, s.accum, True)


def test_refusal_names_free_memory_total_and_settings():
    p = plan_memory(cfg_with(quantization='none', peft_method='full'), FAKE(16))
    assert not p.fits
    assert p.message.startswith('nothing fits: fake has 16.00 GiB free; the plan needs ')
    assert 'quantization: 4bit (now none)' in p.message and 'a shorter max_length' in p.message


def test_prefix_tuning_keeps_checkpointing_off():
    p = plan_memory(cfg_with(peft_method='prefix'), FAKE(20))
    assert p.gradient_checkpointing is False and 'cannot combine' in p.notes[0]
    with pytest.raises(ConfigError, match='cannot combine prefix tuning'):
        RunConfig(peft_method='prefix', gradient_checkpointing=True).validate()
    RunConfig(peft_method='prefix').validate()   # auto is accepted with prefix tuning


def test_precision_per_gpu():
    import torch
    from typhoon_nb.loader import resolve_precision, quantization_config
    dt, why = resolve_precision('auto', 'cuda', bf16_supported=False)
    assert dt == torch.float16 and 'loss scaling' in why
    assert quantization_config('4bit', dt).bnb_4bit_compute_dtype == torch.float16
    assert resolve_precision('auto', 'cuda', bf16_supported=True)[0] == torch.bfloat16
    assert plan_memory(cfg_with(), 'l4').precision == 'bf16' and plan_memory(cfg_with(), 't4').precision == 'fp16'


def test_config_round_trips_auto():
    cfg = RunConfig()
    assert cfg.gradient_checkpointing == 'auto'
    assert RunConfig.from_flags(['--gradient_checkpointing']).gradient_checkpointing is True
    assert RunConfig.from_flags(['--no-gradient_checkpointing']).gradient_checkpointing is False
    assert RunConfig.from_flags(['--gradient_checkpointing', 'auto']).gradient_checkpointing == 'auto'
    assert RunConfig.from_yaml(RunConfig(gradient_checkpointing=True).to_yaml()).gradient_checkpointing is True
    assert RunConfig.from_yaml(cfg.to_yaml()) == cfg
    with pytest.raises(ConfigError, match="gradient_checkpointing: expected true, false or auto, got str 'sometimes'"):
        RunConfig.from_dict({'gradient_checkpointing': 'sometimes'})


def test_cpu_keeps_checkpointing_off():
    "On this CPU the demo's stages fit without checkpointing: auto leaves it off (CPU keeps its speed)."
    p = plan_memory(RunConfig(model='micro-typhoon'))
    assert p.device.kind == 'cpu' and p.gradient_checkpointing is False and p.fits


def test_run_refuses_before_loading_the_model(tmp_path):
    from typhoon_nb.stages import run, RunError
    cfg = RunConfig(model='micro-typhoon', quantization='none', peft_method='full', output_dir=str(tmp_path), run_name='r',
                    stages=[StageConfig(kind='sft', data='demo:sft', batch_size=4, max_length=64, max_steps=1)])
    tiny = Device('fake', 'cpu', 1 << 20, 1 << 20, False, 'given')   # 1 MiB: nothing fits
    with mock.patch.object(memory, 'resolve_device', lambda gpu=None: tiny), \
         mock.patch('typhoon_nb.loader.load_model', side_effect=AssertionError('the model must not load')):
        with pytest.raises(RunError, match='nothing fits: fake has 0.00 GiB free'):
            run(cfg, progress=False, verbose=False)
    man = json.loads((tmp_path / 'r' / 'manifest.json').read_text())
    assert man['status'] == 'failed' and man['memory_plan']['fits'] is False


def test_run_with_the_shape_says_it_has_no_weights(tmp_path):
    from typhoon_nb.stages import run, RunError
    with pytest.raises(RunError, match="typhoon-7b-shape is Typhoon-7B's shape without weights"):
        run(RunConfig(model=SHAPE, output_dir=str(tmp_path), run_name='r'), progress=False, verbose=False)


def test_colab_tutorial_settings_fit_a_t4():
    "The tutorial's settings cell, planned for a 16 GB T4: fp16, checkpointing on, within the card."
    nb = json.loads((ROOT / 'nbs' / 'tutorials' / 'typhoon7b_colab.ipynb').read_text())
    src = next(''.join(c['source']) for c in nb['cells'] if 'cfg = RunConfig(' in ''.join(c['source']))
    ns = {'work': Path('/tmp'), 'data': Path('/tmp/my_sft.jsonl')}
    exec(src, ns)
    cfg = ns['cfg']
    assert cfg.model == 'scb10x/typhoon-7b' and cfg.precision == 'auto' and cfg.gradient_checkpointing == 'auto'
    p = plan_memory(dataclasses.replace(cfg, model=SHAPE), 't4')
    assert p.fits and p.precision == 'fp16' and p.gradient_checkpointing is True and p.total < 15 * GiB


def test_benchmark_notebook_smoke(tmp_path):
    "The benchmark notebook through papermill on the tiny shape, 4-bit only: its record and the 20% goal."
    import papermill as pm
    out = tmp_path / 'memory_plan.json'
    pm.execute_notebook(str(ROOT / 'nbs' / 'benchmarks' / 'memory_plan.ipynb'), str(tmp_path / 'out.ipynb'), cwd=str(ROOT / 'nbs' / 'benchmarks'),
                        parameters={'shapes': ['tiny'], 'quantizations': ['4bit'], 'out': str(out)}, progress_bar=False, kernel_name='python3')
    res = json.loads(out.read_text())
    assert res['machine']['cpu'] and len(res['cpu']) == 1
    r = res['cpu'][0]
    assert r['shape'] == 'tiny' and r['quantization'] == '4bit' and abs(r['error']) <= 0.20
    assert res['gpu'] and all(abs(x['error']) <= 0.20 for x in res['gpu'])
