"""A merge inside the LLM (SparseVLM's recycling): from layer K on, the anchor's hidden state is the weighted mean
of its sources' hidden states entering layer K, the pruned tokens are gone. Checked against transformers' own model
run at full length with that one row replaced and the pruned keys masked from layer K on."""

import pytest
import torch
from reference import hooked, masked_layer_hooks

import vtprune
from vtprune.models.base import PrunePlan
from vtprune.strategies import Selection
from vtprune.strategies.base import Strategy

pytestmark = pytest.mark.usefixtures("one_thread")
K = 2


def keep_first_merge_rest(signals, budgets):
    """Keeps the first ``k - 1`` visual tokens; the rest become one merged token in the last one's slot."""
    out = []
    for b, k in enumerate(budgets.tolist()):
        n = int(signals.valid[b].sum())
        weights = torch.zeros(1, signals.valid.shape[1])
        weights[0, k - 1 : n] = 1 / (n - k + 1)
        out.append(Selection(torch.arange(k - 1), torch.tensor([n - 1]), weights))
    return out


PLAN = PrunePlan(Strategy("merge_rest", keep_first_merge_rest, ("hidden_states",), stage="in_llm",
                          placement={"layer": K}, merges=True), keep_ratio=0.5)


@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl"])
def test_an_in_llm_merge_is_the_mean_of_its_sources_hidden_states(family):
    from PIL import Image

    adapter = vtprune.load(model=f"tiny:{family}", device="cpu", dtype="float32").adapter
    g = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(h, 56, 3, generator=g) * 255).to(torch.uint8).numpy()) for h in (56, 40)]
    inputs = adapter.prepare(images, ["What is shown?", "How many objects are there in the picture please?"])
    with torch.no_grad():
        logits, records = adapter.prefill_logits(inputs, PLAN)

    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    image_pos = [torch.nonzero(row == adapter.image_token_id).flatten() for row in ids]
    allowed = mask.clone()
    for b, r in enumerate(records):
        n, k = r.num_visual, -(-r.num_visual // 2)
        assert r.kept == [*range(k - 1), n - 1] and r.merged == [n - 1] and r.stage_kept == [k]
        allowed[b, image_pos[b][k - 1 : n - 1]] = False

    def merge_rows(layer, args, kwargs):
        hidden = (args[0] if args else kwargs["hidden_states"]).clone()
        for b, r in enumerate(records):
            n, k = r.num_visual, -(-r.num_visual // 2)
            hidden[b, image_pos[b][n - 1]] = hidden[b, image_pos[b][k - 1 : n]].mean(dim=0)
        return (hidden, *args[1:]) if args else args, ({**kwargs, "hidden_states": hidden} if not args else kwargs)

    layers = adapter.model.model.language_model.layers
    handles = [layers[K].register_forward_pre_hook(merge_rows, with_kwargs=True)]
    handles += masked_layer_hooks(layers, allowed, K)
    with torch.no_grad(), hooked(handles):
        expected = adapter.model(**inputs, position_ids=adapter.prompt_positions(inputs)).logits[:, -1]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    # and the merge matters: without it (the anchor as it was) the logits differ
    with torch.no_grad(), hooked(masked_layer_hooks(layers, allowed, K)):
        unmerged = adapter.model(**inputs, position_ids=adapter.prompt_positions(inputs)).logits[:, -1]
    assert not torch.allclose(logits, unmerged, atol=1e-4, rtol=1e-4)
