"""The compression stage: a trained variant of a run folder -> pruned, quantized serving artifact.

``compress_run(run_dir, variant, cfg, out_dir)`` loads the trained DLRM (unsharded, fp32) and
re-creates the dataset, scores row importance, prunes, fills and quantizes per
:class:`~sparse_kd.config.CompressConfig` (or per the budget planner when ``budget_mb > 0``),
evaluates AUC / log loss on every evaluation split (valid, valid_cold, test, test_cold) before
and after, writes the artifact and returns (and prints) a report.

With ``remap: fold`` the pruned tables' remaps are composed into the entity bags
(:func:`~sparse_kd.compress.prune.fold_remaps`): the artifact's ``mappings.json`` then holds
stored row ids, and the compressed model is evaluated on the folded dataset
(:func:`serving_dataset`), exactly as the predictor will feed it.

Compression is a stage over a trained model: nothing here changes the model it is given.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import numpy as np
import torch

from sparse_kd.compress import kernel as K
from sparse_kd.compress import quantize as Q
from sparse_kd.compress import rows as QR
from sparse_kd.compress import table_bytes as TB
from sparse_kd.compress import tbe as TBE
from sparse_kd.compress.artifact import Compressed, check_out_dir, save_artifact
from sparse_kd.compress.finetune import finetune
from sparse_kd.compress.importance import RowImportance, table_importance
from sparse_kd.compress.planner import MB, Plan, plan_budget
from sparse_kd.compress.layout import reorder_tables
from sparse_kd.compress.prune import DEFAULT_CLUSTER_RATIO, fold_dataset, fold_remaps, prune_tables, table_settings
from sparse_kd.config import QUANT_DTYPES, CompressConfig, ConfigError, ExperimentConfig, load_config, to_dict
from sparse_kd.data.batching import BatchBuilder
from sparse_kd.data.schema import RecDataset
from sparse_kd.metrics import evaluate, fp32_forward, serving_forward
from sparse_kd.report import markdown_table
from sparse_kd.student.model import has_dot_logit

log = logging.getLogger(__name__)

@dataclass
class RunInputs:
    """What the stage reads from a run folder. text: {"user": (U, H), "item": (I, H)} or None."""

    cfg: ExperimentConfig
    ds: RecDataset
    model: torch.nn.Module
    builder: BatchBuilder
    entity_dense: dict
    text: Optional[dict]


def load_run(run_dir: Path, variant: str) -> RunInputs:
    """Config, dataset (re-created deterministically), dense features, text embeddings, model."""
    from sparse_kd.data import load_dataset
    from sparse_kd.student.export import load_dlrm

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: missing; is {run_dir} a sparse_kd run folder?")
    cfg = load_config(cfg_path)
    ds = load_dataset(cfg.data)
    dense_path = run_dir / "data" / "entity_dense.pt"
    if not dense_path.is_file():
        raise FileNotFoundError(f"{dense_path}: missing; run the training pipeline first")
    ed = torch.load(dense_path, weights_only=True)
    text = None
    tpath = run_dir / "data" / "text_embeddings.safetensors"
    if tpath.is_file():
        from safetensors.torch import load_file

        t = load_file(str(tpath))
        text = {"user": t["user"].float(), "item": t["item"].float()}
    model = load_dlrm(run_dir / variant)
    builder = BatchBuilder(ds, ed["user"], ed["item"])
    dense_in = model.dense_arch.model._mlp[0]._linear.in_features
    if builder.dense_dim != dense_in:
        raise ValueError(
            f"{run_dir / variant}: the model takes {dense_in} dense inputs but {dense_path} gives "
            f"{builder.dense_dim}; only students that use the run's entity dense features can be compressed"
        )
    return RunInputs(cfg, ds, model, builder, ed, text)


def model_weights(model) -> dict[str, torch.Tensor]:
    """feature -> (N, D) fp32 table of a (float) DLRM, in KJT key order."""
    ebc = model.sparse_arch.embedding_bag_collection
    return {f: ebc.embedding_bags[QR.table_name(f)].weight.detach() for c in ebc.embedding_bag_configs() for f in c.feature_names}


def compress_model(
    model,
    ds: RecDataset,
    settings: Mapping[str, dict],
    importance: str = "frequency",
    remap: str = "array",
    text: Optional[Mapping[str, torch.Tensor]] = None,
    importances: Optional[Mapping[str, RowImportance]] = None,
    dense_int8: bool = False,
    row_alignment: int = TBE.ROW_ALIGNMENT,
    serve_device: str = "cpu",
    kernel: Optional[str] = None,
    row_order: str = "frequency",
    quantizer: str = "minmax",
) -> Compressed:
    """Prune + quantize every table of a trained fp32 DLRM (not modified).

    settings: feature -> {"keep_ratio", "dtype", "fill"[, "cluster_ratio"]} (see
    :func:`~.prune.table_settings`). remap: array, hash or fold (then evaluate the result on
    :func:`serving_dataset`). serve_device / kernel: see :func:`~.quantize.quantize_dlrm`.
    row_order: ``frequency`` stores each table's rows hot-first (:mod:`~.layout`; a table kept
    whole then has its permutation folded into the entity bags), ``id`` keeps them in id order.
    Either way the artifact's bags must come from :func:`serving_dataset` (:func:`artifact_mappings`).
    quantizer: ``minmax`` or ``mse`` (``compress.quantizer``; :mod:`~.row_fit`).
    """
    weights = model_weights(model)
    keys = list(weights)
    if set(settings) != set(keys):
        raise ValueError(f"settings for {sorted(settings)} but the model has tables for {sorted(keys)}")
    imps = importances if importances is not None else table_importance(importance, weights, ds, text)
    pruned = prune_tables(weights, imps, {f: s["keep_ratio"] for f, s in settings.items()},
                          {f: s["fill"] for f, s in settings.items()}, text,
                          {f: s.get("cluster_ratio", DEFAULT_CLUSTER_RATIO) for f, s in settings.items()})
    as_pruned = dict(pruned)
    pruned, permuted = reorder_tables(pruned, {f: imps[f].freq for f in keys}, row_order)
    model_remap = remap
    if remap == "fold":
        _, pruned = fold_remaps(ds, pruned)
        model_remap = "array"  # nothing left to install: no pruned table keeps a remap
    elif permuted:  # tables kept whole: their hot-first permutation lives in the entity bags
        _, pruned = fold_remaps(ds, pruned, permuted)
    kernel = K.kernel_for(serve_device, kernel)
    serving = Q.quantize_dlrm(model, pruned, {f: s["dtype"] for f, s in settings.items()}, model_remap, dense_int8,
                              row_alignment, serve_device, kernel, quantizer)
    tb = TB.table_bytes(serving)
    fp = TB.float_table_bytes(model)
    owners = {f.name: f.owner for f in ds.features}
    tables = {}
    notes = []
    for f in keys:
        t = QR.table_name(f)
        pt = pruned[f]
        notes.extend(pt.notes)
        tables[t] = {
            "feature": f, "owner": owners[f], "dtype": settings[f]["dtype"], "keep_ratio": settings[f]["keep_ratio"],
            "rows_original": pt.num_original, "rows_kept": pt.num_kept, "rows_stored": pt.num_rows, "fill": pt.fill,
            "importance": imps[f].kind, "bytes": tb[t], "fp32_bytes": fp[t]["total"], "clusters": pt.clusters,
            "remap": "folded" if pt.folded is not None else (remap if pt.remap is not None else "none"),
            # its folded remap is only the hot-first permutation (nothing pruned away: any remap
            # kind serves it with no remap in the model)
            "permutation_only": f in permuted,
            "quantizer": quantizer,
        }
    # the remaps as they are served; folded ones are a record (the entity bags hold them)
    remaps = {QR.table_name(f): (pruned[f].remap if pruned[f].remap is not None else pruned[f].folded)
              for f in keys if pruned[f].remap is not None or pruned[f].folded is not None}
    text_maps = {f: pruned[f].text_map for f in keys if pruned[f].text_map is not None}
    dense_fp32 = {k: v.detach().clone() for k, v in model.state_dict().items() if "embedding_bag" not in k}
    dense_in = model.dense_arch.model._mlp[0]._linear.in_features
    info = {
        "keys": keys, "owners": [owners[f] for f in keys], "dense_in_features": int(dense_in),
        "embedding_dim": int(next(iter(weights.values())).shape[1]),
        "dense_arch": [int(m._linear.out_features) for m in model.dense_arch.model._mlp],
        "over_arch": _over_arch_sizes(model), "dot_logit": has_dot_logit(model), "dense_int8": bool(dense_int8),
        "remap": model_remap,
        "folded": [f for f in keys if pruned[f].folded is not None],
        "row_alignment": int(row_alignment), "kernel": kernel, "device": serve_device, "row_order": row_order,
    }
    return Compressed(serving, tables, remaps, text_maps, dense_fp32, info, notes, as_pruned)


def serving_dataset(ds: RecDataset, comp: Compressed) -> RecDataset:
    """The dataset whose entity bags a compressed model reads: ``ds`` itself, or with the folded
    remaps of ``comp`` composed into its CSR (``remap: fold``)."""
    folded = {t["feature"]: comp.remaps[name] for name, t in comp.tables.items() if t.get("remap") == "folded"}
    return fold_dataset(ds, folded) if folded else ds


def artifact_mappings(ds: RecDataset, comp: Compressed) -> dict:
    """``mappings.json`` of the artifact of ``comp``: the ids and entity bags of
    :func:`serving_dataset` (stored rows for folded tables)."""
    return _mappings(serving_dataset(ds, comp))


def serving_builder(ds: RecDataset, comp: Compressed, builder: BatchBuilder) -> BatchBuilder:
    """A batch builder over :func:`serving_dataset` with ``builder``'s dense features."""
    sds = serving_dataset(ds, comp)
    return builder if sds is ds else BatchBuilder(sds, builder.user_dense, builder.item_dense)


def _over_arch_sizes(model) -> list[int]:
    sizes = [int(m.out_features) for m in model.over_arch.modules() if isinstance(m, torch.nn.Linear)]
    return sizes


def settings_from_config(cfg: CompressConfig, features: list[str]) -> dict[str, dict]:
    return table_settings(cfg, features)


def report_table(report: dict) -> str:
    """Readable tables of a stage report: bytes per table, then metrics before / after."""
    rows = []
    for t, v in report["tables"].items():
        fill = v["fill"] + (f" ({v['clusters']})" if v.get("clusters") else "")
        rows.append([t, v["dtype"], f"{v['rows_kept']}/{v['rows_original']}", fill, v["rows_stored"],
                     v["fp32_bytes"], v["bytes"]["weights"] + v["bytes"]["padding"],
                     "row order (folded)" if v.get("permutation_only") else v.get("remap", ""), v["bytes"]["remap"],
                     v["bytes"]["total"], f"{v['fp32_bytes'] / max(1, v['bytes']['total']):.2f}x"])
    b = report["bytes"]
    rows.append(["TOTAL", "", "", "", "", b["fp32_total"], "", "", "", b["total"], f"{b['ratio']:.2f}x"])
    t1 = markdown_table(["table", "dtype", "kept", "fill (clusters)", "rows stored", "fp32 bytes", "weight bytes", "remap",
                         "remap bytes", "total bytes", "ratio"], rows)
    mrows = []
    for s in report["metrics"]["before"]:
        be, af = report["metrics"]["before"][s], report["metrics"]["after"][s]
        mrows.append([s, be["n"], be["auc"], af["auc"], af["auc"] - be["auc"], be["logloss"], af["logloss"]])
    t2 = markdown_table(["split", "n", "AUC fp32", "AUC compressed", "delta AUC", "logloss fp32", "logloss compressed"], mrows)
    head = (f"embedding storage: {b['fp32_total'] / MB:.4f} MB fp32 -> {b['total'] / MB:.4f} MB compressed "
            f"({b['ratio']:.2f}x smaller)")
    return "\n\n".join([head, t1, t2])


def compress_run(run_dir: Path, variant: str, cfg: CompressConfig, out_dir: Path, dense_int8: Optional[bool] = None) -> dict:
    """Compress ``run_dir/variant`` per ``cfg`` into the artifact ``out_dir``; returns the report:

    {"variant", "tables": {table: {... "bytes" {...}, "fp32_bytes"}}, "bytes": {"fp32_total", "total",
    "total_mb", "fp32_mb", "ratio"}, "metrics": {"before"|"after": {split: {"auc","logloss","n"}}},
    "plan": ... (budget only), "artifact": str, "seconds"}. Also printed as readable tables.
    """
    t0 = time.perf_counter()
    dense_int8 = cfg.dense_int8 if dense_int8 is None else dense_int8
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    K.require_device(cfg.serve_device)  # a GPU artifact needs a GPU: refuse before any work
    check_out_dir(out_dir)  # refuse a folder that is not an artifact before any work
    log.info("compress: loading %s (the model, the dataset re-created from its source, text)", run_dir / variant)
    inp = load_run(run_dir, variant)
    model, ds, builder = inp.model, inp.ds, inp.builder
    keys = list(model_weights(model))
    settings = settings_from_config(cfg, keys)
    if cfg.importance == "distill" and inp.text is None:
        raise ConfigError(f"compress.importance: 'distill' needs {run_dir / 'data' / 'text_embeddings.safetensors'}")
    imps = table_importance(cfg.importance, model_weights(model), ds, inp.text)
    log.info("compress: evaluating the fp32 model on %d interactions", sum(len(v) for k, v in ds.splits.items() if k != "train"))
    before = evaluate(fp32_forward(model), ds, builder)
    plan: Optional[Plan] = None
    if cfg.budget_mb > 0:
        plan = plan_budget(model, ds, builder, imps, settings, cfg.budget_mb, cfg.remap, inp.text,
                           dtypes=QUANT_DTYPES + tuple(cfg.planner_tiers), cold_weight=cfg.cold_weight, row_alignment=cfg.row_alignment,
                           kernel=K.kernel_for(cfg.serve_device), max_examples=cfg.planner_max_examples,
                           confidence=cfg.planner_confidence, bootstrap=cfg.planner_bootstrap,
                           quantizer=cfg.quantizer)
        settings = plan.settings()
    comp = compress_model(model, ds, settings, cfg.importance, cfg.remap, inp.text, imps, dense_int8, cfg.row_alignment,
                          cfg.serve_device, row_order=cfg.row_order, quantizer=cfg.quantizer)
    if plan is not None and comp.embedding_bytes > plan.budget_bytes:  # the per-option bytes are exact; guard anyway
        raise RuntimeError(f"plan bytes {comp.embedding_bytes} exceed compress.budget_mb ({plan.budget_bytes} bytes)")
    serve_ds = serving_dataset(ds, comp)
    log.info("compress: evaluating the compressed model")
    after = evaluate(serving_forward(comp.serving), serve_ds, serving_builder(ds, comp, builder))
    finetuned = None
    if cfg.finetune.enabled:
        comp, after, finetuned = finetune_and_choose(model, ds, builder, settings, imps, inp.text, cfg, comp, after,
                                                     dense_int8)
        serve_ds = serving_dataset(ds, comp)
    fp32_total, total = comp.fp32_bytes, comp.embedding_bytes
    report = {
        "variant": variant,
        "run_dir": str(run_dir),
        "tables": comp.tables,
        "bytes": {"fp32_total": fp32_total, "total": total, "fp32_mb": fp32_total / MB, "total_mb": total / MB,
                  "ratio": fp32_total / max(1, total), "dense": TB.dense_bytes(comp.serving)},
        "metrics": {"before": before, "after": after},
        "plan": plan.to_dict() if plan is not None else None,
        "notes": comp.notes,
        "finetune": finetuned,
    }
    mappings = _mappings(serve_ds)
    config = {"compress": to_dict(cfg), "dense_int8": dense_int8, "source": {"run_dir": str(run_dir), "variant": variant},
              "plan": report["plan"], "settings": settings, "metrics": report["metrics"]}
    save_artifact(out_dir, comp, mappings, inp.entity_dense, config)
    report["artifact"] = str(out_dir)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    text = report_table(report)
    if plan is not None:
        text = plan.table() + "\n\n" + text
    print(f"\n[compress] {variant} -> {out_dir}\n{text}\n", flush=True)
    return report


def valid_score(metrics: Mapping[str, dict], cold_weight: float) -> float:
    """valid AUC + cold_weight x valid_cold AUC (where the dataset has valid_cold): the planner's
    objective, used to choose on validation only."""
    score = metrics["valid"]["auc"]
    cold = metrics.get("valid_cold", {}).get("auc", float("nan"))
    return score + (cold_weight * cold if np.isfinite(cold) else 0.0)


def finetune_and_choose(model, ds: RecDataset, builder, settings: Mapping[str, dict], imps, text,
                        cfg: CompressConfig, comp: Compressed, after: dict, dense_int8: bool) -> tuple:
    """``compress.finetune``: train the compressed model to the student (:mod:`~.finetune`),
    compress the result with the same settings and importances, and keep it when its validation
    score (:func:`valid_score`) is at least the plain compression's. Returns (compressed model,
    its metrics, the record)."""
    ft = cfg.finetune
    pruned = comp.pruned  # the tables the plain compression pruned and filled: not pruned again
    log.info("compress: distillation after compression (%d epoch(s))", ft.epochs)
    res = finetune(model, ds, builder, pruned, {f: s["dtype"] for f, s in settings.items()},
                   {f: imps[f].freq for f in pruned}, epochs=ft.epochs,
                   batch_size=ft.batch_size, dense_lr=ft.dense_lr, row_lr=ft.row_lr, kd_weight=ft.kd_weight,
                   temperature=ft.temperature, seed=ft.seed, max_steps=ft.max_steps or None)
    tuned = compress_model(res.model, ds, settings, cfg.importance, cfg.remap, text, imps, dense_int8,
                           cfg.row_alignment, cfg.serve_device, row_order=cfg.row_order, quantizer=cfg.quantizer)
    tuned_after = evaluate(serving_forward(tuned.serving), serving_dataset(ds, tuned), serving_builder(ds, tuned, builder))
    s0, s1 = valid_score(after, cfg.cold_weight), valid_score(tuned_after, cfg.cold_weight)
    kept = s1 >= s0
    log.info("compress.finetune: valid score %.4f -> %.4f (valid + %g x valid_cold): %s", s0, s1, cfg.cold_weight,
             "kept" if kept else "not kept, the plain compression is written")
    record = {"kept": kept, "valid_score_before": s0, "valid_score_after": s1, "history": res.history,
              "seconds": round(res.seconds, 1), "metrics_without": after, "metrics_with": tuned_after}
    return (tuned, tuned_after, record) if kept else (comp, after, record)


def _mappings(ds: RecDataset) -> dict:
    return {
        "user_ids": ds.user_ids,
        "item_ids": ds.item_ids,
        "features": {
            f.name: {"owner": f.owner, "vocab": f.vocab, "offsets": f.offsets.tolist(), "values": f.values.tolist()}
            for f in ds.features
        },
    }
