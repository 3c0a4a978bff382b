import pytest
import torch

from mmfusion.errors import ConfigError
from mmfusion.unified.generation import (
    ImageSpanConstraint,
    SamplingConfig,
    SpanConstraint,
    filter_logits,
    generate,
)
from mmfusion.unified.model import IMAGE, TEXT, UnifiedConfig, UnifiedDecoder

# vocabulary of the tests: 0 = eos, 1 = boi, 2 = eoi, 3..12 text, 13..44 image codes
V, EOS, BOI, EOI = 45, 0, 1, 2
TEXT_IDS, IMAGE_IDS = range(3, 13), range(13, 45)


def tiny(**kw) -> UnifiedDecoder:
    torch.manual_seed(0)
    return UnifiedDecoder(UnifiedConfig(vocab_size=V, dim=16, depth=2, heads=2, max_len=128, **kw)).eval()


@pytest.fixture(scope="module")
def model():
    return tiny(image_window=4, modality_aware=True, sparse_topk=6)


def prompt(batch: int = 2, t: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 13, (batch, t), generator=g), torch.full((batch, t), TEXT)


def constraint(**kw) -> ImageSpanConstraint:
    return ImageSpanConstraint(V, list(TEXT_IDS) + [EOS], IMAGE_IDS, BOI, EOI, tokens_per_image=5, **kw)


def test_greedy_is_argmax_of_the_model(model):
    ids, mod = prompt()
    out = generate(model, ids, mod, max_new_tokens=1)
    assert torch.equal(out[:, 0], model(ids, mod).logits[:, -1].argmax(-1))


@pytest.mark.parametrize(
    "strategy, how", [("greedy", "constraint"), ("sample", "constraint"), ("sample", "table")]
)
def test_kv_cache_generation_equals_recomputation(model, strategy, how):
    # the new tokens' modalities come from the constraint, or from a vocabulary -> modality table
    ids, mod = prompt()
    kw = dict(sampling=SamplingConfig(strategy, top_k=10, seed=3), return_logits=True)
    if how == "constraint":
        kw["constraint"] = constraint()
    else:
        kw["vocab_modality"] = torch.tensor([TEXT] * 13 + [IMAGE] * 32)
    cached, l_cached = generate(model, ids, mod, 24, use_cache=True, **kw)
    full, l_full = generate(model, ids, mod, 24, use_cache=False, **kw)
    assert torch.equal(cached, full)
    assert (l_cached - l_full).abs().max().item() < 1e-4
    assert cached.shape == (2, 24)


def test_sampling_is_seeded():
    m = tiny()
    ids, mod = prompt()
    a = generate(m, ids, mod, 20, SamplingConfig("sample", temperature=2.0, seed=1))
    b = generate(m, ids, mod, 20, SamplingConfig("sample", temperature=2.0, seed=1))
    c = generate(m, ids, mod, 20, SamplingConfig("sample", temperature=2.0, seed=2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_top_k_never_picks_outside_the_top_k():
    m = tiny()
    ids, mod = prompt(batch=4)
    toks, logits = generate(
        m, ids, mod, 40, SamplingConfig("sample", temperature=5.0, top_k=3, seed=0), return_logits=True
    )
    top3 = logits.topk(3, dim=-1).indices  # (batch, steps, 3)
    assert (top3 == toks[..., None]).any(-1).all()
    # and it does sample: not always the argmax
    assert (toks != logits.argmax(-1)).any()


def test_top_p_keeps_the_nucleus():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()

    def kept(p):
        return torch.isfinite(filter_logits(logits, SamplingConfig("sample", top_p=p))).squeeze(0).tolist()

    assert kept(0.5) == [True, False, False, False]
    assert kept(0.79) == [True, True, False, False]
    assert kept(0.81) == [True, True, True, False]
    assert kept(1.0) == [True] * 4
    shuffled = logits[:, [2, 0, 3, 1]]  # order must not matter
    out = filter_logits(shuffled, SamplingConfig("sample", top_p=0.79))
    assert torch.isfinite(out).squeeze(0).tolist() == [False, True, False, True]
    # temperature then top-k, hand-checked
    out = filter_logits(torch.tensor([[2.0, 4.0, 1.0]]), SamplingConfig("sample", temperature=2.0, top_k=2))
    assert out.tolist() == [[1.0, 2.0, float("-inf")]]
    # sampled tokens stay inside the nucleus of the logits they came from
    m = tiny()
    ids, mod = prompt(batch=4)
    toks, lg = generate(
        m, ids, mod, 30, SamplingConfig("sample", temperature=3.0, top_p=0.3), return_logits=True
    )
    allowed = torch.isfinite(filter_logits(lg.flatten(0, 1), SamplingConfig(temperature=3.0, top_p=0.3)))
    assert allowed.gather(-1, toks.reshape(-1, 1)).all()


def test_classifier_free_guidance_limits(model):
    ids, mod = prompt()
    u_ids, u_mod = prompt(t=3, seed=5)  # a shorter unconditional prompt
    greedy = SamplingConfig("greedy")
    cond, l_cond = generate(model, ids, mod, 15, greedy, return_logits=True)
    one, l_one = generate(
        model,
        ids,
        mod,
        15,
        greedy,
        cfg_scale=1.0,
        uncond_ids=u_ids,
        uncond_modality=u_mod,
        return_logits=True,
    )
    assert torch.equal(one, cond) and (l_one - l_cond).abs().max().item() < 1e-5
    unc, l_unc = generate(model, u_ids, u_mod, 15, greedy, return_logits=True)
    zero, l_zero = generate(
        model,
        ids,
        mod,
        15,
        greedy,
        cfg_scale=0.0,
        uncond_ids=u_ids,
        uncond_modality=u_mod,
        return_logits=True,
    )
    assert torch.equal(zero, unc) and (l_zero - l_unc).abs().max().item() < 1e-5
    # scale 3 on the first step: uncond + 3 (cond - uncond), from two separate forward passes
    _, l3 = generate(
        model, ids, mod, 1, greedy, cfg_scale=3.0, uncond_ids=u_ids, uncond_modality=u_mod, return_logits=True
    )
    c, u = model(ids, mod).logits[:, -1], model(u_ids, u_mod).logits[:, -1]
    assert (l3[:, 0] - (u + 3.0 * (c - u))).abs().max().item() < 1e-5
    with pytest.raises(ConfigError, match="cfg_scale = 2.0 needs uncond_ids"):
        generate(model, ids, mod, 2, cfg_scale=2.0)
    with pytest.raises(ConfigError, match="uncond_ids given without uncond_modality"):
        generate(model, ids, mod, 2, cfg_scale=2.0, uncond_ids=u_ids)


def spans(tokens: list[int], start_in_image: bool = False):
    """Split generated ids into (kind, ids) spans at boi/eoi."""
    out, kind, cur = [], "image" if start_in_image else "text", []
    for t in tokens:
        if t == BOI:
            out.append((kind, cur))
            kind, cur = "image", []
        elif t == EOI:
            out.append((kind, cur))
            kind, cur = "text", []
        else:
            cur.append(t)
    out.append((kind + ("_open" if kind == "image" else ""), cur))
    return out


def test_constrained_decoding_yields_exactly_one_image_of_codes():
    m = tiny()  # random, untrained
    ids, mod = prompt(batch=4)
    c = constraint(start_in_image=True, max_images=1)
    toks = generate(m, ids, mod, 12, SamplingConfig("sample", temperature=3.0), constraint=c, stop_ids={EOS})
    for row in toks.tolist():
        assert row[5] == EOI
        assert all(t in IMAGE_IDS for t in row[:5])  # 100 % image codes, exactly tokens_per_image of them
        assert all(t in TEXT_IDS or t == EOS for t in row[6:])  # then text only; no second image
    # mixed text and image spans: boi opens a span of exactly 5 codes, text spans hold only text ids
    c = constraint()
    toks = generate(m, ids, mod, 60, SamplingConfig("sample", temperature=3.0, seed=4), constraint=c)
    n_images = 0
    for row in toks.tolist():
        for kind, span in spans(row):
            if kind == "image":
                assert len(span) == 5 and all(t in IMAGE_IDS for t in span)
                n_images += 1
            elif kind == "image_open":
                assert len(span) <= 5 and all(t in IMAGE_IDS for t in span)
            else:
                assert all(t in TEXT_IDS or t == EOS for t in span)
    assert n_images >= 4  # spans were really opened and closed
    # text-only answers
    c = constraint(allow_images=False)
    toks = generate(m, ids, mod, 30, SamplingConfig("sample", temperature=3.0), constraint=c)
    assert all(t in TEXT_IDS or t == EOS for t in toks.flatten().tolist())


def test_constraint_reports_the_modality_of_the_next_token():
    c = constraint(start_in_image=True)
    assert isinstance(c, SpanConstraint)
    mask, m = c.allowed([])
    assert m == IMAGE and mask.nonzero().flatten().tolist() == list(IMAGE_IDS)
    mask, m = c.allowed([20] * 5)
    assert m == TEXT and mask.nonzero().flatten().tolist() == [EOI]
    mask, m = c.allowed([20] * 5 + [EOI])
    assert m == TEXT and mask[BOI] and mask[EOS] and not mask[EOI] and not mask[20]
    with pytest.raises(ConfigError, match="text_ids and image_ids overlap"):
        ImageSpanConstraint(V, range(3, 20), IMAGE_IDS, BOI, EOI, 5)
    with pytest.raises(ConfigError, match=r"image ids must lie in \[0, 45\); got \[13, 45\]"):
        ImageSpanConstraint(V, TEXT_IDS, range(13, 46), BOI, EOI, 5)


def test_stop_ids_finish_rows_and_pad_them():
    m = tiny()
    ids, mod = prompt(batch=2)

    class StopAt:
        def allowed(self, generated):
            mask = torch.zeros(V, dtype=torch.bool)
            mask[EOS if len(generated) == 2 else 7] = True
            return mask, TEXT

    toks = generate(m, ids, mod, 20, constraint=StopAt(), stop_ids={EOS})
    assert toks.tolist() == [[7, 7, EOS]] * 2  # stops as soon as every row is finished
    toks = generate(m, ids, mod, 6, stop_ids={EOS, 99})
    assert toks.shape == (2, 6)


def test_generation_errors():
    m = tiny()
    ids, mod = prompt()
    with pytest.raises(ConfigError, match="exceeds the model's max_len 128"):
        generate(m, ids, mod, 124)
    with pytest.raises(ConfigError, match="strategy = 'beam'"):
        SamplingConfig("beam")
    with pytest.raises(ConfigError, match=r"top_p = 1.5: expected None or in \(0, 1\]"):
        SamplingConfig("sample", top_p=1.5)
