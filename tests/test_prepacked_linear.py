import pytest
import torch

from twopass_asr.prepacked_linear import PrepackedLinear, prepack_linear_layers, prepacking_available

pytestmark = pytest.mark.skipif(not prepacking_available(), reason="torch built without oneDNN")


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(16, 32), torch.nn.Linear(32, 16, bias=False)])
        self.head = torch.nn.Linear(16, 50, bias=False)
        self.head.weight = self.embed.weight  # tied, as in LLMs
        self.bf16 = torch.nn.Linear(16, 16).to(torch.bfloat16)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_replaces_untied_float32_linears_and_keeps_their_outputs():
    torch.manual_seed(0)
    block = Block().eval()
    inputs = [torch.randn(1, 16), torch.randn(7, 16), torch.randn(3, 5, 16), torch.randn(5, 3, 16).transpose(0, 1),
              torch.randn(2, 0, 16)]
    with torch.inference_mode():
        expected = [block(x) for x in inputs]

    assert prepack_linear_layers(block) == 2
    assert all(isinstance(layer, PrepackedLinear) for layer in block.layers)
    # The tied head and the bfloat16 layer are left as they were.
    assert type(block.head) is torch.nn.Linear and block.head.weight is block.embed.weight
    assert type(block.bf16) is torch.nn.Linear
    with torch.inference_mode():
        for x, want in zip(inputs, expected):
            got = block(x)
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_prepacking_twice_changes_nothing_more():
    block = Block().eval()
    prepack_linear_layers(block)
    assert prepack_linear_layers(block) == 0
