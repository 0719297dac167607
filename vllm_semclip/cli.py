"""The ``semclip`` command: one argparse subcommand per task, each importing its room lazily.

The plugin needs no command (vLLM loads it by its entry point); this is its friendly front.
``serve`` turns SemClip's flags into vLLM's (vLLM has no plugin flags); the other subcommands
reach evaluation, distant supervision, the tiny-model factory and the serving benchmark. It is
the one module that may import every room of the package.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from typing import Any

from vllm_semclip.crops import RELEVANCE_FITS, RELEVANCE_NORMS  # light: numpy and PIL
from vllm_semclip.supervision.train_relevance import RELEVANCE_LOSSES, RELEVANCE_TARGETS  # light: torch lazily

SELECTION_FLAGS = ("topk", "grids", "overlap", "bridges", "method", "relevance_model", "relevance_pretrained",
                   "relevance_precision", "relevance_fit", "relevance_norm", "seed")


def _add_selection_flags(p: argparse.ArgumentParser, *, server: bool) -> None:
    p.add_argument("--topk", type=int, help="crops kept next to the overview (0-8; default 1)")
    p.add_argument("--grids", help="grid sizes of the candidates, e.g. 2,3 (the default)")
    p.add_argument("--overlap", type=float, help="widen each cell by this fraction on each side (0-0.5)")
    p.add_argument("--bridges", action=argparse.BooleanOptionalAction, default=None,
                   help="add a candidate on each crossing of two grids' lines that no cell covers (default: on; "
                        "4 for grids 2,3)")
    p.add_argument("--method", choices=("relevance", "random", "overview", "all"),
                   help="how crops are chosen (method 'given' takes boxes: set it per request)")
    p.add_argument("--relevance-model", help="psi: an open_clip model name or a local-dir checkpoint directory")
    p.add_argument("--relevance-pretrained", help="open_clip pretrained tag or checkpoint path (e.g. openai)")
    p.add_argument("--relevance-precision",
                   help="psi's precision, open_clip's: fp32 (default), bf16, fp16, pure_bf16, pure_fp16")
    p.add_argument("--relevance-fit", choices=RELEVANCE_FITS,
                   help="how psi sees a non-square candidate: windows (default: the best of the squares covering "
                        "it), pad (to a square, as the VLM's tiles), center (the centre square)")
    p.add_argument("--relevance-norm", choices=RELEVANCE_NORMS,
                   help="how psi's scores are compared across grids: grid (default: standardised among each "
                        "grid's cells), none (raw)")
    p.add_argument("--relevance-device", dest="device", help="where psi runs (cpu, cuda, ...)")
    p.add_argument("--seed", type=int, help="seed of the random method")
    if server:
        p.add_argument("--max-topk", type=int, help="the most crops a request may ask for (memory is profiled for it)")
        p.add_argument("--max-candidates", type=int,
                       help="the most candidates per image a request's grids may make for psi to score "
                            "(default: as many as the server's grids make)")
        p.add_argument("--selection-stage", choices=("engine", "processor"),  # config.SELECTION_STAGES
                       help="where psi scores the candidates: engine (default: in the model's encoder step, "
                            "batched across requests) or processor (per request, in the front end)")
        p.add_argument("--log-selections", action="store_true", default=None,
                       help="log one INFO line per image: id, method, boxes, scores, ms, the question's hash")
        p.add_argument("--log-questions", action="store_true", default=None,
                       help="with --log-selections, log the question itself instead of its hash")


def _selection_overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = (*SELECTION_FLAGS, "device", "max_topk", "max_candidates", "log_selections", "log_questions",
             "selection_stage")
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def _config(overrides: dict[str, Any]):
    from vllm_semclip.config import SemClipConfig

    return SemClipConfig().replace(overrides, source="command line")


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag}: whole numbers separated by commas, got {text!r}") from None


# ---- handlers: each imports its room when it runs ---------------------------------------

def cmd_serve(args: argparse.Namespace, vllm_args: list[str]) -> int:
    from vllm_semclip.config import SemClipConfig
    from vllm_semclip.relevance import check_server_psi
    from vllm_semclip.server import metrics_env, runtime_env, serve_command

    model = args.model or args.model_flag
    overrides = _selection_overrides(args)
    _config(overrides)  # the flags alone first: a bad value is named before anything is built
    if model is None:  # the bundled tiny LLaVA; its config.json names its psi
        from vllm_semclip.tiny.build import ensure_default_models

        model = str(ensure_default_models()[0])
    # then the server's config as the processor will build it (the model directory's own
    # semclip_config, these flags over it) and its psi, so start-up fails here in one line
    config = SemClipConfig.from_hf_config(None, model if os.path.isdir(model) else None)
    config = config.replace(overrides, source="command line")
    check_server_psi(config)
    cmd = serve_command(model, overrides, host=args.host, port=args.port, vllm_args=vllm_args)
    print("semclip serve:", " ".join(cmd[1:]), file=sys.stderr, flush=True)
    os.execve(sys.executable, cmd, metrics_env(config, runtime_env()))
    return 0  # not reached


def cmd_select(args: argparse.Namespace) -> int:
    from vllm_semclip.images import load_image
    from vllm_semclip.selection import select_crops

    overrides = _selection_overrides(args)
    if "relevance_model" not in overrides:  # the bundled psi
        from vllm_semclip.tiny.build import ensure_default_models

        overrides["relevance_model"] = str(ensure_default_models()[1])
    config = _config(overrides)
    image = load_image(args.image)
    selection = select_crops(image, args.question, config)
    if args.out:
        from vllm_semclip.eval.overlay import draw_selection

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


def cmd_demo(args: argparse.Namespace, rest: list[str]) -> int:
    from vllm_semclip.eval.demo import main as demo_main

    return demo_main(rest)


def cmd_bench_serve(args: argparse.Namespace, rest: list[str]) -> int:
    from vllm_semclip.bench.serve import main as bench_main

    return bench_main(rest)


def cmd_psi_cost(args: argparse.Namespace) -> int:
    from vllm_semclip.cost import LLAVA_1_5_7B, psi_cost_table

    try:
        width, height = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size: WIDTHxHEIGHT, got {args.size!r}") from None
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    rows = psi_cost_table(**({"models": models} if models else {}), width=width, height=height, topk=args.topk)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"FLOPs per request, {width}x{height} image, default candidates, k={args.topk}; "
          f"{LLAVA_1_5_7B.name} prefill of {1 + args.topk} tiles ({rows[0]['vlm_tokens']} tokens): "
          f"{rows[0]['vlm_prefill_gflops'] / 1000:.1f} TFLOP")
    print(f"{'psi':<18}{'px':>5}{'windows':>9}{'psi GFLOP':>11}{'share of prefill':>18}")
    for r in rows:
        print(f"{r['psi']:<18}{r['input_px']:>5}{r['windows']:>9}{r['psi_gflops']:>11.0f}"
              f"{100 * r['psi_share_of_prefill']:>17.1f}%")
    return 0


def cmd_bench_data(args: argparse.Namespace) -> int:
    from vllm_semclip.eval.benchdata import CATEGORIES, write_bench

    if args.n < 1:
        raise ValueError("--n must be at least 1")
    records = write_bench(args.out, args.n, args.seed, split=args.split)
    counts = {c: sum(r.category == c for r in records) for c in CATEGORIES}
    print(f"wrote {len(records)} {args.split} questions to {args.out}: {counts}; JSONL: {args.out}/records.jsonl")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from vllm_semclip.eval.harness import EVAL_METHODS, TABLE_HEADER, format_row, run

    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    unknown = [m for m in methods if m not in EVAL_METHODS]
    if unknown:
        raise ValueError(f"--method: {', '.join(unknown)} not one of {', '.join(EVAL_METHODS)}")
    docs = run(args.data, methods, args.out, model=args.model, topk=_ints(args.topk, "--topk"),
               protocol=args.protocol, grids=_ints(args.grids, "--grids"), bridges=args.bridges,
               overlap=args.overlap, relevance_norm=args.relevance_norm, relevance_model=args.relevance_model,
               clip_model=args.clip_model, limit=args.limit)
    print(TABLE_HEADER)
    for doc in docs:
        print(format_row(doc))
    return 0


TRAIN_FIELDS = ("model", "steps", "seed", "threads", "init", "curriculum", "lr", "position_weight",
                "position_card_weight", "label_weight", "label_tiles", "empty_tiles", "lock_image",
                "lock_image_unlocked_groups", "question_weight", "side_fraction", "spatial_fraction", "binding_weight",
                "position_binding_weight", "word_binding_weight", "attribute_word_binding_weight", "tower_lr", "turns",
                "text_steps", "side_steps", "ground_spatial_fraction", "align_ground_fraction", "align_projector_only",
                "render", "checkpoint_every")
SPEC_FIELDS = ("text_hidden_size", "text_layers", "text_heads", "text_intermediate_size", "text_rope_theta")


def cmd_train(args: argparse.Namespace) -> int:
    overrides = {k: getattr(args, k) for k in TRAIN_FIELDS if getattr(args, k, None) is not None}
    if args.what == "clip":
        from vllm_semclip.tiny.train_clip import ClipTrainConfig, train_clip

        report = train_clip(ClipTrainConfig(**overrides), args.out)
    else:
        from vllm_semclip.tiny.build import TinyLlavaSpec
        from vllm_semclip.tiny.bundled import DEFAULT_TOWER_DIR
        from vllm_semclip.tiny.train_vlm import VlmTrainConfig, train_vlm

        sizes = {k: getattr(args, k) for k in SPEC_FIELDS if getattr(args, k) is not None}
        report = train_vlm(VlmTrainConfig(**overrides), args.relevance_dir or str(DEFAULT_TOWER_DIR), args.out,
                           spec=TinyLlavaSpec(**sizes))
    print(json.dumps({k: v for k, v in report.items() if k not in ("config", "spec")}, indent=2))
    print(f"written to {args.out} (report: {args.out}/train_report.json)")
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    from vllm_semclip.supervision.label import LabelConfig, run_labelling

    model = args.model
    if model is None:
        from vllm_semclip.tiny.build import ensure_default_models

        model = str(ensure_default_models()[0])
    config = LabelConfig(data=args.data, model=model, out=args.out, grids=tuple(_ints(args.grids, "--grids")),
                         shard_size=args.shard_size, actors=args.actors, address=args.address,
                         cpus_per_actor=args.cpus_per_actor, limit=args.limit)
    print(json.dumps(run_labelling(config), indent=1))
    return 0


def cmd_train_relevance(args: argparse.Namespace) -> int:
    from vllm_semclip.supervision.train_relevance import RelevanceTrainConfig, train_relevance
    from vllm_semclip.tiny.bundled import DEFAULT_TRAINED_RELEVANCE_DIR

    fields = {"init": args.init, "init_pretrained": args.init_pretrained, "epochs": args.epochs,
              "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "threads": args.threads,
              "fit": args.fit, "norm": args.norm, "loss": args.loss, "rank_scale": args.rank_scale,
              "target": args.target, "lock_image_unlocked_groups": args.lock_image_unlocked_groups}
    config = RelevanceTrainConfig(labels=args.labels, lock_image=not args.unlock_image, keep_best=not args.keep_last,
                                  **{k: v for k, v in fields.items() if v is not None})
    out = args.out or str(DEFAULT_TRAINED_RELEVANCE_DIR)
    report = train_relevance(config, out)
    print(json.dumps({k: report[k] for k in ("train_questions", "val_questions", "train_seconds", "zero_shot",
                                             "best_epoch", "kept_start")}, indent=1))
    print(f"written to {out} (report: {out}/train_report.json)")
    return 0


def cmd_build_models(args: argparse.Namespace) -> int:
    from vllm_semclip.tiny.build import ensure_default_models

    llava, psi = ensure_default_models(force=args.force)
    print(f"tiny LLaVA: {llava}\npsi (open_clip local-dir): {psi}")
    return 0


# ---- the parser ------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="semclip", description="SemClip for vLLM: question-aware crop selection for LLaVA-family models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="print the traceback when a command fails")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("serve", help="vLLM's OpenAI-compatible server with SemClip on",
                       description="Start vLLM's OpenAI-compatible server with SemClip on. Without MODEL it serves the "
                                   "bundled tiny LLaVA. Flags it does not know are passed on to vLLM.")
    p.add_argument("model", nargs="?", help="LLaVA checkpoint directory or name (default: the bundled tiny LLaVA)")
    p.add_argument("--model", dest="model_flag", help="the same as MODEL")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    _add_selection_flags(p, server=True)
    p.set_defaults(handler=cmd_serve, passes_rest=True)

    p = sub.add_parser("select", help="show which crops SemClip picks for one image and question",
                       description="Run the processor's own selection on one image and print the chosen boxes.")
    p.add_argument("image")
    p.add_argument("question")
    _add_selection_flags(p, server=False)
    p.add_argument("--json", action="store_true", help="print the selection as JSON")
    p.add_argument("--out", help="write the image with the score heatmap and chosen boxes here (needs matplotlib)")
    p.set_defaults(handler=cmd_select)

    p = sub.add_parser("demo", add_help=False, help="serve the bundled model and show SemClip answering",
                       description="Serve the bundled model on 127.0.0.1, ask about benchmark scenes, print answers.")
    p.set_defaults(handler=cmd_demo, passes_rest=True)

    p = sub.add_parser("psi-cost", help="FLOPs per request of open_clip psi choices next to a LLaVA-1.5-7B prefill",
                       description="Count psi's FLOPs per request (open_clip's configs, random weights, nothing "
                                   "downloaded) for the default candidates, next to LLaVA-1.5-7B's prefill.")
    p.add_argument("--models", help="open_clip model names, comma-separated (default: a user's usual choices)")
    p.add_argument("--size", default="2000x1500", help="image size WIDTHxHEIGHT (default 2000x1500)")
    p.add_argument("--topk", type=int, default=1, help="crops beside the overview (default 1)")
    p.add_argument("--json", action="store_true", help="one JSON list instead of the table")
    p.set_defaults(handler=cmd_psi_cost)

    p = sub.add_parser("bench-data", help="write a V*-style benchmark (V* Bench's layout)",
                       description="Write a V*-style benchmark: small shapes on large photos, V* Bench's layout.")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=191, help="questions (default 191, V* Bench's count)")
    p.add_argument("--split", choices=("legacy", "train", "val", "shifted"), default="legacy",
                   help="legacy (default: the first generator, as the bundled models were trained on), train / "
                        "val (the randomised distribution), shifted (only its held-out parts: measure, never tune)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=cmd_bench_data)

    p = sub.add_parser("bench", help="serving benchmarks (bench serve)")
    bench = p.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    b = bench.add_parser("serve", add_help=False, help="serving throughput and latency of each configuration",
                         description="Throughput and latency of overview, semclip, given, all and hf side by side.")
    b.set_defaults(handler=cmd_bench_serve, passes_rest=True)

    p = sub.add_parser("eval", help="accuracy on V*-layout data through vLLM",
                       description="Accuracy, crop hit rate and visual tokens per method through vLLM with SemClip.")
    p.add_argument("--data", required=True, help="V*-layout directory or records.jsonl")
    p.add_argument("--model", help="LLaVA checkpoint (default: the bundled tiny LLaVA)")
    p.add_argument("--method", required=True,
                   help="one of overview, random, all, clip, trained, oracle, or several separated by commas")
    p.add_argument("--topk", default="1",
                   help="crops for random, clip and trained (default 1); several separated by commas for a sweep "
                        "(METHOD-kK.json each, joined in the plot)")
    p.add_argument("--protocol", choices=("likelihood", "generate"), default="likelihood")
    p.add_argument("--grids", default="2,3", help="candidate grids (default 2,3)")
    p.add_argument("--bridges", action=argparse.BooleanOptionalAction, default=True,
                   help="bridge candidates on the grids' line crossings (default on; --no-bridges: the cells only)")
    p.add_argument("--overlap", type=float,
                   help="widen each candidate cell by this fraction of its size on every side, 0-0.5 "
                        "(default: the model's semclip_config, else 0)")
    p.add_argument("--relevance-norm", choices=RELEVANCE_NORMS,
                   help="how clip and trained rank psi's scores across grids (default: the model's semclip_config, "
                        "else grid)")
    p.add_argument("--relevance-model", help="psi of method trained: local-dir or open_clip name "
                                             "(default: the bundled trained psi)")
    p.add_argument("--clip-model", help="psi of method clip: open_clip name or local-dir "
                                        "(default: the psi the model's config names)")
    p.add_argument("--limit", type=int, help="only the first N questions")
    p.add_argument("--out", required=True, help="results .json (one method) or a directory (several)")
    p.set_defaults(handler=cmd_eval)

    p = sub.add_parser("label", help="label candidate crops with the VLM (distant supervision, on Ray)",
                       description="The VLM scores overview + each candidate crop per question, on Ray actors that "
                                   "each hold one vLLM engine; resumable JSONL shards.")
    p.add_argument("--data", required=True, help="V*-layout directory or records.jsonl (a training split)")
    p.add_argument("--model", help="LLaVA checkpoint (default: the bundled tiny LLaVA)")
    p.add_argument("--out", required=True, help="directory of label shards (a rerun resumes it)")
    p.add_argument("--address", help="an existing Ray cluster (default: start a local Ray)")
    p.add_argument("--actors", type=int, default=1, help="Ray actors, one vLLM engine each (default 1)")
    p.add_argument("--cpus-per-actor", type=int, help="CPUs each actor reserves (default: shared equally)")
    p.add_argument("--shard-size", type=int, default=16, help="questions per shard (default 16)")
    p.add_argument("--grids", default="2,3", help="candidate grids (default 2,3)")
    p.add_argument("--limit", type=int, help="only the first N questions")
    p.set_defaults(handler=cmd_label)

    p = sub.add_parser("train-relevance", help="fine-tune psi on the VLM's crop labels",
                       description="Fine-tune psi on the labels of `semclip label` (each question's most helpful "
                                   "crop is its positive).")
    p.add_argument("--labels", required=True, help="directory of label shards from `semclip label`")
    p.add_argument("--init", help="psi to start from: local-dir or open_clip name (default: the bundled zero-shot psi)")
    p.add_argument("--init-pretrained", help="open_clip pretrained tag or file for a named --init (e.g. openai)")
    p.add_argument("--out", help="where the trained psi goes (default: the bundled trained psi's directory)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--unlock-image", action="store_true", help="also train the image tower (default: locked)")
    p.add_argument("--lock-image-unlocked-groups", type=int,
                   help="train the locked image tower's last groups too, open_clip's (1: the projection; 2: also the "
                        "last block and ln_post); the frozen blocks run once a crop view")
    p.add_argument("--fit", choices=RELEVANCE_FITS,
                   help="how psi sees a non-square crop, as it will be served (default windows)")
    p.add_argument("--norm", choices=RELEVANCE_NORMS,
                   help="how validation ranks the candidates, as they will be served (default grid)")
    p.add_argument("--loss", choices=RELEVANCE_LOSSES,
                   help="rank: each question's own candidates ranked as served (default); contrastive: "
                        "text-to-crop InfoNCE over every crop of the batch")
    p.add_argument("--rank-scale", type=float, help="temperature of the rank loss's standardised scores (default 8)")
    p.add_argument("--target", choices=RELEVANCE_TARGETS,
                   help="a question's positives: gain, the VLM's most helpful crop (distant supervision, default); "
                        "hit, every crop holding the labelled boxes (data with boxes, as the generated splits)")
    p.add_argument("--keep-last", action="store_true",
                   help="save the last epoch (default: the epoch with the best validation gain, or hit rate with "
                        "--target hit; maybe the start)")
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int)
    p.set_defaults(handler=cmd_train_relevance)

    p = sub.add_parser("train", help="train the tiny demo models (train clip, train vlm)")
    train = p.add_subparsers(dest="what", metavar="MODEL", required=True)
    for what, text in (("clip", "train the tiny CLIP: the LLaVA's tower and, at 336 px, psi"),
                       ("vlm", "build the tiny LLaVA on the tiny CLIP's tower and train projector + language model")):
        t = train.add_parser(what, help=text, description=text)
        # a new model goes to out/ unless the package's directory is asked for
        t.add_argument("--out", default="out/psi" if what == "clip" else "out/vlm")
        t.add_argument("--steps", type=int)
        t.add_argument("--seed", type=int)
        t.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
        t.add_argument("--lr", type=float, help="peak learning rate of the warm-up/cosine schedule")
        t.add_argument("--render", choices=("legacy", "train"),
                       help="training material: legacy (default: the first generator) or train (the randomised "
                            "distribution's training split; held-out questions from its val split)")
        t.add_argument("--checkpoint-every", type=int,
                       help="steps between resumable checkpoints in --out (default 100; 0: none; the LLaVA's: in its "
                            "image stage). Run the same command again to go on from the last one")
        t.set_defaults(handler=cmd_train)
        if what == "clip":
            c = t
            c.add_argument("--model", help="open_clip config to train (default SemClip-ViT-T-16, 224 px; "
                           "SemClip-ViT-T-16-336 with --init resizes a 224-px psi's position grid)")
            c.add_argument("--init", help="continue from this psi checkpoint directory")
            c.add_argument("--curriculum", type=float, help="fraction of steps over which cards shrink (default 0.2)")
            c.add_argument("--position-weight", type=float,
                           help="weight of the patch-position loss at the LLaVA's feature layer (default 0: off)")
            c.add_argument("--position-card-weight", type=float,
                           help="weight of the same loss over the patches under a card only (default 0: off)")
            c.add_argument("--label-weight", type=float,
                           help="weight of the patch-label loss: the shape and colour of the card under each patch "
                                "token at the LLaVA's feature layer (default 0: off)")
            c.add_argument("--label-tiles", type=int,
                           help="extra tiles per step with 1-3 cards, for the patch losses only (default 0)")
            c.add_argument("--empty-tiles", type=int,
                           help="photo tiles without a card per step, a negative for every caption (default 0)")
            c.add_argument("--question-weight", type=float,
                           help="weight of the shape-question loss: each shape's question against every tile of a "
                                "caption block, every tile of that shape a positive (default 0: off)")
            c.add_argument("--lock-image", action="store_true", default=None,
                           help="freeze the image tower (open_clip's LiT lock) but its last --lock-image-unlocked-groups")
            c.add_argument("--lock-image-unlocked-groups", type=int,
                           help="image-tower groups left trainable under --lock-image (2: the last block, ln_post and "
                                "the projection, which the LLaVA's feature layer never sees)")
        else:
            v = t
            v.add_argument("--relevance-dir", help="trained tiny CLIP whose ViT is the tower (default: the bundled one)")
            v.add_argument("--side-fraction", type=float,
                           help="share of single-tile samples asking a card's side of the image")
            v.add_argument("--spatial-fraction", type=float,
                           help="share of left/right questions among multi-card samples (default 0.45)")
            v.add_argument("--text-hidden-size", type=int, help="language model width (default 160)")
            v.add_argument("--text-layers", type=int, help="language model depth (default 4)")
            v.add_argument("--text-heads", type=int, help="attention heads, each at least 32 wide (default 5)")
            v.add_argument("--text-intermediate-size", type=int, help="MLP width (default 432)")
            v.add_argument("--text-rope-theta", type=float, help="RoPE base of the language model (default 10000)")
            v.add_argument("--binding-weight", type=float,
                           help="weight of the attention-binding loss: one head, at the position predicting the "
                                "colour, is steered to the asked-for card's tokens (default 0: off)")
            v.add_argument("--position-binding-weight", type=float,
                           help="the same loss on left/right questions: heads 0 and 1, at the position predicting "
                                "left/right, steered to the two cards' tokens (default 0: off)")
            v.add_argument("--word-binding-weight", type=float,
                           help="left/right questions: heads 0 and 1 of the first layer, at the same position, steered "
                                "to the question's words naming the two cards (default 0: off)")
            v.add_argument("--attribute-word-binding-weight", type=float,
                           help="colour questions: head 0 of the first layer, at the position predicting the colour, "
                                "steered to the question's shape word (with --binding-weight: the pair of steerings "
                                "of the left/right question; default 0: off)")
            v.add_argument("--tower-lr", type=float,
                           help="train the tower too after alignment, at this learning rate (default 0: frozen)")
            v.add_argument("--turns", type=int,
                           help="questions per multi-card tile, as one multi-turn conversation: every card's colour "
                                "and left/right of card pairs (default 1)")
            v.add_argument("--text-steps", type=int,
                           help="text-only steps first: questions over cards written as words, the language "
                                "model's pretraining (default 0)")
            v.add_argument("--side-steps", type=int,
                           help="a grounding stage first: this many steps of side-of-the-image questions alone "
                                "(default 0)")
            v.add_argument("--ground-spatial-fraction", type=float,
                           help="share of grounding-stage samples asking the two-card left/right question instead "
                                "of a card's side of the image (default 0)")
            v.add_argument("--align-ground-fraction", type=float,
                           help="share of alignment samples drawn as grounding-stage samples, so the skill is kept "
                                "(default 0)")
            v.add_argument("--init", help="continue from this saved LLaVA's projector and language model (the tower is "
                                           "--relevance-dir's)")
            v.add_argument("--align-projector-only", action="store_true", default=None,
                           help="alignment trains the projector alone, the language model frozen (LLaVA-1.5's stage 1)")

    p = sub.add_parser("build-models", help="build random stand-ins where the bundled models are missing")
    p.add_argument("--force", action="store_true", help="rebuild even if present")
    p.set_defaults(handler=cmd_build_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if rest and not getattr(args, "passes_rest", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    name = args.command if args.command != "bench" else "bench serve"
    try:
        return args.handler(args, rest) if getattr(args, "passes_rest", False) else args.handler(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one clear line; the traceback with -v
        if args.verbose:
            traceback.print_exc()
        print(f"semclip {name}: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, (ValueError, FileNotFoundError)) else 1


if __name__ == "__main__":
    sys.exit(main())
