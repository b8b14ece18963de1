"""Tests for graphs, mixing matrices and their checks (declora.network.topology)."""

from __future__ import annotations

import itertools
import json
import math

import networkx as nx
import numpy as np
import pytest

from declora.errors import DecloraError, TopologyError
from declora.network.topology import (
    KINDS,
    MIXING_RULES,
    Topology,
    build_graph,
    build_topology,
    check_connected,
    check_mixing,
    format_topology,
    gossip_rounds_to,
    load_matrix,
    mixing_matrix,
    spectral_gap,
)

# --------------------------------------------------------------------------- helpers


def _write_edges(path, edges, *, sep=" ", header=None):
    """Write an edge list file and return its path as str."""
    lines = [header] if header else []
    lines += [f"{u}{sep}{v}" for u, v in edges]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _graph_kwargs(kind, n, tmp_path):
    """Arguments for building ``kind`` on n peers (some combinations are impossible)."""
    kwargs = {"p": 0.5, "seed": 1}
    if kind == "regular":
        kwargs["degree"] = {1: 1, 2: 1, 4: 2}.get(n, 3)
    if kind == "edges":
        edges = [(i, i + 1) for i in range(n - 1)] + ([(0, n - 1)] if n > 3 else [])
        kwargs["edge_file"] = _write_edges(tmp_path / f"edges_{n}.txt", edges)
    return kwargs


def _impossible(kind, n):
    """Torus needs a composite n (or a single peer); 3-regular needs an even n."""
    if kind == "torus":
        return n in (2, 3) or (n > 3 and all(n % k for k in range(2, n)))
    return kind == "regular" and n > 2 and n % 2 == 1


def _assert_valid_mixing(W, graph):
    """The properties gossip needs, computed without the module under test."""
    n = graph.number_of_nodes()
    assert W.shape == (n, n)
    assert W.dtype == np.float64
    assert np.all(np.isfinite(W))
    assert np.all(W >= -1e-12)
    np.testing.assert_allclose(W, W.T, atol=1e-12)
    np.testing.assert_allclose(W.sum(axis=0), 1.0, atol=1e-12)
    np.testing.assert_allclose(W.sum(axis=1), 1.0, atol=1e-12)
    adj = nx.to_numpy_array(graph, nodelist=range(n)) != 0
    off_graph = ~adj & ~np.eye(n, dtype=bool)
    assert np.all(W[off_graph] == 0.0)


def _paper_laplacian_w(graph):
    """W = I - 2L / (3 lambda_max), computed directly."""
    n = graph.number_of_nodes()
    adj = nx.to_numpy_array(graph, nodelist=range(n))
    lap = np.diag(adj.sum(axis=1)) - adj
    lam = np.linalg.eigvalsh(lap).max()
    return np.eye(n) - 2 * lap / (3 * lam)


def _disagreement(x):
    return float(np.linalg.norm(x - x.mean(axis=0)))


# --------------------------------------------------------------------------- every kind x rule

SIZES = (1, 2, 5, 8, 9, 12)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", SIZES)
def test_every_kind_and_rule_gives_a_valid_mixing_matrix(kind, n, tmp_path):
    kwargs = _graph_kwargs(kind, n, tmp_path)
    if _impossible(kind, n):
        with pytest.raises(TopologyError, match=f"got {n}|n \\* degree = {3 * n} is odd"):
            build_topology(kind, n, **kwargs)
        return
    graph = build_graph(kind, n, **kwargs)
    assert sorted(graph.nodes) == list(range(n))
    assert nx.is_connected(graph)
    for rule in MIXING_RULES:
        if rule == "uniform" and not nx.is_regular(graph):
            with pytest.raises(TopologyError, match="metropolis"):
                mixing_matrix(graph, rule)
            continue
        W = mixing_matrix(graph, rule)
        if rule == "fedavg":
            _assert_valid_mixing(W, nx.complete_graph(n))
            check_mixing(W)
        else:
            _assert_valid_mixing(W, graph)
            check_mixing(W, graph)
        topo = build_topology(kind, n, rule, **kwargs)
        assert topo.rule == rule and topo.kind == kind and topo.n == n
        np.testing.assert_allclose(topo.mixing, W, atol=1e-12)
        check_mixing(topo.mixing, topo.graph)


def test_single_peer_is_one_node_for_every_kind(tmp_path):
    empty = tmp_path / "none.txt"
    empty.write_text("# no edges at all\n")
    for kind in KINDS:
        topo = build_topology(kind, 1, edge_file=str(empty), degree=2, p=0.1)
        assert topo.n == 1 and topo.edges == []
        np.testing.assert_array_equal(topo.mixing, [[1.0]])
        assert topo.spectral_gap == 1.0


# --------------------------------------------------------------------------- shapes of graphs


@pytest.mark.parametrize("kind", ["ring", "er", "torus", "star", "complete"])
def test_paper_laplacian_rule_matches_independent_formula(kind):
    graph = build_graph(kind, 12, p=0.4, seed=3)
    W = mixing_matrix(graph, "laplacian")
    np.testing.assert_allclose(W, _paper_laplacian_w(graph), atol=1e-12)
    # positive semidefinite with eigenvalues in [1/3, 1]: no oscillating -1 mode
    eig = np.linalg.eigvalsh(W)
    assert eig.min() >= 1 / 3 - 1e-12 and eig.max() <= 1 + 1e-12


def test_ring_degrees_and_two_peer_ring():
    topo = build_topology("ring", 10)
    assert topo.degrees == [2] * 10
    assert topo.neighbours(0) == [1, 9]
    assert topo.edges[0] == (0, 1) and (0, 9) in topo.edges and len(topo.edges) == 10
    assert build_topology("ring", 2).edges == [(0, 1)]


def test_star_has_node_zero_in_the_centre():
    topo = build_topology("star", 6)
    assert topo.degrees == [5, 1, 1, 1, 1, 1]
    assert topo.neighbours(3) == [0]


def test_torus_3x3_has_degree_four_and_wraps_around():
    topo = build_topology("torus", 9)
    assert topo.degrees == [4] * 9
    assert topo.neighbours(0) == [1, 2, 3, 6]
    assert len(topo.edges) == 18


def test_torus_uses_the_most_square_grid():
    graph = build_graph("torus", 12)  # 3 x 4
    expected = nx.convert_node_labels_to_integers(
        nx.grid_2d_graph(3, 4, periodic=True), ordering="sorted"
    )
    assert sorted(graph.edges()) == sorted(tuple(sorted(e)) for e in expected.edges())
    assert sorted(d for _, d in graph.degree()) == [4] * 12


def test_exponential_graph_edges_for_eight_peers():
    graph = build_graph("exponential", 8)
    ring = {(i, (i + 1) % 8) for i in range(8)}
    hop2 = {(i, (i + 2) % 8) for i in range(8)}
    hop4 = {(i, i + 4) for i in range(4)}
    expected = {tuple(sorted(e)) for e in ring | hop2 | hop4}
    assert {tuple(sorted(e)) for e in graph.edges()} == expected
    assert len(expected) == 20
    assert all(d == 5 for _, d in graph.degree())


def test_regular_graph_has_the_requested_degree_and_is_reproducible():
    a = build_graph("regular", 12, degree=3, seed=5)
    b = build_graph("regular", 12, degree=3, seed=5)
    assert all(d == 3 for _, d in a.degree())
    assert nx.is_connected(a)
    assert sorted(a.edges()) == sorted(b.edges())


def test_uniform_rule_on_regular_graph_is_equal_weights():
    W = mixing_matrix(build_graph("ring", 6), "uniform")
    assert W[0, 0] == pytest.approx(1 / 3) and W[0, 1] == pytest.approx(1 / 3)
    assert W[0, 3] == 0.0


def test_metropolis_weights_on_a_star():
    W = mixing_matrix(build_graph("star", 5), "metropolis")
    assert W[0, 1] == pytest.approx(1 / 5)
    assert W[1, 1] == pytest.approx(4 / 5)
    assert W[0, 0] == pytest.approx(1 / 5)
    assert W[1, 2] == 0.0


# --------------------------------------------------------------------------- spectra and gossip


def test_spectral_gap_extremes():
    assert spectral_gap(mixing_matrix(build_graph("complete", 7), "fedavg")) == pytest.approx(1.0)
    assert build_topology("ring", 7, "fedavg").spectral_gap == pytest.approx(1.0)
    assert spectral_gap(np.eye(7)) == 0.0
    assert build_topology("ring", 7, "identity").spectral_gap == 0.0
    assert spectral_gap(np.array([[1.0]])) == 1.0


def test_ring_gap_shrinks_as_the_ring_grows():
    gaps = [build_topology("ring", n).spectral_gap for n in (4, 8, 16, 32, 64)]
    assert all(a > b > 0 for a, b in itertools.pairwise(gaps))


def test_better_connected_graphs_have_larger_gaps():
    ring = build_topology("ring", 16, "metropolis").spectral_gap
    torus = build_topology("torus", 16, "metropolis").spectral_gap
    expo = build_topology("exponential", 16, "metropolis").spectral_gap
    assert ring < torus < expo


@pytest.mark.parametrize("kind", ["ring", "torus", "er", "exponential"])
def test_pure_gossip_converges_to_the_average_at_the_predicted_rate(kind):
    topo = build_topology(kind, 16, "laplacian", p=0.3, seed=2)
    W = topo.mixing
    rho = topo.to_dict()["second_eigenvalue_modulus"]
    assert rho == pytest.approx(1 - topo.spectral_gap)
    x0 = np.random.default_rng(0).normal(size=(16, 4))
    x = x0.copy()
    d0 = _disagreement(x0)
    rounds = gossip_rounds_to(1e-9, topo.spectral_gap)
    assert rounds is not None and rounds > 0
    for t in range(1, rounds + 1):
        x = W @ x
        assert _disagreement(x) <= rho**t * d0 * (1 + 1e-9) + 1e-12
    assert _disagreement(x) <= 1e-9 * d0
    np.testing.assert_allclose(x, np.broadcast_to(x0.mean(axis=0), x.shape), atol=1e-8)
    np.testing.assert_allclose(x.mean(axis=0), x0.mean(axis=0), atol=1e-12)


def test_slowest_eigenvector_shrinks_exactly_at_lambda_2():
    topo = build_topology("ring", 12)
    eig, vecs = np.linalg.eigh(topo.mixing)
    order = np.argsort(-np.abs(eig))
    slow = vecs[:, order[1]]
    assert abs(slow.sum()) < 1e-9  # orthogonal to consensus
    rho = 1 - topo.spectral_gap
    x = slow.copy()
    for t in range(1, 21):
        x = topo.mixing @ x
        assert _disagreement(x) == pytest.approx(rho**t * _disagreement(slow), rel=1e-8)


def test_gossip_rounds_to():
    assert gossip_rounds_to(1e-3, 0.0) is None
    assert gossip_rounds_to(1e-3, 1.0) == 0
    assert gossip_rounds_to(0.5, 0.5) == 1
    assert gossip_rounds_to(1e-3, 0.5) == 10  # 2^-10 < 1e-3 < 2^-9
    assert gossip_rounds_to(1e-2, 0.1) == math.ceil(math.log(1e-2) / math.log(0.9))
    with pytest.raises(TopologyError, match="> 0"):
        gossip_rounds_to(0.0, 0.5)


def test_predicted_rounds_are_enough_in_practice():
    topo = build_topology("ring", 10)
    rounds = gossip_rounds_to(1e-3, topo.spectral_gap)
    x0 = np.random.default_rng(1).normal(size=10)
    x = np.linalg.matrix_power(topo.mixing, rounds) @ x0
    assert _disagreement(x) <= 1e-3 * _disagreement(x0)


# --------------------------------------------------------------------------- Erdős–Rényi


def test_er_is_reproducible_connected_and_seed_dependent():
    graphs = [build_graph("er", 20, p=0.15, seed=s) for s in range(15)]
    assert all(nx.is_connected(g) for g in graphs)
    again = build_graph("er", 20, p=0.15, seed=3)
    assert sorted(again.edges()) == sorted(graphs[3].edges())
    assert len({tuple(sorted(g.edges())) for g in graphs}) == len(graphs)


def test_er_gives_up_with_a_hint_for_a_tiny_p():
    with pytest.raises(TopologyError, match=r"larger topology\.p"):
        build_graph("er", 30, p=0.01, seed=0)


def test_er_needs_a_valid_p():
    with pytest.raises(TopologyError, match=r"needs an edge probability topology\.p"):
        build_graph("er", 5)
    with pytest.raises(TopologyError, match=r"in \(0, 1\]"):
        build_graph("er", 5, p=1.5)


# --------------------------------------------------------------------------- errors


def test_errors_are_declora_errors_with_one_line_messages(tmp_path):
    assert issubclass(TopologyError, DecloraError)
    bad = tmp_path / "bad.txt"
    bad.write_text("0 1\n1 2 3\n")
    attempts = [
        lambda: build_topology("rng", 4),
        lambda: build_topology("ring", 4, "x"),
        lambda: build_graph("torus", 7),
        lambda: build_graph("regular", 5, degree=3),
        lambda: build_graph("edges", 4, edge_file=str(bad)),
        lambda: check_mixing(np.ones((2, 2))),
        lambda: check_connected(nx.empty_graph(4)),
    ]
    for attempt in attempts:
        with pytest.raises(TopologyError) as info:
            attempt()
        assert "\n" not in str(info.value) and len(str(info.value)) > 30


def test_unknown_kind_lists_the_choices():
    with pytest.raises(TopologyError, match=r"topology\.kind 'rng' is unknown") as info:
        build_topology("rng", 4)
    assert "did you mean 'ring'" in str(info.value)
    assert "ring, complete, star, er, torus, exponential, regular, edges" in str(info.value)


def test_unknown_rule_lists_the_choices():
    with pytest.raises(TopologyError, match=r"topology\.mixing 'metro' is unknown") as info:
        build_topology("ring", 4, "metro")
    assert "laplacian, metropolis, uniform, fedavg, identity" in str(info.value)
    with pytest.raises(TopologyError, match="is unknown"):
        mixing_matrix(build_graph("ring", 4), "nope")


@pytest.mark.parametrize("n", [0, -3, 2.5, True])
def test_bad_peer_count(n):
    with pytest.raises(TopologyError, match="integer >= 1"):
        build_graph("ring", n)


def test_disconnected_edge_file_names_the_small_component(tmp_path):
    path = _write_edges(tmp_path / "cut.txt", [(0, 1), (1, 2), (2, 3), (3, 0), (4, 5)])
    with pytest.raises(TopologyError, match="2 components") as info:
        build_topology("edges", 6, edge_file=path)
    assert "[4, 5]" in str(info.value)
    # local-only training needs no links
    topo = build_topology("edges", 6, "identity", edge_file=path)
    np.testing.assert_array_equal(topo.mixing, np.eye(6))
    # server averaging ignores the graph: it is taken as complete
    topo = build_topology("edges", 6, "fedavg", edge_file=path)
    assert len(topo.edges) == 15 and topo.spectral_gap == pytest.approx(1.0)


def test_isolated_peer_counts_as_a_component(tmp_path):
    path = _write_edges(tmp_path / "iso.txt", [(0, 1), (1, 2)])
    with pytest.raises(TopologyError, match=r"2 components.*\[3\]"):
        build_topology("edges", 4, edge_file=path)


def test_check_connected_passes_on_connected_graph():
    check_connected(nx.path_graph(5))
    with pytest.raises(TopologyError, match="3 components"):
        check_connected(nx.empty_graph(3))


def test_uniform_rejects_non_regular_graph():
    with pytest.raises(TopologyError, match=r"needs a regular graph.*'metropolis'"):
        build_topology("star", 5, "uniform")


@pytest.mark.parametrize("n", [2, 3, 5, 7, 13])
def test_torus_rejects_prime_or_small_sizes(n):
    with pytest.raises(TopologyError, match=r"torus.*not prime") as info:
        build_graph("torus", n)
    assert f"got {n}" in str(info.value)


def test_torus_error_suggests_nearby_sizes():
    with pytest.raises(TopologyError, match=r"e\.g\. 6 or 8"):
        build_graph("torus", 7)


def test_regular_rejects_odd_n_times_d_and_bad_degrees():
    with pytest.raises(TopologyError, match="n \\* degree = 15 is odd"):
        build_graph("regular", 5, degree=3)
    with pytest.raises(TopologyError, match="between 1 and n - 1"):
        build_graph("regular", 5, degree=5)
    with pytest.raises(TopologyError, match=r"needs topology\.degree"):
        build_graph("regular", 6)
    with pytest.raises(TopologyError, match="disconnected pairs"):
        build_graph("regular", 6, degree=1)


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ("0 1\n1 2 3\n", "line 2: expected two peer ids"),
        ("0 1\n\n# c\n1 x\n", "line 4: peer ids must be integers"),
        ("0 1\n1 7\n", "line 2: peer 7 is out of range; peers are numbered 0..3"),
        ("0 1\n2 2\n", "line 2: self loop 2-2"),
        ("0 1\n-1 2\n", "peer -1 is out of range"),
        ("0 1\n1.5 2\n", "line 2: peer ids must be integers"),
    ],
)
def test_bad_edge_file_lines_name_the_line(tmp_path, content, pattern):
    path = tmp_path / "bad.txt"
    path.write_text(content)
    with pytest.raises(TopologyError, match=pattern):
        build_graph("edges", 4, edge_file=str(path))


def test_missing_files_are_clear(tmp_path):
    with pytest.raises(TopologyError, match=r"edge file .* does not exist"):
        build_graph("edges", 4, edge_file=str(tmp_path / "nope.txt"))
    with pytest.raises(TopologyError, match=r"matrix file .* does not exist"):
        load_matrix(str(tmp_path / "nope.csv"), 4)
    with pytest.raises(TopologyError, match=r"needs topology\.edge_file"):
        build_graph("edges", 4)


def test_single_peer_edge_file_must_be_empty(tmp_path):
    path = _write_edges(tmp_path / "one.txt", [(0, 1)])
    with pytest.raises(TopologyError, match="out of range"):
        build_graph("edges", 1, edge_file=path)


# --------------------------------------------------------------------------- check_mixing


def _ring4():
    return build_graph("ring", 4)


def test_check_mixing_wrong_size():
    with pytest.raises(TopologyError, match="mixing matrix is 3x4; expected 10x10 for 10 peers"):
        check_mixing(np.zeros((3, 4)), build_graph("ring", 10))
    with pytest.raises(TopologyError, match="must be square"):
        check_mixing(np.zeros((3, 4)))


def test_check_mixing_non_finite():
    W = mixing_matrix(_ring4(), "metropolis")
    W[1, 2] = np.nan
    with pytest.raises(TopologyError, match=r"non-finite entry: W\[1, 2\]"):
        check_mixing(W, _ring4())


def test_check_mixing_negative_weight():
    W = np.array([[1.2, -0.2], [-0.2, 1.2]])
    with pytest.raises(TopologyError, match=r"negative weight W\[0, 1\] = -0.2"):
        check_mixing(W)


def test_check_mixing_not_symmetric():
    W = np.array([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.5, 0.0, 0.5]])  # doubly stochastic
    with pytest.raises(TopologyError, match=r"not symmetric: max \|W - W\^T\| = 0.5 at \(0, 1\)"):
        check_mixing(W)


def test_check_mixing_not_doubly_stochastic():
    W = np.array([[0.5, 0.4], [0.4, 0.5]])
    with pytest.raises(TopologyError, match=r"row 0 sums to 0\.9"):
        check_mixing(W)
    W = np.array([[0.5, 0.5], [0.5, 0.6]])
    with pytest.raises(TopologyError, match=r"row 1 sums to 1\.1"):
        check_mixing(W)


def test_check_mixing_weight_on_a_non_edge():
    W = np.full((4, 4), 0.25)
    with pytest.raises(TopologyError, match="between peers 0 and 2, which are not neighbours"):
        check_mixing(W, _ring4())
    check_mixing(W, nx.complete_graph(4))


def test_check_mixing_tolerance():
    W = mixing_matrix(_ring4(), "laplacian")
    noise = np.zeros_like(W)
    noise[0, 0] = 1e-10
    check_mixing(W + noise, _ring4())
    noise[0, 0] = 1e-4
    with pytest.raises(TopologyError, match=r"row 0 sums to 1\.0001"):
        check_mixing(W + noise, _ring4())
    with pytest.raises(TopologyError, match=r"row 0 sums to 1\.0001"):
        check_mixing(W + noise, _ring4(), atol=1e-5)
    check_mixing(W + noise, _ring4(), atol=1e-3)


# --------------------------------------------------------------------------- files


def test_edge_file_round_trip_with_separators_comments_and_header(tmp_path):
    ref = build_graph("er", 12, p=0.3, seed=4)
    plain = _write_edges(tmp_path / "plain.txt", ref.edges())
    csv = _write_edges(tmp_path / "e.csv", ref.edges(), sep=",", header="source,target")
    spaced = tmp_path / "spaced.txt"
    spaced.write_text(
        "# my graph\n" + "".join(f"  {u} ,\t{v}  # link\n" for u, v in ref.edges()) + "\n"
    )
    for path in (plain, csv, str(spaced)):
        graph = build_graph("edges", 12, edge_file=path)
        assert sorted(graph.edges()) == sorted(ref.edges())
        assert sorted(graph.nodes()) == list(range(12))


def test_edge_file_duplicate_and_reversed_edges_are_one_link(tmp_path):
    path = _write_edges(tmp_path / "dup.txt", [(0, 1), (1, 0), (1, 2), (2, 0), (0, 1)])
    assert build_topology("edges", 3, edge_file=path).edges == [(0, 1), (0, 2), (1, 2)]


@pytest.mark.parametrize("fmt", ["csv", "txt", "json"])
def test_matrix_file_round_trip(tmp_path, fmt):
    topo = build_topology("torus", 9, "metropolis")
    path = tmp_path / f"W.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(topo.to_dict()["mixing"]))
    else:
        np.savetxt(path, topo.mixing, delimiter="," if fmt == "csv" else " ", fmt="%.17g")
    W = load_matrix(str(path), 9)
    np.testing.assert_array_equal(W, topo.mixing)
    # the graph given by the kind is checked against the matrix ...
    custom = build_topology("torus", 9, matrix_file=str(path))
    assert custom.rule == "custom" and custom.edges == topo.edges
    # ... or, for kind 'edges' with no edge file, read from the matrix's nonzeros
    derived = build_topology("edges", 9, matrix_file=str(path))
    assert derived.edges == topo.edges
    assert derived.spectral_gap == pytest.approx(topo.spectral_gap)


def test_matrix_file_is_checked_against_the_graph(tmp_path):
    path = tmp_path / "W.csv"
    np.savetxt(path, np.full((4, 4), 0.25), delimiter=",")
    with pytest.raises(TopologyError, match="not neighbours"):
        build_topology("ring", 4, matrix_file=str(path))
    assert len(build_topology("complete", 4, matrix_file=str(path)).edges) == 6


def test_matrix_file_errors(tmp_path):
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("0.5,0.5\n0.5,0.25,0.25\n")
    with pytest.raises(TopologyError, match="ragged: row 2 \\(line 2\\) has 3 values"):
        load_matrix(str(ragged), 2)
    ragged_json = tmp_path / "ragged.json"
    ragged_json.write_text("[[0.5, 0.5], [1.0]]")
    with pytest.raises(TopologyError, match="ragged: row 2 has 1 values"):
        load_matrix(str(ragged_json), 2)
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("1 0 0\n0 1 0\n0 0 1\n")
    with pytest.raises(TopologyError, match="3x3; expected 4x4 for 4 peers"):
        load_matrix(str(wrong), 4)
    text = tmp_path / "word.txt"
    text.write_text("1 0\n0 one\n")
    with pytest.raises(TopologyError, match="line 2: 'one' is not a number"):
        load_matrix(str(text), 2)
    npy = tmp_path / "W.npy"
    npy.write_text("x")
    with pytest.raises(TopologyError, match=r"use \.csv, \.txt or \.json"):
        load_matrix(str(npy), 2)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{")
    with pytest.raises(TopologyError, match="not valid JSON"):
        load_matrix(str(bad_json), 2)


def test_custom_matrix_from_file_must_be_symmetric(tmp_path):
    path = tmp_path / "asym.csv"
    W = np.array([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.5, 0.0, 0.5]])
    np.savetxt(path, W, delimiter=",")
    with pytest.raises(TopologyError, match="not symmetric"):
        build_topology("edges", 3, matrix_file=str(path))
    with pytest.raises(TopologyError, match="not symmetric"):
        build_topology("complete", 3, matrix_file=str(path))


# --------------------------------------------------------------------------- Topology object


def test_topology_to_dict_is_json_serialisable():
    topo = build_topology("ring", 5, "metropolis")
    data = json.loads(json.dumps(topo.to_dict()))
    assert data["kind"] == "ring" and data["rule"] == "metropolis" and data["peers"] == 5
    assert data["edges"] == [[0, 1], [0, 4], [1, 2], [2, 3], [3, 4]]
    assert data["degrees"] == [2] * 5
    assert data["spectral_gap"] == pytest.approx(1 - data["second_eigenvalue_modulus"])
    np.testing.assert_allclose(np.array(data["mixing"]), topo.mixing)


def test_topology_is_frozen_and_neighbours_checks_range():
    topo = build_topology("ring", 5)
    assert isinstance(topo, Topology)
    with pytest.raises(AttributeError):
        topo.kind = "star"  # type: ignore[misc]
    with pytest.raises(TopologyError, match="peer 7 does not exist"):
        topo.neighbours(7)


def test_format_topology_small_and_large():
    small = format_topology(build_topology("ring", 6), precision=2)
    first = small.splitlines()[0]
    assert first == "topology: ring, 6 peers, rule laplacian, 6 edges"
    assert "degrees: min 2, mean 2.00, max 2" in small
    assert "degree per peer: [2, 2, 2, 2, 2, 2]" in small
    assert "|lambda_2| =" in small and "spectral gap:" in small
    assert "mixing matrix:" in small and "0.67" in small
    large = format_topology(build_topology("ring", 40))
    assert "omitted for 40 peers" in large
    assert "degree per peer" not in large
    assert "gossip never mixes" in format_topology(build_topology("ring", 4, "identity"))
