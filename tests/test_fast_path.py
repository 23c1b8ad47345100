"The SFT fast path in real trainers: packed rows kept as rows, TRL's token count, FastDropout and uncast LoRA inputs."
import warnings
import pytest
import torch
from peft import LoraConfig, get_peft_model
from trl import SFTConfig, SFTTrainer

from typhoon_nb.adapters import FastDropout, fast_lora_cpu, fast_lora_dropout, skip_input_casts
from typhoon_nb.config import RunConfig
from typhoon_nb.refinements import NEFTuneProbe, RowPackedCollator, row_packing, trainer_kwargs
from test_refinements import CPU, qa, sft_stage, sft_trainer, tiny, tok  # noqa: F401 (tok is a fixture)


def _examples(batch):
    "(input_ids, labels) of every real example in a row-packed batch (pad segments dropped)."
    out, pad = [], 0
    for row in range(batch['input_ids'].shape[0]):
        ids, lab, pos = batch['input_ids'][row], batch['labels'][row], batch['position_ids'][row]
        starts = (pos == 0).nonzero().flatten().tolist() + [len(ids)]
        for a, b in zip(starts, starts[1:]):
            if (ids[a:b] == pad).all(): assert (lab[a:b] == -100).all(); continue
            out.append((ids[a:b].tolist(), lab[a:b].tolist()))
    return out


def test_row_packing_keeps_rows_and_examples_apart(tmp_path, tok):
    model = tiny(len(tok)).eval()
    tr = sft_trainer(tmp_path, tok, model, RunConfig(packing=True), sft_stage(max_length=128))
    one_row = next(iter(tr.get_train_dataloader()))
    assert row_packing(tr) and isinstance(tr.data_collator, RowPackedCollator)
    batch = next(iter(tr.get_train_dataloader()))
    assert 'attention_mask' not in batch and batch['input_ids'].shape[0] == 4 and batch['input_ids'].shape[1] <= 128
    # the same tokens and labels as TRL's one-row batch, example by example
    flat = lambda b: [t for t in b['labels'].flatten().tolist() if t != -100]
    assert flat(batch) == flat(one_row) and len(flat(batch)) > 0
    with torch.no_grad():
        rows = model(input_ids=batch['input_ids'], position_ids=batch['position_ids'], use_cache=False).logits
        n_examples = 0
        for r in range(rows.shape[0]):
            pos = batch['position_ids'][r]
            starts = (pos == 0).nonzero().flatten().tolist() + [len(pos)]
            for a, b in zip(starts, starts[1:]):
                if (batch['input_ids'][r, a:b] == tok.pad_token_id).all(): continue
                alone = model(input_ids=batch['input_ids'][r:r + 1, a:b], use_cache=False).logits[0]
                assert (rows[r, a:b] - alone).abs().max().item() < 1e-4
                n_examples += 1
    assert n_examples > batch['input_ids'].shape[0]  # rows hold several examples


def test_row_packing_same_loss_as_one_row(tmp_path, tok):
    "One optimizer step: the loss with packed rows equals the loss with TRL's one-row batch (same examples, same labels)."
    losses = {}
    for mode in ('one_row', 'rows'):
        tr = sft_trainer(tmp_path / mode, tok, tiny(len(tok)), RunConfig(packing=True), sft_stage(max_length=128))
        if mode == 'rows': assert row_packing(tr)
        losses[mode] = tr.train().training_loss
    assert abs(losses['rows'] - losses['one_row']) < 1e-5, losses


def test_row_packing_counts_every_token(tmp_path, tok):
    "TRL's num_tokens metric counts all rows' real tokens (its own rule counts one row: `position_ids.size(1)`)."
    tr = sft_trainer(tmp_path, tok, tiny(len(tok)), RunConfig(packing=True), sft_stage(max_length=128),
                     include_num_input_tokens_seen='non_padding')
    assert row_packing(tr)
    tr.train()
    logged = [h['num_tokens'] for h in tr.state.log_history if 'num_tokens' in h]
    assert logged == [tr.state.num_input_tokens_seen], (logged, tr.state.num_input_tokens_seen)
    assert tr.state.num_input_tokens_seen > 128  # four rows' worth, not one row's length


@pytest.mark.parametrize('rows', [False, True])
def test_neftune_length_with_row_packing(tmp_path, tok, rows):
    "NEFTune's L is the packed row's length with rows, the whole batch's token count with TRL's one row."
    probe = NEFTuneProbe()
    model = get_peft_model(tiny(len(tok), d=128), LoraConfig(r=4, target_modules=['q_proj', 'v_proj']))
    tr = sft_trainer(tmp_path, tok, model, RunConfig(neftune_alpha=5.0, packing=True), sft_stage(max_length=64), callbacks=[probe])
    if rows: assert row_packing(tr)
    tr.train()
    L = probe.records[0]['L']
    assert (L <= 64) if rows else (L > 64), L


def test_row_packing_not_for_padded_batches(tmp_path, tok):
    tr = sft_trainer(tmp_path, tok, tiny(len(tok)), RunConfig(packing=False), sft_stage())
    assert not row_packing(tr)


def test_collator_rejects_inconsistent_rows():
    with pytest.raises(ValueError, match=r'packed row 1: seq_lengths sum to 5 but input_ids has 4 tokens'):
        RowPackedCollator(pad_token_id=0)([{'input_ids': [5, 6], 'seq_lengths': [2]}, {'input_ids': [5, 6, 7, 8], 'seq_lengths': [2, 3]}])


def _lora_sft(tmp_path, tok, dropout, bf16=True):
    "A bf16 base with fp32 LoRA adapters (PEFT's default for a bf16 base, and how our runs train)."
    base = tiny(len(tok)).to(torch.bfloat16 if bf16 else torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_dropout=dropout, target_modules='all-linear'))
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if 'lora_' in n)
    for n, p in model.named_parameters():
        if 'lora_B' in n: torch.nn.init.normal_(p, std=0.1)
    return sft_trainer(tmp_path, tok, model, RunConfig(packing=False), sft_stage(max_steps=2), bf16=bf16, use_cpu=True)


def test_fast_lora_cpu_in_a_bf16_trainer(tmp_path, tok):
    tr = _lora_sft(tmp_path, tok, 0.05)
    n_lora = sum(1 for m in tr.model.modules() if hasattr(m, 'lora_A') and len(m.lora_A))
    assert fast_lora_cpu(tr) == {'fast_dropout': n_lora, 'skip_input_casts': True}
    assert all(type(m.lora_dropout['default']) is FastDropout for m in tr.model.modules() if hasattr(m, 'lora_A') and len(m.lora_A))
    tr.train()  # trains under autocast with the casts off
    assert tr.state.global_step == 2


def test_skip_input_casts_same_loss_fewer_copies(tmp_path, tok):
    "Without dropout the bf16 round trip of PEFT's cast is exact: the same loss, and two copies fewer per LoRA layer."
    from torch.profiler import profile, ProfilerActivity
    out = {}
    for skip in (False, True):
        torch.manual_seed(0)
        tr = _lora_sft(tmp_path / str(skip), tok, 0.0)
        if skip: assert skip_input_casts(tr)
        batch = tr._prepare_inputs(next(iter(tr.get_train_dataloader())))
        model = tr.accelerator.prepare_model(tr.model)
        with profile(activities=[ProfilerActivity.CPU]) as prof, tr.compute_loss_context_manager():
            loss = tr.compute_loss(model, batch)
        copies = sum(e.count for e in prof.key_averages() if e.key == 'aten::_to_copy')
        out[skip] = (loss.item(), copies)
    n_lora = 14  # 2 layers x 7 linear layers
    assert out[True][0] == out[False][0], out
    assert out[False][1] - out[True][1] >= n_lora, out


def test_skip_input_casts_needs_mixed_precision(tmp_path, tok):
    tr = _lora_sft(tmp_path, tok, 0.0, bf16=False)
    assert not skip_input_casts(tr)


def test_fast_dropout_replaces_only_real_dropout(tok):
    m = get_peft_model(tiny(len(tok)), LoraConfig(r=4, lora_dropout=0.0, target_modules=['q_proj']))
    assert fast_lora_dropout(m) == 0  # p = 0: PEFT uses Identity, nothing to replace
    m = get_peft_model(tiny(len(tok)), LoraConfig(r=4, lora_dropout=0.1, target_modules=['q_proj']))
    assert fast_lora_dropout(m) == 2 and fast_lora_dropout(m) == 0  # once per layer, idempotent
