"""Mllama adapter on the tiny model: the invariants of DESIGN §3.1 for trimmed_llama and the mllama baselines."""

import json
import math
from pathlib import Path

import pytest
import torch
from kvcheck import expected_kv, measured_kv
from PIL import Image
from reference import hooked, plan

import vtprune

# tiny:mllama: 32x32 tiles, 17 tokens per tile (16 patches + CLS), up to 4 tiles, cross-attention layers [1, 3]
PER_TILE = 17


def noise(width, height, seed):
    # Noise, not flat colour: flat images give many equal patches, i.e. score ties that float noise would break.
    pixels = torch.randint(0, 256, (height, width, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


PADDED = [noise(40, 30, 0), noise(30, 90, 1)]  # 2 and 3 of 4 tiles
FULL = [noise(64, 64, 2), noise(32, 128, 3)]  # 4 of 4 tiles
PROMPTS = ["What is shown?", "How many objects are there in the picture please?"]



@pytest.fixture(scope="module")
def adapter():
    return vtprune.load(model="tiny:mllama").adapter


@pytest.fixture(scope="module")
def eager():
    return vtprune.load(model="tiny:mllama", attn_implementation="eager").adapter


@pytest.fixture(scope="module")
def padded(adapter):
    return adapter.prepare(PADDED, PROMPTS)


def hooks_left(adapter):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in adapter.model.modules())


def masked_reference(adapter, kept, cut_first, first_pruned=False):
    """Hooks that only hide every token outside ``kept`` from the later cross-attention layers (and from the first
    one's decode steps when its cache is cut, from all of it when it is pruned too): the full-length, unpruned
    equivalent of the pruned run."""
    first, *later = adapter.cross_layers

    def hook_for(layer_index):
        def hook(layer, args, kwargs):
            prefill = kwargs.get("cross_attention_states") is not None
            if layer_index == first and not first_pruned and (not cut_first or prefill):
                return None
            mask = kwargs["cross_attention_mask"]
            hide = torch.ones(len(kept), mask.shape[-1], dtype=torch.bool)
            for b, keep in enumerate(kept):
                hide[b, keep] = False
            kwargs["cross_attention_mask"] = mask.masked_fill(hide[:, None, None, :], torch.finfo(mask.dtype).min)
            return args, kwargs

        return hook

    layers = adapter.decoder_layers
    return [layers[i].register_forward_pre_hook(hook_for(i), with_kwargs=True) for i in [first, *later]]


def greedy_scores(adapter, inputs, steps=4):
    out = adapter.model.generate(
        **inputs, max_new_tokens=steps, do_sample=False, output_scores=True, return_dict_in_generate=True, min_new_tokens=steps
    )
    return out.sequences[:, inputs["input_ids"].shape[1] :], torch.stack(out.scores, dim=1)


# -- (1) keep everything == the model's own path ---------------------------------------------------------------


def test_keep_all_equals_unpruned(adapter):
    # All tiles real: with padded tiles, HF lets masked-out text rows (before the image) attend to padding tiles,
    # which pruning (padding is never kept) removes from the later layers; see docs/_notes/models/mllama.md.
    inputs = adapter.prepare(FULL, PROMPTS)
    with torch.no_grad():
        ref, ref_records = adapter.prefill_logits(inputs, plan("none"))
        for cut in (True, False):
            logits, records = adapter.prefill_logits(inputs, plan("trimmed_llama", 1.0, prune_first_layer_cache=cut))
            torch.testing.assert_close(logits, ref, atol=1e-5, rtol=0)
            assert [r.kept for r in records] == [r.kept for r in ref_records] == [list(range(4 * PER_TILE))] * 2
        ref_ids, _ = adapter.generate(inputs, plan("none"), max_new_tokens=5, do_sample=False)
        ids, _ = adapter.generate(inputs, plan("trimmed_llama", 1.0), max_new_tokens=5, do_sample=False)
    assert torch.equal(ids, ref_ids)
    assert hooks_left(adapter) == 0


# -- (2) pruned == unpruned with the pruned tokens masked ------------------------------------------------------


@pytest.mark.parametrize(
    "name,keep,cut",
    [("trimmed_llama", 0.3, True), ("trimmed_llama", 0.3, False), ("random", 0.4, True), ("cls_saliency", 0.25, True)],
)  # the baselines have no option: they always cut the first layer's cache
def test_pruned_equals_masked_reference(adapter, padded, name, keep, cut):
    p = plan(name, keep, **({"prune_first_layer_cache": cut} if name == "trimmed_llama" else {}))
    with torch.no_grad():
        logits, records = adapter.prefill_logits(padded, p)
        with adapter.applied(padded, p) as state:
            ids, scores = greedy_scores(adapter, padded)
        kept = [r.kept for r in records]
        assert [r.kept for r in state.records] == kept
        assert all(len(k) < r.num_visual for k, r in zip(kept, records))
        with hooked(masked_reference(adapter, kept, cut)):
            ref_logits = adapter.model(**padded, position_ids=_positions(padded)).logits[:, -1]
            ref_ids, ref_scores = greedy_scores(adapter, padded)
        unpruned, _ = adapter.prefill_logits(padded, plan("none"))
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores, ref_scores, atol=1e-4, rtol=0)
    assert torch.equal(ids, ref_ids)
    assert not torch.allclose(logits, unpruned, atol=1e-4)  # the pruning did change something


def _positions(inputs):
    from vtprune.models.base import left_pad_positions

    return left_pad_positions(inputs["attention_mask"])


# -- (3) + (6) the kept set equals a direct computation from the eager attention weights -----------------------


def eager_kept(eager, inputs, keep, mode="adaptive"):
    """Kept sets from the attention probabilities the eager first cross-attention layer itself computes."""
    first = eager.cross_layers[0]
    captured = {}

    def capture(module, args, out):
        captured["w"] = out[1]

    handle = eager.decoder_layers[first].cross_attn.register_forward_hook(capture)
    try:
        eager.model(**inputs, position_ids=_positions(inputs))
    finally:
        handle.remove()
    weights = captured["w"].float()  # [B, H, S, N]
    tiles = inputs["cross_attention_mask"].bool()[:, :, 0]  # [B, S, tiles]
    rows = tiles.any(-1) & inputs["attention_mask"].bool()
    columns = tiles.any(1).repeat_interleave(PER_TILE, dim=1)
    kept = []
    for b in range(len(weights)):
        heads = weights[b][:, rows[b]].mean(dim=1)[:, columns[b]]  # [H, N_valid]; valid tokens form a prefix
        k = math.ceil(keep * int(columns[b].sum()))
        ranked = heads.argsort(dim=-1, descending=True, stable=True)
        if mode == "adaptive":
            kept.append(sorted(set(ranked[:, :k].flatten().tolist())))
        else:
            order = list(dict.fromkeys(ranked.t().flatten().tolist()))
            kept.append(sorted(order[:k]))
    return kept


@pytest.mark.parametrize("mode", ["adaptive", "budget"])
def test_kept_set_matches_eager_attention(adapter, eager, padded, mode):
    with torch.no_grad():
        expected = eager_kept(eager, padded, 0.2, mode)
        _, sdpa_records = adapter.prefill_logits(padded, plan("trimmed_llama", 0.2, mode=mode))
        _, eager_records = eager.prefill_logits(padded, plan("trimmed_llama", 0.2, mode=mode))
    assert [r.kept for r in sdpa_records] == expected
    assert [r.kept for r in eager_records] == expected
    if mode == "budget":
        assert [len(k) for k in expected] == [math.ceil(0.2 * 34), math.ceil(0.2 * 51)]
    else:
        assert all(len(k) > math.ceil(0.2 * r.num_visual) for k, r in zip(expected, sdpa_records))


# -- (4) batched == per sample ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["trimmed_llama", "random", "uniform", "cls_saliency"])
def test_batched_equals_per_sample(adapter, padded, name):
    p = plan(name, 0.3)
    with torch.no_grad():
        logits, records = adapter.prefill_logits(padded, p)
        ids, _ = adapter.generate(padded, p, max_new_tokens=4, do_sample=False, min_new_tokens=4)
        for b in range(2):
            alone = adapter.prepare(PADDED[b : b + 1], PROMPTS[b : b + 1])
            one_logits, one_records = adapter.prefill_logits(alone, p)
            one_ids, _ = adapter.generate(alone, p, max_new_tokens=4, do_sample=False, min_new_tokens=4)
            assert one_records[0].kept == records[b].kept
            torch.testing.assert_close(one_logits[0], logits[b], atol=1e-4, rtol=0)
            assert torch.equal(one_ids[0], ids[b])
    assert not padded["attention_mask"][0].all()  # prompts of different lengths: sample 0 is left padded


@pytest.mark.parametrize("name", ["cls_saliency", "trimmed_llama"])
def test_pruning_before_the_first_cross_layer_equals_masking_it_too(adapter, padded, name):
    # placement prune_first_layer: every cross-attention layer, the first included, sees only the kept tokens
    p = plan(name, 0.3, prune_first_layer=True)
    first, *later = adapter.cross_layers
    with torch.no_grad():
        logits, records = adapter.prefill_logits(padded, p)
        with adapter.applied(padded, p):
            ids, scores = greedy_scores(adapter, padded)
        out, _ = adapter.forward(padded, p, use_cache=True)
        kept = [r.kept for r in records]
        with hooked(masked_reference(adapter, kept, cut_first=True, first_pruned=True)):
            ref_logits = adapter.model(**padded, position_ids=_positions(padded)).logits[:, -1]
            ref_ids, ref_scores = greedy_scores(adapter, padded)
        after_first, _ = adapter.prefill_logits(padded, plan(name, 0.3))
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores, ref_scores, atol=1e-4, rtol=0)
    assert torch.equal(ids, ref_ids)
    assert not torch.allclose(logits, after_first, atol=1e-4)  # the first layer's own view changed the output
    width = max(len(k) for k in kept)
    assert all(out.cache.layers[i].keys.shape[2] == width for i in [first, *later])
    assert all(r.equivalent_tokens == r.num_kept for r in records)
    assert adapter.placement(p).describe() == "before the first cross-attention layer"


# -- (5) cross-attention KV cache holds only the kept tokens ---------------------------------------------------


@pytest.mark.parametrize("cut", [True, False])
def test_cross_cache_holds_kept_tokens(adapter, padded, cut):
    first, *later = adapter.cross_layers
    with torch.no_grad():
        full, _ = adapter.forward(padded, plan("none"), use_cache=True)
        out, records = adapter.forward(padded, plan("trimmed_llama", 0.3, prune_first_layer_cache=cut), use_cache=True)
    width = max(r.num_kept for r in records)
    n = 4 * PER_TILE
    assert full.cache.layers[first].keys.shape[2] == n
    assert out.cache.layers[first].keys.shape[2] == (width if cut else n)
    assert out.cache.layers[first].values.shape[2] == (width if cut else n)
    for i in later:
        assert full.cache.layers[i].keys.shape[2] == n
        assert out.cache.layers[i].keys.shape[2] == out.cache.layers[i].values.shape[2] == width
    saved = measured_kv(adapter, full.cache)["cross"] - measured_kv(adapter, out.cache)["cross"]
    per_token = full.cache.layers[first].keys[0, :, 0].numel() * 4 * 2 * len(padded["input_ids"])
    assert saved == per_token * ((n - width) * len(later) + (n - width) * cut)
    assert measured_kv(adapter, out.cache)["self"] == measured_kv(adapter, full.cache)["self"]


def test_synthetic_inputs_and_analytic_kv_bytes(adapter):
    gen = torch.Generator().manual_seed(0)
    inputs = adapter.synthetic_inputs(2, 7, gen)
    assert inputs["input_ids"].shape == (2, 8)
    assert (inputs["input_ids"][:, 0] == adapter.model.config.image_token_id).all()
    for p in (plan("none"), plan("trimmed_llama", 0.3), plan("trimmed_llama", 0.3, prune_first_layer_cache=False), plan("uniform", 0.5)):
        with torch.no_grad():
            out, records = adapter.forward(inputs, p, use_cache=True)
        assert all(r.num_visual == 4 * PER_TILE for r in records)
        kept = max(r.num_kept for r in records)
        assert measured_kv(adapter, out.cache) == expected_kv(adapter, p, batch_size=2, text_tokens=8, num_visual=4 * PER_TILE, num_kept=kept)


def test_synthetic_words_skip_every_special_id_when_a_config_lists_several_eos(adapter, monkeypatch):
    # LLaMA-3.2-Vision's config lists three EOS ids; a bench on its proxy failed on the unhashable list.
    text = adapter.model.config.text_config
    monkeypatch.setattr(text, "eos_token_id", [7, 20, 33])
    inputs = adapter.synthetic_inputs(2, 7, torch.Generator().manual_seed(0))
    assert inputs["input_ids"].shape == (2, 8)
    words = adapter.synthetic_words(8, 2000, torch.Generator().manual_seed(0), 8)
    special = {7, 20, 33, text.bos_token_id, text.pad_token_id, 8}
    assert set(words.flatten().tolist()) == set(range(text.vocab_size)) - special


# -- baselines, padding, hooks -----------------------------------------------------------------------------


def test_baselines_keep_budget_and_never_padding(adapter, padded):
    with torch.no_grad():
        for name in ("random", "uniform", "cls_saliency", "trimmed_llama"):
            _, records = adapter.prefill_logits(padded, plan(name, 0.25, mode="budget") if name == "trimmed_llama" else plan(name, 0.25))
            assert [r.num_visual for r in records] == [2 * PER_TILE, 3 * PER_TILE]
            assert [r.num_kept for r in records] == [math.ceil(0.25 * 34), math.ceil(0.25 * 51)]
            assert all(max(r.kept) < r.num_visual for r in records)
            L = len(adapter.cross_layers)
            assert all(r.equivalent_tokens == (r.num_visual + (L - 1) * r.num_kept) / L for r in records)
        _, uniform = adapter.prefill_logits(padded, plan("uniform", 6 / 51))
        assert [sorted({i // PER_TILE for i in r.kept}) for r in uniform] == [[0, 1], [0, 1, 2]]  # spread over tiles
    assert hooks_left(adapter) == 0


def test_random_is_seeded_per_sample(adapter, padded):
    with torch.no_grad():
        _, a = adapter.prefill_logits(padded, plan("random", 0.3, seed=1))
        _, b = adapter.prefill_logits(padded, plan("random", 0.3, seed=1))
        _, c = adapter.prefill_logits(padded, plan("random", 0.3, seed=2))
    assert [r.kept for r in a] == [r.kept for r in b] != [r.kept for r in c]


def test_hooks_removed_after_an_error(adapter, padded):
    broken = {k: v for k, v in padded.items() if k != "aspect_ratio_ids"}
    with pytest.raises(Exception), torch.no_grad(), adapter.applied(padded, plan("trimmed_llama", 0.3)):
        adapter.model(**broken)
    assert hooks_left(adapter) == 0


def test_architecture_config_on_meta_device():
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    root = Path(__file__).resolve().parents[2] / "configs" / "architectures"
    config = MllamaConfig(**json.loads((root / "llama-3.2-11b-vision" / "config.json").read_text()))
    with torch.device("meta"):
        model = MllamaForConditionalGeneration(config)
    count = sum(p.numel() for p in model.parameters())
    assert 10.4e9 < count < 10.8e9
    assert config.text_config.cross_attention_layers == [3, 8, 13, 18, 23, 28, 33, 38]
    cfg = vtprune.config.load_config(root / "llama-3.2-11b-vision.yaml")
    assert cfg.pruning.strategy == "trimmed_llama" and cfg.model.weights == "random"


def test_sampling_generate(adapter):
    inputs = adapter.prepare(FULL, PROMPTS)
    gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=True, top_k=0, temperature=1.0)

    def sample(p, seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            return adapter.generate(inputs, p, **gen)

    # keep 1.0 gives the unpruned distribution, hence the same draws from the same seed
    assert torch.equal(sample(plan("trimmed_llama", 1.0), 5)[0], sample(plan("none"), 5)[0])
    # pruned sampling works, keeps the set it chose at prefill, and is reproducible
    ids, records = sample(plan("trimmed_llama", 0.3, mode="budget"), 5)
    again, records_again = sample(plan("trimmed_llama", 0.3, mode="budget"), 5)
    assert ids.shape == (2, 6) and torch.equal(ids, again)
    assert [r.kept for r in records] == [r.kept for r in records_again]
    assert all(r.num_kept == math.ceil(0.3 * 4 * PER_TILE) for r in records)
    assert hooks_left(adapter) == 0
