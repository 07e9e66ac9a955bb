"""Qwen2.5-VL adapter on the tiny model: dynamic-size images, original M-RoPE positions, fastv, CLS-free saliency.

Every reference here is built from transformers' own model (full sequence, masks with holes, the positions
``get_rope_index`` gives the unpruned prompt), never from the adapter's splice or hooks.
"""

import checks
import numpy as np
import pytest
import torch
from PIL import Image
from reference import eager_copy, holed_mask, image_positions, no_hooks_left, plan

from vtprune.models.base import left_pad_positions

pytestmark = pytest.mark.usefixtures("one_thread")
ALL = ["none", "uniform", "random", "fastervlm", "cls_saliency", "adav", "divprune", "text_sim", "fastv"]
PRE_LLM = [name for name in ALL if name not in ("none", "fastv")]


def noise(width, height, seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# 56×56 → 8×8 patches → 16 visual tokens; 112×56 → 8×14 patches → 28 visual tokens (different sizes).
IMAGES = [noise(56, 56, 1), noise(112, 56, 2)]
COUNTS = [16, 28]


@pytest.fixture(scope="module")
def adapter(one_thread):
    return checks.sdpa_adapter("qwen2_5_vl", "Qwen2_5_VLAdapter")


def full_positions(adapter, inputs):
    """``[3, B, S]`` M-RoPE positions of the unpruned prompt, straight from transformers."""
    pos, _ = adapter.model.model.get_rope_index(
        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"],
    )
    return pos


# ---------------------------------------------------------------------------------------------------------------------


def test_inputs_have_two_sizes(adapter, inputs):
    counts = [len(image_positions(adapter, inputs, b)) for b in range(2)]
    assert counts == COUNTS
    assert (inputs["image_grid_thw"].prod(-1) // 4).tolist() == COUNTS
    assert inputs["attention_mask"][0, 0] == 0 and inputs["attention_mask"][:, -1].all()  # left padded


@pytest.mark.parametrize("name", ALL)
def test_keep_all_equals_unpruned(adapter, inputs, name):
    ref, records = checks.keep_all(adapter, inputs, name, **({"layer": 2} if name == "fastv" else {}))
    with torch.no_grad():
        plain = adapter.model(**inputs).logits[:, -1]  # the model's own path, positions computed by itself
    torch.testing.assert_close(ref, plain, atol=1e-5, rtol=1e-5)
    assert [r.num_visual for r in records] == COUNTS
    assert all(r.kept == list(range(r.num_visual)) for r in records)
    assert no_hooks_left(adapter)


@pytest.mark.parametrize("name", ["uniform", "fastervlm"])
def test_pre_llm_pruning_equals_masked_full_sequence(adapter, inputs, gen, name):
    p = plan(name, 0.5)
    with torch.no_grad():
        logits, records = adapter.prefill_logits(inputs, p)
        new, gen_records = adapter.generate(inputs, p, **gen)
        kept = [r.kept for r in records]
        holed = holed_mask(adapter, inputs, kept).long()
        pos = full_positions(adapter, inputs)
        ref = adapter.model(**{**inputs, "attention_mask": holed}, position_ids=pos).logits[:, -1]
        ref_new = adapter.model.generate(**{**inputs, "attention_mask": holed}, position_ids=pos, **gen)
        unpruned, _ = adapter.prefill_logits(inputs, plan("none"))
    assert [r.num_kept for r in records] == [c // 2 for c in COUNTS]
    assert [r.kept for r in gen_records] == kept
    assert all(k == sorted(set(k)) and 0 <= k[0] and k[-1] < c for k, c in zip(kept, COUNTS))
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
    assert (logits - unpruned).abs().max() > 1e-3  # the pruning does change the output
    assert torch.equal(new, ref_new[:, inputs["input_ids"].shape[1] :])
    assert torch.equal(new[:, 0], logits.argmax(-1))


@pytest.mark.parametrize("name", ["uniform", "fastervlm"])
def test_kept_tokens_keep_their_original_positions(adapter, inputs, name):
    seen = []

    def spy(module, args, kwargs):
        seen.append(kwargs["position_ids"].clone())

    handle = adapter.model.model.language_model.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        with torch.no_grad():
            _, records = adapter.prefill_logits(inputs, plan(name, 0.5))
    finally:
        handle.remove()
    assert len(seen) == 1
    got = seen[0]
    full = full_positions(adapter, inputs)
    stays = holed_mask(adapter, inputs, [r.kept for r in records])
    rows = [full[:, b, stays[b]] for b in range(2)]  # [3, S'_b]
    width = max(r.shape[1] for r in rows)
    expected = torch.zeros(3, 2, width, dtype=full.dtype)
    short_mask = torch.zeros(2, width, dtype=torch.long)
    for b, r in enumerate(rows):
        expected[:, b, width - r.shape[1] :] = r
        short_mask[b, width - r.shape[1] :] = 1
    assert got.shape == (3, 2, width) and width < inputs["input_ids"].shape[1]
    assert torch.equal(got, expected)
    # The kept image tokens of a sample share one t and keep their (h, w) places in the image.
    for b in range(2):
        stayed = stays[b].nonzero().flatten()
        is_image = inputs["input_ids"][b, stayed] == adapter.model.config.image_token_id
        cols = got[:, b, width - len(stayed) :][:, is_image]
        assert cols.shape[1] == records[b].num_kept
        assert (cols[0] == cols[0, 0]).all() and len(set(map(tuple, cols[1:].T.tolist()))) == records[b].num_kept
    renumbered = left_pad_positions(short_mask).expand(3, -1, -1)
    assert not torch.equal(renumbered, expected)  # renumbering the shorter sequence would be caught


def test_fastv_equals_masked_reference(adapter, inputs, gen):
    checks.fastv_equals_masked(adapter, inputs, gen, COUNTS, full_positions)


@pytest.mark.parametrize("name,options", [("uniform", {}), ("adav", {}), ("fastv", {"layer": 2})])
def test_batched_equals_per_sample(adapter, inputs, gen, name, options):
    records, alone = checks.batched_equals_per_sample(adapter, inputs, gen, plan(name, 0.5, **options), IMAGES)
    assert [r.num_visual for _, r in alone] == COUNTS
    assert [r.num_kept for r in records] == [c // 2 for c in COUNTS]


def test_pre_llm_cache_holds_kept_and_text_of_longest_sample(adapter, inputs):
    valid = checks.pre_llm_cache(adapter, inputs, [(16, 8), (28, 14)])
    assert valid[0] < valid[1] == inputs["input_ids"].shape[1]  # sample 0 is left padded


def test_fastv_cache_holds_full_prompt_before_k_and_kept_after(adapter, inputs):
    checks.fastv_cache(adapter, inputs, [(16, 8), (28, 14)], full_positions)


@pytest.mark.parametrize("name", ["uniform", "fastv"])
def test_synthetic_kv_bytes(adapter, name):
    checks.synthetic_kv(adapter, name, 8, adapter.prompt_positions)


@pytest.mark.parametrize("which", ["one 112x112 image", "batch"])
def test_cls_attention_matches_eager_vision_tower(adapter, inputs, which, monkeypatch):
    import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl as qwen

    batch = adapter.prepare([noise(112, 112, 3)], ["What is shown?"]) if which != "batch" else inputs
    sizes = (batch["image_grid_thw"].prod(-1) // 4).tolist()
    assert sizes == ([36] if which != "batch" else COUNTS)

    # The same tower with eager attention; transformers' own eager function, recorded for the last full block.
    eager = eager_copy(adapter.model.model.visual)
    config = eager.config
    block = eager.blocks[max(config.fullatt_block_indexes)].attn
    weights = []
    original = qwen.eager_attention_forward

    def recording(module, *args, **kwargs):
        out = original(module, *args, **kwargs)
        if module is block:
            weights.append(out[1])
        return out

    monkeypatch.setattr(qwen, "eager_attention_forward", recording)
    with torch.no_grad():
        visual = adapter.visual_tokens(batch)
        scores = adapter.cls_attention(batch, visual)
        out = eager(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
        merged = eager.merger(out.last_hidden_state)  # one row per 4 consecutive block rows, in window order
    # one full-attention chunk per image
    assert [w.shape for w in weights] == [(1, config.num_heads, 4 * s, 4 * s) for s in sizes]
    torch.testing.assert_close(torch.cat(visual.features), out.pooler_output, atol=1e-5, rtol=1e-5)
    # Window order → token order, from the tower's own output: merged row w is visual token j where they match.
    distance = (out.pooler_output[:, None] - merged[None]).abs().amax(dim=-1)
    order = distance.argmin(dim=1)  # token j ← window-order row order[j]
    assert distance.min(dim=1).values.max() < 1e-5 and len(set(order.tolist())) == len(order)
    assert not torch.equal(order, torch.arange(len(order)))  # window order is not token order here
    received = torch.cat([w[0].mean(dim=0).mean(dim=0) for w in weights])  # per patch row, window order
    window_pooled = received.view(-1, 4).mean(dim=1)  # per merge group, window order
    expected = torch.split(window_pooled[order], sizes)
    unordered = torch.split(window_pooled, sizes)

    assert [len(s) for s in scores] == sizes == [len(f) for f in visual.features]
    for s, e, u in zip(scores, expected, unordered):
        assert torch.all(s > 0) and torch.all(s <= 1)
        torch.testing.assert_close(s.sum(), torch.tensor(0.25), atol=1e-5, rtol=0)  # attention received sums to 1
        torch.testing.assert_close(s, e, atol=1e-6, rtol=1e-5)
        assert (s - u).abs().max() > 1e-4  # without undoing the window order the scores would be misaligned


def test_synthetic_inputs_run(adapter):
    synthetic = adapter.synthetic_inputs(2, 8, torch.Generator().manual_seed(0))
    n = adapter.num_synthetic_visual()
    ids, cfg = synthetic["input_ids"], adapter.model.config
    assert ids.shape == (2, n + 8)  # the two vision markers count among the 8 prompt tokens
    assert (ids == cfg.image_token_id).sum(dim=1).tolist() == [n, n]
    assert torch.equal(synthetic["mm_token_type_ids"], (ids == cfg.image_token_id).long())
    assert (synthetic["image_grid_thw"].prod(-1) // 4).tolist() == [n, n]
    assert synthetic["pixel_values"].shape[0] == int(synthetic["image_grid_thw"].prod(-1).sum())
    with torch.no_grad():
        ref, ref_records = adapter.prefill_logits(synthetic, plan("none"))
        logits, records = adapter.prefill_logits(synthetic, plan("uniform", 0.5))
    vocab = adapter.model.config.text_config.vocab_size
    assert ref.shape == logits.shape == (2, vocab) and torch.isfinite(ref).all() and torch.isfinite(logits).all()
    assert [r.num_visual for r in ref_records] == [r.num_visual for r in records] == [n, n]
    assert [r.num_kept for r in records] == [n // 2] * 2
    assert (logits - ref).abs().max() > 1e-4


# -- downsample: the image itself, resized to a merged grid within the budget ------------------------------------


def test_patches_round_trip_to_the_image_and_back(adapter, inputs):
    grids = inputs["image_grid_thw"].tolist()
    start = 0
    for b, (t, h, w) in enumerate(grids):
        rows = inputs["pixel_values"][start : start + t * h * w]
        start += t * h * w
        assert torch.equal(adapter.patchify(adapter.image_pixels(inputs, b)), rows)


def test_fitted_grid_keeps_the_aspect_ratio_within_the_budget():
    from vtprune.models.qwen2_5_vl import fitted_grid

    assert fitted_grid(4, 4, 16) == (4, 4)
    # 8 cells of a square: 2×4 / 4×2 are 2× off; 3×2 and 2×3 are 1.5× off and tie -> the taller
    assert fitted_grid(4, 4, 8) == (3, 2)
    # 4×7 (aspect 0.57) in 14: 2×7 is 2× off; 3×4 (12 cells, 1.31× off) is the largest within 1.5×
    assert fitted_grid(4, 7, 14) == (3, 4)
    # in 4 cells: 2×2 (1.75×), 1×3 (1.71×) and 1×4 (2.3×) are too far off; 1×2 (1.14×) is the largest within 1.5×
    assert fitted_grid(4, 7, 4) == (1, 2)
    assert fitted_grid(10, 10, 1) == (1, 1)


def test_downsample_runs_the_model_on_a_smaller_image(adapter, inputs):
    p = plan("downsample", 0.5)
    with torch.no_grad():
        small, records = adapter.downsampled(inputs, p)
        logits, same = adapter.prefill_logits(inputs, p)
        direct = adapter.model(**small, position_ids=adapter.prompt_positions(small)).logits[:, -1]
    torch.testing.assert_close(logits, direct)
    assert [r.kept for r in same] == [r.kept for r in records]
    new_counts = (small["input_ids"] == adapter.image_token_id).sum(dim=1).tolist()
    for (t, h, w), n, r in zip(small["image_grid_thw"].tolist(), new_counts, records):
        assert n == t * h * w // 4 == r.num_kept <= -(-r.num_visual // 2)
        assert len(set(r.kept)) == r.num_kept and max(r.kept) < r.num_visual
    assert small["pixel_values"].shape[0] < inputs["pixel_values"].shape[0]  # the vision tower sees fewer patches
    text = lambda x: [row[m.bool()][row[m.bool()] != adapter.image_token_id].tolist()  # noqa: E731
                      for row, m in zip(x["input_ids"], x["attention_mask"])]
    assert text(small) == text(inputs)  # the prompt is unchanged around the shorter image run
