"Chat with a run: load_run reloads each stage as the run ended it (both, 4-bit LoRA, use_rwkv), the panel, and `typhoon-nb chat`."
import json, os, subprocess, sys
from pathlib import Path
import pytest
from typhoon_nb.config import RunConfig

ROOT = Path(__file__).resolve().parent.parent
SFT = dict(kind='sft', data='demo:sft', lr=5e-3, max_steps=4, batch_size=8, max_length=64, save_steps=0, eval_samples=4)

def _run(tmp_path, name, stages=(SFT,), **kw):
    from typhoon_nb.stages import run
    base = dict(model='micro-typhoon', quantization='none', precision='fp32', output_dir=str(tmp_path / 'runs'), run_name=name,
                lora_r=8, lora_alpha=16.0, lora_dropout=0.0, prefix_tokens=4, warmup_ratio=0.0)
    return Path(run(RunConfig.from_dict(base | kw | {'stages': list(stages)}), progress=False, verbose=False).run_dir)

def _last_samples(rd):
    "The held-out prompts of the last stage and the greedy answers the model gave at the end of the run (the manifest's)."
    man = json.loads((rd / 'manifest.json').read_text())
    last = list(man['stages'].values())[-1]
    return [s['prompt'] for s in last['samples']], [s['after'] for s in last['samples']]

@pytest.mark.parametrize('name,kw', [('both', dict(peft_method='both')),
                                     ('lora4bit', dict(quantization='4bit', precision='auto')),
                                     # bf16 compute on every CPU kind (emulated where the CPU has no bf16): the reload
                                     # must take the run's layout, unquantized weights in fp32
                                     ('lora4bit-bf16', dict(quantization='4bit', precision='bf16')),
                                     ('rwkv', dict(use_rwkv=True, rwkv_transfer_steps=10))])
def test_load_run_gives_the_answers_of_the_run(tmp_path, name, kw):
    "final/ reloaded through load_run answers the held-out prompts exactly as the model did at the end of the run."
    from typhoon_nb.chat import compare_answers, load_run
    rd = _run(tmp_path, name, **kw)
    prompts, after = _last_samples(rd)
    assert len(prompts) == 4 and all(isinstance(a, str) for a in after)
    table = compare_answers(rd, prompts, stages=['final'])
    assert list(table.columns) == ['prompt', 'final'] and list(table['final']) == after
    model, tok = load_run(rd)
    assert not model.training
    if name == 'rwkv':  # the transferred feature maps came back with the adapter
        from typhoon_nb.patches.linear_attention import linear_attention_modules
        assert linear_attention_modules(model)

def test_load_run_bad_input(tmp_path):
    from typhoon_nb.chat import ChatError, load_run, finished_stages
    with pytest.raises(ChatError, match='not a run folder'): load_run(tmp_path)
    rd = _run(tmp_path, 'r')
    assert finished_stages(rd) == ['base', 'sft', 'final']
    with pytest.raises(ChatError, match=r"no stage 'dpo'; available: base, sft, final"): load_run(rd, 'dpo')

def test_prompt_longer_than_the_context_is_refused(tmp_path):
    from typhoon_nb.chat import ChatError, compare_answers
    rd = _run(tmp_path, 'r')
    with pytest.raises(ChatError, match=r"prompt: \d+ tokens \+ 24 new tokens do not fit the model's context of 256 tokens"):
        compare_answers(rd, ['ก ' * 400], stages=['base'])

def test_panel_two_columns_answer_the_same_prompt(tmp_path):
    "Headless: base and final each answer in their own column; the history carries the turn; the second turn goes on it."
    from typhoon_nb.chat import ChatPanel, answer, load_run
    rd = _run(tmp_path, 'r')
    p = ChatPanel(rd)
    assert p.stage_select.value == ('base', 'final') and len(p.columns.children) == 2
    p.max_new.value = 8
    p.send('สวัสดี', wait=True)
    assert p.error is None and p.status.value == 'done'
    for name in ('base', 'final'):
        hist = p.histories[name]
        assert [m['role'] for m in hist] == ['user', 'assistant'] and hist[0]['content'] == 'สวัสดี'
        model, tok = load_run(rd, name)
        assert hist[1]['content'] == answer(model, tok, hist[:1], max_new_tokens=8)  # greedy: the same answer again
    p.send('ต่อ', wait=True)
    assert [m['role'] for m in p.histories['final']] == ['user', 'assistant'] * 2

def _cli(*args):
    return subprocess.run([sys.executable, '-m', 'typhoon_nb.jobs', 'chat', *map(str, args)], capture_output=True, text=True,
                          env=os.environ | {'HF_HUB_OFFLINE': '1'}, timeout=900, cwd=ROOT)

def test_cli_prompt_and_compare(tmp_path):
    from typhoon_nb.chat import compare_answers
    rd = _run(tmp_path, 'r')
    cp = _cli(rd, '--prompt', 'สวัสดี', '--max_new_tokens', '8')
    assert cp.returncode == 0, cp.stderr[-2000:]
    want = compare_answers(rd, ['สวัสดี'], stages=['base', 'sft', 'final'], max_new_tokens=8)
    assert cp.stdout.strip() == f"final> {want['final'][0]}".strip()
    cp = _cli(rd, '--compare', 'base,sft', '--prompt', 'สวัสดี', '--max_new_tokens', '8')
    assert cp.returncode == 0, cp.stderr[-2000:]
    assert [l.split('>')[0] for l in cp.stdout.strip().splitlines()] == ['base', 'sft']
    assert cp.stdout.strip().splitlines()[0].rstrip() == f"base> {want['base'][0]}".rstrip()
    cp = _cli(rd, '--stage', 'dpo', '--prompt', 'x')
    assert cp.returncode == 2 and "no stage 'dpo'; available: base, sft, final" in cp.stderr

def test_report_table_answers_the_recorded_prompts(tmp_path):
    "The report's table: the recorded held-out prompts of the SFT stage, answered by the base and the SFT stage."
    from typhoon_nb.chat import report_answers, chat_prompts
    rd = _run(tmp_path, 'r')
    prompts, after = _last_samples(rd)
    assert chat_prompts(rd) == prompts
    t = report_answers(rd)
    assert list(t.columns) == ['prompt', 'base', 'sft'] and list(t['prompt']) == prompts and list(t['sft']) == after
