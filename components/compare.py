"""The method comparison: its grid (methods x seeds), each cell's params, and the statistics over seeds.

``pipelines/compare.py`` runs the grid (a Prefect flow; every cell runs the same stage CLIs as the pipeline); this
module holds what is computed (params, summaries, Welch tests, table, plot), so it is tested without Prefect.
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import math
from itertools import combinations
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from components.io import write_bytes_atomic

#: (stage, key in its metrics file, label): the figures the comparison reads from each cell
METRICS: tuple[tuple[str, str, str], ...] = (
    ("probe", "dense_mIoU", "dense probe mIoU"),
    ("probe", "object_acc", "object probe acc"),
    ("detect", "bbox_AP", "Mask R-CNN AP^b"),
    ("detect", "segm_AP", "Mask R-CNN AP^m"),
    ("segment", "mIoU", "FCN mIoU"),
    ("unsup_seg", "mIoU", "unsup. seg. mIoU"),
)
#: downstream stages, in the order a cell runs them (cheap and low-variance first)
STAGES: tuple[str, ...] = ("probe", "unsup_seg", "segment", "detect")
#: "methods" that are not pretraining methods: the trunk's random initialisation, through the same stages
BASELINES: tuple[str, ...] = ("random",)

#: the comparison's schedule: longer than the demo's (3 epochs of 192 images), on harder scenes (more, smaller
#: objects, more categories: the existing generator knobs), downstream comparisons off (random is its own row)
DEFAULT_OVERRIDES: dict[str, Any] = {
    # harder scenes than the demo's (the generator's "harder" variant): more, smaller and larger objects of more
    # categories, piled around one focus point (occlusion) among unannotated clutter
    "scenes.num_train": 256, "scenes.num_val": 64, "scenes.min_objects": 3, "scenes.max_objects": 8,
    "scenes.min_object_frac": 0.1, "scenes.max_object_frac": 0.45, "scenes.num_thing_classes": 8,
    "scenes.clutter_shapes": 4, "scenes.object_spread": 0.6,
    "pretrain.epochs": 10, "pretrain.slotcon.warmup_epochs": 1, "pretrain.sim.warmup_epochs": 1,
    "pretrain.save_every_steps": 20,
    "probe.steps": 200,
    # Mask R-CNN: more iterations at a lower, single scale (the demo: 40 at [96, 112, 128])
    "detect.iters": 60, "detect.min_size": [96], "detect.max_size": 128, "detect.test_size": 128,
    "detect.steps": [40, 53],
    "export.register_model": False,
    "probe.compare_random": False, "unsup.compare_random": False,
    "segment.compare_random": False, "detect.compare_random": False, "detect.num_vis": 0,
    "detect.log_model": False,
}
SEED_KEYS = ("pretrain.seed", "probe.seed", "unsup.seed", "segment.seed", "detect.seed")


# --------------------------------------------------------------------------------------------------------------------
# params of a cell
# --------------------------------------------------------------------------------------------------------------------
def parse_overrides(items: Sequence[str] | Mapping[str, Any] | None) -> dict[str, Any]:
    """``["pretrain.epochs=10", ...]`` (values read as YAML) or a mapping -> ``{"pretrain.epochs": 10}``."""
    if not items:
        return {}
    if isinstance(items, Mapping):
        return dict(items)
    out = {}
    for item in items:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ValueError(f"override {item!r} must look like section.key=value (e.g. pretrain.epochs=10)")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def set_dotted(params: dict[str, Any], key: str, value: Any) -> None:
    """``params["a"]["b"]["c"] = value`` for ``key = "a.b.c"`` (missing levels are created)."""
    *parents, last = key.split(".")
    node = params
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {key}: {p} is not a section")
    node[last] = value


def cell_params(base: Mapping[str, Any], overrides: Mapping[str, Any], method: str, seed: int) -> dict[str, Any]:
    """One cell's params: ``base`` + ``overrides`` + method + every stage's seed (a deep copy).

    The seeds are every stage's (pretraining, k-means, probes, fine-tuning): a replicate varies them all together.
    """
    params = copy.deepcopy(dict(base))
    for k, v in overrides.items():
        set_dotted(params, k, v)
    if method not in BASELINES:
        set_dotted(params, "pretrain.method", method)
    for k in SEED_KEYS:
        set_dotted(params, k, seed)
    return params


def digest(obj: Any) -> str:
    """A short stable hash of a JSON-able object (a cell's params: a changed value re-runs the cell's stages)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def write_random_init(out_dir: str | Path, *, arch: str, seed: int) -> Path:
    """The ``random`` row's "pretraining": a ``last.pt`` whose query trunk is torchvision's random initialisation
    (seed ``seed``) inside a MoCo v2 model, so export and the k-means path treat it like any method (no prototypes,
    ``dense_features`` = the trunk's map). Written atomically; returns the path."""
    # lazy: torch and the models cost seconds at start-up; the grid and the statistics need neither
    import torch

    from components.pretrain.artifact import PretrainArtifact  # lazy: as above
    from components.pretrain.methods.mocov2.method import MocoV2Method  # lazy: as above

    kwargs = {"arch": arch, "dim_hidden": 64, "dim": 16, "queue_size": 16, "temperature": 0.2, "bn_splits": 1}
    torch.manual_seed(seed)
    model = MocoV2Method.model_from_kwargs(kwargs)
    path = Path(out_dir) / "last.pt"
    PretrainArtifact(model=model.state_dict(), model_kwargs=kwargs, method=MocoV2Method.name, arch=arch,
                     backbone_prefix=MocoV2Method.backbone_prefix, epoch=0, step=0,
                     extra={"init": "random", "seed": seed}).save(path)
    return path


# --------------------------------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------------------------------
def _t_quantile(df: float, q: float = 0.975) -> float:
    from scipy import stats  # lazy: scipy costs ~0.5 s at start-up; only the statistics need it

    return float(stats.t.ppf(q, df))


def describe(values: Sequence[float]) -> dict[str, Any]:
    """``{"n", "mean", "std", "ci95": [low, high], "values"}`` of replicate values (std and CI need n >= 2).

    The CI is the two-sided 95 % Student-t interval of the mean, ``mean ± t(0.975, n - 1) · std / sqrt(n)``, with
    the sample standard deviation (n - 1).
    """
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(vals)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci95": [None, None], "values": []}
    mean = sum(vals) / n
    if n < 2:
        return {"n": 1, "mean": mean, "std": None, "ci95": [None, None], "values": vals}
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1))
    half = _t_quantile(n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half], "values": vals}


def welch(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Welch's two-sample t-test of mean(a) - mean(b): ``{"diff", "p", "df", "ci95", "significant"}`` (None where
    a side has fewer than 2 values; a zero-variance pair is significant iff the means differ).

    Unequal variances, Welch-Satterthwaite degrees of freedom; the interval is the 95 % one of the difference.
    "significant" is p < 0.05, with no correction for the number of comparisons (the table says how many were made).
    """
    da, db = describe(a), describe(b)
    if da["n"] < 2 or db["n"] < 2:
        return {"diff": None, "p": None, "df": None, "ci95": [None, None], "significant": None}
    from scipy import stats  # lazy: scipy costs ~0.5 s at start-up; only the statistics need it

    diff = da["mean"] - db["mean"]
    va, vb = da["std"] ** 2 / da["n"], db["std"] ** 2 / db["n"]
    se = math.sqrt(va + vb)
    if se == 0:
        return {"diff": diff, "p": 0.0 if diff else 1.0, "df": None, "ci95": [diff, diff], "significant": diff != 0}
    df = (va + vb) ** 2 / (va**2 / (da["n"] - 1) + vb**2 / (db["n"] - 1))
    t = diff / se
    p = float(2 * stats.t.sf(abs(t), df))
    half = _t_quantile(df) * se
    return {"diff": diff, "p": p, "df": df, "ci95": [diff - half, diff + half], "significant": p < 0.05}


def summarize(values: Mapping[str, Mapping[str, Sequence[float]]], methods: Sequence[str],
              metrics: Sequence[str]) -> dict[str, Any]:
    """``values[method][metric] = [one value per seed]`` -> ``{"methods": {m: {metric: describe}}, "tests":
    {metric: {"a vs b": welch}}}`` (every pair of methods, in the given order)."""
    out: dict[str, Any] = {"methods": {}, "tests": {}}
    for m in methods:
        out["methods"][m] = {k: describe(values.get(m, {}).get(k, [])) for k in metrics}
    for k in metrics:
        out["tests"][k] = {f"{a} vs {b}": welch(values.get(a, {}).get(k, []), values.get(b, {}).get(k, []))
                           for a, b in combinations(methods, 2)}
    return out


def collect(cells: Mapping[tuple[str, int], Mapping[str, Mapping[str, Any]]]) -> dict[str, dict[str, list[float]]]:
    """``{(method, seed): {stage: metrics dict}}`` -> ``{method: {"stage/key": [values in seed order]}}``."""
    out: dict[str, dict[str, list[float]]] = {}
    for (method, _), stages in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        for stage, key, _ in METRICS:
            v = (stages.get(stage) or {}).get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0:
                out.setdefault(method, {}).setdefault(f"{stage}/{key}", []).append(float(v))
    return out


# --------------------------------------------------------------------------------------------------------------------
# reports
# --------------------------------------------------------------------------------------------------------------------
def _label(metric: str) -> str:
    return next((lab for s, k, lab in METRICS if f"{s}/{k}" == metric), metric)


def _fmt(d: Mapping[str, Any]) -> str:
    if d["mean"] is None:
        return "–"
    if d["std"] is None:
        return f"{d['mean']:.3f} (n=1)"
    return f"{d['mean']:.3f} ± {d['std']:.3f} [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}]"


def markdown_table(summary: Mapping[str, Any], methods: Sequence[str], metrics: Sequence[str]) -> str:
    """Rows = metrics; a column per method: ``mean ± std [95 % CI]``; then the significant pairwise differences."""
    lines = ["| metric | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    for k in metrics:
        lines.append(f"| {_label(k)} | " + " | ".join(_fmt(summary["methods"][m][k]) for m in methods) + " |")
    sig, n_tests = [], 0
    for k in metrics:
        for pair, t in summary["tests"][k].items():
            if t["p"] is None:
                continue
            n_tests += 1
            if t["significant"]:
                sig.append(f"{_label(k)}: {pair} {t['diff']:+.3f} (p = {t['p']:.3g})")
    lines.append("")
    lines.append(f"Significant at p < 0.05 (Welch's t-test, {n_tests} comparisons, uncorrected): "
                 + ("; ".join(sig) if sig else "none") + ".")
    return "\n".join(lines)


def write_plot(summary: Mapping[str, Any], methods: Sequence[str], metrics: Sequence[str], path: str | Path) -> None:
    """One panel per metric: each seed's value (dots), the mean (bar) and its 95 % CI (error bar); PNG, atomic."""
    import matplotlib  # lazy: matplotlib costs ~0.5 s at start-up; only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: as above

    cols = min(3, max(1, len(metrics)))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), dpi=100, squeeze=False)
    for ax, k in zip(axes.flat, metrics):
        for i, m in enumerate(methods):
            d = summary["methods"][m][k]
            if d["mean"] is None:
                continue
            ax.bar(i, d["mean"], color=f"C{i}", alpha=0.35)
            if d["ci95"][0] is not None:
                ax.errorbar(i, d["mean"], yerr=[[d["mean"] - d["ci95"][0]], [d["ci95"][1] - d["mean"]]], color="k",
                            capsize=4)
            ax.plot([i] * len(d["values"]), d["values"], "o", color=f"C{i}", ms=4)
        ax.set_xticks(range(len(methods)), methods)
        ax.set_title(_label(k), fontsize=10)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())
