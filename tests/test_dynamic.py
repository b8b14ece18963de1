"""Time-varying mixing matrices and peer availability: always doubly stochastic, reproducible."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest

from declora.errors import ConfigError, TopologyError
from declora.network.schedules import (
    DYNAMIC_KINDS,
    Availability,
    ErdosRenyiEachRound,
    active_at,
    check_dynamic_mixing,
    make_schedule,
    restrict_to_live,
)
from declora.network.topology import build_topology, mixing_matrix

ROUNDS = range(1, 41)


def _schedule(kind: str, n: int = 10, seed: int = 0, q: float = 0.0, rule: str = "metropolis"):
    base = build_topology("ring", n, rule) if kind == "static" else None
    return make_schedule(kind, n, seed, p=0.4, offline_prob=q, base=base, mixing_rule=rule)


@pytest.mark.parametrize("kind", DYNAMIC_KINDS)
@pytest.mark.parametrize("q", [0.0, 0.3])
def test_every_round_is_doubly_stochastic_on_the_live_peers(kind, q):
    sched = _schedule(kind, q=q)
    offline_seen = 0
    for t in ROUNDS:
        W, live = sched.matrix(t), sched.live(t)
        check_dynamic_mixing(W, live)
        assert (W >= 0).all()
        np.testing.assert_allclose(W.sum(axis=0), 1.0, atol=1e-12)
        np.testing.assert_allclose(W.sum(axis=1), 1.0, atol=1e-12)
        if sched.symmetric:
            np.testing.assert_array_equal(W, W.T)
        off = ~live
        offline_seen += int(off.sum())
        assert (np.diag(W)[off] == 1.0).all()
        # no weight between an offline peer and anyone else, either way
        cross = W[np.ix_(off, np.ones(len(live), bool))].copy()
        cross[:, off] -= np.eye(int(off.sum()))
        assert not cross.any() and not W[np.ix_(live, off)].any()
    assert (offline_seen > 0) == (q > 0)


@pytest.mark.parametrize("rule", ["laplacian", "metropolis", "fedavg", "identity"])
def test_static_rebuilds_its_rule_on_the_live_subgraph(rule):
    n = 8
    base = build_topology("torus", n, rule)
    sched = make_schedule("static", n, seed=3, offline_prob=0.3, base=base)
    for t in ROUNDS:
        live = sched.live(t)
        W = sched.matrix(t)
        check_dynamic_mixing(W, live)
        if live.all():
            np.testing.assert_array_equal(W, base.mixing)
            continue
        ids = np.flatnonzero(live)
        if rule in ("laplacian", "metropolis") and len(ids):
            pos = {int(i): a for a, i in enumerate(ids)}
            sub = nx.empty_graph(len(ids))
            sub.add_edges_from(
                (pos[u], pos[v]) for u, v in base.graph.edges() if live[u] and live[v]
            )
            np.testing.assert_allclose(W[np.ix_(ids, ids)], mixing_matrix(sub, rule), atol=1e-12)
        if rule == "fedavg" and len(ids):
            np.testing.assert_allclose(W[np.ix_(ids, ids)], 1.0 / len(ids))


def test_custom_matrix_gives_offline_weight_to_the_diagonal():
    W = build_topology("complete", 5, "metropolis").mixing
    live = np.array([True, False, True, True, False])
    R = restrict_to_live(W, live)
    check_dynamic_mixing(R, live)
    np.testing.assert_array_equal(R, R.T)
    assert R[0, 2] == W[0, 2] and R[0, 0] == pytest.approx(W[0, 0] + W[0, 1] + W[0, 4])


def test_schedules_are_deterministic_for_a_seed():
    for kind in DYNAMIC_KINDS:
        a = _schedule(kind, seed=7, q=0.2)
        b = _schedule(kind, seed=7, q=0.2)
        c = _schedule(kind, seed=8, q=0.2)
        for t in (1, 2, 9, 40):
            np.testing.assert_array_equal(a.matrix(t), b.matrix(t))
            np.testing.assert_array_equal(a.live(t), b.live(t))
            np.testing.assert_array_equal(a.local_steps(t, 5), b.local_steps(t, 5))
        # asking for rounds in another order gives the same matrices
        np.testing.assert_array_equal(b.matrix(2), a.matrix(2))
        assert any(not np.array_equal(a.live(t), c.live(t)) for t in ROUNDS)


def test_matrix_is_read_only():
    W = _schedule("random-pairs").matrix(1)
    with pytest.raises(ValueError):
        W[0, 0] = 2.0


@pytest.mark.parametrize("n", [2, 4, 8, 16, 32])
def test_one_peer_exponential_averages_exactly_in_log2_n_rounds(n):
    sched = make_schedule("one-peer-exponential", n)
    tau = max(1, int(np.log2(n)))
    for start in (1, 2, 5):
        prod = np.eye(n)
        for t in range(start, start + tau):
            prod = sched.matrix(t) @ prod
        np.testing.assert_array_equal(prod, np.full((n, n), 1.0 / n))


def test_one_peer_exponential_is_one_message_per_peer_and_not_symmetric():
    n = 8
    sched = make_schedule("one-peer-exponential", n)
    assert [sched.hop(t) for t in range(1, 8)] == [1, 2, 4, 1, 2, 4, 1]
    W = sched.matrix(1)
    assert not np.array_equal(W, W.T)
    assert sched.messages(1).tolist() == [1] * n
    assert sched.receives_from(1, 0) == [1] and sched.sends_to(1, 0) == [7]
    assert sched.receives_from(2, 3) == [5] and sched.sends_to(2, 3) == [1]


def test_one_peer_exponential_over_live_peers():
    sched = make_schedule("one-peer-exponential", 8, seed=1, offline_prob=0.4)
    for t in ROUNDS:
        live = sched.live(t)
        W = sched.matrix(t)
        check_dynamic_mixing(W, live)
        if live.sum() >= 2:
            assert sched.messages(t)[live].tolist() == [1] * int(live.sum())


@pytest.mark.parametrize("n", [2, 6, 10])
def test_random_pairs_with_p1_gives_every_peer_one_partner(n):
    sched = make_schedule("random-pairs", n, seed=2, p=1.0)
    partners_seen = set()
    for t in ROUNDS:
        W = sched.matrix(t)
        off = W - np.diag(np.diag(W))
        assert ((off > 0).sum(axis=1) == 1).all()
        assert set(off[off > 0].tolist()) == {0.5}
        np.testing.assert_array_equal(np.diag(W), 0.5)
        partners_seen.add(tuple(sorted(sched.pairs(t))))
    assert len(partners_seen) > 1 or n == 2  # the matching changes from round to round


def test_random_pairs_odd_and_partial():
    sched = make_schedule("random-pairs", 7, seed=0, p=1.0)
    for t in ROUNDS:
        assert len(sched.pairs(t)) == 3
    lazy = make_schedule("random-pairs", 10, seed=0, p=0.5)
    active = [len(lazy.pairs(t)) for t in range(1, 201)]
    assert len(set(active)) > 2
    assert np.mean(active) == pytest.approx(2.5, abs=0.3)


def test_er_each_round_draws_different_graphs():
    sched = make_schedule("er-each-round", 12, seed=4, p=0.3)
    assert isinstance(sched, ErdosRenyiEachRound)
    edges = [frozenset(sched.drawn_graph(t).edges()) for t in range(1, 11)]
    assert len(set(edges)) == 10
    density = np.mean([len(e) for e in edges]) / (12 * 11 / 2)
    assert density == pytest.approx(0.3, abs=0.08)
    assert frozenset(sched.graph(1).edges()) == edges[0]  # every drawn edge is used


def test_availability_streams_are_independent():
    """Turning on dropouts does not change which graphs are drawn."""
    plain = make_schedule("er-each-round", 12, seed=4, p=0.3)
    dropping = make_schedule("er-each-round", 12, seed=4, p=0.3, offline_prob=0.5)
    for t in (1, 5):
        assert set(plain.drawn_graph(t).edges()) == set(dropping.drawn_graph(t).edges())
        live = dropping.live(t)
        used = set(dropping.graph(t).edges())
        assert used == {(i, j) for i, j in plain.graph(t).edges() if live[i] and live[j]}


def test_local_steps_and_stragglers():
    avail = Availability(50, seed=5, offline_prob=0.2, straggler_prob=0.5)
    slow = total = 0
    for t in ROUNDS:
        steps, live = avail.local_steps(t, 6), avail.live(t)
        assert (steps[~live] == 0).all()
        assert ((steps[live] >= 1) & (steps[live] <= 6)).all()
        slow += int((steps[live] < 6).sum())
        total += int(live.sum())
    assert slow / total == pytest.approx(0.5, abs=0.06)
    assert Availability(4).local_steps(1, 3).tolist() == [3, 3, 3, 3]
    assert Availability(4, straggler_prob=1.0).local_steps(1, 1).tolist() == [1, 1, 1, 1]
    steps = np.array([3, 0, 1, 2])
    assert [active_at(steps, k).tolist() for k in range(3)] == [
        [True, False, True, True],
        [True, False, False, True],
        [True, False, False, False],
    ]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(kind="er-each-round", p=0.0), TopologyError, r"topology\.p must be .* \(0, 1\]"),
        (dict(kind="er-each-round", p=1.5), TopologyError, r"topology\.p"),
        (dict(kind="er-each-round"), TopologyError, r"needs an edge probability topology\.p"),
        (dict(kind="random-pairs", p=-0.1), TopologyError, r"topology\.p"),
        (dict(kind="random-pairs", offline_prob=1.0), TopologyError, r"topology\.offline_prob"),
        (dict(kind="random-pairs", offline_prob=-0.1), TopologyError, r"offline_prob"),
        (dict(kind="random-pairs", straggler_prob=1.5), ConfigError, r"train\.straggler_prob"),
        (dict(kind="random-pair"), TopologyError, r"topology\.dynamic .*'random-pairs'"),
        (dict(kind="static"), TopologyError, r"needs a base topology"),
        (
            dict(kind="er-each-round", p=0.5, mixing_rule="uniform"),
            TopologyError,
            r"topology\.mixing 'uniform'",
        ),
    ],
)
def test_invalid_settings_name_the_config_key(kwargs, error, message):
    kind = kwargs.pop("kind")
    with pytest.raises(error, match=message):
        make_schedule(kind, 6, 0, **kwargs)


def test_uniform_rule_cannot_survive_dropouts():
    base = build_topology("ring", 6, "uniform")
    make_schedule("static", 6, base=base)  # fine without dropouts
    with pytest.raises(TopologyError, match=r"uniform.*offline_prob"):
        make_schedule("static", 6, base=base, offline_prob=0.1)


def test_bad_rounds_and_steps():
    sched = _schedule("random-pairs")
    with pytest.raises(ValueError, match="numbered from 1"):
        sched.matrix(0)
    with pytest.raises(ConfigError, match=r"train\.local_steps"):
        sched.local_steps(1, 0)
