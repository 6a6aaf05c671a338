"""Hybrid families (Mamba, Gated DeltaNet and other linear attention, short convolutions) on packed rows: each
sequence through the recurrent mixers from a fresh state (finetune/training/packed_mixers.py), so a packed row
gives what the padded batch gives.

tests/test_families.py (d) checks padding-free SFT and packed prompt-shared DPO against TRL's padded loss and
adapter gradients for the registry's hybrids (and, with MOETUNE_ALL_FAMILIES=1, every family); here the decoder's
hidden states of every hybrid family transformers 5.24 has, in both packed layouts, and a CLI run.
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from finetune.config.recipe import ModelInit
from finetune.modeling.tiny import family_config
from finetune.training.packed_forward import ROW_POSITION_BIAS, padding_free_refusal, use_block_attention
from finetune.training.packed_mixers import recurrent_mixers
from helpers.recipes import LORA_CHAIN_RECIPE, run_cli

# The MoE families of transformers 5.24 with recurrent token mixers, and the mixer class moetune finds in each.
HYBRIDS = {
    "qwen3_next": "Qwen3NextGatedDeltaNet", "qwen3_5_moe_text": "Qwen3_5MoeGatedDeltaNet",
    "jamba": "JambaMambaMixer", "granitemoehybrid": "GraniteMoeHybridMambaLayer",
    "nemotron_h": "NemotronHMamba2Mixer", "kimi_linear": "KimiLinearDeltaAttention",
    "bailing_hybrid": "BailingHybridDeltaAttention", "lfm2_moe": "Lfm2MoeShortConv",
    "lara_mini": "LaraMiniGatedDeltaNet", "minimax": "MiniMaxLightningAttention", "zaya": "ZayaCCAProjection",
}
# Families with recurrent mixers that still run padded, and what their reason names.
STILL_PADDED = {"qwen4_exp_text": "indexed_attention layers", "inkling_text": ROW_POSITION_BIAS,
                "deepseek_v4": "compressed_sparse_attention and heavily_compressed_attention layers"}


def tiny_model(architecture: str):
    init = ModelInit(architecture=architecture, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
                     num_kv_heads=2, num_experts=4, experts_per_token=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(family_config(init, 200, pad_token_id=0, eos_token_id=1)).eval()


def padded_hidden(model, sequences):
    """Last hidden states of each sequence in a right-padded batch."""
    ids = torch.zeros(len(sequences), max(map(len, sequences)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, sequence in enumerate(sequences):
        ids[row, :len(sequence)], mask[row, :len(sequence)] = sequence, 1
    hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    return [hidden[row, :len(sequence)] for row, sequence in enumerate(sequences)]


@pytest.mark.parametrize("family", sorted(HYBRIDS))
def test_packed_rows_equal_padded_batch_in_hybrid_families(family):
    """TRL's padding-free row (restarting positions, cu_seq_lens, seq_idx) and a prompt-shared pair row (prompt,
    chosen, rejected continuing from the prompt) give the padded batch's hidden states at every real token."""
    model = tiny_model(family)
    assert padding_free_refusal(model) is None
    assert {type(mixer).__name__ for mixer in recurrent_mixers(model.base_model).values()} == {HYBRIDS[family]}
    generator = torch.Generator().manual_seed(1)
    sequences = [torch.randint(3, 200, (n,), generator=generator) for n in (7, 12, 5)]
    prompt, chosen, rejected = (torch.randint(3, 200, (n,), generator=generator) for n in (6, 4, 5))
    with torch.no_grad():
        expected = padded_hidden(model, sequences)
        pair = padded_hidden(model, [torch.cat([prompt, chosen]), torch.cat([prompt, rejected])])
        use_block_attention(model)
        lengths = torch.tensor([len(s) for s in sequences])
        bounds = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).int()])
        row = model.base_model(
            input_ids=torch.cat(sequences)[None], position_ids=torch.cat([torch.arange(n) for n in lengths])[None],
            cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, max_length_q=12, max_length_k=12, use_cache=False,
            seq_idx=torch.repeat_interleave(torch.arange(3, dtype=torch.int32), lengths)[None]).last_hidden_state[0]
        shared = model.base_model(
            input_ids=torch.cat([prompt, chosen, rejected])[None], packed_blocks=[(0, 6, 10, 15)], use_cache=False,
            position_ids=torch.cat([torch.arange(10), torch.arange(6, 11)])[None]).last_hidden_state[0]
    torch.testing.assert_close(row, torch.cat(expected), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared[:10], pair[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared[10:], pair[1][6:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", sorted(STILL_PADDED))
def test_families_that_still_run_padded_say_what_is_missing(family):
    assert STILL_PADDED[family] in padding_free_refusal(tiny_model(family))


def logged(run, stage: str, key: str) -> list[float]:
    """The per-step values of `key` a stage logged (its metrics.json)."""
    return [entry[key] for entry in json.loads((run / stage / "metrics.json").read_text()) if key in entry]


@pytest.mark.slow  # two runs of prep, SFT and DPO: ~4 min on a busy shared 2-core machine
def test_cli_runs_a_hybrid_family_padding_free_with_the_padded_losses(tmp_path):
    """`moetune run` on a Jamba model.init recipe (attention and Mamba layers, MoE in the Mamba ones), LoRA SFT ->
    LoRA DPO: padding-free by default, it says so, and its SFT and DPO losses and aux losses step by step are the
    padded run's (`speed.padding_free=false`)."""
    runs = {}
    for padding_free in ("true", "false"):
        folder = tmp_path / padding_free
        folder.mkdir()
        (folder / "recipe.yaml").write_text(LORA_CHAIN_RECIPE.format(run_dir=folder / "run", architecture="jamba"))
        printed = run_cli(["run", str(folder / "recipe.yaml"), "--stages", "prep,sft,dpo", "dpo.max_steps=2",
                           f"speed.padding_free={padding_free}"])
        assert "speed.padding_free is off" not in printed
        note = "padding-free rows for jamba: its recurrent token mixers (2 JambaMambaMixer) run sequence by sequence"
        assert (note in printed) == (padding_free == "true"), printed[-3000:]
        runs[padding_free] = folder / "run"
    for stage in ("sft", "dpo"):
        for key in ("loss", "aux_loss"):
            packed, padded = (logged(runs[run], stage, key) for run in ("true", "false"))
            assert len(packed) == 2  # the second step after an update: DPO's first loss is log 2 either way
            assert packed == pytest.approx(padded, rel=1e-5)
