"""`tgm <stage>`: the command line that every DVC stage runs. Each command reads its group of params.yaml."""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap

STAGES = {
    "ingest": """Copy the source named by ingest.source into data/raw/ and list every file in
        data/raw/manifest.csv (path, label, sha256, size, format, width, height, mode).
        Sources: builtin:mnist5k, builtin:digits, folder:PATH (one sub-folder per class).""",
    "validate": """Decode and inspect every ingested file and judge it with Great Expectations suites: each file is
        accepted (data/validated/manifest.csv) or quarantined with one reason (data/validated/quarantine.csv).
        Writes every file's measurements and verdict (data/validated/inspected.csv), details.json,
        reports/validation.json (a DVC metric) and Data Docs in reports/validation_docs/. Fails when more than
        validate.max_reject_fraction is rejected, a class is below validate.min_images_per_class, or fewer
        than two classes remain.""",
    "prepare": """Resize and quantise the accepted images to a palette (grey levels or k-means colours),
        split them train/val/test (stratified, no image in two splits) and write token arrays,
        the palette and meta.json to data/prepared/.""",
    "pretrain": """Train the transformer to predict the next pixel on the training images (labels unused).
        Writes models/pretrained/ (safetensors + config), metrics/pretrain.json, plots/pretrain_curve.csv.""",
    "finetune": """Fine-tune the pretrained model as a classifier: features averaged over a finetune.cls_grid
        square grid of image regions -> linear head, loss = class cross-entropy + finetune.lambda_gen *
        next-pixel loss, early stopping on validation. Writes models/classifier/, metrics/finetune.json,
        plots/finetune_curve.csv.""",
    "probe": """Linear probes on the pretrained model: average-pooled features of every layer, a logistic
        regression per layer fitted on train, the layer chosen on validation. Writes metrics/probe.json and
        plots/probe.csv (accuracy per layer).""",
    "study": """Label-efficiency study under one protocol: for each share of the training labels in
        study.fractions, study.subsets stratified labelled subsets; every arm (pretrained fine-tune, linear
        probe, from scratch, logistic regression, RBF SVM, kNN) picks its settings inside its subset alone
        (holdout or k-fold, study.folds), refits on the whole subset, and is scored once on test. Writes
        metrics/study.json (mean and spread per arm), plots/label_efficiency.csv (every run) and .png.""",
    "evaluate": """Score the classifier on the test split: metrics/evaluate.json (accuracy, macro-F1,
        per-class recall, test bits per pixel, an RBF-SVM reference), plots/confusion.csv and
        plots/completions.png (top halves given, bottom halves sampled by the pretrained model).""",
    "gate": """Check the evaluation metrics against the gate.* floors and against the champion (the model
        the newest Bento serves, metrics from its BentoML metadata; worse by more than gate.max_regression
        fails); write reports/gate.json and exit non-zero naming each failed check, so that package does
        not run.""",
    "package": """Save the gated classifier to the BentoML model store (package.model_name) with its
        metrics, params, git commit and data hash as metadata, build a Bento from bentofile.yaml and
        write reports/package.json.""",
}


def run_stage(stage: str, params_path: str) -> None:
    from tgm.params import load_params

    p = load_params(params_path)
    if stage == "ingest":
        from tgm.ingest import ingest

        ingest(p.ingest)
    elif stage == "validate":
        from tgm.validate import validate

        validate(p.validate)
    elif stage == "prepare":
        from tgm.prepare import prepare

        prepare(p.prepare)
    elif stage == "pretrain":
        from tgm.train import pretrain

        pretrain(p.model, p.pretrain)
    elif stage == "finetune":
        from tgm.train import finetune

        finetune(p.finetune)
    elif stage == "probe":
        from tgm.probe import probe

        probe(p.probe)
    elif stage == "study":
        from tgm.study import study

        study(p.study, p.finetune)
    elif stage == "evaluate":
        from tgm.evaluate import evaluate

        evaluate(p.evaluate)
    elif stage == "gate":
        from tgm.gate import gate

        gate(p.gate, model_name=p.package.model_name)
    elif stage == "package":
        from tgm.package import package

        package(p, params_path=params_path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tgm", description="T-GM pipeline stages (each is one DVC stage).")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, text in STAGES.items():
        doc = textwrap.dedent("        " + text).strip()
        sp = sub.add_parser(name, help=doc.split(".")[0], description=doc)
        sp.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
        sp.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
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
    from tgm.gate import GateFailed
    from tgm.params import ParamsError
    from tgm.schemas import DataContractError
    from tgm.validate import DataUnusableError

    try:
        run_stage(args.stage, args.params)
    except (
        ParamsError,
        DataContractError,
        DataUnusableError,
        GateFailed,
        FileNotFoundError,
        FloatingPointError,
    ) as exc:
        print(f"tgm {args.stage}: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ParamsError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
