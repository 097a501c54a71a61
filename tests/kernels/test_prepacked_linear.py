import threading

import pytest
import torch

from twopass_asr.kernels.prepacked_linear import MlasLinear, OneDnnLinear, choose_kernel, prepack_linear_layers

KERNELS = [pytest.param(kernel, marks=pytest.mark.skipif(choose_kernel(kernel) is None,
                                                         reason=f"{kernel} unavailable here"))
           for kernel in ("mlas", "onednn")]
CLASSES = {"mlas": MlasLinear, "onednn": OneDnnLinear}


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


@pytest.mark.parametrize("kernel", KERNELS)
def test_replaces_untied_float32_linears_and_keeps_their_outputs(kernel):
    torch.manual_seed(0)
    block = Block().eval()
    inputs = [torch.randn(1, 16), torch.randn(7, 16), torch.randn(3, 5, 16), torch.randn(5, 3, 16).transpose(0, 1),
              torch.randn(2, 0, 16)]
    with torch.inference_mode():
        expected = [block(x) for x in inputs]

    assert prepack_linear_layers(block, kernel) == 2
    assert all(isinstance(layer, CLASSES[kernel]) for layer in block.layers)
    # The tied head and the bfloat16 layer are left as they were.
    assert type(block.head) is torch.nn.Linear and block.head.weight is block.embed.weight
    assert type(block.bf16) is torch.nn.Linear
    with torch.inference_mode():
        for x, want in zip(inputs, expected):
            got = block(x)
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
def test_prepacking_twice_changes_nothing_more(kernel):
    block = Block().eval()
    prepack_linear_layers(block, kernel)
    assert prepack_linear_layers(block, kernel) == 0


@pytest.mark.skipif(choose_kernel("mlas") is None, reason="onnxruntime not installed")
def test_one_mlas_layer_serves_threads_at_once():
    # The first pass's worker threads share one model.
    torch.manual_seed(1)
    linear = torch.nn.Linear(64, 96)
    packed = MlasLinear(linear)
    inputs = [torch.randn(15 + i, 64) for i in range(4)]
    with torch.inference_mode():
        expected = [linear(x) for x in inputs]
    mismatches = []

    def run(x, want):
        with torch.inference_mode():
            for _ in range(200):
                if not torch.allclose(packed(x), want, rtol=1e-5, atol=1e-5):
                    mismatches.append(x.shape)

    threads = [threading.Thread(target=run, args=pair) for pair in zip(inputs, expected)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert mismatches == []


@pytest.mark.skipif(choose_kernel("mlas") is None or choose_kernel("onednn") is None,
                    reason="needs both kernels")
def test_auto_takes_mlas_on_one_thread_only():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert choose_kernel() == "mlas"
        torch.set_num_threads(2)
        assert choose_kernel() == "onednn"
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="linear kernel must be one of"):
        choose_kernel("mkl")

