"""`tgm <stage>`: the command line that every DVC stage runs, and `tgm champion`.

Argument parsing, help texts and the version only: what a stage does is tgm/stages.py's table and the stage's
module, so nothing here is a code dependency of any stage (editing a help text reruns nothing).
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap

HELP = {
    "ingest": (
        "List every file of the data source, with its sha256, in data/raw/manifest.csv.gz.",
        """List every file of the labelled source named by ingest.source and of each unlabelled pool
        (ingest.unlabelled) in data/raw/manifest.csv.gz (path, label, split, pool, sha256, size, format,
        width, height, mode, source). A folder's images are read in place by the later stages, which refuse
        any file whose sha256 changed; built-in images are written to data/raw/. Sources: builtin:mnist5k,
        builtin:digits, builtin:fashion-mnist, folder:PATH in its layout (class folders, split folders,
        metadata.csv, an unlabelled/ pool beside them: docs/own-data.md); an ambiguous layout is refused.
        ingest.labels_per_class keeps that many labels per class of the training images and pools the rest.""",
    ),
    "validate": (
        "Judge every ingested file with Great Expectations: accept it or quarantine it with a reason.",
        """Decode and inspect every ingested file and judge it with Great Expectations suites: each file is
        accepted (data/validated/manifest.csv.gz) or quarantined with one reason (data/validated/quarantine.csv).
        Writes every file's measurements and verdict (data/validated/inspected.csv.gz), details.json,
        reports/validation.json (a DVC metric) and Data Docs in reports/validation_docs/. Fails when more than
        validate.max_reject_fraction is rejected, a class is below validate.min_images_per_class, or fewer
        than two classes remain.""",
    ),
    "prepare": (
        "Resize, quantise to a palette, split train/val/test and write token arrays.",
        """Resize and quantise the accepted images to a palette (grey levels or k-means colours, or the
        palette of base.path), split them train/val/test (stratified, no image in two splits; the source's
        own splits kept), set aside any training, validation or pooled image that copies a held-out one
        (set_aside.csv), and write token arrays (the pools' too), the palette and meta.json to
        data/prepared/.""",
    ),
    "pretrain": (
        "Train the transformer to predict the next pixel (labels unused).",
        """Train the transformer to predict the next pixel on the training images and the unlabelled pools
        (labels unused), from a random start or from base.path (pretrain.epochs 0: the base as it is). Writes
        models/pretrained/ (safetensors, config, palette, provenance.json), metrics/pretrain.json,
        plots/pretrain_curve.csv.""",
    ),
    "finetune": (
        "Fine-tune the pretrained model as a classifier with the joint loss.",
        """Fine-tune the pretrained model as a classifier: features averaged over a finetune.cls_grid
        square grid of image regions -> linear head, loss = class cross-entropy + finetune.lambda_gen *
        next-pixel loss, early stopping on validation. Writes models/classifier/, metrics/finetune.json,
        plots/finetune_curve.csv.""",
    ),
    "probe": (
        "Fit a linear probe on every layer of the pretrained model.",
        """Linear probes on the pretrained model: average-pooled features of every layer, a logistic
        regression per layer fitted on train, the layer chosen on validation. Writes metrics/probe.json and
        plots/probe.csv (accuracy per layer).""",
    ),
    "study": (
        "Compare pretrained and baseline arms on small labelled subsets (label efficiency).",
        """Label-efficiency study under one protocol: for each share of the training labels in
        study.fractions, study.subsets stratified labelled subsets; every arm (pretrained fine-tune, linear
        probe, from scratch, logistic regression, RBF SVM, kNN) picks its settings inside its subset alone
        (holdout or k-fold, study.folds), refits on the whole subset, and is scored once on test. Writes
        metrics/study.json (mean and spread per arm), plots/label_efficiency.csv (every run) and .png.""",
    ),
    "evaluate": (
        "Score the classifier on the test split, with an SVM reference and sampled completions.",
        """Score the classifier on the test split: metrics/evaluate.json (accuracy, macro-F1,
        per-class recall, test bits per pixel, an RBF-SVM reference), plots/confusion.csv and
        plots/completions.png (top halves given, bottom halves sampled by the pretrained model).""",
    ),
    "gate": (
        "Check the metrics against the floors and the task's champion; exit non-zero when a check fails.",
        """Check the evaluation metrics against the gate.* floors and against the champion of the same task
        (same data source and class names, or gate.task), as GTO's git tags record it; worse by
        more than gate.max_regression fails. A task without a champion is checked against the floors alone.
        Writes reports/gate.json (the task, the champion, every check) and exits non-zero naming each failed
        check, so that package does not run.""",
    ),
    "drift": (
        "Score a folder of new images against the training distribution; exit non-zero on drift.",
        """Score every image in drift.folder (or --folder) with the classifier's bits per pixel and compare
        them with the validation split's (reports/typicality.json, written by evaluate): the share above the
        typical threshold, a two-sample Kolmogorov-Smirnov test and a Great Expectations suite over the
        scores. Writes reports/drift.json, reports/drift_scores.csv (every file, scored or unreadable) and
        Data Docs in reports/drift_docs/. Fails when the share passes drift.max_atypical_share or the test's
        p-value falls below drift.min_p_value. Not a DVC stage: run it on new data, or schedule flows.drift.""",
    ),
    "package": (
        "Package the gated classifier as a BentoML model and a Bento, exported to models/packaged/.",
        """Package the gated classifier as a BentoML model (package.model_name, its version a digest of
        its contents) with its metrics, params, git commit and data hash as metadata, build a Bento from
        bentofile.yaml, and export both to models/packaged/ (a DVC output: any clone restores it with
        `dvc pull`). Writes reports/package.json and reports/model_card.md (also inside the model, and
        served at GET /model_card).""",
    ),
    "promote": (
        "Make the packaged model its task's champion: a GTO version and stage assignment (git tags).",
        """Make the model package just exported (it passed the gate) the champion of its task: a snapshot
        commit of the project (dvc.lock, metrics, reports; on no branch) registered as a new GTO version of
        the task (<task>@vX.Y.Z) and assigned the stage `champion` (<task>#champion#N), by git's user.name.
        A model that is the champion already, or was one before, is not promoted again (`tgm champion promote`
        brings one back). Writes reports/promotion.json. `git push --tags` shares the champion; on another
        clone `git fetch --tags` brings it to the gate and to `bentoml serve`, which fetches the model's bytes
        through DVC. See `tgm champion --help` to list, promote by hand or roll back.""",
    ),
}


CHAMPION_HELP = """\
The champion of each task is a GTO stage assignment, a git tag (see `tgm promote --help`).

  tgm champion show                       each task, its champion, when and by whom it was promoted
  tgm champion promote tgm-classifier:V   make the model packaged here, or an earlier champion, the champion
  tgm champion rollback [--task T]        unassign the champion: the one before it is the champion again

Each writes git tags only; `git push --tags` shares them, `git fetch --tags` brings others'."""


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("tgm")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    from tgm.stages import STAGES

    parser = argparse.ArgumentParser(
        prog="tgm", description="T-GM pipeline stages (each is one DVC stage), and the drift check."
    )
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    for name in STAGES:
        summary, text = HELP[name]
        sp = sub.add_parser(name, help=summary, description=textwrap.dedent("        " + text).strip())
        sp.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
        sp.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub.choices["drift"].add_argument("--folder", help="the folder of new images (default: drift.folder)")
    champion = sub.add_parser(
        "champion",
        help="List the champion of each task, promote a packaged model by hand, or roll back.",
        description=CHAMPION_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    champion.add_argument("action", choices=("show", "promote", "rollback"))
    champion.add_argument(
        "model", nargs="?", help="promote: the model tag (name:version), packaged here or an earlier champion"
    )
    champion.add_argument("--task", help="rollback: the task (default: the task changed last)")
    champion.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    for noisy in ("PIL", "matplotlib", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from tgm.errors import UserError

    try:
        if args.stage == "champion":
            from tgm.champion import champion_command

            print(champion_command(args.action, args.model, args.task))
        else:
            from tgm.stages import run

            folder = getattr(args, "folder", None)
            run(args.stage, args.params, overrides={"drift.folder": folder} if folder else None)
    except UserError as exc:
        print(f"tgm {args.stage}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
