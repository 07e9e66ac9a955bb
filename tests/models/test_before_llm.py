"""A strategy that selects before the LLM and then inside it (VScan's shape): the pre-LLM splice, then an in-LLM
cut on the shortened sequence — checked against transformers' model on the shortened input with the second cut's
pruned keys masked from layer K on."""

import pytest
import torch
from reference import hooked, masked_layer_hooks, shortened_embeds

import vtprune
from vtprune.models.base import PrunePlan, left_pad_positions
from vtprune.strategies.base import Strategy

pytestmark = pytest.mark.usefixtures("one_thread")
K = 2


def first_half(signals, budgets):
    """Before the LLM (stage 0) and at layer K (stage 1) alike: the first half of the tokens present."""
    assert (signals.features is not None) == (signals.stage == 0)  # each stage gets its own signals
    assert (signals.hidden_states is not None) == (signals.stage == 1)
    return [torch.arange(max(1, int(v.sum()) // 2)) for v in signals.valid]


PLAN = PrunePlan(Strategy("half_then_half", first_half, ("features", "hidden_states"), stage="in_llm",
                          placement={"layer": K}, before_llm=True), keep_ratio=0.5)


def test_selecting_before_and_inside_the_llm_equals_the_shortened_input_with_the_second_cut_masked():
    from PIL import Image

    adapter = vtprune.load(model="tiny:llava", device="cpu", dtype="float32").adapter
    g = torch.Generator().manual_seed(5)
    images = [Image.fromarray((torch.rand(56, 56, 3, generator=g) * 255).to(torch.uint8).numpy()) for _ in range(2)]
    inputs = adapter.prepare(images, ["What is shown?", "How many objects are there in the picture please?"])
    gen = dict(max_new_tokens=3, do_sample=False, pad_token_id=adapter.processor.tokenizer.pad_token_id)
    with torch.no_grad():
        logits, records = adapter.prefill_logits(inputs, PLAN)
        new, gen_records = adapter.generate(inputs, PLAN, **gen)
        feats = adapter.visual_tokens(inputs).features
    layers = len(adapter.decoder_layers)
    for r in records:  # 16 visual tokens: 8 before the LLM, 4 from layer K on
        assert r.kept == [0, 1, 2, 3] and r.stage_kept == [8, 4] and r.num_visual == 16
        assert r.equivalent_tokens == (K * 8 + (layers - K) * 4) / layers
    assert [r.kept for r in gen_records] == [r.kept for r in records]

    batch, mask = shortened_embeds(adapter, inputs, [list(range(8))] * 2, feats)
    allowed = mask.bool().clone()
    for b in range(2):  # in the shortened rows, the image tokens are the first 8 after the prompt's prefix
        row_ids = inputs["input_ids"][b][inputs["attention_mask"][b].bool()]
        first_image = int(torch.nonzero(row_ids == adapter.image_token_id)[0])
        start = mask.shape[1] - int(mask[b].sum()) + first_image
        allowed[b, start + 4 : start + 8] = False
    with torch.no_grad(), hooked(masked_layer_hooks(adapter.decoder_layers, allowed, K)):
        expected = adapter.model(inputs_embeds=batch, attention_mask=mask,
                                 position_ids=left_pad_positions(mask)).logits[:, -1]
        ref_new = adapter.model.generate(inputs_embeds=batch, attention_mask=mask, **gen)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(new, ref_new)
    with torch.no_grad():  # the second cut matters: the shortened input alone gives other logits
        first_cut_only = adapter.model(inputs_embeds=batch, attention_mask=mask,
                                       position_ids=left_pad_positions(mask)).logits[:, -1]
    assert (logits - first_cut_only).abs().max() > 1e-3
