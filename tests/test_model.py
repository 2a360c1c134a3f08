"""GPT-2 model: published sizes, Hugging Face weight conversion, generation, MFU arithmetic."""

import pytest
import torch

from nanogpt.gpus import gpu_table, peak_flops
from nanogpt.model import GPT, GPT2_SIZES, GPTConfig

# Published parameter counts of the GPT-2 family (tied embeddings, 50257 tokens, 1024 positions),
# as the Hugging Face checkpoints report them.
PUBLISHED = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_parameter_counts_match_published(name):
    with torch.device("meta"):  # no memory for 1.5B parameters
        model = GPT(GPTConfig(vocab_size=50257, **GPT2_SIZES[name]))
    assert model.num_params(non_embedding=False) == PUBLISHED[name]
    assert model.lm_head.weight is model.transformer.wte.weight  # tied


def test_from_pretrained_gives_the_same_logits_as_hugging_face(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(n_layer=3, n_head=4, n_embd=64, n_positions=48, vocab_size=211,
                                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf_model = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():  # random, non-trivial biases and norms so a missed transpose cannot hide
        for p in hf_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf_model.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(str(tmp_path)).eval()
    assert ours.config.n_layer == 3 and ours.config.vocab_size == 211 and ours.config.block_size == 48
    tokens = torch.randint(0, 211, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(tokens).logits
        got, _ = ours(tokens, targets=tokens)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_loss_at_init_is_near_uniform():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=97))
    x, y = torch.randint(0, 97, (2, 4, 16))
    _, loss = model(x, y)  # independent targets: with y = x the tied embedding would favour the input
    assert abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.3


def test_generate_extends_and_respects_top_k():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=16, block_size=8, vocab_size=11)).eval()
    prompt = torch.zeros((2, 3), dtype=torch.long)
    out = model.generate(prompt, 12, temperature=1.0, top_k=1)  # longer than block_size: context is cropped
    assert out.shape == (2, 15)
    assert torch.equal(out[:, :3], prompt)
    # top_k=1 is greedy: the same prompt always gives the same continuation
    assert torch.equal(out, model.generate(prompt, 12, temperature=1.0, top_k=1))


def test_sequence_longer_than_block_size_is_an_error():
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=4, vocab_size=5))
    with pytest.raises(ValueError, match="exceeds block_size 4"):
        model(torch.zeros((1, 5), dtype=torch.long))


def test_mfu_uses_the_gpu_table():
    """The peaks come from slurm/gpus.tsv, the table the scripts and the launcher read (the trainer had its own
    copy, whose H100 PCIe, H100 NVL and L40S figures differed from the table's)."""
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989.5e12
    assert peak_flops("NVIDIA H100 PCIe") == 756.5e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("cpu") is None
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=50304))
    tokens_per_s = 100_000
    for gpu_type, row in gpu_table().items():
        expected = model.flops_per_token() * tokens_per_s / float(row["peak_bf16_flops"])
        name = f"NVIDIA {row['torch_name']}"
        assert model.estimate_mfu(tokens_per_s, name) == pytest.approx(expected, rel=1e-12), gpu_type
    # 6N + 12 L C T per token: at 480k tokens/s the original trainer's 41.5% on an H100
    assert model.estimate_mfu(480_000, "NVIDIA H100 80GB HBM3") == pytest.approx(0.416, abs=0.003)
