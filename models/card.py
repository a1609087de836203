"""The model card of an exported encoder: facts in, Hugging Face model-card text out.

`render_card(facts)` is pure: it reads nothing and computes nothing, so every number in
a card is one the run recorded (`vitmpp.models.hub.card_facts` gathers them from the
export folder: encoder.json, config.yaml, evaluations.json) and every word about the
objective is its class's (`facts["objective"]`: `vitmpp.models.objective.objective_facts`). The format is the Hub's:
YAML front matter (`library_name`, `license`, `tags`, `datasets`, `metrics`,
`model-index` for recorded results) and markdown.

Names the run records (the run folder, the data set, split names, paths) are data, not markup:
the body shows them escaped (`_text`, `_code`) and the code snippets quote them (`_py`, shell
quoting), so a `|`, a newline, a backtick or `<script>` in a name neither breaks the card nor
reaches it as HTML; the YAML front matter holds them as they are (yaml.safe_dump quotes them).

`license` is `other` with `license_name: unspecified`: who may use pretrained weights
depends on the data they were trained on, which vitmpp cannot know; the card says so and
whoever publishes the weights sets it. `base_model` is absent: vitmpp pretrains from
random initialisation.
"""

from __future__ import annotations

import html
import json
import re
import shlex
from typing import Any

import yaml

PROTOCOL_NAMES = {"linear": "linear probe", "finetune": "fine-tuning", "knn": "k-NN"}


def render_card(facts: dict) -> str:
    """The README.md text for `facts` (see `vitmpp.models.hub.card_facts` for the keys)."""
    return _front_matter(facts) + "\n" + "\n".join(_body(facts)).rstrip() + "\n"


# ----------------------------------------------------------------------------- names as data

_LINE_BREAKS = re.compile(r"[\r\n\v\f\x1c-\x1e\x85\u2028\u2029]+")


def _text(value: Any) -> str:
    """`value` as Markdown text that shows it as written: on one line, `<`, `>`, `&` HTML-escaped,
    Markdown's punctuation (`|` included, for tables) backslash-escaped."""
    text = html.escape(" ".join(str(value).split()), quote=False)
    return re.sub(r"([\\`*_\[\]|~])", r"\\\1", text)


def _code(value: Any, table: bool = False) -> str:
    """`value` as an inline code span: on one line, fenced by more backticks than it holds; in a `table`
    cell `|` escaped (GFM splits cells on it even in code). Code spans show `<`, `&` as written, never as HTML."""
    text = _LINE_BREAKS.sub(" ", str(value))
    text = text.replace("|", "\\|") if table else text
    fence = "`" * (max(map(len, re.findall("`+", text)), default=0) + 1)
    pad = " " if text[:1] in ("`", " ") or text[-1:] in ("`", " ") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def _py(value: Any) -> str:
    """`value` as a Python string literal (JSON's quoting is Python's): no name can end the string,
    or the line, and so the code block."""
    return json.dumps(str(value), ensure_ascii=False)


def _block(language: str, lines: list[str]) -> list[str]:
    """A fenced code block whose fence is longer than any run of backticks in it (so none closes it)."""
    fence = "`" * max(3, max((len(r) for line in lines for r in re.findall("`+", line)), default=0) + 1)
    return [fence + language, *lines, fence]


# ----------------------------------------------------------------------------- front matter


def _front_matter(facts: dict) -> str:
    info = facts["info"]
    objective = info.get("objective") or "unknown"
    extra = info.get("extra") or {}
    data = extra.get("data") or {}
    transformers = facts.get("flavour") == "transformers"
    tags = ["vitmpp", "vision-transformer", "image-feature-extraction", "pytorch", "timm"]
    if transformers:
        tags.append("transformers")
    described = facts.get("objective") or {}
    tags.append("self-supervised" if described.get("self_supervised") else objective)
    tags += [str(tag) for tag in described.get("hub_tags") or ()]
    tags.append(f"objective-{objective}")
    meta: dict[str, Any] = {
        "library_name": "transformers" if transformers else "timm",
        "license": "other",
        "license_name": "unspecified",
        "pipeline_tag": "image-feature-extraction",
        "tags": list(dict.fromkeys(tags)),
    }
    if data.get("name"):
        meta["datasets"] = [str(data["name"])]
    evaluations = facts.get("evaluations") or []
    if evaluations:
        meta["metrics"] = ["accuracy"]
        meta["model-index"] = [
            {
                "name": str(facts.get("folder") or info.get("name")),
                "results": [
                    {
                        "task": {
                            "type": "image-classification",
                            "name": PROTOCOL_NAMES.get(r.get("protocol"), r.get("protocol")),
                        },
                        "dataset": {
                            "name": str(r.get("dataset") or data.get("name") or r.get("shards") or "unknown"),
                            "type": str(r.get("dataset") or data.get("name") or "unknown"),
                            "split": str(r.get("split", "validation")),
                        },
                        "metrics": [
                            {
                                "type": "accuracy",
                                "value": round(float(r["top1"]), 2),
                                "name": f"{_protocol(r)} top-1 (label fraction {r.get('label_fraction', 1):g}, "
                                f"seed {r.get('seed', 0)})",
                            }
                        ],
                    }
                    for r in evaluations
                    if r.get("top1") is not None
                ],
            }
        ]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


# ----------------------------------------------------------------------------- body


def _body(facts: dict) -> list[str]:
    info = facts["info"]
    objective = info.get("objective") or "unknown"
    paper = facts.get("objective") or {}
    extra = info.get("extra") or {}
    title = paper.get("title") or objective
    lines = [f"# {_text(facts.get('folder') or info.get('name'))}: a ViT encoder pretrained with {_text(title)}", ""]
    lines += [
        f"A {_code(info.get('name'))} Vision Transformer encoder ({_count(info.get('num_params'))} parameters) "
        f"pretrained with vitmpp's {_code(objective)} objective for "
        f"{_int(info.get('step'))} steps. Everything below was generated from the run's own records.",
        "",
    ]
    lines += _model_section(info)
    lines += ["## Pretraining objective", ""]
    if paper.get("paper"):
        arxiv = paper.get("arxiv")
        link = f", [arXiv:{arxiv}](https://arxiv.org/abs/{arxiv})" if arxiv else ""
        lines += [
            f"{_code(objective)}: {paper.get('description') or paper['title']}",
            "",
            f"Paper: {paper['paper']}{link}.",
            "",
        ]
    else:
        lines += [f"{_code(objective)} (no paper is associated with it in vitmpp).", ""]
    lines += _data_section(extra)
    lines += _training_section(info, extra)
    lines += _evaluation_section(facts)
    lines += _usage_section(facts)
    if facts.get("config_yaml"):
        lines += [
            "## Configuration",
            "",
            "The resolved configuration of the pretraining run (`config.yaml`):",
            "",
            *_block("yaml", facts["config_yaml"].rstrip().splitlines()),
            "",
        ]
    lines += [
        "## License",
        "",
        "Not stated: the terms under which these weights may be used depend on the data they were trained on. "
        "Set `license` in the front matter before publishing them.",
        "",
    ]
    lines += [
        "## Provenance",
        "",
        f"Exported {_text(info.get('created', 'at an unrecorded time'))} with timm "
        f"{_text(info.get('timm_version', '?'))} and torch {_text(info.get('torch_version', '?'))} "
        f"({_code(info.get('format', 'vitmpp-encoder'))}).",
        "",
    ]
    return lines


def _model_section(info: dict) -> list[str]:
    rows = [
        (
            "architecture",
            _code(info.get("name"), True)
            + (
                f" (timm: {_code(info['timm_name'], True)})"
                if info.get("timm_name")
                else " (a vitmpp variant of timm's VisionTransformer)"
            ),
        ),
        ("parameters", _count(info.get("num_params"))),
        ("image size", f"{_text(info.get('img_size'))} px"),
        ("patch size", f"{_text(info.get('patch_size'))} px"),
        ("width / depth / heads", " / ".join(_text(info.get(k)) for k in ("embed_dim", "depth", "num_heads"))),
        ("MLP ratio", _text(info.get("mlp_ratio"))),
        ("class token", "yes" if info.get("class_token", True) else "no"),
        ("pooling", _code(info.get("global_pool"), True)),
        (
            "position embedding",
            {"sincos": "fixed 2D sin-cos (MAE)", "learned": "learned"}.get(
                info.get("pos_embed"), _text(info.get("pos_embed"))
            ),
        ),
    ]
    return ["## Encoder", "", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]


def _data_section(extra: dict) -> list[str]:
    data = extra.get("data") or {}
    lines = ["## Data", ""]
    shards = data.get("shards") or extra.get("shards")
    if shards:
        lines.append(f"Shards: {_code(shards)}.")
    if not data:
        lines += ["", "The export records no manifest facts (it predates them).", ""]
        return lines
    lines.append(
        f"Manifest: {_code(data.get('name'))} ({_code(data.get('source'))}), "
        f"{_text(data.get('num_classes'))} classes"
        + (f", images {_text(data['image_size'])} px." if data.get("image_size") else ".")
    )
    splits = data.get("splits") or {}
    if splits:
        lines += ["", "| split | images | used |", "|---|---:|---|"]
        for name, count in splits.items():
            used = "pretraining" if name == data.get("train_split") else ""
            lines.append(f"| {_text(name)} | {_int(count)} | {used} |")
    lines.append("")
    if data.get("train_split"):
        lines += [
            f"Pretraining read only the {_code(data['train_split'])} split"
            + (" (labels used)." if extra.get("uses_labels") else " (labels not used)."),
            "",
        ]
    return lines


def _training_section(info: dict, extra: dict) -> list[str]:
    train = extra.get("train") or {}
    compute = extra.get("compute") or {}
    lines = ["## Training", ""]
    rows = [("optimizer steps", _int(info.get("step")))]
    if train.get("global_batch"):
        rows.append(("global batch", _int(train["global_batch"])))
    if train.get("images_seen") is not None:
        rows.append(("images seen", f"{_int(train['images_seen'])} (steps x global batch)"))
    if train.get("epochs") is not None:
        rows.append(("epochs (images seen / training images)", f"{train['epochs']:.2f}"))
    if compute.get("flops_per_image"):
        rows.append(("training FLOPs per image", f"{compute['flops_per_image']:.4g}"))
    if compute.get("total_flops"):
        rows.append(("training FLOPs in all", f"{compute['total_flops']:.4g}"))
    if train.get("world_size"):
        rows.append(("processes", _int(train["world_size"])))
    lines += ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
    init = extra.get("init")
    if init:  # model.init: the weights pretraining started from (data, so as text)
        lines += [
            f"Pretraining started from {_code(init.get('path', ''), True)} ({_text(init.get('format'))}, "
            f"sha256 {_code(init.get('sha256', ''), True)}; {_text(', '.join(init.get('parts') or []))}), "
            "not from random weights.",
            "",
        ]
    if compute.get("how"):
        lines += [compute["how"], ""]
    elif not compute:
        lines += ["Compute was not recorded for this export.", ""]
    return lines


def _evaluation_section(facts: dict) -> list[str]:
    records = facts.get("evaluations") or []
    lines = ["## Evaluation", ""]
    if not records:
        lines += [
            "No evaluation of these weights has been recorded yet. A linear probe, k-NN or fine-tuning run "
            "of vitmpp that uses this folder as its encoder adds its result here, e.g. "
            + _code(f"python finetune/main.py encoder={shlex.quote(str(facts.get('path') or facts.get('folder')))}")
            + ".",
            "",
        ]
    else:
        lines += [
            "Results recorded by evaluation runs that used these weights: top-1 and top-5 (%) of each "
            "run's last evaluation, on the split shown: the test split, never used to choose anything "
            "(validation only where the shards had no test split):",
            "",
            "| protocol | label fraction | seed | split | top-1 | top-5 | training images | epochs | run |",
            "|---|---:|---:|---|---:|---:|---:|---:|---|",
        ]
        for r in sorted(records, key=lambda r: (str(r.get("protocol")), r.get("label_fraction", 1), r.get("seed", 0))):
            lines.append(
                f"| {_text(_protocol(r))} | {r.get('label_fraction', 1):g} | {_text(r.get('seed', 0))} | "
                f"{_text(r.get('split', '?'))} | {_pct(r.get('top1'))} | {_pct(r.get('top5'))} | "
                f"{_int(r.get('train_images'))} | {_text(r.get('epochs', ''))} | {_code(r.get('run', ''), True)} |"
            )
        lines.append("")
    older = facts.get("older_evaluations") or 0
    if older:
        lines += [f"{older} result(s) recorded for an earlier export of this folder are not shown.", ""]
    return lines


def _usage_section(facts: dict) -> list[str]:
    info = facts["info"]
    path = str(facts.get("path") or facts.get("folder") or ".")
    size = info.get("img_size")
    lines = ["## How to use", ""]
    transformers = facts.get("flavour") == "transformers"
    hf_path = path if transformers else f"{path}/transformers"
    run_path = path
    if not transformers:
        kwargs = _timm_kwargs(info)
        weights = _py(f"{run_path}/encoder.safetensors")
        lines += [
            "With timm (`encoder.safetensors` holds a headless `VisionTransformer` state dict):",
            "",
            *_block(
                "python",
                [
                    "import timm, torch",
                    "from safetensors.torch import load_file",
                    "",
                    f"encoder = timm.models.VisionTransformer({kwargs})",
                    f"encoder.load_state_dict(load_file({weights}))",
                    f"features = encoder.eval().forward_features(torch.randn(1, 3, {size!r}, {size!r}))"
                    "  # [1, tokens, width]",
                ],
            ),
            "",
        ]
        if info.get("timm_name"):
            lines += [
                "or through timm's factory, with a new head of K classes:",
                "",
                *_block(
                    "python",
                    [
                        f"model = timm.create_model({_py(info['timm_name'])}, pretrained=True, num_classes=K,",
                        f"    pretrained_cfg_overlay=dict(file={weights}, num_classes=0))",
                    ],
                ),
                "",
            ]
        lines += [
            "or with vitmpp (which also resamples position embeddings for another image size): "
            + _code(f"vitmpp.models.load_encoder({_py(run_path)})")
            + ".",
            "",
        ]
    if transformers or facts.get("transformers"):
        pool = (
            "`pooler_output` is the class-token feature (the pooler is the identity)"
            if info.get("global_pool") == "token"
            else "timm pools by averaging: use `last_hidden_state[:, 1:].mean(1)`"
        )
        lines += [
            "With transformers (a `ViTModel`; `last_hidden_state` equals timm's `forward_features`; " + pool + "):",
            "",
            *_block(
                "python",
                [
                    "import torch",
                    "from PIL import Image",
                    "from transformers import AutoImageProcessor, AutoModel",
                    "",
                    f"processor = AutoImageProcessor.from_pretrained({_py(hf_path)})",
                    f"model = AutoModel.from_pretrained({_py(hf_path)}).eval()",
                    f'image = Image.new("RGB", ({size!r}, {size!r}))',
                    "with torch.no_grad():",
                    '    outputs = model(**processor(images=image, return_tensors="pt"))',
                    "features = outputs.pooler_output  # [1, width]",
                ],
            ),
            "",
            _code(f"ViTForImageClassification.from_pretrained({_py(hf_path)}, num_labels=K)")
            + " adds a new head for fine-tuning.",
            "",
        ]
    elif facts.get("transformers_refusal"):
        lines += [f"No transformers export: {_text(facts['transformers_refusal'])}.", ""]
    else:
        lines += [
            "A transformers folder can be written with "
            + _code(f"python -m vitmpp.models.export {shlex.quote(run_path)} --to transformers OUT")
            + ".",
            "",
        ]
    return lines


def _timm_kwargs(info: dict) -> str:
    kwargs: dict[str, Any] = {
        "img_size": info.get("img_size"),
        "patch_size": info.get("patch_size"),
        "embed_dim": info.get("embed_dim"),
        "depth": info.get("depth"),
        "num_heads": info.get("num_heads"),
        "mlp_ratio": info.get("mlp_ratio"),
    }
    for key, value in (info.get("overrides") or {}).items():
        if key not in kwargs and key not in ("pos_embed", "global_pool"):
            kwargs[key] = value
    if not info.get("class_token", True):
        kwargs["class_token"] = False
    kwargs["num_classes"] = 0
    kwargs["global_pool"] = info.get("global_pool", "token")
    # a key that is not a Python name (encoder.json is a file anyone can edit) is passed as one, quoted
    return ", ".join(f"{k}={v!r}" if str(k).isidentifier() else f"**{{{str(k)!r}: {v!r}}}" for k, v in kwargs.items())


def _protocol(record: dict) -> str:
    name = PROTOCOL_NAMES.get(record.get("protocol"), str(record.get("protocol")))
    return f"{name} (k={record['k']})" if record.get("protocol") == "knn" and record.get("k") else name


def _count(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "?"
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K" if n >= 1e3 else str(int(n))


def _int(n: Any) -> str:
    return f"{int(n):,}" if isinstance(n, (int, float)) else "?"


def _pct(n: Any) -> str:
    return f"{float(n):.2f}" if isinstance(n, (int, float)) else ""
