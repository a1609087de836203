"""An export records what the run used (issue 27, item 6): MAE's encoder trains with a fixed sin-cos
position table, and its encoder.json and card say so; MPP's is learned."""

from __future__ import annotations

import json

import torch

from engine_helpers import TINY, python_cmd, run


def test_the_position_table_is_recorded_as_the_objective_used_it(tmp_path, digits16):
    from vitmpp.models import load_encoder, mae_sincos_pos_embed

    for objective, kind in (("mae", "sincos"), ("mpp", "learned")):
        run(
            python_cmd("pretrain/main.py")
            + TINY
            + ["train.steps=2", f"objective={objective}", f"data.shards={digits16}"],
            cwd=tmp_path,
        )
        run_dir = tmp_path / "runs" / f"default-{objective}"
        assert json.loads((run_dir / "encoder.json").read_text())["pos_embed"] == kind
        encoder = load_encoder(run_dir)
        table = mae_sincos_pos_embed(encoder.patch_embed.grid_size, encoder.embed_dim, encoder.num_prefix_tokens)
        assert torch.equal(encoder.pos_embed[0], table.to(encoder.pos_embed.dtype)) == (kind == "sincos")
