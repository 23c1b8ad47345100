"run(cfg): the DPO reference, kill-and-resume, the run folder, and bad input caught before training (micro model)."
import json, math, os, signal, subprocess, sys, time, textwrap
from pathlib import Path
import pytest
from typhoon_nb.config import RunConfig, ConfigError

ROOT = Path(__file__).resolve().parent.parent

def micro_cfg(tmp_path, stages, **kw):
    base = dict(model='micro-typhoon', quantization='none', precision='fp32', output_dir=str(tmp_path / 'runs'),
                run_name='r', lora_r=8, lora_alpha=16.0, lora_dropout=0.0, prefix_tokens=4, warmup_ratio=0.0)
    return RunConfig.from_dict(base | kw | {'stages': stages})

SFT = dict(kind='sft', data='demo:sft', lr=5e-3, max_steps=6, batch_size=8, max_length=64, save_steps=0, eval_samples=8)
DPO = dict(kind='dpo', data='demo:dpo', lr=1e-3, max_steps=2, batch_size=4, max_length=64, save_steps=0, eval_samples=8)

def stage_logs(run_dir, stage):
    return [json.loads(l) for l in (Path(run_dir) / 'metrics.jsonl').read_text().splitlines() if json.loads(l)['stage'] == stage]

# --- the DPO reference ----------------------------------------------------------------------------------------
@pytest.mark.parametrize('method', ['lora', 'prefix', 'both', 'full'])
def test_dpo_step0_loss_is_ln2_with_the_sft_reference(tmp_path, method):
    from typhoon_nb.stages import run
    cfg = micro_cfg(tmp_path, [SFT, DPO | {'overrides': {}}], peft_method=method, run_name=f'ref-{method}')
    cfg.stages[1].reference = 'sft'
    res = run(cfg, progress=False, verbose=False)
    first = [r for r in stage_logs(res.run_dir, 'dpo') if 'loss' in r][0]
    assert first['step'] == 1
    assert abs(first['loss'] - math.log(2)) < 1e-3, first
    assert abs(first['rewards/margins']) < 1e-4, first

def test_moe_router_load_is_in_the_metrics(tmp_path):
    "With the MoE patch every logged SFT record carries the router's load per expert per layer, summing to top-k x tokens."
    from typhoon_nb.stages import run
    cfg = micro_cfg(tmp_path, [SFT | {'max_steps': 2}], use_moe=True, moe_experts=4, moe_top_k=2, run_name='moe')
    res = run(cfg, progress=False, verbose=False)
    recs = [r for r in stage_logs(res.run_dir, 'sft') if 'router_tokens/L0' in r]
    assert recs, 'no router statistics in metrics.jsonl'
    for r in recs:
        for layer in (0, 1):
            counts = [r[f'router_count/L{layer}/E{e}'] for e in range(4)]
            assert sum(counts) == 2 * r[f'router_tokens/L{layer}'], r
    assert sum(r['router_tokens/L0'] for r in recs) > 0

def test_dpo_with_base_reference_starts_elsewhere(tmp_path):
    "Negative control: after SFT, an adapter-disabled (base) reference does not start DPO at ln 2."
    from typhoon_nb.stages import run
    cfg = micro_cfg(tmp_path, [SFT, DPO | {'reference': 'base'}], run_name='base-ref')
    res = run(cfg, progress=False, verbose=False)
    first = [r for r in stage_logs(res.run_dir, 'dpo') if 'loss' in r][0]
    assert abs(first['loss'] - math.log(2)) > 1e-3, first

# --- the run folder ---------------------------------------------------------------------------------------------
def test_run_folder_is_complete(tmp_path):
    from typhoon_nb.stages import run
    pre = dict(kind='pretrain', data='demo:pretrain', lr=5e-3, max_steps=3, batch_size=4, max_length=64, save_steps=0, eval_samples=8)
    cfg = micro_cfg(tmp_path, [pre, SFT | {'max_steps': 2}, DPO | {'max_steps': 1}])
    res = run(cfg, progress=False, verbose=False)
    rd = Path(res.run_dir)
    for p in ['config.yaml', 'manifest.json', 'metrics.jsonl', 'summary.json', 'stages/0-pretrain/adapter',
              'stages/1-sft/adapter', 'stages/2-dpo/adapter', 'final', 'plots/loss.png']:
        assert (rd / p).exists(), p
    man = json.loads((rd / 'manifest.json').read_text())
    assert man['status'] == 'done' and man['seed'] == cfg.seed
    assert {'torch', 'transformers', 'peft', 'trl'} <= set(man['versions'])
    assert all(man['stages'][s]['status'] == 'done' for s in ('pretrain', 'sft', 'dpo'))
    assert len(man['data']['sft']['sha256']) == 16
    summ = json.loads((rd / 'summary.json').read_text())
    assert summ['status'] == 'done'
    assert {'perplexity_before', 'perplexity_after', 'tokens', 'wall_s', 'status'} <= set(summ['stages']['pretrain'])
    assert {'exact_match_before', 'exact_match_after', 'style_rate_before', 'style_rate_after'} <= set(summ['stages']['sft'])
    assert {'preference_accuracy_before', 'preference_accuracy_after'} <= set(summ['stages']['dpo'])
    assert summ['stages']['pretrain']['tokens'] > 0
    assert RunConfig.from_yaml(rd / 'config.yaml') == cfg.__class__.from_dict(cfg.to_dict() | {'run_name': 'r'})

# --- bad input: a clear error before any training ----------------------------------------------------------------
def _no_training(tmp_path):
    rd = tmp_path / 'runs' / 'r'
    return not (rd / 'metrics.jsonl').exists() and not list(rd.glob('stages/*/checkpoints/checkpoint-*'))

def test_stage_without_data_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r'stages\[0\]\.data: every stage needs data'):
        micro_cfg(tmp_path, [{'kind': 'sft'}])

def test_dpo_before_sft_with_sft_reference(tmp_path):
    with pytest.raises(ConfigError, match=r"stages\[0\]\.reference: 'sft' needs an SFT stage before"):
        micro_cfg(tmp_path, [DPO])

def test_wrong_schema_for_the_stage(tmp_path):
    from typhoon_nb.stages import run
    f = tmp_path / 'pre.jsonl'
    f.write_text('\n'.join(json.dumps({'text': f'ข้อความ {i}'}) for i in range(5)) + '\n', encoding='utf-8')
    cfg = micro_cfg(tmp_path, [SFT | {'data': str(f)}])
    with pytest.raises(Exception) as e: run(cfg, progress=False, verbose=False)
    assert 'pre.jsonl' in str(e.value) and 'line 1' in str(e.value), str(e.value)
    assert _no_training(tmp_path)

def test_every_record_rejected(tmp_path):
    from typhoon_nb.stages import run
    f = tmp_path / 'sft.jsonl'
    f.write_text('\n'.join(json.dumps({'prompt': 'ถาม', 'completion': ''}) for _ in range(4)) + '\n', encoding='utf-8')
    cfg = micro_cfg(tmp_path, [SFT | {'data': str(f), 'on_bad_record': 'skip'}])
    with pytest.raises(Exception, match=r"none of the 4 records is usable[\s\S]*line 1: field 'completion': empty text"):
        run(cfg, progress=False, verbose=False)
    assert _no_training(tmp_path)

def test_resume_from_a_folder_that_is_not_a_run(tmp_path):
    from typhoon_nb.stages import run, RunError
    (tmp_path / 'notarun').mkdir()
    with pytest.raises(RunError, match='is not a run folder'):
        run(micro_cfg(tmp_path, [SFT], resume=str(tmp_path / 'notarun')), progress=False, verbose=False)

def test_existing_run_folder_is_not_overwritten(tmp_path):
    from typhoon_nb.stages import run, RunError
    (tmp_path / 'runs' / 'r').mkdir(parents=True); (tmp_path / 'runs' / 'r' / 'keep.txt').write_text('x')
    with pytest.raises(RunError, match='exists: set overwrite: true'):
        run(micro_cfg(tmp_path, [SFT]), progress=False, verbose=False)
    assert (tmp_path / 'runs' / 'r' / 'keep.txt').read_text() == 'x'

# --- kill and resume -------------------------------------------------------------------------------------------------
SCRIPT = textwrap.dedent('''
    import sys, json
    from typhoon_nb.config import RunConfig
    from typhoon_nb.stages import run
    cfg = RunConfig.from_yaml(sys.argv[1])
    if len(sys.argv) > 2: cfg = RunConfig.from_dict(cfg.to_dict() | {'resume': sys.argv[2]})
    run(cfg, progress=False, verbose=False)
''')

def _cfg_file(tmp_path, name):
    sft = SFT | {'max_steps': 16, 'save_steps': 2, 'lr': 2e-3}
    cfg = micro_cfg(tmp_path, [sft, DPO | {'max_steps': 4, 'save_steps': 2}], run_name=name)
    p = tmp_path / f'{name}.yaml'; cfg.to_yaml(p); return p

def test_kill_and_resume_matches_uninterrupted(tmp_path):
    env = dict(os.environ, PYTHONHASHSEED='0')
    (tmp_path / 'job.py').write_text(SCRIPT)
    subprocess.run([sys.executable, str(tmp_path / 'job.py'), str(_cfg_file(tmp_path, 'full'))], check=True, env=env, timeout=600)
    full = json.loads((tmp_path / 'runs' / 'full' / 'summary.json').read_text())
    # the same job, killed once a mid-SFT checkpoint is complete
    p = subprocess.Popen([sys.executable, str(tmp_path / 'job.py'), str(_cfg_file(tmp_path, 'killed'))], env=env)
    ck = tmp_path / 'runs' / 'killed' / 'stages' / '0-sft' / 'checkpoints' / 'checkpoint-6' / 'COMPLETE'
    t0 = time.time()
    while not ck.exists() and p.poll() is None and time.time() - t0 < 300: time.sleep(0.05)
    assert p.poll() is None, 'the job ended before it could be killed'
    p.send_signal(signal.SIGKILL); p.wait()
    man = json.loads((tmp_path / 'runs' / 'killed' / 'manifest.json').read_text())
    assert man['status'] == 'running'  # killed: nobody marked it
    subprocess.run([sys.executable, str(tmp_path / 'job.py'), str(_cfg_file(tmp_path, 'killed')), str(tmp_path / 'runs' / 'killed')],
                   check=True, env=env, timeout=600)
    resumed = json.loads((tmp_path / 'runs' / 'killed' / 'summary.json').read_text())
    assert resumed['status'] == 'done'
    for st in ('sft', 'dpo'):
        for k, v in full['stages'][st].items():
            if k.endswith(('_before', '_after')): assert v == pytest.approx(resumed['stages'][st][k], abs=1e-4), (st, k)
        assert resumed['stages'][st]['steps'] == full['stages'][st]['steps']
    losses = lambda n: [r['loss'] for r in stage_logs(tmp_path / 'runs' / n, 'dpo') if 'loss' in r]
    assert losses('killed')[-len(losses('full')):] == pytest.approx(losses('full'), abs=1e-4)

# --- patches inside run(cfg) ------------------------------------------------------------------------------------
def test_llama3_patches_run_through_the_stages(tmp_path):
    "use_llama3 (GQA + MoE) on a 4-bit base: patched before quantizing, a Mixtral model trains with LoRA."
    from typhoon_nb.stages import run
    cfg = micro_cfg(tmp_path, [SFT | {'max_steps': 2, 'eval_samples': 0}], use_llama3=True, moe_experts=4,
                    quantization='4bit', precision='auto')
    res = run(cfg, progress=False, verbose=False)
    man = json.loads((Path(res.run_dir) / 'manifest.json').read_text())
    assert res.status == 'done'
    assert [p.splitlines()[0] for p in man['patches']] == ['patch gqa', 'patch moe'], man['patches']
    assert 'MixtralForCausalLM' in man['load'] or 'mixtral' in man['load'].lower()

def test_rwkv_inserts_attention_transfer(tmp_path):
    from typhoon_nb.stages import run
    cfg = micro_cfg(tmp_path, [SFT | {'max_steps': 2, 'eval_samples': 0}], use_rwkv=True, rwkv_transfer_steps=30)
    res = run(cfg, progress=False, verbose=False)
    at = json.loads((Path(res.run_dir) / 'manifest.json').read_text())['attention_transfer']
    assert at['mse_after'] < at['mse_before'] / 2, at

def test_train_embeddings_in_pretrain_only(tmp_path):
    "Embeddings and LM head train in the stage that asks (their change is saved with its adapter) and stay fixed after."
    from safetensors.torch import load_file
    from typhoon_nb.stages import run
    pre = dict(kind='pretrain', data='demo:pretrain', lr=5e-3, max_steps=3, batch_size=4, max_length=64, save_steps=0,
               eval_samples=0, train_embeddings=True)
    res = run(micro_cfg(tmp_path, [pre, SFT | {'max_steps': 2, 'eval_samples': 0}]), progress=False, verbose=False)
    sd = lambda s: {k: v for k, v in load_file(str(Path(res.run_dir) / 'stages' / s / 'adapter' / 'adapter_model.safetensors')).items()
                    if 'embed_tokens' in k or 'lm_head' in k}
    a, b = sd('0-pretrain'), sd('1-sft')
    assert a and set(a) == set(b)
    assert all((a[k] - b[k]).abs().max() == 0 for k in a)  # frozen in SFT

def test_train_embeddings_with_prefix_is_reported_not_silent(tmp_path):
    from typhoon_nb.stages import run
    pre = dict(kind='pretrain', data='demo:pretrain', lr=5e-3, max_steps=2, batch_size=4, max_length=64, save_steps=0,
               eval_samples=0, train_embeddings=True)
    res = run(micro_cfg(tmp_path, [pre], peft_method='prefix'), progress=False, verbose=False)
    notes = json.loads((Path(res.run_dir) / 'manifest.json').read_text())['notes']
    assert notes == ['train_embeddings is ignored with peft_method prefix: prefix tuning keeps the embeddings and LM head frozen']

def test_non_finite_loss_stops_the_stage_and_keeps_the_last_good_checkpoint(tmp_path):
    "Injected fault: a learning rate that blows the weights up. The stage stops naming the step; the run is marked failed."
    import torch
    from safetensors.torch import load_file
    from typhoon_nb.stages import run, RunError, last_complete_checkpoint
    cfg = micro_cfg(tmp_path, [SFT | {'lr': 1e12, 'max_steps': 8, 'save_steps': 1, 'eval_samples': 0}], max_grad_norm=0.0)
    with pytest.raises(RunError, match=r'stage sft: non-finite (loss|grad_norm) \(\S+\) at step (\d+)') as e:
        run(cfg, progress=False, verbose=False)
    import re
    step = int(re.search(r'at step (\d+)', str(e.value)).group(1))
    rd = tmp_path / 'runs' / 'r'
    man = json.loads((rd / 'manifest.json').read_text())
    assert man['status'] == 'failed' and man['stages']['sft']['status'] == 'failed'
    assert f'at step {step}' in man['stages']['sft']['error']
    ck = last_complete_checkpoint(rd / 'stages' / '0-sft' / 'checkpoints')
    assert ck is not None and int(ck.name.split('-')[1]) == step - 1
    assert not (rd / 'stages' / '0-sft' / 'checkpoints' / f'checkpoint-{step}' / 'COMPLETE').exists()
    w = load_file(str(ck / 'adapter_model.safetensors'))
    assert all(torch.isfinite(t).all() for t in w.values())

# --- use_rwkv: the trained linear attention travels with every adapter and survives a resume ----------------------------
RWKV = dict(use_rwkv=True, rwkv_transfer_steps=15)
PROBE = [[5 + (7 * i + 3 * j) % 400 for j in range(24)] for i in range(2)]  # token ids for comparing logits

def _logits(model):
    "Logits on PROBE in eval mode (4-bit layers kept off bitsandbytes' repacked CPU kernel, whose numbers differ by ~5e-3)."
    import torch
    from typhoon_nb.patches.linear_attention import _no_cpu_4bit_repacking
    was = model.training; model.eval()
    with torch.no_grad(), _no_cpu_4bit_repacking(model):
        out = model(input_ids=torch.tensor(PROBE, device=model.device), use_cache=False).logits.float().cpu()
    model.train(was)
    return out

def _la_params(model) -> list:
    "The linear-attention parameters (feature maps, decays) of `model`, in layer order, as CPU float32 copies."
    from typhoon_nb.patches.linear_attention import linear_attention_modules
    return [p.detach().float().cpu().clone() for m in linear_attention_modules(model) for p in m.transfer_parameters()]

def _max_diff(a, b) -> float: return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))

@pytest.mark.parametrize('quant', ['none', '4bit'])
def test_rwkv_final_reloads_as_the_trained_model(tmp_path, monkeypatch, quant):
    "Loading final/ as typhoon_nb loads a run (patched base + adapter) gives the trained model's logits, transfer included."
    import torch
    from typhoon_nb import adapters
    from typhoon_nb.stages import run, _load
    seen, save = {}, adapters.save_adapter
    def spy(model, folder, *a, **k):
        if '.tmp-final' in str(folder):
            # 4-bit: the trained model holds its LoRA weights in bf16 and the reloaded one the same values in fp32; compute
            # both in fp32 so that the comparison sees what final/ carries, not the precision of the LoRA matmuls
            for n, p in model.named_parameters():
                if 'lora_' in n and p.dtype != torch.float32: p.data = p.data.float()
            seen['logits'], seen['la'] = _logits(model), _la_params(model)
        return save(model, folder, *a, **k)
    monkeypatch.setattr(adapters, 'save_adapter', spy)
    cfg = micro_cfg(tmp_path, [SFT | {'max_steps': 2, 'eval_samples': 0}], quantization=quant, **RWKV)
    res = run(cfg, progress=False, verbose=False)
    model, *_ = _load(res.config, Path(res.run_dir) / 'final')
    assert _max_diff(_la_params(model), seen['la']) == 0.0  # the transferred feature maps and decays came back
    err = float((_logits(model) - seen['logits']).abs().max())
    assert err < 1e-5, err

def _killed_run(cfg, kill_stage):
    "Run `cfg` in a forked process that SIGKILLs itself as it starts writing `kill_stage`'s adapter (that stage not done)."
    import multiprocessing as mp
    def job():
        import torch
        from typhoon_nb import adapters
        from typhoon_nb.stages import run
        torch.set_num_threads(1)
        save = adapters.save_adapter
        def save_adapter(model, folder, *a, **k):
            if f'-{kill_stage}/.tmp-adapter' in str(folder): os.kill(os.getpid(), signal.SIGKILL)
            return save(model, folder, *a, **k)
        adapters.save_adapter = save_adapter
        run(cfg, progress=False, verbose=False)
    p = mp.get_context('fork').Process(target=job, daemon=True); p.start(); p.join(300)
    assert p.exitcode == -signal.SIGKILL, p.exitcode

def test_rwkv_resume_after_the_first_stage_matches_uninterrupted(tmp_path, monkeypatch):
    """use_rwkv, SFT -> DPO, killed after SFT finished: the resumed run ends with the uninterrupted run's weights and metrics,
    and the DPO reference carries the transferred feature maps."""
    from safetensors.torch import load_file
    from typhoon_nb import stages
    stg = [SFT | {'max_steps': 2}, DPO | {'max_steps': 2}]
    full_cfg, cut_cfg = (micro_cfg(tmp_path, stg, run_name=n, **RWKV) for n in ('full', 'cut'))
    _killed_run(cut_cfg, 'dpo')
    cut = tmp_path / 'runs' / 'cut'
    man = json.loads((cut / 'manifest.json').read_text())
    assert man['stages']['sft']['status'] == 'done' and man['stages']['dpo']['status'] == 'running'
    refs, build = {}, stages.build_trainer
    def spy(cfg, stage, model, *a, **k):
        tr = build(cfg, stage, model, *a, **k)
        if stage.kind == 'dpo': refs[cfg.run_name] = _la_params(tr.ref_model if tr.ref_model is not None else tr.model)
        return tr
    monkeypatch.setattr(stages, 'build_trainer', spy)
    full = stages.run(full_cfg, progress=False, verbose=False)
    stages.run(RunConfig(resume=str(cut), output_dir=str(cut.parent)), progress=False, verbose=False)
    a, b = (json.loads((Path(d) / 'summary.json').read_text()) for d in (full.run_dir, cut))
    assert b['status'] == 'done'
    for st in ('sft', 'dpo'):
        for k, v in a['stages'][st].items():
            if k.endswith(('_before', '_after')): assert b['stages'][st][k] == pytest.approx(v, abs=1e-6), (st, k)
        assert b['stages'][st]['steps'] == a['stages'][st]['steps']
    wa, wb = (load_file(str(Path(d) / 'final' / 'adapter_model.safetensors')) for d in (full.run_dir, cut))
    assert set(wa) == set(wb) and max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-6
    assert _max_diff(refs['cut'], refs['full']) == 0.0  # the resumed DPO reference has the transferred feature maps
    m0, *_ = stages._load(full.config, Path(full.run_dir) / 'final')
    assert _max_diff(refs['full'], _la_params(m0)) == 0.0  # which are the ones final/ carries

# --- full fine-tuning: resume after a finished stage, final/ reload --------------------------------------------------------
def _stop_at_first(stage):
    "A listener that interrupts the run at `stage`'s first logged training step (the stages before it are done)."
    def listener(rec):
        if rec['stage'] == stage and 'loss' in rec: raise KeyboardInterrupt(f'stopped by the test at {stage} step {rec["step"]}')
    return listener

def test_full_resume_after_sft_matches_uninterrupted(tmp_path, monkeypatch):
    """peft_method full, SFT -> DPO, interrupted at DPO's first step: the resumed run reloads the SFT weights, ends with the
    uninterrupted run's metrics and weights, its DPO reference is the SFT model (step-0 loss ln 2), and final/ reloads to
    the trained model's logits."""
    from safetensors.torch import load_file
    from typhoon_nb import stages
    stg = [SFT | {'max_steps': 3}, DPO | {'max_steps': 2}]
    full_cfg, cut_cfg = (micro_cfg(tmp_path, stg, run_name=n, peft_method='full') for n in ('full', 'cut'))
    with pytest.raises(KeyboardInterrupt): stages.run(cut_cfg, progress=False, listener=_stop_at_first('dpo'), verbose=False)
    cut = tmp_path / 'runs' / 'cut'
    man = json.loads((cut / 'manifest.json').read_text())
    assert man['stages']['sft']['status'] == 'done' and man['stages']['dpo']['status'] == 'failed'
    models, build = {}, stages.build_trainer
    def spy(cfg, stage, model, *a, **k):
        if stage.kind == 'dpo': models[cfg.run_name] = model
        return build(cfg, stage, model, *a, **k)
    monkeypatch.setattr(stages, 'build_trainer', spy)
    full = stages.run(full_cfg, progress=False, verbose=False)
    res = stages.run(RunConfig(resume=str(cut), output_dir=str(cut.parent)), progress=False, verbose=False)
    a, b = (json.loads((Path(d) / 'summary.json').read_text()) for d in (full.run_dir, cut))
    assert res.status == 'done' and b['status'] == 'done'
    for st in ('sft', 'dpo'):
        for k, v in a['stages'][st].items():
            if k.endswith(('_before', '_after')): assert b['stages'][st][k] == pytest.approx(v, abs=1e-6), (st, k)
        assert b['stages'][st]['steps'] == a['stages'][st]['steps']
    losses = lambda d: [r['loss'] for r in stage_logs(d, 'dpo') if 'loss' in r]
    assert losses(cut)[-len(losses(full.run_dir)):] == pytest.approx(losses(full.run_dir), abs=1e-6)
    first = [r for r in stage_logs(cut, 'dpo') if 'loss' in r][-2]  # the resumed DPO's step 1
    assert first['step'] == 1 and abs(first['loss'] - math.log(2)) < 1e-3, first
    assert abs(first['rewards/margins']) < 1e-4, first
    wa, wb = (load_file(str(Path(d) / 'final' / 'model.safetensors')) for d in (full.run_dir, cut))
    assert set(wa) == set(wb) and max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-6
    m, *_ = stages._load(full.config, Path(full.run_dir) / 'final')
    err = float((_logits(m) - _logits(models['full'])).abs().max())
    assert err < 1e-5, err

def test_4bit_fp32_adapters_stay_fp32_and_final_reloads(tmp_path, monkeypatch):
    """quantization 4bit, precision fp32: TRL's trainers cast QLoRA adapters to bf16, the run puts them back in fp32, so the
    trained adapters are fp32 and final/ reloads to the trained model's logits within 1e-5."""
    import torch
    from safetensors import safe_open
    from typhoon_nb import stages
    models, build = {}, stages.build_trainer
    def spy(cfg, stage, model, *a, **k):
        tr = build(cfg, stage, model, *a, **k); models[stage.kind] = tr.model
        return tr
    monkeypatch.setattr(stages, 'build_trainer', spy)
    cfg = micro_cfg(tmp_path, [SFT | {'max_steps': 2, 'eval_samples': 0}, DPO | {'max_steps': 2, 'eval_samples': 0}],
                    quantization='4bit', precision='fp32')
    res = stages.run(cfg, progress=False, verbose=False)
    m = models['dpo']
    assert {p.dtype for n, p in m.named_parameters() if 'lora_' in n} == {torch.float32}
    with safe_open(str(Path(res.run_dir) / 'final' / 'adapter_model.safetensors'), 'pt') as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {'F32'}
    r, *_ = stages._load(res.config, Path(res.run_dir) / 'final')
    err = float((_logits(r) - _logits(m)).abs().max())
    assert err < 1e-5, err

def test_4bit_stages_that_train_the_embeddings_complete(tmp_path):
    "QLoRA (default precision) with train_embeddings in SFT and DPO: TRL's bf16 cast of the trained embedding / LM-head copies is undone, so evaluation runs."
    from typhoon_nb.stages import run
    cfg = micro_cfg(tmp_path, [SFT | {'max_steps': 2, 'train_embeddings': True}, DPO | {'max_steps': 1, 'train_embeddings': True}],
                    quantization='4bit', precision='auto', run_name='emb4')
    res = run(cfg, progress=False, verbose=False)
    assert res.status == 'done' and [s.status for s in res.stages] == ['done', 'done'], res.summary
    assert 0 <= res.summary['stages']['sft']['exact_match_after'] <= 1

def test_dpo_nll_weight_adds_the_chosen_nll(tmp_path):
    "nll_weight w adds w x the chosen answers' NLL (TRL's sft loss) to DPO: at step 1 (policy = reference, DPO loss ln 2) the excess over ln 2 doubles with w."
    from typhoon_nb.stages import run
    first = {}
    for w in (1.0, 2.0):
        cfg = micro_cfg(tmp_path, [SFT | {'max_steps': 2}, DPO | {'max_steps': 1, 'nll_weight': w}], run_name=f'nll{w:g}')
        res = run(cfg, progress=False, verbose=False)
        first[w] = [r for r in stage_logs(res.run_dir, 'dpo') if 'loss' in r][0]
    e1, e2 = first[1.0]['loss'] - math.log(2), first[2.0]['loss'] - math.log(2)
    assert e1 > 0.1 and abs(e2 - 2 * e1) < 1e-3 * e1, (e1, e2)
    assert abs(first[1.0]['rewards/margins']) < 1e-4

def test_qlora_adapters_train_in_fp32_so_weight_decay_acts(tmp_path):
    "4-bit, default precision: the LoRA weights stay fp32 through TRL's trainer, and weight decay changes them (in bf16 its step rounded away)."
    import torch
    from safetensors.torch import load_file
    w = {}
    for wd in (0.0, 0.5):
        cfg = micro_cfg(tmp_path, [SFT | {'max_steps': 3, 'eval_samples': 0}], quantization='4bit', precision='auto',
                        weight_decay=wd, run_name=f'wd{wd:g}')
        from typhoon_nb.stages import run
        res = run(cfg, progress=False, verbose=False)
        w[wd] = load_file(str(Path(res.run_dir) / 'final' / 'adapter_model.safetensors'))
    assert all(t.dtype == torch.float32 for t in w[0.0].values())
    diff = max(float((w[0.0][k] - w[0.5][k]).abs().max()) for k in w[0.0])
    assert diff > 1e-6, diff

# --- per-task exact match and the held-out samples -----------------------------------------------------------------
def test_sft_reports_exact_match_per_task_and_samples(tmp_path):
    "summary.json holds exact match per demo task before and after SFT, consistent with the overall number; the manifest keeps samples."
    from typhoon_nb.stages import run, demo_checks
    from typhoon_nb.curriculum import DEMO_TASKS, demo_task, demo_curriculum
    from typhoon_nb.jobs import result_from_folder
    cfg = micro_cfg(tmp_path, [SFT | {'max_steps': 2, 'eval_samples': 40}], run_name='tasks')
    res = run(cfg, progress=False, verbose=False)
    sft = json.loads((Path(res.run_dir) / 'summary.json').read_text())['stages']['sft']
    n = {t: sum(demo_task(r) == t for r in demo_curriculum(seed=cfg.seed)['sft_eval'][:40]) for t in DEMO_TASKS}
    for when in ('before', 'after'):
        by = sft[f'exact_match_by_task_{when}']
        assert set(by) == set(DEMO_TASKS) and all(0 <= v <= 1 for v in by.values()), by
        assert abs(sum(by[t] * n[t] for t in DEMO_TASKS) / 40 - sft[f'exact_match_{when}']) < 1e-9
    checks = {w: ok for w, _, ok in demo_checks({'stages': {'sft': sft}})}
    assert checks['sft: exact match on add (reported)'] is None and 'sft: exact match on to_arabic >= 50%' in checks
    samples = json.loads((Path(res.run_dir) / 'manifest.json').read_text())['stages']['sft']['samples']
    assert [demo_task(s['prompt']) for s in samples] == list(DEMO_TASKS)
    assert all({'prompt', 'expected', 'before', 'after'} <= set(s) for s in samples)
    table = str(result_from_folder(res.run_dir))
    assert 'exact_match.to_thai_digits' in table and samples[0]['prompt'] in table
