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
