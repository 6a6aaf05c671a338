"""Hybrid families (Mamba, Gated DeltaNet and other linear attention, short convolutions) on packed rows: each
sequence through the recurrent mixers from a fresh state (finetune/training/packed_mixers.py), so a packed row
gives what the padded batch gives.

tests/test_families.py (d) checks padding-free SFT and packed prompt-shared DPO against TRL's padded loss and
adapter gradients for the registry's hybrids (and, with MOETUNE_ALL_FAMILIES=1, every family); here the decoder's
hidden states of every hybrid family transformers 5.24 has, and of the families whose attention modules run on the
padded batch of the row's sequences (finetune/training/packed_attention.py), in both packed layouts, and a CLI run.
"""

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from finetune.config.recipe import ModelInit
from finetune.modeling.tiny import family_config
from finetune.training.packed_attention import whole_sequence_attention
from finetune.training.packed_forward import padding_free_refusal, use_block_attention
from finetune.training.packed_mixers import recurrent_mixers
from helpers.recipes import LORA_CHAIN_RECIPE, logged, run_cli

ALL_FAMILIES = os.environ.get("MOETUNE_ALL_FAMILIES") == "1"

# The MoE families of transformers 5.24 with recurrent token mixers, and the mixer class moetune finds in each.
HYBRIDS = {
    "qwen3_next": "Qwen3NextGatedDeltaNet", "qwen3_5_moe_text": "Qwen3_5MoeGatedDeltaNet",
    "jamba": "JambaMambaMixer", "granitemoehybrid": "GraniteMoeHybridMambaLayer",
    "nemotron_h": "NemotronHMamba2Mixer", "kimi_linear": "KimiLinearDeltaAttention",
    "bailing_hybrid": "BailingHybridDeltaAttention", "lfm2_moe": "Lfm2MoeShortConv",
    "lara_mini": "LaraMiniGatedDeltaNet", "minimax": "MiniMaxLightningAttention", "zaya": "ZayaCCAProjection",
}
# The MoE families whose attention modules mix tokens outside their attention call, run on the padded batch of a
# packed row's sequences (finetune/training/packed_attention.py), and the module class moetune finds in each:
# DeepSeek Sparse Attention indexers, DeepSeek-V4's compressors, Inkling's row-position biases. The suite runs one;
# MOETUNE_ALL_FAMILIES=1 all of them, and GLM-5's layers that reuse the previous layer's top-k ("shared" indexer).
WHOLE_ATTENTION = {
    "deepseek_v32": "DeepseekV32Attention", "glm_moe_dsa": "GlmMoeDsaAttention", "hy_v4": "HYV4Attention",
    "axk2": "AXK2Attention", "dots3_note_text": "Dots3NoteTextAttention", "qwen4_exp_text": "Qwen4ExpTextAttention",
    "deepseek_v4": "DeepseekV4Attention", "inkling_text": "InklingAttention",
    "inkling2_text": "Inkling2FullAttention", "inkling2_loop_text": "Inkling2LoopFullAttention",
    "glm_moe_dsa/shared": "GlmMoeDsaAttention",
}
CONFIG_CHANGES = {"glm_moe_dsa/shared": {"indexer_types": ["full", "shared", "shared"]}}


def tiny_model(architecture: str, **changes):
    init = ModelInit(architecture=architecture, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
                     num_kv_heads=2, num_experts=4, experts_per_token=2)
    config = family_config(init, 200, pad_token_id=0, eos_token_id=1)
    for key, value in changes.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


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
    assert_packed_rows_equal_padded_batch(model, lengths=(7, 12, 5), pair=(6, 4, 5))


@pytest.mark.parametrize("family", sorted(WHOLE_ATTENTION) if ALL_FAMILIES else ["deepseek_v32"])
def test_packed_rows_equal_padded_batch_where_attention_mixes_tokens_outside_its_call(family):
    """The same for the families whose attention modules run on the padded batch of the row's sequences, with
    sequences longer than the indexers' top-k (16, with ties at zero that torch.topk breaks by the row's length:
    one call per unpadded sequence picks other keys), the sliding windows (16) and many compression blocks (4)."""
    model = tiny_model(family.split("/")[0], **CONFIG_CHANGES.get(family, {}))
    assert padding_free_refusal(model) is None
    assert WHOLE_ATTENTION[family] in {type(module).__name__ for module in whole_sequence_attention(model)}
    assert_packed_rows_equal_padded_batch(model, lengths=(40, 70, 25), pair=(40, 20, 30))


def assert_packed_rows_equal_padded_batch(model, lengths: tuple[int, ...], pair: tuple[int, int, int]):
    generator = torch.Generator().manual_seed(1)
    sequences = [torch.randint(3, 200, (n,), generator=generator) for n in lengths]
    prompt, chosen, rejected = (torch.randint(3, 200, (n,), generator=generator) for n in pair)
    split, end = len(prompt) + len(chosen), sum(pair)
    with torch.no_grad():
        expected = padded_hidden(model, sequences)
        padded_pair = padded_hidden(model, [torch.cat([prompt, chosen]), torch.cat([prompt, rejected])])
        use_block_attention(model)
        sizes = torch.tensor(lengths)
        bounds = torch.cat([torch.zeros(1, dtype=torch.int32), sizes.cumsum(0).int()])
        row = model.base_model(
            input_ids=torch.cat(sequences)[None], position_ids=torch.cat([torch.arange(n) for n in lengths])[None],
            cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, max_length_q=max(lengths), max_length_k=max(lengths),
            use_cache=False,
            seq_idx=torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32), sizes)[None],
        ).last_hidden_state[0]
        shared = model.base_model(
            input_ids=torch.cat([prompt, chosen, rejected])[None], packed_blocks=[(0, len(prompt), split, end)],
            position_ids=torch.cat([torch.arange(split), torch.arange(len(prompt), len(prompt) + len(rejected))])[None],
            use_cache=False).last_hidden_state[0]
    torch.testing.assert_close(row, torch.cat(expected), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared[:split], padded_pair[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shared[split:], padded_pair[1][len(prompt):], rtol=1e-5, atol=1e-5)


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
            packed, padded = (logged(runs[run] / stage, key) for run in ("true", "false"))
            assert len(packed) == 2  # the second step after an update: DPO's first loss is log 2 either way
            assert packed == pytest.approx(padded, rel=1e-5)
