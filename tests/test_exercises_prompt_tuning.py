"""The Prompt tuning chapter's checks pass for a correct implementation and fail for broken ones."""
import torch
from torch import nn

from minipeft.exercises import check_nearest_tokens, check_prepend_prompt, check_text_init


def prepend(P, embeds, mask, labels):
    B, L = embeds.shape[0], P.shape[0]
    e = torch.cat([P.to(embeds.dtype).unsqueeze(0).expand(B, -1, -1), embeds], dim=1)
    m = torch.cat([mask.new_ones(B, L), mask], dim=1)
    lab = torch.cat([labels.new_full((B, L), -100), labels], dim=1)
    return e, m, lab


def test_prepend():
    assert check_prepend_prompt(prepend)
    # prompt appended instead of prepended
    assert not check_prepend_prompt(lambda P, e, m, l: tuple(torch.cat([b, a], 1) for a, b in
                                                            zip(prepend(P, e, m, l), (e, m, l))))
    # zeros in the mask for the virtual tokens
    assert not check_prepend_prompt(lambda P, e, m, l: (prepend(P, e, m, l)[0],
                                                        torch.cat([m.new_zeros(m.shape[0], P.shape[0]), m], 1),
                                                        prepend(P, e, m, l)[2]))
    # the prompt detached: no gradient
    assert not check_prepend_prompt(lambda P, e, m, l: prepend(P.detach(), e, m, l))


def text_init(E, ids, L):
    ids = torch.tensor(ids)
    return E[ids.repeat((L + len(ids) - 1) // len(ids))[:L]]


def test_text_init():
    assert check_text_init(text_init)
    assert not check_text_init(lambda E, ids, L: E[torch.tensor(ids)[:L]])  # no repeat
    # pads with the last token instead of repeating
    assert not check_text_init(lambda E, ids, L: E[torch.tensor((ids + [ids[-1]] * L)[:L])])


def nearest(P, E, k):
    s = nn.functional.normalize(P, dim=-1) @ nn.functional.normalize(E, dim=-1).T
    v, i = s.topk(k, dim=-1)
    return i, v


def test_nearest():
    assert check_nearest_tokens(nearest)

    def dot(P, E, k):
        v, i = (P @ E.T).topk(k, dim=-1)
        return i, v
    assert not check_nearest_tokens(dot)

    def ascending(P, E, k):
        i, v = nearest(P, E, k)
        return i.flip(-1), v.flip(-1)
    assert not check_nearest_tokens(ascending)


def results(report):
    return [ok for _, ok in report]


# ---- second correct answers, more mistakes, raising answers, and the hint for an appended prompt ------------
def prepend_stack(P, embeds, mask, labels):  # a second correct answer: a list of rows, then stack
    rows = [torch.cat([P.to(embeds.dtype), embeds[b]]) for b in range(embeds.shape[0])]
    L = P.shape[0]
    pad = torch.full((mask.shape[0], L), 1, dtype=mask.dtype)
    return torch.stack(rows), torch.cat([pad, mask], 1), torch.cat([torch.full_like(pad, -100), labels], 1)


def appended(P, e, m, l):  # the prompt after the tokens
    B, L = e.shape[0], P.shape[0]
    return (torch.cat([e, P.unsqueeze(0).expand(B, -1, -1)], 1), torch.cat([m, m.new_ones(B, L)], 1),
            torch.cat([l, l.new_full((B, L), -100)], 1))


def test_prepend_more(capsys):
    assert check_prepend_prompt(prepend_stack)
    # labels 0 instead of -100 in front: the virtual tokens enter the loss
    assert results(check_prepend_prompt(lambda P, e, m, l: (*prepend(P, e, m, l)[:2],
                                                            torch.cat([l.new_zeros(l.shape[0], P.shape[0]), l], 1))))[1] \
        is False
    capsys.readouterr()
    assert results(check_prepend_prompt(appended))[3] is False
    assert "causal LM" in capsys.readouterr().out  # the real cause, not "detached?"
    assert not any(results(check_prepend_prompt(lambda P, e, m, l: torch.cat([P, e]))))  # raises: 2-D and 3-D


def text_init_modulo(E, ids, L):  # a second correct answer
    return torch.stack([E[ids[i % len(ids)]] for i in range(L)])


def test_text_init_more():
    assert check_text_init(text_init_modulo)
    # each id repeated in place (a a b b c c …) instead of the list repeated
    assert not check_text_init(lambda E, ids, L: E[torch.tensor(ids).repeat_interleave(L)[:L]])
    assert not any(results(check_text_init(lambda E, ids, L: E[ids * 1.0])))  # raises: float index


def nearest_sorted(P, E, k):  # a second correct answer: cosine_similarity, then a full sort
    sims = nn.functional.cosine_similarity(P[:, None, :], E[None, :, :], dim=-1)
    values, ids = sims.sort(dim=-1, descending=True)
    return ids[:, :k], values[:, :k]


def test_nearest_more():
    assert check_nearest_tokens(nearest_sorted)

    def only_e_normalised(P, E, k):  # the ranking is right, the values are not cosines
        v, i = (P @ nn.functional.normalize(E, dim=-1).T).topk(k, dim=-1)
        return i, v
    assert results(check_nearest_tokens(only_e_normalised))[1] is False
    assert not any(results(check_nearest_tokens(lambda P, E, k: (P @ E).topk(k))))  # raises: (L, d) @ (V, d)
