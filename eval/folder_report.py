"""report.md of eval/folders.py: the tables a practitioner reads (thresholds are cosine similarities)."""
from __future__ import annotations

import os


def write_text_atomic(path: str, text: str) -> None:
    """Write a text file through a temporary name and os.replace."""
    with open(path + ".tmp", "w") as handle:
        handle.write(text)
    os.replace(path + ".tmp", path)


def _number(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _mean_std(value, std, digits: int = 5) -> str:
    return "-" if value is None else f"{value:.{digits}f}+-{std:.{digits}f}"


def _model_lines(label: str, model: dict) -> list[str]:
    one = model["one_to_one"]
    lines = [f"## {label}", "",
             f"`{model['path']}` (sha256 {model['sha256'][:12]}), faces: {model['face_preparation']}, "
             f"{model['photos_with_face']} photos with a face (embedded now: {model['embedded_now']}, "
             f"from the cache: {model['from_cache']})", ""] + ([model["model"], ""] if "model" in model else []) + [
             f"### 1:1 verification: {one['genuine_pairs']} genuine, {one['impostor_pairs']} impostor pairs", "",
             "| FAR | TAR | FAR reached | threshold (cosine) |", "|---|---|---|---|"]
    for row in one["tar_at_far"]:
        note = "" if row["measurable"] else " (too few impostor pairs for this FAR)"
        lines.append(f"| {row['far']:.0e} | {_number(row['tar'])} | {row['far_reached']:.2e}{note} | "
                     f"{_number(row['threshold'])} |")
    best, eer = one["best_accuracy"], one["eer"]
    lines += ["", f"EER {_number(eer['eer'])} at threshold {_number(eer['threshold'])}; AUC {_number(one['auc'], 6)}; "
              f"best accuracy {_number(best['accuracy'])} at threshold {_number(best['threshold'])} (fitted on all "
              f"pairs: optimistic)"]
    folds = one.get("ten_fold") or {}
    if folds:
        far = "-" if folds["far_flip"] is None else f"{folds['far_flip']:.2e}"
        lines.append(f"10-fold (the .bin protocol, same pairs): Accuracy "
                     f"{_mean_std(folds['accuracy'], folds['accuracy_std'])}, Accuracy-Flip "
                     f"{_mean_std(folds['accuracy_flip'], folds['accuracy_flip_std'])}, VAL@FAR=1e-3 "
                     f"{_number(folds['val_flip'], 5)} (FAR reached {far})")
    ident = model.get("one_to_n") or {}
    if ident:
        lines += ["", f"### 1:N identification: {ident['identities']} identities, {ident['gallery_images']} gallery "
                      f"photos ({ident['gallery_per_identity']} per identity), {ident['mated_probes']} probes", "",
                  f"rank-1 {ident['rank1']:.4f}, rank-5 {ident['rank5']:.4f}"]
        if "dir_at_fpir" in ident:
            lines += ["", f"Open set, {ident['unknown_probes']} probes of people not enrolled:", "",
                      "| FPIR | DIR |", "|---|---|"]
            lines += [f"| {row['fpir']:.0e} | {_number(row['dir'])}"
                      f"{'' if row['measurable'] else ' (too few unknown probes)'} |" for row in ident["dir_at_fpir"]]
    warnings = model.get("weights_warnings", []) + model["warnings"]
    if warnings:
        lines += ["", "Warnings:", ""] + [f"- {warning}" for warning in warnings]
    return lines + [""]


def format_markdown(report: dict) -> str:
    """The whole report.md."""
    lines = [f"# Evaluation of {report['root']}", "",
             f"{report['photos']} photos of {report['identities']} identities; {report['faceless']} without a usable "
             f"face (faceless.txt).", ""]
    if report["warnings"]:
        lines += ["Warnings:", ""] + [f"- {warning}" for warning in report["warnings"]] + [""]
    for label, model in report["models"].items():
        lines += _model_lines(label, model)
    if report.get("pictures"):
        lines += ["## Pictures", ""] + [f"![{os.path.splitext(name)[0]}]({name})" for name in report["pictures"]]
    return "\n".join(lines) + "\n"
