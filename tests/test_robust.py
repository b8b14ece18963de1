"""Gossip that survives bad peers (issue 16 §2) and peers that must prove membership (§3)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
import yaml

from declora.config.schema import load_config
from declora.errors import ConfigError
from declora.network.attacks import Attack
from declora.network.auth import AuthRefused, authenticate, load_key
from declora.network.robust import (
    FlagCounts,
    RobustGossip,
    RobustRule,
    clip_combine,
    median_combine,
    message_digest,
    robust_combine,
    trimmed_mean_combine,
)
from declora.network.topology import build_topology
from tests.conftest import run_cli, run_in_process, write_tiny_job

# --------------------------------------------------------------------------- the rules


def test_clipping_pulls_a_far_neighbour_to_the_radius_and_leaves_near_ones():
    own = torch.zeros(2)
    received = torch.tensor([[3.0, 4.0], [0.3, 0.4]])  # distances 5 and 0.5
    w = torch.tensor([0.25, 0.25])
    value, clipped = clip_combine(own, received, w, radius=1.0, b=1)
    # 0.25 * (3, 4) / 5 + 0.25 * (0.3, 0.4)
    torch.testing.assert_close(value, torch.tensor([0.225, 0.3]))
    assert clipped.tolist() == [True, False]


def test_adaptive_radius_is_the_distance_of_the_farthest_neighbour_kept():
    own = torch.zeros(1)
    received = torch.tensor([[1.0], [2.0], [100.0]])
    value, clipped = clip_combine(own, received, torch.full((3,), 0.25), radius=None, b=1)
    # radius 2: the 100 is pulled in to 2
    torch.testing.assert_close(value, torch.tensor([0.25 * (1 + 2 + 2)]))
    assert clipped.tolist() == [False, False, True]


def test_trimmed_mean_drops_the_extremes_per_coordinate():
    own = torch.tensor([1.0, 10.0])
    received = torch.tensor([[2.0, -50.0], [3.0, 11.0], [100.0, 12.0], [4.0, 13.0]])
    value, share = trimmed_mean_combine(own, received, b=1)
    # coordinate 0: drop 1 and 100 -> mean(2, 3, 4); coordinate 1: drop -50 and 13 -> mean(10..12)
    torch.testing.assert_close(value, torch.tensor([3.0, 11.0]))
    torch.testing.assert_close(share, torch.tensor([0.5, 0.0, 0.5, 0.5]))


def test_median_odd_and_even_and_the_flags():
    own = torch.tensor([0.0])
    value, share = median_combine(own, torch.tensor([[1.0], [5.0]]))
    torch.testing.assert_close(value, torch.tensor([1.0]))
    torch.testing.assert_close(share, torch.tensor([0.0, 1.0]))
    value, _ = median_combine(own, torch.tensor([[1.0], [5.0], [2.0]]))
    torch.testing.assert_close(value, torch.tensor([1.5]))  # mean of the middle two


def test_robust_combine_treats_all_tensors_as_one_vector():
    rule = RobustRule("clip", radius=1.0)
    own = {"a": torch.zeros(1), "b": torch.zeros(1)}
    received = [{"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}]
    out, flagged, removed = robust_combine(rule, own, received, [1.0])
    torch.testing.assert_close(out["a"], torch.tensor([0.6]))
    torch.testing.assert_close(out["b"], torch.tensor([0.8]))
    assert flagged == [True]
    assert removed == pytest.approx([0.8])  # distance 5 clipped to 1


# --------------------------------------------------------------------------- attacks, simulated

BAD = 3


def _gossip_error(attack: str | None, rule: RobustRule | None, rounds: int = 20) -> float:
    """Ten peers on a 4-regular graph that all move the same way each round (as training
    would); the honest peers' distance to where the honest average should be."""
    W = build_topology("regular", 10, "metropolis", degree=4, seed=0).mixing
    g = torch.Generator().manual_seed(1)
    x = {"m.lora_A": 1 + 0.1 * torch.randn(10, 2, 8, generator=g)}
    x["head"] = 0.1 * torch.randn(10, 3, generator=g)
    ref = {k: v.mean(0) for k, v in x.items()}
    gossip = RobustGossip(W, rule, Attack(attack, [BAD], seed=0) if attack else None)
    honest = [i for i in range(10) if i != BAD]
    for _ in range(rounds):
        x = gossip.mix({k: v + 0.05 for k, v in x.items()})
        ref = {k: v + 0.05 for k, v in ref.items()}
    err = sum(float((x[k][honest] - ref[k]).pow(2).sum()) for k in x) / len(honest)
    return err**0.5


@pytest.mark.parametrize("attack", ["sign-flip", "scaled", "gaussian", "alie", "stale"])
def test_an_attacker_drags_plain_gossip_but_not_a_robust_rule(attack):
    clean = _gossip_error(None, None)
    plain = _gossip_error(attack, None)
    robust = {name: _gossip_error(attack, RobustRule(name)) for name in ("clip", "trimmed-mean")}
    assert clean < 0.01  # plain gossip without an attacker: the honest average
    assert plain > 0.3, plain  # one peer of ten moves the honest ones far off
    for name, err in robust.items():
        assert err < 0.25 and err < plain / 2, (name, err, plain)


def test_attacks_draw_per_peer_seeded_numbers_and_keep_their_state():
    x = {"k": torch.ones(3)}
    a, b = Attack("gaussian", [1, 2], seed=7), Attack("gaussian", [2], seed=7)
    torch.testing.assert_close(a.poison(2, x)["k"], b.poison(2, x)["k"])  # same (seed, peer)
    assert not torch.equal(a.poison(1, x)["k"], a.poison(2, x)["k"])
    assert torch.equal(a.poison(0, x)["k"], x["k"])  # an honest peer sends its values
    saved, c = a.state_dict(), Attack("gaussian", [1, 2], seed=7)
    c.load_state_dict(saved)
    torch.testing.assert_close(a.poison(1, x)["k"], c.poison(1, x)["k"])
    stale = Attack("stale", [0], seed=0)
    stale.poison(0, x)
    assert torch.equal(stale.poison(0, {"k": torch.zeros(3)})["k"], x["k"])


def test_the_simulator_counts_who_each_peer_flagged():
    W = build_topology("regular", 10, "metropolis", degree=4, seed=0).mixing
    gossip = RobustGossip(W, RobustRule("clip"), Attack("scaled", [BAD], seed=0))
    x = {"a": 1 + 0.1 * torch.randn(10, 5)}
    for _ in range(3):
        x = gossip.mix(x)
    flags = gossip.round_metrics()["robust_flags"]
    receivers = [int(i) for i in (W[:, BAD] != 0).nonzero()[0] if i != BAD]
    for r in receivers:
        assert flags[f"{BAD}->{r}"] == 3  # flagged in every exchange by every neighbour


def test_a_neighbour_cut_off_is_left_out_and_takes_its_share_of_the_trimming():
    own = {"a": torch.zeros(2)}
    received = [{"a": torch.tensor(v)} for v in ([1.0, 0.0], [0.0, 2.0], [50.0, 50.0])]
    w = [0.25, 0.25, 0.25]
    # clip, b=1, neighbour 2 cut off: b - 1 = 0 left to clip, so the others mix in full
    out, flagged, removed = robust_combine(
        RobustRule("clip"), own, received, w, [False, False, True]
    )
    torch.testing.assert_close(out["a"], torch.tensor([0.25, 0.5]))
    assert flagged == [False, False, True] and removed == [0.0, 0.0, 1.0]
    # without the cut: neighbour 2 is clipped to the radius 2, most of its pull removed
    _, flagged, removed = robust_combine(RobustRule("clip"), own, received, w)
    assert flagged == [False, False, True]
    assert removed == pytest.approx([0.0, 0.0, 1 - 2 / (50 * 2**0.5)])
    # trimmed mean, b=1 with the extreme one cut off: the plain mean of own and the other two
    out, flagged, _ = robust_combine(
        RobustRule("trimmed-mean"), own, received, w, [False, False, True]
    )
    torch.testing.assert_close(out["a"], torch.tensor([1 / 3, 2 / 3]))
    assert flagged == [False, False, True]
    # every neighbour cut off: the peer keeps its own value
    out, flagged, _ = robust_combine(RobustRule("clip"), own, received, w, [True] * 3)
    assert torch.equal(out["a"], own["a"]) and flagged == [True] * 3


@pytest.mark.parametrize("attack", ["sign-flip", "scaled", "gaussian", "stale"])
def test_exclusion_cuts_off_only_a_neighbour_whose_messages_are_mostly_clipped_away(attack):
    W = build_topology("regular", 10, "metropolis", degree=4, seed=0).mixing
    rule = RobustRule("clip", exclude=0.5, exclude_window=5)
    gossip = RobustGossip(W, rule, Attack(attack, [BAD], seed=0))
    g = torch.Generator().manual_seed(0)
    x = {"a": 1 + 0.1 * torch.randn(10, 50, generator=g)}

    def step(v: torch.Tensor) -> torch.Tensor:  # training: a common drift and each peer's noise
        return v + 0.05 + 0.05 * torch.randn(v.shape, generator=g)

    receivers = [int(i) for i in (W[:, BAD] != 0).nonzero()[0] if i != BAD]
    for _ in range(4):
        x = gossip.mix({"a": step(x["a"])})
    assert gossip.round_metrics()["robust_excluded"] == []  # 4 messages < exclude_window
    for _ in range(6):
        x = gossip.mix({"a": step(x["a"])})
    metrics = gossip.round_metrics()
    excluded, removed = metrics["robust_excluded"], metrics["robust_removed"]
    assert sorted(excluded) == sorted(f"{BAD}->{r}" for r in receivers)  # no honest pair
    assert max(v for p, v in removed.items() if p not in excluded) < 0.2  # honest: clipped less
    # from now on a receiver mixes its honest neighbours in full (the attacker was its b=1)
    # and keeps the attacker's weight
    before = step(x["a"])
    x = gossip.mix({"a": before})
    for i in receivers:
        honest = [j for j in range(10) if j not in (i, BAD) and W[i, j] > 0]
        want = before[i] + sum(W[i, j] * (before[j] - before[i]) for j in honest)
        torch.testing.assert_close(x["a"][i], want.float())
    # the decision is the flag counts': a fresh simulator loaded with them decides alike
    again = RobustGossip(W, rule, Attack(attack, [BAD], seed=0))
    again.load_state_dict(gossip.state_dict())
    assert again.round_metrics() == gossip.round_metrics()


@pytest.mark.parametrize("trim", [1, 2])
def test_a_peer_cuts_off_at_most_b_neighbours(trim):
    """Two attackers around peer 0: with b = 1 it cuts off one (then clips nobody, so no honest
    neighbour follows in a cascade); with b = 2 it cuts off both and no honest one."""
    W = build_topology("regular", 10, "metropolis", degree=4, seed=0).mixing
    bad = [int(j) for j in (W[0] != 0).nonzero()[0] if j != 0][:2]
    rule = RobustRule("clip", trim=trim, exclude=0.5, exclude_window=5)
    gossip = RobustGossip(W, rule, Attack("sign-flip", bad, seed=0))
    g = torch.Generator().manual_seed(1)
    x = {"a": 1 + 0.1 * torch.randn(10, 50, generator=g)}
    for _ in range(30):
        x = gossip.mix({"a": x["a"] + 0.05 + 0.05 * torch.randn(10, 50, generator=g)})
    cut = [p for p in gossip.round_metrics()["robust_excluded"] if p.endswith("->0")]
    assert len(cut) == trim and {int(p.split("->")[0]) for p in cut} <= set(bad)


def test_a_neighbour_that_turns_bad_late_in_a_long_run_is_still_cut_off():
    """The share removed is a moving average over about the last W messages, not the mean of
    the whole run: 200 honest-looking messages do not hide 15 bad ones."""
    rule = RobustRule("clip", exclude=0.5, exclude_window=10)
    flags = FlagCounts(2)
    for _ in range(200):
        flags.add(0, [1], [True], [0.1], window=10)
    assert flags.excluded(rule, 0, [1]) == [False]
    for _ in range(15):
        flags.add(0, [1], [True], [0.9], window=10)
    assert flags.excluded(rule, 0, [1]) == [True]
    assert float(flags.removed[0, 1]) > 0.5 > (200 * 0.1 + 15 * 0.9) / 215  # the run's mean


def _drifting(gossip: RobustGossip, exchanges: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """`exchanges` mixes of 10 peers that train between them (a common drift, own noise)."""
    g = torch.Generator().manual_seed(seed)
    x = {"a": 1 + 0.1 * torch.randn(10, 50, generator=g)}
    for _ in range(exchanges):
        x = gossip.mix({"a": x["a"] + 0.05 + 0.05 * torch.randn(10, 50, generator=g)})
    return x


@pytest.mark.parametrize("name", ["none", "clip", "trimmed-mean", "median"])
def test_a_neighbour_repeating_one_message_is_cut_off_at_the_limit_and_no_honest_one(name):
    W = build_topology("regular", 10, "metropolis", degree=4, seed=0).mixing
    rule = RobustRule(name, stale=3)
    gossip = RobustGossip(W, rule, Attack("stale", [BAD], seed=0))
    receivers = [int(i) for i in (W[:, BAD] != 0).nonzero()[0] if i != BAD]
    _drifting(gossip, 2)  # its first message and one repeat
    assert gossip.round_metrics()["robust_excluded"] == []
    assert float(gossip.flags.repeats.max()) == 1.0
    # a checkpointed simulator decides alike: the third identical message cuts it off
    again = RobustGossip(W, rule, Attack("stale", [BAD], seed=0))
    again.load_state_dict(gossip.state_dict())
    x = {"a": torch.randn(10, 50, generator=torch.Generator().manual_seed(5))}
    out, out_again = gossip.mix(x), again.mix(x)
    torch.testing.assert_close(out["a"], out_again["a"], rtol=0, atol=0)
    metrics = gossip.round_metrics()
    assert sorted(metrics["robust_stale"]) == sorted(f"{BAD}->{r}" for r in receivers)
    assert metrics["robust_excluded"] == metrics["robust_stale"] == again.round_metrics()[
        "robust_stale"]  # fmt: skip
    # cut off: a receiver combines its other neighbours only (with b - 1 = 0 trimmed/clipped)
    for i in receivers:
        honest = [j for j in range(10) if j not in (i, BAD) and W[i, j] > 0]
        if name in ("none", "clip"):  # plain gossip over the others; clip: b = 0 left
            want = x["a"][i] + sum(W[i, j] * (x["a"][j] - x["a"][i]) for j in honest)
        elif name == "trimmed-mean":  # b = 0 left: the plain mean of own and the honest ones
            want = torch.stack([x["a"][i], *(x["a"][j] for j in honest)]).mean(0)
        else:
            want = median_combine(x["a"][i], torch.stack([x["a"][j] for j in honest]))[0]
        torch.testing.assert_close(out["a"][i], want.float())
    # it stays cut off after more exchanges, and no honest pair joins it
    _drifting(gossip, 5, seed=1)
    assert sorted(gossip.round_metrics()["robust_excluded"]) == sorted(metrics["robust_stale"])


@pytest.mark.parametrize("attack", ["sign-flip", "alie"])
def test_the_staleness_check_changes_nothing_while_every_message_is_new(attack):
    """What the study's `clip-exclude-stale` column rests on: where no neighbour repeats a
    message, the check leaves the run bit-identical to the rule without it."""
    W = build_topology("regular", 10, "metropolis", degree=4, seed=0).mixing
    runs = []
    for stale in (None, 2):
        rule = RobustRule("clip", exclude=0.5, exclude_window=5, stale=stale)
        gossip = RobustGossip(W, rule, Attack(attack, [BAD], seed=0))
        runs.append((_drifting(gossip, 12)["a"], gossip.round_metrics()))
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[1][1].pop("robust_stale") == []
    assert runs[0][1] == runs[1][1]


def test_plain_gossip_with_the_staleness_check_is_plain_gossip_while_messages_are_new():
    W = build_topology("regular", 10, "metropolis", degree=4, seed=0).mixing
    plain = _drifting(RobustGossip(W, None, Attack("sign-flip", [BAD], seed=0)), 12)
    checked = RobustGossip(W, RobustRule("none", stale=2), Attack("sign-flip", [BAD], seed=0))
    torch.testing.assert_close(_drifting(checked, 12)["a"], plain["a"], rtol=1e-6, atol=1e-6)
    assert checked.round_metrics()["robust_stale"] == []


def test_a_stuck_neighbour_that_recovers_before_the_limit_is_not_cut_off():
    rule = RobustRule("clip", stale=3)
    flags = FlagCounts(2)
    same, other = message_digest({"a": torch.ones(4)}), message_digest({"a": torch.zeros(4)})
    assert same != message_digest({"a": torch.ones(4).nextafter(torch.tensor(2.0))})  # one ulp
    for message in (same, same, other, same, same, other):  # never 3 in a row
        flags.observe(rule, 0, [1], [message])
        flags.add(0, [1], [False])
    assert flags.excluded(rule, 0, [1]) == [False]
    for _ in range(3):
        flags.observe(rule, 0, [1], [same])
        flags.add(0, [1], [False])
    assert flags.excluded(rule, 0, [1]) == [True]
    flags.observe(rule, 0, [1], [other])  # recovered too late: it stays cut off
    assert flags.excluded(rule, 0, [1]) == [True]


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["faults.byzantine=[12]", "faults.attack=scaled"], "faults.byzantine: [12] are not peers"),
        (["faults.byzantine=[1]"], "needs faults.attack"),
        (["faults.attack=alie"], "needs faults.byzantine"),
        (["comm.robust=clip", "algorithm.name=fedavg"], "needs a gossip algorithm"),
        (["comm.robust=median", "comm.scheme=choco"], "comm.scheme=plain only"),
        (["comm.robust_radius=1.0"], "comm.robust_radius is for comm.robust=clip"),
        (["comm.robust=trim"], "comm.robust"),
        (["comm.robust=median", "comm.robust_exclude=0.9"], "got comm.robust=median"),
        (["comm.robust_exclude=0.9"], "comm.robust_exclude works with comm.robust=clip only"),
        (["comm.robust=clip", "comm.robust_exclude=1.5"], "comm.robust_exclude"),
        (["comm.robust_stale=3", "algorithm.name=fedavg"], "comm.robust_stale needs a gossip"),
        (["comm.robust_stale=3", "comm.scheme=choco"], "comm.robust_stale works with comm.scheme"),
        (["comm.robust_stale=3", "lora.ranks=tiers:4,8"], "no comm.robust_stale"),
        (["comm.robust=clip", "comm.robust_stale=1"], "comm.robust_stale"),
        (
            ["comm.robust=clip", "comm.robust_stale=3", "comm.bits=4"],
            "with comm.rounding=stochastic the same value is encoded differently",
        ),
        (
            [
                "comm.robust=median",
                "comm.robust_stale=3",
                "comm.bits=4",
                "comm.rounding=nearest",
                "comm.error_feedback=true",
            ],
            "with comm.error_feedback=true",
        ),
    ],
)
def test_bad_robustness_settings_are_one_line_each(sets, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, sets)
    assert message in str(info.value)


def test_too_few_neighbours_for_the_trimming_exits_2_before_any_run_directory(tmp_path):
    out = tmp_path / "run"
    res = run_in_process(
        "run", "--quiet", "--out", str(out), "--set", "comm.robust=trimmed-mean",
        "--set", "comm.robust_trim=2",  # a ring gives every peer 2 neighbours, 4 are needed
    )  # fmt: skip
    assert res.returncode == 2, res.stderr[-2000:]
    assert "comm.robust=trimmed-mean with comm.robust_trim=2 needs at least 4" in res.stderr
    assert not out.exists()


def test_missing_or_short_keys_are_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("DECLORA_AUTH_KEY", raising=False)
    assert load_key(None) is None
    with pytest.raises(ConfigError, match="is not a file"):
        load_key(str(tmp_path / "nope"))
    (tmp_path / "short").write_text("abc\n")
    with pytest.raises(ConfigError, match="at least 16"):
        load_key(str(tmp_path / "short"))
    monkeypatch.setenv("DECLORA_AUTH_KEY", "x" * 32)
    assert load_key(None) == b"x" * 32


# --------------------------------------------------------------------------- auth, in-process


def _run_auth(keys: list[bytes | None]) -> list[str | None]:
    """The membership proof between len(keys) threads sharing JSON like an all-gather."""
    world = len(keys)
    slots: list[object] = [None] * world
    barrier = threading.Barrier(world)
    outcome: list[str | None] = [None] * world

    def gather(obj: object, rank: int) -> list[object]:
        barrier.wait()
        slots[rank] = json.loads(json.dumps(obj))  # only JSON travels
        barrier.wait()
        out = list(slots)
        barrier.wait()
        return out

    def peer(rank: int) -> None:
        try:
            authenticate(keys[rank], rank, world, lambda o: gather(o, rank), False)
        except AuthRefused as exc:
            outcome[rank] = str(exc)

    threads = [threading.Thread(target=peer, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return outcome


def test_peers_with_the_secret_are_accepted_and_a_wrong_or_missing_key_refused():
    good, bad = b"s" * 32, b"t" * 32
    assert _run_auth([good] * 4) == [None] * 4
    assert _run_auth([None] * 4) == [None] * 4  # no secret anywhere: open, as before
    wrong = _run_auth([good, good, good, bad])
    assert all("peer(s) [3] could not prove" in m for m in wrong[:3] if m)
    assert wrong[3] is not None and "this peer's shared secret does not match" in wrong[3]
    missing = _run_auth([good, None, good, good])
    assert all(m and "peer(s) [1] hold no shared secret" in m for m in missing[0:1] + missing[2:])
    assert missing[1] is not None and "this peer has none" in missing[1]


# --------------------------------------------------------------------------- real peers

PEERS = 4


@pytest.fixture(scope="module")
def job(tmp_path_factory, tokenizer) -> Path:
    d = tmp_path_factory.mktemp("robustjob")
    write_tiny_job(d, tokenizer, seed=3)
    cfg = {
        "model": {"name": str(d / "model"), "dropout": 0.0},
        "data": {"name": "file", "path": str(d / "data.csv"), "max_length": 16},
        "topology": {"peers": PEERS, "kind": "complete"},
        "train": {"rounds": 3, "local_steps": 2, "batch_size": 4},
        "eval": {"every": 3, "max_examples": 20, "final_max_examples": 20},
        "baselines": [],
    }
    (d / "job.yaml").write_text(yaml.safe_dump(cfg))
    return d


CASES = {
    "gaussian+trimmed-mean": ["faults.attack=gaussian", "comm.robust=trimmed-mean"],
    "alie+clip+q4ef": [
        "faults.attack=alie",
        "comm.robust=clip",
        "comm.bits=4",
        "comm.error_feedback=true",
        # whoever is clipped in the first exchange is cut off from the second on
        "comm.robust_exclude=0.001",
        "comm.robust_exclude_window=1",
    ],
    # a stuck peer, seen by the digest of what arrives (8-bit, nearest: encoded alike each time)
    "stale+plain+stale2+q8": [  # plain gossip with the staleness check only
        "faults.attack=stale",
        "comm.robust_stale=2",
        "comm.bits=8",
        "comm.rounding=nearest",
    ],
}


# the other rule on real peers runs with make test-slow (the transport applies the same per-peer
# function as the simulator; the clipped, compressed case holds it equal in make test)
SLOW_CASES = {"gaussian+trimmed-mean"}


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_CASES else n for n in sorted(CASES)],
)
def test_an_attacker_and_a_robust_rule_on_real_peers_equal_the_simulation(job, tmp_path, name):
    from tests.conftest import gossip_bits
    from tests.test_distributed_algorithms import assert_same_adapters

    sets = ["faults.byzantine=[2]", *CASES[name]]
    args = ["--quiet", "--config", str(job / "job.yaml")]
    for s in sets:
        args += ["--set", s]
    env = {"OMP_NUM_THREADS": "1", "DECLORA_AUTH_KEY": "k" * 32}  # and peers prove the secret
    sim, dist = tmp_path / "sim", tmp_path / "dist"
    res = run_in_process("run", *args, "--out", str(sim), threads=1)  # needs no secret
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_cli("launch", "--peers", str(PEERS), "--", *args, "--out", str(dist), env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_adapters(sim, dist, bits=gossip_bits(CASES[name]))
    last = json.loads((sim / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["robust_flagged_share"] > 0  # a neighbour cut off counts as flagged too
    flagged = {k for k, v in last["robust_flags"].items() if v}
    assert {"2->0", "2->1", "2->3"} <= flagged or name.startswith("alie")
    peer0 = json.loads((dist / "peers" / "peer-0" / "metrics.jsonl").read_text().splitlines()[-1])
    assert peer0["robust_flags"] == {k: v for k, v in last["robust_flags"].items()
                                     if k.endswith("->0")}  # fmt: skip
    assert last["robust_removed"] and peer0["robust_removed"] == {
        k: v for k, v in last["robust_removed"].items() if k.endswith("->0")}  # fmt: skip
    report = (sim / "report.md").read_text()
    # the report shows it where a rule discards part of a message (not plain gossip)
    assert ("Mean share of a neighbour's messages" in report) != ("+plain+" in name)
    if "comm.robust_exclude=0.001" in sets:
        assert len(last["robust_excluded"]) >= PEERS  # every peer cut off someone
        assert peer0["robust_excluded"] == [p for p in last["robust_excluded"] if p.endswith("->0")]
        report = (sim / "report.md").read_text()
        assert "Cut off (`comm.robust_exclude=0.001`" in report
        assert all(f"`{pair}`" in report for pair in last["robust_excluded"])
    if "comm.robust_stale=2" in sets:  # cut off by every receiver at the second exchange
        assert last["robust_stale"] == last["robust_excluded"] == ["2->0", "2->1", "2->3"]
        assert peer0["robust_stale"] == ["2->0"]
        report = (sim / "report.md").read_text()
        assert "Cut off (`comm.robust_stale=2`, sender->receiver): `2->0`" in report
        assert "for repeating one message 2 times in a row: `2->0`" in report


@pytest.mark.slow  # three runs in fresh processes, ~40 s: make test-slow
def test_a_killed_run_with_an_attacker_resumes_with_the_same_flags_and_adapters(
    tokenizer, tmp_path
):
    """The attack's state (stale's first message, ALIE's last exchange) and who was flagged
    how often are checkpointed: a killed run ends exactly where an uninterrupted one does."""
    from tests.conftest import run_adapters, run_job, run_metrics, write_ring_job

    job = write_ring_job(
        tmp_path,
        tokenizer,
        seed=2,
        rounds=6,
        faults={"byzantine": [1], "attack": "stale"},
        comm={"robust": "clip", "robust_stale": 4},  # cut off after the kill, from its counts
    )
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert run_job(job, whole).returncode == 0
    assert run_job(job, killed, env={"DECLORA_KILL_AT": "3"}).returncode == -9
    res = run_cli("run", "--quiet", "--resume", str(killed))
    assert res.returncode == 0, res.stderr[-2000:]
    flags = [m.get("robust_flags") for m in run_metrics(whole)]
    assert any(flags) and flags == [m.get("robust_flags") for m in run_metrics(killed)]
    assert run_metrics(killed) == run_metrics(whole)
    assert [m.get("robust_stale") for m in run_metrics(whole)][-1] == ["1->0", "1->2"]
    a, b = run_adapters(whole), run_adapters(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_exclusion_on_a_graph_it_can_split_is_warned_about(caplog):
    from declora.network.robust import check_graph

    ring = load_config(None, ["comm.robust=clip", "comm.robust_exclude=0.5"])
    with caplog.at_level("WARNING", logger="declora.network"):
        check_graph(ring, [2] * 10)  # every ring peer clips one of its 2 neighbours
    assert "comm.robust_exclude with the adaptive radius on a sparse graph" in caplog.text
    assert "10 of 10 peers (such as [0, 1, 2, 3]) have 2 neighbours, clip 1" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="declora.network"):
        check_graph(ring, [4] * 10)  # a 4-regular peer keeps 3 after cutting one off
        check_graph(load_config(None, ["comm.robust=clip"]), [2] * 10)  # no exclusion
        fixed = ["comm.robust=clip", "comm.robust_exclude=0.5", "comm.robust_radius=1.0"]
        check_graph(load_config(None, fixed), [2] * 10)  # the radius does not follow them
    assert caplog.text == ""
