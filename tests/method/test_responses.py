"""Eq. 7 per response: documents packed into one row (``method.response_logprobs``)."""

import pytest
import torch

from ordmoe_megatron.method import rank_loss, response_logprobs


def test_per_document_means_by_hand():
    # One row of 10 positions, two paths, four documents: [0, 3), [3, 5), [5, 9), [9, 10).
    # Document 1 (positions 3-4) has no answer token: it is left out.
    logprobs = torch.tensor(
        [
            [-1.0, -2.0, -3.0, -9.0, -9.0, -0.5, -1.5, -2.5, -3.5, -4.0],
            [-2.0, -4.0, -6.0, -9.0, -9.0, -1.0, -1.0, -1.0, -1.0, -7.0],
        ],
        dtype=torch.float64,
    )
    mask = torch.tensor([0, 1, 1, 0, 0, 1, 0, 1, 1, 1], dtype=torch.float64)
    cu = torch.tensor([0, 3, 5, 9, 10], dtype=torch.int32)
    per_doc, tokens = response_logprobs(logprobs, mask, cu)
    expected = torch.tensor(
        [
            [(-2.0 - 3.0) / 2, (-0.5 - 2.5 - 3.5) / 3, -4.0],
            [(-4.0 - 6.0) / 2, (-1.0 - 1.0 - 1.0) / 3, -7.0],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(per_doc, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(tokens, torch.tensor([2.0, 3.0, 1.0], dtype=torch.float64))
    # Per response, not per row: the row mean would mix the documents.
    row_mean = (logprobs * mask).sum(-1) / mask.sum()
    assert not torch.allclose(per_doc.mean(-1), row_mean)
    # The rank loss then runs over the three responses: Eq. 9 with z-scored [1, 0] advantages.
    loss = rank_loss(per_doc, "advantage", rewards=[1.0, 0.0], reduction="none")
    torch.testing.assert_close(loss, -(per_doc[0] - per_doc[1]))


def test_padding_past_the_last_document_and_gradients():
    logprobs = torch.randn(3, 1, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(1, 8, dtype=torch.float64)
    per_doc, tokens = response_logprobs(logprobs, mask, torch.tensor([0, 2, 6]))
    assert tokens.tolist() == [2.0, 4.0]  # positions 6, 7 are padding of no document
    per_doc.sum().backward()
    grad = logprobs.grad[0, 0]
    torch.testing.assert_close(grad, torch.tensor([0.5, 0.5, 0.25, 0.25, 0.25, 0.25, 0.0, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("cu", [[1, 4], [0, 5, 3], [0, 9]])
def test_bad_boundaries_are_refused(cu):
    with pytest.raises(ValueError, match="cu_seqlens"):
        response_logprobs(torch.zeros(1, 8), torch.ones(8), torch.tensor(cu))
