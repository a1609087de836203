"""Look inside a ViT (`vitmpp.analyze`): the ViT paper's Figure 7 and attention rollout.

* attention.py: attention weights recomputed from each block's own qkv (hooks only
  while analysing; timm's fused training path is untouched), attention rollout
  (Abnar & Zuidema 2020), mean attention distance per layer and head in pixels;
* embeddings.py: position-embedding cosine similarity, principal components of
  the patch-embedding filters;
* render.py / figures.py: the pictures, as [3, H, W] tensors and as matplotlib figures;
* training.py: `training_figures`, the cheap ones for the pretraining engine;
* report.py and `python -m vitmpp.analyze`: the whole analysis of an exported
  encoder on shards, as PNGs + summary.json (+ TensorBoard).
"""

from vitmpp.common.lazy import lazy_exports

# Imported on first use (common/lazy.py): `python -m vitmpp.analyze --help` must not wait for torch.
__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    {
        **dict.fromkeys(
            [
                "attention_rollout",
                "attention_weights",
                "encoder_geometry",
                "mean_attention_distance",
                "patch_distances",
                "record_attention",
                "recompute_attention",
                "rollout_maps",
                "rollout_step",
                "supports_attention",
            ],
            ".attention",
        ),
        **dict.fromkeys(
            [
                "EmbeddingFilters",
                "embedding_filters",
                "patch_position_embeddings",
                "position_similarity",
                "similarity_by_offset",
            ],
            ".embeddings",
        ),
        **dict.fromkeys(["filter_tiles", "rollout_overlays", "rollout_pairs", "similarity_tiles"], ".render"),
        **dict.fromkeys(
            ["FIGURE_FILES", "Analysis", "analysis_figures", "analysis_summary", "analyze_encoder", "write_analysis"],
            ".report",
        ),
        "training_figures": ".training",
    },
)
