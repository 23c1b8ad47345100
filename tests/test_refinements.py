"Refinements inside real trainers: NEFTune in an SFT step, completion-only labels, label smoothing, clipping, LR groups."
import dataclasses, math, warnings
import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast, Trainer, TrainingArguments
from trl import DPOConfig, SFTConfig, SFTTrainer

from typhoon_nb.config import RunConfig, StageConfig
from typhoon_nb.refinements import (NEFTuneProbe, StepLog, make_optimizer, neftune_std, param_groups, schedule_lr,
                                    trainer_kwargs)

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CPU = dict(report_to='none', bf16=False, save_strategy='no', logging_steps=1, disable_tqdm=True)


@pytest.fixture(scope='module')
def tok():
    "A small byte-level BPE tokenizer with a ChatML-like chat template."
    t = Tokenizer(models.BPE())
    t.pre_tokenizer, t.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tr = trainers.BpeTrainer(vocab_size=320, special_tokens=['<pad>', '<|im_start|>', '<|im_end|>'],
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(['user assistant what is plus minus times equals the answer is '] + [str(i) for i in range(100)], tr)
    pt = PreTrainedTokenizerFast(tokenizer_object=t, pad_token='<pad>', eos_token='<|im_end|>')
    pt.chat_template = CHATML
    return pt


def tiny(vocab, d=64, seed=0):
    torch.manual_seed(seed)
    return MistralForCausalLM(MistralConfig(vocab_size=vocab, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512))


def qa(n=24):
    "Conversational prompt/completion records of different lengths."
    return Dataset.from_list([{'prompt': [{'role': 'user', 'content': f'what is {i} plus {i * 7 % 13}' + ' please' * (i % 4)}],
                               'completion': [{'role': 'assistant', 'content': f'the answer is {i + i * 7 % 13}'}]}
                              for i in range(n)])


def sft_trainer(tmp_path, tok, model, cfg, stage, data=None, callbacks=None, **extra):
    kw = trainer_kwargs(cfg, stage) | CPU | extra
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)
        return SFTTrainer(model=model, args=SFTConfig(output_dir=str(tmp_path), **kw), train_dataset=data or qa(),
                          processing_class=tok, callbacks=callbacks or [])


def sft_stage(**kw): return StageConfig(**(dict(kind='sft', data='demo:sft', lr=1e-3, batch_size=4, max_length=64, max_steps=1) | kw))


# --- trainer arguments -------------------------------------------------------------------------------------------

@pytest.mark.parametrize('sched', ['cosine', 'linear', 'constant'])
@pytest.mark.parametrize('packing', [True, False])
def test_each_class_accepts_its_kwargs(tmp_path, sched, packing):
    cfg = RunConfig(lr_schedule=sched, packing=packing, neftune_alpha=5.0, label_smoothing=0.1, weight_decay=0.01)
    for st, cls in zip(cfg.stages, (TrainingArguments, SFTConfig, DPOConfig)):
        kw = trainer_kwargs(cfg, st)
        a = cls(output_dir=str(tmp_path), report_to='none', bf16=False, **kw)
        assert {k: getattr(a, k) for k in kw} == kw
        assert a.learning_rate == st.lr and a.weight_decay == 0.01 and a.seed == 42
    sft = trainer_kwargs(cfg, cfg.stages[1])
    assert (sft['neftune_noise_alpha'], sft['label_smoothing_factor'], sft['packing'], sft['completion_only_loss']) == (5.0, 0.1, packing, True)
    assert 'beta' in trainer_kwargs(cfg, cfg.stages[2]) and 'neftune_noise_alpha' not in trainer_kwargs(cfg, cfg.stages[2])


# --- NEFTune inside a real SFT step -------------------------------------------------------------------------------

@pytest.mark.parametrize('packing', [False, True])
def test_neftune_active_in_sft_step_with_lora(tmp_path, tok, packing):
    from peft import LoraConfig, get_peft_model
    alpha, d = 10.0, 256
    model = get_peft_model(tiny(len(tok), d=d), LoraConfig(r=4, target_modules=['q_proj', 'v_proj']))
    layer0_in = []
    h = model.base_model.model.model.layers[0].register_forward_pre_hook(
        lambda m, args, kwargs: layer0_in.append(kwargs.get('hidden_states', args[0] if args else None).detach().clone()), with_kwargs=True)
    clean = []
    emb = model.base_model.model.get_input_embeddings()
    h2 = emb.register_forward_hook(lambda m, i, o: clean.append(o.detach().clone()), prepend=True)
    probe = NEFTuneProbe()
    cfg = RunConfig(neftune_alpha=alpha, packing=packing)
    tr = sft_trainer(tmp_path, tok, model, cfg, sft_stage(), callbacks=[probe])
    assert tr.args.neftune_noise_alpha == alpha
    tr.train()
    h.remove(); h2.remove()
    assert len(probe.records) == 1, probe.records
    r = probe.records[0]
    assert r['d'] == d and r['std'] > 0
    assert abs(r['std'] / neftune_std(alpha, r['L'], d) - 1) < 0.05, (r, neftune_std(alpha, r['L'], d))
    assert r['max_abs'] <= alpha / math.sqrt(r['L'] * d) * (1 + 1e-5)
    # the noise reaches the decoder: what layer 0 receives is the embeddings plus noise of that size
    noise = (layer0_in[0] - clean[0]).float()
    assert abs(noise.std().item() / neftune_std(alpha, r['L'], d) - 1) < 0.05
    if packing:  # padding-free: the whole batch is one row, so L is the batch's token count
        assert clean[0].shape[0] == 1 and r['L'] > sft_stage().max_length
    # after training the hook is gone and the embeddings are clean again, even in train mode
    model.train()
    ids = torch.randint(0, len(tok), (2, 8))
    assert torch.equal(emb(ids), emb.weight[ids])


def test_neftune_off_adds_nothing(tmp_path, tok):
    probe = NEFTuneProbe()
    tr = sft_trainer(tmp_path, tok, tiny(len(tok)), RunConfig(neftune_alpha=None), sft_stage(), callbacks=[probe])
    tr.train()
    assert [r['std'] for r in probe.records] == [0.0]


# --- completion-only loss --------------------------------------------------------------------------------------

def _segments(batch):
    "(input_ids, labels) per example in a collated batch (padded rows, or padding-free rows split at position 0)."
    out = []
    for row in range(batch['input_ids'].shape[0]):
        ids, lab = batch['input_ids'][row], batch['labels'][row]
        if 'position_ids' in batch and 'attention_mask' not in batch:
            starts = (batch['position_ids'][row] == 0).nonzero().flatten().tolist() + [len(ids)]
            out += [(ids[a:b].tolist(), lab[a:b].tolist()) for a, b in zip(starts, starts[1:]) if b > a]
        else:
            n = int(batch['attention_mask'][row].sum())
            assert (lab[n:] == -100).all()
            out.append((ids[:n].tolist(), lab[:n].tolist()))
    return out


@pytest.mark.parametrize('packing', [False, True])
@pytest.mark.parametrize('completion_only', [True, False])
def test_completion_only_labels(tmp_path, tok, packing, completion_only):
    data = qa()
    prompt_len = {}
    for ex in data:
        full = tok.apply_chat_template(ex['prompt'] + ex['completion'], tokenize=True, return_dict=True)['input_ids']
        p = tok.apply_chat_template(ex['prompt'], tokenize=True, add_generation_prompt=True, return_dict=True)['input_ids']
        assert full[:len(p)] == p
        prompt_len[tuple(full)] = len(p)
    cfg = RunConfig(packing=packing, completion_only=completion_only)
    tr = sft_trainer(tmp_path, tok, tiny(len(tok)), cfg, sft_stage(max_length=128))
    seen = 0
    for batch in tr.get_train_dataloader():
        for ids, lab in _segments(batch):
            n = prompt_len[tuple(ids)]
            if completion_only:
                assert all(x == -100 for x in lab[:n]), (ids, lab)
            else:
                assert all(x == t for x, t in zip(lab[1:n], ids[1:n]))  # prompt tokens train too
            assert lab[n:] == ids[n:]  # every completion token keeps its label
            seen += 1
    assert seen == len(data)


# --- label smoothing --------------------------------------------------------------------------------------------

def test_label_smoothing_in_sft_loss(tmp_path, tok):
    eps = 0.1
    model = tiny(len(tok))
    tr = sft_trainer(tmp_path, tok, model, RunConfig(label_smoothing=eps, packing=False), sft_stage())
    batch = next(iter(tr.get_train_dataloader()))
    model.eval()
    with torch.no_grad():
        loss = tr.compute_loss(model, dict(batch)).item()
        logits = model(input_ids=batch['input_ids'], attention_mask=batch['attention_mask']).logits
        V = logits.shape[-1]
        lg, lb = logits[:, :-1].reshape(-1, V), batch['labels'][:, 1:].reshape(-1)
        ref = F.cross_entropy(lg, lb, ignore_index=-100, label_smoothing=eps).item()
        nll = F.cross_entropy(lg, lb, ignore_index=-100).item()
    assert abs(loss - ref) < 1e-4, (loss, ref)
    assert abs(loss - nll) > 1e-3  # smoothing changed the loss
    plain = sft_trainer(tmp_path, tok, model, RunConfig(label_smoothing=0.0, packing=False), sft_stage())
    with torch.no_grad(): assert abs(plain.compute_loss(model, dict(batch)).item() - nll) < 1e-4


# --- clipping, LR groups and the schedule in a real run -------------------------------------------------------

def _lm_data(tok, n=32, L=24):
    g = torch.Generator().manual_seed(0)
    return Dataset.from_list([{'input_ids': (ids := torch.randint(3, len(tok), (L,), generator=g).tolist()), 'labels': ids} for _ in range(n)])


@pytest.mark.parametrize('max_norm', [0.01, 0.0])
def test_clipped_grad_norm_at_most_max(tmp_path, tok, max_norm):
    model = tiny(len(tok))
    cfg = RunConfig(max_grad_norm=max_norm)
    st = StageConfig(kind='pretrain', data='demo:pretrain', lr=1e-3, batch_size=4, max_steps=4)
    log = StepLog()
    tr = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), **trainer_kwargs(cfg, st), **CPU),
                 train_dataset=_lm_data(tok), optimizers=(make_optimizer(model, cfg, st), None), callbacks=[log])
    tr.train()
    pre = [l['grad_norm'] for l in log.logs if 'grad_norm' in l]
    post = [r['grad_norm_clipped'] for r in log.records]
    assert len(pre) == len(post) == 4
    if max_norm:
        assert all(p > 10 * max_norm for p in pre), pre
        assert all(q <= max_norm * (1 + 1e-4) for q in post), post
    else:  # clipping off: the optimizer sees the full gradient
        assert all(abs(q / p - 1) < 1e-3 for p, q in zip(pre, post)), (pre, post)


def test_embedding_lr_group_follows_the_schedule(tmp_path, tok):
    model = tiny(len(tok))
    cfg = RunConfig(embedding_lr=1e-4, weight_decay=0.01, warmup_ratio=0.1)
    st = StageConfig(kind='pretrain', data='demo:pretrain', lr=1e-3, batch_size=2, max_steps=16, train_embeddings=True)
    log = StepLog()
    tr = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), **trainer_kwargs(cfg, st), **CPU),
                 train_dataset=_lm_data(tok), optimizers=(make_optimizer(model, cfg, st), None), callbacks=[log])
    tr.train()
    assert [r['step'] for r in log.records] == list(range(16))
    for r in log.records:
        assert abs(r['lr']['decay'] - schedule_lr(r['step'], 16, 1e-3, 'cosine', 0.1)) < 1e-9
        assert abs(r['lr']['embeddings'] - schedule_lr(r['step'], 16, 1e-4, 'cosine', 0.1)) < 1e-9
    lrs = [r['lr']['decay'] for r in log.records]
    assert lrs.index(max(lrs)) == math.ceil(16 * 0.1) and max(lrs) == 1e-3


def test_prefix_tuning_groups(tok):
    from peft import PrefixTuningConfig, get_peft_model
    model = get_peft_model(tiny(len(tok)), PrefixTuningConfig(task_type='CAUSAL_LM', num_virtual_tokens=4))
    gs = {g['name']: g for g in param_groups(model, RunConfig(weight_decay=0.1), StageConfig(data='x'))}
    assert list(gs) == ['no_decay']  # the prefix table is an embedding: no decay, and not the token-embedding LR
    assert sum(len(g['params']) for g in gs.values()) == sum(p.requires_grad for p in model.parameters())


def test_padding_free_batch_keeps_examples_apart(tmp_path, tok):
    "A batch from TRL's padding-free collator gives each example the logits it has alone (TRL calls with use_cache=False)."
    model = tiny(len(tok)).eval()
    tr = sft_trainer(tmp_path, tok, model, RunConfig(packing=True), sft_stage(max_length=128))
    batch = next(iter(tr.get_train_dataloader()))
    assert 'attention_mask' not in batch and batch['input_ids'].shape[0] == 1
    with torch.no_grad():
        packed = model(input_ids=batch['input_ids'], position_ids=batch['position_ids'], use_cache=False).logits[0]
        starts = (batch['position_ids'][0] == 0).nonzero().flatten().tolist() + [batch['input_ids'].shape[1]]
        assert len(starts) > 2  # several examples in the row
        for a, b in zip(starts, starts[1:]):
            alone = model(input_ids=batch['input_ids'][:, a:b], use_cache=False).logits[0]
            assert (packed[a:b] - alone).abs().max().item() < 1e-4
