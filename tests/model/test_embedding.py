"""The lookup tables: drawn as nn.Embedding draws them, and nothing drawn for a meta skeleton."""

from __future__ import annotations

import subprocess
import sys

import torch

from qvl_pipeline.model.embedding import lookup_table


def test_lookup_table_draws_what_nn_embedding_draws() -> None:
    torch.manual_seed(3)
    reference = torch.nn.Embedding(17, 5)
    torch.manual_seed(3)
    ours = lookup_table(17, 5)
    assert torch.equal(ours.weight, reference.weight)
    assert ours.weight.requires_grad and ours.num_embeddings == 17 and ours.embedding_dim == 5


def test_meta_skeleton_does_not_import_the_compiler() -> None:
    # A fresh interpreter: whether torch._dynamo is imported is process-wide state (an earlier test may import it).
    code = ("import sys\n"
            "from tests.model.tiny_configs import tiny_hf_dict\n"
            "from qvl_pipeline.model.config import ModelConfig\n"
            "from qvl_pipeline.model.qwen3_vl import skeleton\n"
            "model = skeleton(ModelConfig.from_hf_dict(tiny_hf_dict()))\n"
            "assert model.model.language_model.embed_tokens.weight.is_meta\n"
            "assert model.model.visual.pos_embed.weight.is_meta\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr
