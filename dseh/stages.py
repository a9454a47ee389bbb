"""One function per pipeline step (prepare, train_labnet, train_imgnet, evaluate, promote): the
orchestration API that the CLI (dvc.yaml), the Kubeflow components and the experiments call, and
STAGE_PARAMS, the params keys each step reads (dvc.yaml declares exactly these; a test records
what each step reads). File names and formats live in dseh.artifacts; methods in dseh.methods.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from dseh import artifacts, evaluation, linear, methods, promotion, report, stored_codes, tracking
from dseh.artifacts import TARGETS, TRAIN_OUTPUTS, StepModel, load_step_model, save_step_model
from dseh.codes import count_distinct, pack, packed_width, sign
from dseh.config import Config, dump_config, epochs_for_round, to_dict, values
from dseh.data import MANIFEST, PreparedData, as_prepared, open_source, write_prepared
from dseh.encoder import encode_images
from dseh.errors import DsehError
from dseh.models.factory import build_imgnet, build_labnet, load_labnet
from dseh.models.nets import FEATURE_DIM, ImgNet
from dseh.storage import atomic_dir
from dseh.train import device as dev
from dseh.train.loop import finite_or_raise, run_phase
from dseh.train.phases import encode_labels, imgnet_param_groups, imgnet_phase, labnet_phase, place_model
from dseh.train.recipe import make_optimizer

log = logging.getLogger(__name__)


def _keys(section: str, names: str) -> tuple[str, ...]:
    return tuple(f"{section}.{n}" for n in names.split())


_LABNET = _keys("labnet", "hidden lrn batch_size epochs lr_exp gamma_pf gamma_ph beta gamma_hl sim_scale logit_scale")
_LABNET += _keys("labnet", "quant_reduction label_head clip_value")
_TRAIN = _keys("train", "rounds optimizer momentum step_epochs step_exp device compile threads")
_IMGNET = _keys("imgnet", "backbone weights batch_size epochs lr_exp backbone_lr_mult clip_value gamma_if eta")
_IMGNET += _keys("imgnet", "sim_scale logit_scale code_scale code_target hash_from dropout flip shift")
_IMGNET += ("imgnet.encode_batch_size",)
_RECIPE = "optimizer lr_exp step_exp momentum weight_decay init"
_BASELINE = ("baseline.features", *_keys("dpsh", f"eta {_RECIPE}"))
_BASELINE += _keys("hashnet", f"alpha_bits step_size gamma power {_RECIPE}")
_DATA = _keys("data", "source image_root list_dir train_list query_list database_list img_h5 lab_h5 fashion_dir")
_DATA += _keys("data", "image_size n_database n_train n_query skip_bad_images max_pixels device")

# the params keys each step reads (for any method and data source), besides dseh.config.NEUTRAL_KEYS
# (speed and logging only): dvc.yaml declares exactly these, fingerprints hold their values, and
# tests/test_stage_params.py checks them against what each step reads
STAGE_PARAMS: dict[str, tuple[str, ...]] = {
    "prepare": ("seed", *_DATA),
    "train_labnet": ("seed", "bits", "method", *_LABNET, *_TRAIN),
    "train_imgnet": ("seed", "bits", "method", *_IMGNET, *_TRAIN, *_keys("train", "amp channels_last"), *_BASELINE),
    "evaluate": ("seed", "train.rounds", "train.device", "imgnet.encode_batch_size")
    + _keys(
        "evaluate",
        "topk precision_at radius heatmap_items example_queries example_topk collapse_min_distinct verify_codes verify_max_mismatch",
    ),
    "promote": _keys("promote", "metric min_delta")
    + _keys("tracking", "enabled registered_model retrieval_model")
    + ("imgnet.encode_batch_size",),
}


def _check_round(cfg: Config, step: str, round_index: int, prev: dict[str, object]) -> None:
    """round_index is within train.rounds, and a round r > 0 has the outputs of round r - 1."""
    if round_index >= cfg.train.rounds:
        raise DsehError(f"round {round_index} is past train.rounds={cfg.train.rounds}")
    missing = [name for name, path in prev.items() if path is None]
    if round_index > 0 and missing:
        what = " and ".join(missing) + (" outputs" if len(missing) > 1 else " output")
        raise DsehError(f"round {round_index} of {step} needs the {what} of round {round_index - 1}")


def _check_compatible(model: StepModel, cfg: Config | None, data: PreparedData, where) -> None:
    """A model read as an input was trained with these bits (when cfg is given) on this dataset."""
    if cfg is not None and model.bits != cfg.bits:
        raise DsehError(f"{where} was trained with {model.bits} bits, params say bits={cfg.bits}")
    if model.dataset_sha256 != data.sha256:
        raise DsehError(f"{where} was trained on another prepared dataset than {data.root}")


def _log_step(tr, out: Path, name: str, summary: dict, exclude: tuple[str, ...] = ()) -> None:
    if tr is None:
        return
    tr.log_metrics(summary)
    tr.log_artifacts(out, name, exclude)


def _log_imgnet_model(tr, cfg: Config, model: ImgNet, image_size: int, data: PreparedData) -> dict:
    """Log the trained image network as the pyfunc model `imgnet` in the step's run (two query
    images as its input example); its URI and run for the summary. Nothing without tracking."""
    if tr is None:
        return {}
    with tracking.guard(tr.uri):
        promotion.log_model(cfg, model, image_size, cfg.bits, data)
    return {"model_uri": f"runs:/{tr.run_id}/imgnet", "model_run_id": tr.run_id}


def _final(history: list[dict]) -> dict:
    return {k: v for k, v in (history[-1] if history else {}).items() if k not in ("round", "epoch")}


# --------------------------------------------------------------------------- prepare


def prepare(cfg: Config, out_dir: str | Path, progress: bool = True) -> dict:
    """Build the prepared dataset directory from `cfg.data` (atomic: all or nothing)."""
    src = open_source(cfg.data, cfg.seed)
    with atomic_dir(out_dir) as tmp:
        manifest = write_prepared(src, cfg.data, cfg.seed, tmp, progress)
        dump_config(cfg, tmp / artifacts.CONFIG)
    log.info("prepared %s: %s", out_dir, manifest["sizes"])
    with tracking.step_run(cfg, "prepare", manifest["dataset_sha256"]) as tr:
        if tr is not None:
            tr.log_metrics(manifest["sizes"], "data.")
            tr.log_artifacts(Path(out_dir) / MANIFEST, "data")
    return manifest


# --------------------------------------------------------------------------- LabNet


def labnet_fingerprint(cfg: Config, round_index: int, inputs: list[str]) -> str:
    """What a LabNet phase's result depends on: its declared params and its inputs' hashes (the
    resume checkpoint and the comparison's shared LabNets are keyed by it)."""
    return artifacts.fingerprint("train_labnet", round_index, values(cfg, STAGE_PARAMS["train_labnet"]), inputs)


def train_labnet(
    cfg: Config,
    data_dir: str | Path | PreparedData,
    round_index: int,
    out_dir: str | Path,
    prev_labnet: str | Path | None = None,
    prev_imgnet: str | Path | None = None,
    progress: bool = True,
    checkpoint: str | Path | None = None,
) -> dict:
    """LabNet phase of round r. Round 0 starts from random weights and N(0,1) buffers; round r > 0
    continues LabNet r-1 (weights and optimiser) with buffers from ImgNet r-1:
    H~ = sign(u), F~ = f^v over the training images. Methods without a LabNet record that only.
    The resume checkpoint is `checkpoint` when given, else beside the output."""
    _check_round(cfg, "train_labnet", round_index, {"LabNet": prev_labnet, "ImgNet": prev_imgnet})
    if not methods.get(cfg.method).needs_labnet:
        # the stage records that it has nothing to do, so the DVC graph stays one shape
        summary = {"round": round_index, "method": cfg.method, "labnet": f"not used by method {cfg.method}"}
        if not dev.secondary_rank():
            with atomic_dir(out_dir) as tmp:
                artifacts.write_step_dir(tmp, cfg, summary)
        return summary
    data = as_prepared(data_dir)
    rank = dev.init_distributed(cfg.train.device)
    with tracking.step_run(cfg, "train_labnet", data.sha256, {"dseh.round": str(round_index)}) as tr:
        device = dev.resolve_device(cfg.train.device)
        seed = artifacts.phase_seed(cfg.seed, "labnet", round_index)
        dev.set_determinism(seed, cfg.train.threads)
        labels = torch.from_numpy(data.labels[data.train]).to(device)
        model = build_labnet(data.n_classes, cfg.bits, cfg.labnet).to(device)
        recipe = methods.labnet_recipe(cfg)
        optimizer = make_optimizer([{"params": list(model.parameters()), "lr": 1e-3}], recipe)
        F_buf, H_buf, inputs = _labnet_start(cfg, data, round_index, seed, model, optimizer, prev_labnet, prev_imgnet)
        epochs = epochs_for_round(cfg.labnet.epochs, round_index)
        phase = labnet_phase(
            model,
            optimizer,
            labels,
            F_buf.to(device),
            H_buf.to(device),
            cfg.labnet,
            recipe,
            round_index,
            epochs,
            seed,
        )
        out = Path(out_dir)
        ckpt = Path(checkpoint) if checkpoint else artifacts.checkpoint_path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        fp = labnet_fingerprint(cfg, round_index, inputs)
        history = run_phase(phase, cfg.train, ckpt, fp, progress, tr.log_epoch if tr else None)
        if not rank.main:  # rank 0 writes the step output
            return {"round": round_index, "rank": rank.rank, "epochs": epochs}
        F_lab, H_lab = encode_labels(model, labels)
        B_lab = sign(H_lab.cpu().numpy())
        summary = {
            "round": round_index,
            "epochs": epochs,
            "distinct_codes": count_distinct(pack(B_lab)),
            "distinct_label_sets": int(len(np.unique(data.labels[data.train], axis=0))),
            "seconds": round(time.perf_counter() - t0, 3),
            "final": _final(history),
        }
        # codes far fewer than the label sets they must tell apart: LabNet's targets carry little
        summary["degenerate"] = summary["distinct_codes"] * 2 < summary["distinct_label_sets"]
        with atomic_dir(out) as tmp:
            save_step_model(
                tmp, "labnet", cfg, model.cpu().state_dict(), optimizer=optimizer.state_dict(),
                round_index=round_index, dataset_sha256=data.sha256, n_classes=data.n_classes,
            )  # fmt: skip
            artifacts.save_targets(tmp, B_lab, F_lab.cpu().numpy().astype(np.float32), data.train)
            artifacts.write_step_dir(tmp, cfg, summary, history)
        ckpt.unlink(missing_ok=True)
        level = logging.WARNING if summary["degenerate"] else logging.INFO
        log.log(level, "LabNet round %d: %d distinct codes for %d label sets%s", round_index,
                summary["distinct_codes"], summary["distinct_label_sets"],
                " (degenerate: lower labnet.lr_exp or check the labels)" if summary["degenerate"] else "")  # fmt: skip
        _log_step(tr, out, "labnet", summary)
    return summary


def _labnet_start(cfg, data, round_index, seed, model, optimizer, prev_labnet, prev_imgnet):
    """(F buffer, H buffer, input hashes) of a LabNet phase: N(0, 1) in round 0; in round r > 0
    LabNet r-1's weights and optimiser are loaded and the buffers are ImgNet r-1's f^v and sign(u)."""
    n = len(data.train)
    if round_index == 0:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n, FEATURE_DIM, generator=g), torch.randn(n, cfg.bits, generator=g), [data.sha256]
    prev = load_step_model(prev_labnet, "labnet")
    _check_compatible(prev, cfg, data, prev_labnet)
    model.load_state_dict(prev.state_dict)
    optimizer.load_state_dict(prev.optimizer)
    B_prev, F_prev = artifacts.load_train_outputs(prev_imgnet)
    F_buf, H_buf = torch.from_numpy(F_prev).float(), torch.from_numpy(B_prev).float()
    if F_buf.shape != (n, FEATURE_DIM) or H_buf.shape != (n, cfg.bits):
        raise DsehError(f"{prev_imgnet}: ImgNet outputs do not match {n} training items at {cfg.bits} bits")
    inputs = [data.sha256, artifacts.file_sha(Path(prev_labnet) / artifacts.MODEL)]
    return F_buf, H_buf, inputs + [artifacts.file_sha(Path(prev_imgnet) / TRAIN_OUTPUTS)]


# --------------------------------------------------------------------------- ImgNet


def train_imgnet(
    cfg: Config,
    data_dir: str | Path | PreparedData,
    round_index: int,
    labnet_dir: str | Path | None,
    out_dir: str | Path,
    prev_imgnet: str | Path | None = None,
    progress: bool = True,
    checkpoint: str | Path | None = None,
) -> dict:
    """Image-network phase of round r: the method's objective (dseh.methods) in the one loop (DSEH
    against LabNet round r's fixed targets; round r > 0 continues round r - 1), or for a linear
    method a hash fitted on image features.

    Writes the model, the packed codes of every item, sign(u) and f^v over the training items
    (the next LabNet round's buffers) and the history. The resume checkpoint is `checkpoint` when
    given, else beside the output. With tracking, the model is logged as a pyfunc model in the
    step's run and its URI recorded in the summary (`model_uri`)."""
    _check_round(cfg, "train_imgnet", round_index, {"ImgNet": prev_imgnet})
    data = as_prepared(data_dir)
    method = methods.get(cfg.method)
    if not method.deep:
        if dev.secondary_rank():  # a linear hash is fitted once, by rank 0 under torchrun
            return {"round": round_index, "method": cfg.method, "rank": "secondary"}
        return linear.fit_linear_hash(cfg, data, round_index, out_dir)
    rank = dev.init_distributed(cfg.train.device)
    with tracking.step_run(cfg, "train_imgnet", data.sha256, {"dseh.round": str(round_index)}) as tr:
        device = dev.resolve_device(cfg.train.device)
        dtype = dev.compute_dtype(device, cfg.train.amp)  # bf16 or fp32: in the fingerprint and summary
        seed = artifacts.phase_seed(cfg.seed, "imgnet", round_index)
        dev.set_determinism(seed, cfg.train.threads)
        image_size = int(data.images.shape[1])
        recipe, init = method.recipe(cfg)
        model = place_model(build_imgnet(cfg, image_size, init), device, cfg.train)
        epochs = epochs_for_round(cfg.imgnet.epochs, round_index)
        groups, mults = imgnet_param_groups(model, recipe.lr(0, round_index), cfg.imgnet.backbone_lr_mult)
        optimizer = make_optimizer(groups, recipe)
        labels = torch.from_numpy(data.labels[data.train]).to(device)
        inp, inputs = _objective_inputs(cfg, method, data, labels, device, model, optimizer, labnet_dir, prev_imgnet)
        objective, buffers = method.objective(inp)
        per_epoch = -(-len(data.train) // cfg.imgnet.batch_size)
        step_offset = per_epoch * sum(epochs_for_round(cfg.imgnet.epochs, r) for r in range(round_index))
        phase = imgnet_phase(
            model, optimizer, mults, data.images, data.train, objective, cfg.imgnet, cfg.train,
            round_index, epochs, seed, device, recipe, step_offset, buffers,
        )  # fmt: skip
        out = Path(out_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        fp = artifacts.fingerprint(
            "train_imgnet", round_index, values(cfg, STAGE_PARAMS["train_imgnet"]), inputs, dtype
        )
        ckpt = Path(checkpoint) if checkpoint else artifacts.checkpoint_path(out)
        t0 = time.perf_counter()
        history = run_phase(phase, cfg.train, ckpt, fp, progress, tr.log_epoch if tr else None)
        if not rank.main:  # rank 0 encodes and writes the step output
            return {"round": round_index, "rank": rank.rank, "epochs": epochs}
        f_all, u_all = encode_images(model, data.images, None, cfg.imgnet.encode_batch_size, device, progress)
        finite_or_raise("ImgNet outputs", u_all)
        codes = pack(u_all)
        summary = {
            "round": round_index,
            "method": cfg.method,
            "epochs": epochs,
            "compute_dtype": dtype,
            "seconds": round(time.perf_counter() - t0, 3),
            "distinct_codes_database": count_distinct(codes[data.database]),
            "final": _final(history),
        }
        with atomic_dir(out) as tmp:
            save_step_model(
                tmp, "imgnet", cfg, model.cpu().state_dict(), optimizer=optimizer.state_dict(),
                round_index=round_index, dataset_sha256=data.sha256, n_classes=data.n_classes, image_size=image_size,
            )  # fmt: skip
            artifacts.save_codes(tmp, codes)
            artifacts.save_train_outputs(tmp, sign(u_all[data.train]), f_all[data.train].astype(np.float32))
            summary.update(_log_imgnet_model(tr, cfg, model, image_size, data))
            artifacts.write_step_dir(tmp, cfg, summary, history)
        ckpt.unlink(missing_ok=True)
        _log_step(tr, out, "imgnet", summary, exclude=(artifacts.MODEL,))
    return summary


def _objective_inputs(cfg, method, data, labels, device, model, optimizer, labnet_dir, prev_imgnet):
    """(ObjectiveInputs, input hashes): the previous round's weights are loaded into model and
    optimizer; the inputs the method's entry asks for (LabNet targets, previous codes) are read."""
    inp = methods.ObjectiveInputs(cfg=cfg, labels=labels, device=device)
    inputs = [data.sha256]
    if prev_imgnet is not None:
        prev = load_step_model(prev_imgnet, "imgnet")
        _check_compatible(prev, cfg, data, prev_imgnet)
        model.load_state_dict(prev.state_dict)
        optimizer.load_state_dict(prev.optimizer)
        inputs.append(artifacts.file_sha(Path(prev_imgnet) / artifacts.MODEL))
        if method.uses_prev_codes:
            inp.prev_codes = torch.from_numpy(artifacts.load_train_outputs(prev_imgnet)[0]).float()
    if method.needs_labnet:
        if labnet_dir is None:
            raise DsehError(f"method {cfg.method} needs the LabNet output of the same round")
        _check_compatible(load_step_model(labnet_dir, "labnet"), cfg, data, labnet_dir)
        B_lab, F_lab = artifacts.load_targets(labnet_dir)
        inp.labnet_targets = (torch.from_numpy(B_lab).float().to(device), torch.from_numpy(F_lab).float().to(device))
        inputs.append(artifacts.file_sha(Path(labnet_dir) / TARGETS))
    return inp, inputs


# --------------------------------------------------------------------------- evaluate


def evaluate(
    cfg: Config,
    data_dir: str | Path | PreparedData,
    labnet_dir: str | Path,
    imgnet_dir: str | Path,
    out_dir: str | Path,
    progress: bool = True,
    encode: bool = False,
) -> dict:
    """Retrieval metrics (query -> database) of the saved codes (or, with `encode`, codes computed
    anew by the saved model), LabNet's label retrieval, DVC plot data, figures and the HTML report."""
    data = as_prepared(data_dir)
    with tracking.step_run(cfg, "evaluate", data.sha256) as tr:
        img = load_step_model(imgnet_dir, ("imgnet", "linear-hash"))
        if img.round != cfg.train.rounds - 1:
            raise DsehError(
                f"{imgnet_dir} is round {img.round} but train.rounds={cfg.train.rounds}: the pipeline "
                "has stages for another number of rounds; regenerate dvc.yaml with `dseh dvc-yaml`"
            )
        _check_compatible(img, None, data, imgnet_dir)
        if encode:
            codes = stored_codes.encode_all(cfg, data, img, imgnet_dir, progress)
        else:
            codes = artifacts.load_codes(imgnet_dir, len(data.labels), img.bits)
        verified = {} if encode else stored_codes.verify(cfg, data, img, imgnet_dir, codes, progress)
        metrics, rep = evaluation.split_metrics(cfg.evaluate, data, codes, img.bits)
        metrics.update(verified)
        lab_feats = None
        if methods.get(img.method).needs_labnet:
            metrics["labnet"], lab_feats = _labnet_metrics(cfg, data, labnet_dir, img.bits, codes)
        img_feats = artifacts.load_train_outputs(imgnet_dir)[1]
        with atomic_dir(out_dir) as tmp:
            artifacts.write_json(tmp / artifacts.METRICS, metrics)
            rows = report.heatmap_rows(
                cfg.seed, cfg.evaluate.heatmap_items, data.labels[data.train], lab_feats, img_feats
            )
            ev = cfg.evaluate
            examples = report.retrieval_examples(
                codes[data.query], codes[data.database], data.labels[data.query], data.labels[data.database],
                ev.example_queries, ev.example_topk,
            )  # fmt: skip
            report.write_evaluation(tmp, rep, metrics, *rows, to_dict(cfg), examples, data)
            dump_config(cfg, tmp / artifacts.CONFIG)
        labnet_text = f", LabNet label mAP@ALL {metrics['labnet']['label_map_all']:.4f}" if "labnet" in metrics else ""
        log.info("%s: mAP@ALL %.4f, mAP@%d %.4f%s", img.method, rep.map_all, rep.topk, rep.map_topk, labnet_text)
        _log_step(tr, Path(out_dir), "eval", metrics)
    return metrics


def _labnet_metrics(cfg: Config, data: PreparedData, labnet_dir, bits: int, codes_db) -> tuple[dict, np.ndarray]:
    """LabNet's own label retrieval (query label sets -> database label sets), search by labels
    (LabNet's codes of the query label sets -> the database's image codes `codes_db`, what
    `dseh search --labels` ranks) and LabNet's training features."""
    labnet, _ = load_labnet(labnet_dir)
    _, h_q = encode_labels(labnet, torch.from_numpy(data.labels[data.query]))
    _, h_db = encode_labels(labnet, torch.from_numpy(data.labels[data.database]))
    codes = np.empty((len(data.labels), packed_width(bits)), np.uint8)
    codes[data.query], codes[data.database] = pack(h_q.numpy()), pack(h_db.numpy())
    rep = evaluation.split_report(cfg.evaluate, data, codes, bits, (cfg.evaluate.topk,))
    cross = np.array(codes_db, copy=True)
    cross[data.query] = pack(h_q.numpy())
    by_labels = evaluation.split_report(cfg.evaluate, data, cross, bits, (cfg.evaluate.topk,))
    lab_codes, lab_feats = artifacts.load_targets(labnet_dir)
    return {
        "label_map_all": rep.map_all,
        f"label_map_at_{rep.topk}": rep.map_topk,
        "label_query_map_all": by_labels.map_all,
        f"label_query_map_at_{rep.topk}": by_labels.map_topk,
        "label_query_map_tie_aware": by_labels.map_tie_aware,
        "distinct_codes_train": count_distinct(pack(lab_codes)),
        "distinct_label_sets_train": int(len(np.unique(data.labels[data.train], axis=0))),
    }, lab_feats


# --------------------------------------------------------------------------- promote


def promote(
    cfg: Config,
    data_dir: str | Path,
    imgnet_dir: str | Path,
    eval_dir: str | Path,
    out_dir: str | Path | None,
    dry_run: bool = False,
    labnet_dir: str | Path | None = None,
) -> dict:
    """Register the evaluated image network as a new version of tracking.registered_model and move
    `champion` to it when dseh.promotion.decide says so; with dry_run say what would happen and
    write nothing anywhere. decision.json is written only for a real promotion. The model that
    train_imgnet logged (its summary's model_uri) is the one registered when the registry reaches it.
    The retrieval model (tracking.retrieval_model) bundles it with `labnet_dir`, the round's LabNet
    (for a method that trains one) and the database's codes, with the same aliases."""
    data = PreparedData(data_dir)
    metrics = artifacts.read_json(Path(eval_dir) / artifacts.METRICS, "run `dseh evaluate` first")
    img = load_step_model(imgnet_dir, ("imgnet", "linear-hash"))
    if img.kind != "imgnet":
        raise DsehError(
            f"{imgnet_dir} holds {img.method} codes, not an image network: only the deep methods' models "
            f"({', '.join(methods.DEEP_METHODS)}) can be registered"
        )
    _check_compatible(img, None, data, imgnet_dir)
    candidate = promotion.Candidate.from_metrics(cfg, metrics, Path(eval_dir) / artifacts.METRICS, img, data)
    if dry_run:
        decision = promotion.dry_run(cfg, candidate, data)
    else:
        summary = Path(imgnet_dir) / artifacts.SUMMARY
        trained = artifacts.read_json(summary).get("model_uri") if summary.is_file() else None
        labnet = labnet_dir if labnet_dir is not None and methods.get(img.method).needs_labnet else None
        decision = promotion.register(cfg, candidate, imgnet_dir, data, trained, labnet)
        if out_dir is not None:
            with atomic_dir(out_dir) as tmp:
                artifacts.write_json(tmp / artifacts.DECISION, decision)
                dump_config(cfg, tmp / artifacts.CONFIG)
    log.info("promote: %s (%s)", decision["decision"], decision.get("reason"))
    return decision
