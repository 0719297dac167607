"""The ``semclip`` command: serve, select, demo, build-models.

``semclip serve [MODEL] [--port P] [--topk K] [--grids 2,3] [--relevance-model NAME_OR_PATH] [vllm flags…]``
    vLLM's OpenAI-compatible server with SemClip on; no MODEL serves the bundled model.
``semclip select IMAGE "QUESTION" [--topk K] [--json] [--out overlay.png]``
    runs the processor's own selection code on one image and prints the boxes.
``semclip demo``
    serves the bundled model on 127.0.0.1, asks questions about real photos, prints
    answers, boxes and visual-token counts, writes overlays, stops the server.
``semclip bench-data --out DIR --n N --seed S``
    writes a V*-style benchmark (V* Bench's layout) of small shapes on large photos.
``semclip bench serve [--quick]``
    serving throughput/latency of overview, semclip, given, all and hf, side by side.
``semclip eval --data DIR --method M[,M...] [--topk K] [--protocol likelihood|generate] --out results.json``
    accuracy, crop hit rate and visual tokens of overview/random/all/clip/trained/oracle through vLLM.
``semclip train clip [--model NAME] [--init DIR] [--out DIR] [--steps N] [--seed S]``
    trains the tiny CLIP (the LLaVA tower; at 336 px ψ's default) and evaluates it on held-out cards.
``semclip train vlm [--relevance-dir DIR] [--init DIR] [--out DIR] [--steps N] [--seed S]``
    builds the tiny LLaVA on the tiny CLIP's tower, trains projector + LM, evaluates held-out questions.
``semclip label --data DIR [--model DIR] --out LABELS [--address RAY_ADDRESS] [--actors N]``
    distant supervision: the VLM scores overview + each candidate crop per question, on Ray
    actors holding one vLLM engine each; resumable JSONL shards.
``semclip train-relevance --labels LABELS [--init DIR] [--out DIR] [--epochs N]``
    fine-tunes ψ on the labels (each question's most helpful crop is its positive).
``semclip build-models [--force]``
    builds random (seeded) stand-ins where the bundled trained models are missing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

SELECTION_FLAGS = ("topk", "grids", "overlap", "method", "relevance_model", "relevance_pretrained",
                   "relevance_precision", "relevance_fit", "relevance_norm", "seed")


def _add_selection_flags(p: argparse.ArgumentParser, *, server: bool) -> None:
    p.add_argument("--topk", type=int, help="crops kept next to the overview (0-8; default 1)")
    p.add_argument("--grids", help="grid sizes of the candidates, e.g. 2,3 (default)")
    p.add_argument("--overlap", type=float, help="widen each cell by this fraction on each side (0-0.5)")
    p.add_argument("--method", choices=("relevance", "random", "overview", "all"),
                   help="how crops are chosen (method 'given' takes boxes: set it per request)")
    p.add_argument("--relevance-model", help="ψ: an open_clip model name or a local-dir checkpoint directory")
    p.add_argument("--relevance-pretrained", help="open_clip pretrained tag or checkpoint path (e.g. openai)")
    p.add_argument("--relevance-precision",
                   help="ψ's precision, open_clip's: fp32 (default), bf16, fp16, pure_bf16, pure_fp16")
    from .crops import RELEVANCE_FITS, RELEVANCE_NORMS

    p.add_argument("--relevance-fit", choices=RELEVANCE_FITS,
                   help="how ψ sees a non-square candidate: windows (default: best of the squares covering it), "
                        "pad (to a square, as the VLM's tiles), center (the centre square)")
    p.add_argument("--relevance-norm", choices=RELEVANCE_NORMS,
                   help="how ψ's scores are compared across grids: grid (default: standardised among each "
                        "grid's cells), none (raw)")
    p.add_argument("--relevance-device", dest="device", help="where ψ runs (cpu, cuda, ...)")
    p.add_argument("--seed", type=int, help="seed of the random method")
    if server:
        p.add_argument("--max-topk", type=int, help="the most crops a request may ask for (memory is profiled for it)")


def _selection_overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = (*SELECTION_FLAGS, "device", "max_topk")
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def _config(overrides: dict[str, Any]):
    from .config import SemClipConfig

    return SemClipConfig().replace(overrides, source="command line")


def cmd_serve(argv: list[str]) -> int:
    from .server import runtime_env, serve_command
    from .tiny_models import DEFAULT_MODEL_DIR, ensure_default_models

    model = None
    if argv and not argv[0].startswith("-"):
        model, argv = argv[0], argv[1:]
    p = argparse.ArgumentParser(prog="semclip serve", description="vLLM's OpenAI server with SemClip")
    p.add_argument("--model", dest="model_flag")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    _add_selection_flags(p, server=True)
    args, vllm_args = p.parse_known_args(argv)
    model = model or args.model_flag
    overrides = _selection_overrides(args)
    _config(overrides)  # fail here, with the field named, rather than inside vLLM
    if model is None or "relevance_model" not in overrides:
        ensure_default_models()
    model = model or str(DEFAULT_MODEL_DIR)
    cmd = serve_command(model, overrides, host=args.host, port=args.port, vllm_args=vllm_args)
    print("semclip serve:", " ".join(cmd[1:]), file=sys.stderr, flush=True)
    os.execve(sys.executable, cmd, runtime_env())
    return 0  # not reached


def cmd_select(argv: list[str]) -> int:
    from .images import load_image
    from .selection import select_crops

    p = argparse.ArgumentParser(prog="semclip select", description="show which crops SemClip picks")
    p.add_argument("image")
    p.add_argument("question")
    _add_selection_flags(p, server=False)
    p.add_argument("--json", action="store_true", help="print the selection as JSON")
    p.add_argument("--out", help="write the image with the score heatmap and chosen boxes here")
    args = p.parse_args(argv)
    overrides = _selection_overrides(args)
    if "relevance_model" not in overrides:
        from .tiny_models import ensure_default_models

        ensure_default_models()
    config = _config(overrides)
    image = load_image(args.image)
    selection = select_crops(image, args.question, config)
    if args.out:
        from .overlay import draw_selection

        draw_selection(image, selection, args.out)
    if args.json:
        doc = selection.to_json()
        print(json.dumps({"boxes": doc["boxes"], "scores": doc["scores"], "candidates": doc["candidates"]}))
    else:
        print(f"{args.image}: {selection.image_size[0]}x{selection.image_size[1]}, "
              f"{len(selection.candidates)} candidates, method {selection.method}, question {selection.question!r}")
        for rank, (box, score) in enumerate(zip(selection.boxes, selection.scores), start=1):
            shown = "-" if score is None else f"{score:.4f}"
            print(f"  #{rank} box={list(box)} score={shown}")
        if not selection.boxes:
            print("  no crops (overview only)")
        if args.out:
            print(f"overlay written to {args.out}")
    return 0


def cmd_demo(argv: list[str]) -> int:
    from .demo import main as demo_main

    return demo_main(argv)


def cmd_bench_data(argv: list[str]) -> int:
    from .benchdata import CATEGORIES, write_bench

    p = argparse.ArgumentParser(prog="semclip bench-data", description="write a V*-style benchmark (V* Bench layout)")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=191, help="questions (default 191, V* Bench's count)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.n < 1:
        raise ValueError("--n must be at least 1")
    records = write_bench(args.out, args.n, args.seed)
    counts = {c: sum(r.category == c for r in records) for c in CATEGORIES}
    print(f"wrote {len(records)} questions to {args.out}: {counts}; JSONL: {args.out}/records.jsonl")
    return 0


def cmd_bench(argv: list[str]) -> int:
    if not argv or argv[0] != "serve":
        print("usage: semclip bench serve [--quick] [...]  (see --help)", file=sys.stderr)
        return 2
    from .serve_bench import main as bench_main

    return bench_main(argv[1:])


def cmd_eval(argv: list[str]) -> int:
    from .evaluate import EVAL_METHODS, PROTOCOLS, TABLE_HEADER, format_row, run

    p = argparse.ArgumentParser(prog="semclip eval", description="V*-style evaluation through vLLM with SemClip")
    p.add_argument("--data", required=True, help="V*-layout directory or records.jsonl")
    p.add_argument("--model", help="LLaVA checkpoint (default: the bundled tiny LLaVA)")
    p.add_argument("--method", required=True,
                   help=f"one of {', '.join(EVAL_METHODS)}, or several separated by commas")
    p.add_argument("--topk", default="1",
                   help="crops for random, clip and trained (default 1); several separated by commas "
                        "for a sweep (METHOD-kK.json each, joined in the plot)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="likelihood")
    p.add_argument("--grids", default="2,3", help="candidate grids (default 2,3)")
    p.add_argument("--relevance-model", help="ψ of method trained: local-dir or open_clip name (default: bundled trained ψ)")
    p.add_argument("--clip-model", help="ψ of method clip: open_clip name or local-dir (default: bundled zero-shot ψ)")
    p.add_argument("--limit", type=int, help="only the first N questions")
    p.add_argument("--out", required=True, help="results .json (one method) or a directory (several)")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    grids = [int(g) for g in args.grids.split(",") if g.strip()]
    try:
        topk = [int(k) for k in args.topk.split(",") if k.strip()]
    except ValueError:
        p.error(f"--topk: whole numbers separated by commas, got {args.topk!r}")
    docs = run(args.data, methods, args.out, model=args.model, topk=topk, protocol=args.protocol,
               grids=grids, relevance_model=args.relevance_model, clip_model=args.clip_model, limit=args.limit)
    print(TABLE_HEADER)
    for doc in docs:
        print(format_row(doc))
    return 0


def cmd_train(argv: list[str]) -> int:
    if not argv or argv[0] not in ("clip", "vlm"):
        print("usage: semclip train clip|vlm [--out DIR] [--steps N] [--seed S] ...", file=sys.stderr)
        return 2
    what, argv = argv[0], argv[1:]
    from .tiny_models import DEFAULT_TOWER_DIR

    p = argparse.ArgumentParser(prog=f"semclip train {what}")
    # the bundled CLIP is the LLaVA's tower (and, at 336 px, ψ), and the bundled LLaVA is a chain of
    # runs (README): a new model goes to out/ unless the package's directory is asked for
    p.add_argument("--out", default="out/psi" if what == "clip" else "out/vlm")
    p.add_argument("--steps", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--lr", type=float, help="peak learning rate of the warm-up/cosine schedule")
    if what == "clip":
        p.add_argument("--model", help="open_clip config to train (default SemClip-ViT-T-16, 224 px; "
                       "SemClip-ViT-T-16-336 with --init resizes a 224-px ψ's position grid)")
        p.add_argument("--init", help="continue from this ψ checkpoint directory")
        p.add_argument("--curriculum", type=float, help="fraction of steps over which cards shrink (default 0.2)")
        p.add_argument("--position-weight", type=float,
                       help="weight of the patch-position loss at the LLaVA's feature layer (default 0: off)")
        p.add_argument("--position-card-weight", type=float,
                       help="weight of the same loss over the patches under a card only (default 0: off)")
        p.add_argument("--label-weight", type=float,
                       help="weight of the patch-label loss: the shape and colour of the card under each patch "
                            "token at the LLaVA's feature layer (default 0: off)")
        p.add_argument("--label-tiles", type=int,
                       help="extra tiles per step with 1-3 cards, for the patch losses only (default 0)")
        p.add_argument("--empty-tiles", type=int,
                       help="photo tiles without a card per step, a negative for every caption (default 0)")
        p.add_argument("--question-weight", type=float,
                       help="weight of the shape-question loss: each shape's question against every tile of a "
                            "caption block, every tile of that shape a positive (default 0: off)")
        p.add_argument("--lock-image", action="store_true", default=None,
                       help="freeze the image tower (open_clip's LiT lock) but its last --lock-image-unlocked-groups")
        p.add_argument("--lock-image-unlocked-groups", type=int,
                       help="image-tower groups left trainable under --lock-image (2: the last block, ln_post and "
                            "the projection, which the LLaVA's feature layer never sees)")
    if what == "vlm":
        p.add_argument("--relevance-dir", default=str(DEFAULT_TOWER_DIR), help="trained tiny CLIP whose ViT is the tower")
        p.add_argument("--side-fraction", type=float,
                       help="share of single-tile samples asking a card's side of the image")
        p.add_argument("--spatial-fraction", type=float,
                       help="share of left/right questions among multi-card samples (default 0.45)")
        p.add_argument("--text-hidden-size", type=int, help="language model width (default 160)")
        p.add_argument("--text-layers", type=int, help="language model depth (default 4)")
        p.add_argument("--text-heads", type=int, help="attention heads, each at least 32 wide (default 5)")
        p.add_argument("--text-intermediate-size", type=int, help="MLP width (default 432)")
        p.add_argument("--text-rope-theta", type=float, help="RoPE base of the language model (default 10000)")
        p.add_argument("--binding-weight", type=float,
                       help="weight of the attention-binding loss: one head, at the position predicting the "
                            "colour, is steered to the asked-for card's tokens (default 0: off)")
        p.add_argument("--position-binding-weight", type=float,
                       help="the same loss on left/right questions: heads 0 and 1, at the position predicting "
                            "left/right, steered to the two cards' tokens (default 0: off)")
        p.add_argument("--word-binding-weight", type=float,
                       help="left/right questions: heads 0 and 1 of the first layer, at the same position, steered "
                            "to the question's words naming the two cards (default 0: off)")
        p.add_argument("--attribute-word-binding-weight", type=float,
                       help="colour questions: head 0 of the first layer, at the position predicting the colour, "
                            "steered to the question's shape word (with --binding-weight: the pair of steerings "
                            "of the left/right question; default 0: off)")
        p.add_argument("--tower-lr", type=float,
                       help="train the tower too after alignment, at this learning rate (default 0: frozen)")
        p.add_argument("--turns", type=int,
                       help="questions per multi-card tile, as one multi-turn conversation: every card's colour "
                            "and left/right of card pairs (default 1)")
        p.add_argument("--text-steps", type=int,
                       help="text-only steps first: questions over cards written as words, the language "
                            "model's pretraining (default 0)")
        p.add_argument("--side-steps", type=int,
                       help="a grounding stage first: this many steps of side-of-the-image questions alone "
                            "(default 0)")
        p.add_argument("--ground-spatial-fraction", type=float,
                       help="share of grounding-stage samples asking the two-card left/right question instead "
                            "of a card's side of the image (default 0)")
        p.add_argument("--align-ground-fraction", type=float,
                       help="share of alignment samples drawn as grounding-stage samples, so the skill is kept "
                            "(default 0)")
        p.add_argument("--init", help="continue from this saved LLaVA's projector and language model (the tower is "
                                       "--relevance-dir's)")
        p.add_argument("--align-projector-only", action="store_true", default=None,
                       help="alignment trains the projector alone, the language model frozen (LLaVA-1.5's stage 1)")
    args = p.parse_args(argv)
    overrides = {k: getattr(args, k, None) for k in ("model", "steps", "seed", "threads", "init", "curriculum", "lr",
                                                  "position_weight", "position_card_weight", "label_weight", "label_tiles",
                                                  "empty_tiles", "lock_image", "lock_image_unlocked_groups", "question_weight",
                                                  "side_fraction", "spatial_fraction", "binding_weight",
                                                  "position_binding_weight", "word_binding_weight",
                                                  "attribute_word_binding_weight", "tower_lr", "turns",
                                                  "text_steps", "side_steps", "ground_spatial_fraction",
                                                  "align_ground_fraction", "align_projector_only")}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if what == "clip":
        from .train_clip import ClipTrainConfig, train_clip

        report = train_clip(ClipTrainConfig(**overrides), args.out)
    else:
        from .train_vlm import VlmTrainConfig, train_vlm

        from .tiny_models import TinyLlavaSpec

        sizes = {k: getattr(args, k) for k in ("text_hidden_size", "text_layers", "text_heads",
                                               "text_intermediate_size", "text_rope_theta") if getattr(args, k) is not None}
        report = train_vlm(VlmTrainConfig(**overrides), args.relevance_dir, args.out, spec=TinyLlavaSpec(**sizes))
    print(json.dumps({k: v for k, v in report.items() if k not in ("config", "spec")}, indent=2))
    print(f"written to {args.out} (report: {args.out}/train_report.json)")
    return 0


def cmd_label(argv: list[str]) -> int:
    from .label import LabelConfig, run_labelling
    from .tiny_models import DEFAULT_MODEL_DIR, ensure_default_models

    p = argparse.ArgumentParser(prog="semclip label", description="label candidate crops with the VLM (Ray + vLLM)")
    p.add_argument("--data", required=True, help="V*-layout directory or records.jsonl (a training split)")
    p.add_argument("--model", help="LLaVA checkpoint (default: the bundled tiny LLaVA)")
    p.add_argument("--out", required=True, help="directory of label shards (a rerun resumes it)")
    p.add_argument("--address", help="an existing Ray cluster (default: start a local Ray)")
    p.add_argument("--actors", type=int, default=1, help="Ray actors, one vLLM engine each (default 1)")
    p.add_argument("--cpus-per-actor", type=int, help="CPUs each actor reserves (default: shared equally)")
    p.add_argument("--shard-size", type=int, default=16, help="questions per shard (default 16)")
    p.add_argument("--grids", default="2,3", help="candidate grids (default 2,3)")
    p.add_argument("--limit", type=int, help="only the first N questions")
    args = p.parse_args(argv)
    if args.model is None:
        ensure_default_models()
    config = LabelConfig(data=args.data, model=args.model or str(DEFAULT_MODEL_DIR), out=args.out,
                         grids=tuple(int(g) for g in args.grids.split(",") if g.strip()),
                         shard_size=args.shard_size, actors=args.actors, address=args.address,
                         cpus_per_actor=args.cpus_per_actor, limit=args.limit)
    print(json.dumps(run_labelling(config), indent=1))
    return 0


def cmd_train_relevance(argv: list[str]) -> int:
    from .train_relevance import DEFAULT_TRAINED_RELEVANCE_DIR, RelevanceTrainConfig, train_relevance

    p = argparse.ArgumentParser(prog="semclip train-relevance", description="fine-tune ψ on the VLM's crop labels")
    p.add_argument("--labels", required=True, help="directory of label shards from `semclip label`")
    p.add_argument("--init", help="ψ to start from: local-dir or open_clip name (default: bundled zero-shot ψ)")
    p.add_argument("--init-pretrained", help="open_clip pretrained tag or file for a named --init (e.g. openai)")
    p.add_argument("--out", default=str(DEFAULT_TRAINED_RELEVANCE_DIR))
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--unlock-image", action="store_true", help="also train the image tower (default: locked)")
    from .crops import RELEVANCE_FITS, RELEVANCE_NORMS

    p.add_argument("--fit", choices=RELEVANCE_FITS,
                   help="how ψ sees a non-square crop, as it will be served (default windows)")
    p.add_argument("--norm", choices=RELEVANCE_NORMS,
                   help="how validation ranks the candidates, as they will be served (default grid)")
    p.add_argument("--keep-last", action="store_true",
                   help="save the last epoch (default: the epoch with the best validation gain, maybe the start)")
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    fields = {"init": args.init, "init_pretrained": args.init_pretrained, "epochs": args.epochs,
              "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "threads": args.threads,
              "fit": args.fit, "norm": args.norm}
    config = RelevanceTrainConfig(labels=args.labels, lock_image=not args.unlock_image, keep_best=not args.keep_last,
                                  **{k: v for k, v in fields.items() if v is not None})
    report = train_relevance(config, args.out)
    print(json.dumps({k: report[k] for k in ("train_questions", "val_questions", "train_seconds", "zero_shot",
                                             "best_epoch", "kept_start")}, indent=1))
    print(f"written to {args.out} (report: {args.out}/train_report.json)")
    return 0


def cmd_build_models(argv: list[str]) -> int:
    from .tiny_models import ensure_default_models

    p = argparse.ArgumentParser(prog="semclip build-models")
    p.add_argument("--force", action="store_true", help="rebuild even if present")
    args = p.parse_args(argv)
    llava, psi = ensure_default_models(force=args.force)
    print(f"tiny LLaVA: {llava}\nψ (open_clip local-dir): {psi}")
    return 0


COMMANDS = {"serve": cmd_serve, "select": cmd_select, "demo": cmd_demo, "bench-data": cmd_bench_data,
            "bench": cmd_bench, "eval": cmd_eval, "train": cmd_train, "label": cmd_label, "train-relevance": cmd_train_relevance,
            "build-models": cmd_build_models}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    from .config import SemClipConfigError  # noqa: F401  (a ValueError)

    try:
        return COMMANDS[argv[0]](argv[1:])
    except (SemClipConfigError, ValueError, FileNotFoundError) as exc:
        print(f"semclip {argv[0]}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
