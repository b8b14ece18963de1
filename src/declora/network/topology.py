"""Communication graphs and gossip mixing matrices for Dec-LoRA.

Each peer averages its LoRA adapter with its neighbours' using a row of a mixing matrix ``W``.
Gossip only reaches consensus on the true average when ``W`` is symmetric, doubly stochastic,
nonnegative, supported on the graph's edges, and the graph is connected, so this module builds
graphs and matrices that satisfy this and checks user-supplied ones with messages a user can act on.
"""

from __future__ import annotations

import difflib
import json
import math
import random
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import networkx as nx
import numpy as np

from declora.errors import TopologyError

KINDS = ("ring", "complete", "star", "er", "torus", "exponential", "regular", "edges")
MIXING_RULES = ("laplacian", "metropolis", "uniform", "fedavg", "identity")

#: Rule name recorded on a :class:`Topology` whose matrix was read from a file.
CUSTOM_RULE = "custom"
#: How many random graphs ``er`` and ``regular`` draw before giving up on a connected one.
MAX_DRAWS = 1000
#: Most peers a topology may have (as `topology.peers` in a config): an n x n matrix of 10,000
#: peers is 800 MB already, and its eigenvalues take minutes.
MAX_PEERS = 10_000
#: Largest number of peers for which :func:`format_topology` prints per-peer details.
MAX_PRINTED_PEERS = 32
#: Eigenvalue moduli this close to 0 or 1 are snapped, so exact cases give exact gaps.
_EIG_SNAP = 1e-12
_SPLIT = re.compile(r"[,\s]+")


# --------------------------------------------------------------------------- name checks


def _unknown(what: str, value: object, choices: tuple[str, ...]) -> TopologyError:
    """Build the 'unknown name' error, with a close match when there is one."""
    hint = ""
    if isinstance(value, str):
        close = difflib.get_close_matches(value, choices, n=1)
        if close:
            hint = f" (did you mean '{close[0]}'?)"
    return TopologyError(
        f"topology.{what} {value!r} is unknown{hint}; choose one of: {', '.join(choices)}"
    )


def _check_kind(kind: object) -> str:
    """Reject graph kinds this module cannot build."""
    if kind not in KINDS:
        raise _unknown("kind", kind, KINDS)
    return str(kind)


def _check_rule(rule: object) -> str:
    """Reject mixing rules this module cannot build."""
    if rule not in MIXING_RULES:
        raise _unknown("mixing", rule, MIXING_RULES)
    return str(rule)


def _check_n(n: object) -> int:
    """Peers are counted, so n must be a positive integer (bool is not a count)."""
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise TopologyError(f"the number of peers must be an integer >= 1; got {n!r}")
    if n > MAX_PEERS:
        raise TopologyError(f"the number of peers must be at most {MAX_PEERS:,}; got {n:,}")
    return int(n)


# --------------------------------------------------------------------------- graphs


def _canonical(graph: nx.Graph, n: int) -> nx.Graph:
    """Copy a graph with nodes 0..n-1 in order and sorted edges, so iteration is reproducible."""
    out = nx.Graph()
    out.add_nodes_from(range(n))
    out.add_edges_from(sorted((min(u, v), max(u, v)) for u, v in graph.edges()))
    return out


def _ring(n: int) -> nx.Graph:
    """Cycle over all peers; for two peers networkx's cycle collapses to one edge."""
    return nx.cycle_graph(n)


def _star(n: int) -> nx.Graph:
    """Hub-and-spoke graph with peer 0 in the centre."""
    return nx.star_graph(n - 1)


def _er(n: int, p: float | None, seed: int) -> nx.Graph:
    """Draw G(n, p) until connected; the first draw uses ``seed`` itself, later ones derive."""
    if p is None:
        raise TopologyError("topology.kind 'er' needs an edge probability topology.p in (0, 1]")
    if isinstance(p, bool) or not isinstance(p, int | float) or not 0 < p <= 1:
        raise TopologyError(f"topology.p must be a probability in (0, 1] for kind 'er'; got {p!r}")
    derive = random.Random(seed)
    draw_seed = seed
    for _ in range(MAX_DRAWS):
        graph = nx.gnp_random_graph(n, float(p), seed=draw_seed)
        if nx.is_connected(graph):
            return graph
        draw_seed = derive.getrandbits(63)
    suggested = min(1.0, 2 * math.log(n) / n)
    raise TopologyError(
        f"no connected Erdős–Rényi graph G(n={n}, p={p}) in {MAX_DRAWS} draws; "
        f"use a larger topology.p (about {suggested:.3g} or more for {n} peers)"
    )


def _composites_near(n: int) -> tuple[int, int]:
    """Nearest composite sizes >= 4 below and above n, to suggest accepted torus sizes."""

    def composite(m: int) -> bool:
        return m >= 4 and any(m % k == 0 for k in range(2, math.isqrt(m) + 1))

    below = next((m for m in range(n - 1, 3, -1) if composite(m)), 4)
    above = next(m for m in range(max(n + 1, 4), 2 * n + 5) if composite(m))
    return below, above


def torus_shape(n: int) -> tuple[int, int]:
    """Most square rows x cols factorisation of n, rows <= cols; needs n composite and >= 4."""
    rows = next((r for r in range(math.isqrt(n), 1, -1) if n % r == 0), 1)
    if n < 4 or rows == 1:
        below, above = _composites_near(n)
        sizes = f"e.g. {above}" if below >= n else f"e.g. {below} or {above}"
        raise TopologyError(
            f"topology.kind 'torus' needs a number of peers that is >= 4 and not prime "
            f"(rows x cols grid), {sizes}; got {n}"
        )
    return rows, n // rows


def _torus(n: int) -> nx.Graph:
    """Periodic 2-D grid, relabelled row-major to 0..n-1."""
    rows, cols = torus_shape(n)
    grid = nx.grid_2d_graph(rows, cols, periodic=True)
    return nx.convert_node_labels_to_integers(grid, ordering="sorted")


def _exponential(n: int) -> nx.Graph:
    """Link i to i + 2^k (mod n) for every power of two below n: log-diameter with few links."""
    hops = [2**k for k in range(n.bit_length()) if 2**k < n]
    graph = nx.empty_graph(n)
    graph.add_edges_from((i, (i + h) % n) for i in range(n) for h in hops)
    return graph


def _check_degree(n: int, degree: int | None) -> int:
    """A d-regular connected graph on n peers exists only for some (n, d); say which."""
    if degree is None:
        raise TopologyError("topology.kind 'regular' needs topology.degree (links per peer)")
    if isinstance(degree, bool) or not isinstance(degree, int | np.integer):
        raise TopologyError(f"topology.degree must be an integer; got {degree!r}")
    d = int(degree)
    if not 1 <= d < n:
        raise TopologyError(f"topology.degree must be between 1 and n - 1 = {n - 1}; got {d}")
    if d == 1 and n > 2:
        raise TopologyError(
            f"topology.degree 1 splits {n} peers into disconnected pairs; use degree >= 2"
        )
    if (n * d) % 2:
        raise TopologyError(
            f"a {d}-regular graph on {n} peers does not exist: n * degree = {n * d} is odd; "
            f"change topology.degree to {d - 1} or {d + 1}, or use an even number of peers"
        )
    return d


def _regular(n: int, degree: int | None, seed: int) -> nx.Graph:
    """Draw random d-regular graphs until connected; first draw uses ``seed`` itself."""
    d = _check_degree(n, degree)
    derive = random.Random(seed)
    draw_seed = seed
    for _ in range(MAX_DRAWS):
        graph = nx.random_regular_graph(d, n, seed=draw_seed)
        if nx.is_connected(graph):
            return graph
        draw_seed = derive.getrandbits(63)
    raise TopologyError(
        f"no connected random {d}-regular graph on {n} peers in {MAX_DRAWS} draws; "
        "use a larger topology.degree"
    )


def _read_text(path: str | Path, what: str) -> str:
    """Read a user file, turning OS errors into one-line messages."""
    file = Path(path)
    if not file.is_file():
        raise TopologyError(f"{what} '{file}' does not exist or is not a file")
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TopologyError(f"cannot read {what} '{file}': {exc}") from exc


def _data_lines(text: str) -> list[tuple[int, list[str]]]:
    """Non-empty lines with '#' comments stripped, split on commas/whitespace, with line numbers."""
    rows = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip().strip(",")
        if line:
            rows.append((number, _SPLIT.split(line)))
    return rows


def _is_number(token: str) -> bool:
    """Whether a token reads as a number (a header cell does not)."""
    try:
        float(token)
    except ValueError:
        return False
    return True


def _parse_edge(path: str | Path, number: int, tokens: list[str], n: int) -> tuple[int, int]:
    """Turn one 'i j' line into an edge, naming the line when it is wrong."""
    where = f"edge file '{path}' line {number}"
    if len(tokens) != 2:
        raise TopologyError(
            f"{where}: expected two peer ids 'i j' (or 'i,j'); got {' '.join(tokens)!r}"
        )
    try:
        u, v = int(tokens[0]), int(tokens[1])
    except ValueError:
        raise TopologyError(
            f"{where}: peer ids must be integers; got {' '.join(tokens)!r}"
        ) from None
    for peer in (u, v):
        if not 0 <= peer < n:
            raise TopologyError(
                f"{where}: peer {peer} is out of range; peers are numbered 0..{n - 1} for n={n}"
            )
    if u == v:
        raise TopologyError(
            f"{where}: self loop {u}-{v} is not allowed; a peer's own weight comes from the rule"
        )
    return u, v


def read_edge_file(path: str | Path, n: int) -> nx.Graph:
    """Read an edge list ('i j' or 'i,j' per line, '#' comments, optional CSV header)."""
    rows = _data_lines(_read_text(path, "edge file"))
    if rows and not any(_is_number(token) for token in rows[0][1]):
        rows = rows[1:]  # a header such as "source,target"
    graph = nx.empty_graph(n)
    graph.add_edges_from(_parse_edge(path, number, tokens, n) for number, tokens in rows)
    return graph


def build_graph(
    kind: str,
    n: int,
    *,
    p: float | None = None,
    seed: int = 0,
    degree: int | None = None,
    edge_file: str | None = None,
) -> nx.Graph:
    """Build the communication graph of ``kind`` on peers 0..n-1.

    One peer (centralised training) gives a single node for every kind; an edge file must then
    list no edges.
    """
    kind = _check_kind(kind)
    n = _check_n(n)
    if kind == "edges":
        if edge_file is None:
            raise TopologyError("topology.kind 'edges' needs topology.edge_file (an edge list)")
        return _canonical(read_edge_file(edge_file, n), n)
    if n == 1:
        return _canonical(nx.empty_graph(1), 1)
    builders = {
        "ring": lambda: _ring(n),
        "complete": lambda: nx.complete_graph(n),
        "star": lambda: _star(n),
        "er": lambda: _er(n, p, seed),
        "torus": lambda: _torus(n),
        "exponential": lambda: _exponential(n),
        "regular": lambda: _regular(n, degree, seed),
    }
    return _canonical(builders[kind](), n)


def check_connected(graph: nx.Graph) -> None:
    """Gossip can only average peers that are linked by some path; name what is cut off."""
    if graph.number_of_nodes() == 0:
        raise TopologyError("the graph has no peers; it needs at least one")
    if nx.is_connected(graph):
        return
    parts = sorted(nx.connected_components(graph), key=lambda c: (len(c), min(c)))
    smallest = sorted(parts[0])
    shown = ", ".join(map(str, smallest[:10])) + (", ..." if len(smallest) > 10 else "")
    raise TopologyError(
        f"the graph is not connected: it has {len(parts)} components and the smallest holds "
        f"peer(s) [{shown}], which can never reach the others; add edges between components "
        "or use rule 'identity' for local-only training"
    )


# --------------------------------------------------------------------------- mixing matrices


def _peer_count(graph: nx.Graph) -> int:
    """Graphs here are indexed by peer id, so the nodes must be exactly 0..n-1."""
    n = graph.number_of_nodes()
    if sorted(graph.nodes) != list(range(n)):
        raise TopologyError(f"the graph's nodes must be the peers 0..{n - 1}; got other labels")
    return n


def _adjacency(graph: nx.Graph) -> np.ndarray:
    """0/1 adjacency matrix in peer order, ignoring any self loops."""
    n = _peer_count(graph)
    adj = nx.to_numpy_array(graph, nodelist=range(n), weight=None, dtype=np.float64)
    np.fill_diagonal(adj, 0.0)
    return (adj != 0).astype(np.float64)


def _laplacian_rule(graph: nx.Graph) -> np.ndarray:
    """Dec-LoRA paper: W = I - 2L / (3 lambda_max(L)), positive semidefinite and mixing."""
    n = _peer_count(graph)
    lap = nx.laplacian_matrix(graph, nodelist=range(n), weight=None).toarray().astype(np.float64)
    lam_max = float(np.linalg.eigvalsh(lap)[-1]) if n > 1 else 0.0
    if lam_max <= 0.0:  # no edges at all: nothing to mix
        return np.eye(n)
    return np.eye(n) - 2.0 * lap / (3.0 * lam_max)


def _metropolis_rule(graph: nx.Graph) -> np.ndarray:
    """Metropolis-Hastings weights: doubly stochastic on any graph, using local degrees only."""
    adj = _adjacency(graph)
    deg = adj.sum(axis=1)
    off = adj / (1.0 + np.maximum.outer(deg, deg))
    return off + np.diag(1.0 - off.sum(axis=1))


def _uniform_rule(graph: nx.Graph) -> np.ndarray:
    """Equal weight to self and each neighbour; doubly stochastic only on regular graphs."""
    adj = _adjacency(graph)
    deg = adj.sum(axis=1)
    if deg.size and deg.min() != deg.max():
        raise TopologyError(
            "rule 'uniform' needs a regular graph (every peer with the same degree); this graph's "
            f"degrees range from {int(deg.min())} to {int(deg.max())}; use rule 'metropolis', "
            "which works on any graph"
        )
    d = float(deg[0]) if deg.size else 0.0
    return (adj + np.eye(len(deg))) / (d + 1.0)


def mixing_matrix(graph: nx.Graph, rule: str) -> np.ndarray:
    """Build the float64 [n, n] gossip matrix of ``rule`` for ``graph``."""
    rule = _check_rule(rule)
    n = _peer_count(graph)
    if rule == "fedavg":
        return np.full((n, n), 1.0 / n)
    if rule == "identity":
        return np.eye(n)
    builders = {
        "laplacian": _laplacian_rule,
        "metropolis": _metropolis_rule,
        "uniform": _uniform_rule,
    }
    return builders[rule](graph)


def _check_shape(W: np.ndarray, n: int | None) -> None:
    """A mixing matrix needs one row and one column per peer."""
    shape = "x".join(map(str, W.shape)) if W.ndim == 2 else f"{W.ndim}-D with shape {W.shape}"
    if n is not None and W.shape != (n, n):
        raise TopologyError(f"mixing matrix is {shape}; expected {n}x{n} for {n} peers")
    if W.ndim != 2 or W.shape[0] != W.shape[1] or W.shape[0] == 0:
        raise TopologyError(
            f"mixing matrix is {shape}; it must be square with one row and column per peer"
        )


def _rows_from_json(path: str | Path, text: str) -> list[list[object]]:
    """Parse a JSON matrix file: a list of rows, each a list of numbers."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TopologyError(f"matrix file '{path}' is not valid JSON: {exc}") from exc
    if not isinstance(data, list) or not all(isinstance(row, list) for row in data):
        raise TopologyError(
            f"matrix file '{path}' must hold a JSON list of rows, e.g. [[0.5, 0.5], [0.5, 0.5]]"
        )
    return data


def _to_float(path: str | Path, where: str, value: object) -> float:
    """Read one matrix entry, naming where a non-number sits."""
    if isinstance(value, bool):
        value = repr(value)
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TopologyError(f"matrix file '{path}' {where}: {value!r} is not a number") from None


def load_matrix(path: str, n: int) -> np.ndarray:
    """Read a custom mixing matrix from .csv/.txt (comma or whitespace separated) or .json."""
    n = _check_n(n)
    suffix = Path(path).suffix.lower()
    if suffix not in (".csv", ".txt", ".json"):
        raise TopologyError(
            f"matrix file '{path}' has extension {suffix or '(none)'!r}; use .csv, .txt or .json"
        )
    text = _read_text(path, "matrix file")
    if suffix == ".json":
        raw = _rows_from_json(path, text)
        rows = [
            [_to_float(path, f"row {r + 1}", value) for value in row] for r, row in enumerate(raw)
        ]
        lines = [f"row {r + 1}" for r in range(len(rows))]
    else:
        numbered = _data_lines(text)
        rows = [
            [_to_float(path, f"line {number}", token) for token in tokens]
            for number, tokens in numbered
        ]
        lines = [f"row {r + 1} (line {number})" for r, (number, _) in enumerate(numbered)]
    if not rows:
        raise TopologyError(f"matrix file '{path}' holds no rows; expected {n}x{n} numbers")
    for where, row in zip(lines, rows, strict=True):
        if len(row) != len(rows[0]):
            raise TopologyError(
                f"matrix file '{path}' is ragged: {where} has {len(row)} values "
                f"but row 1 has {len(rows[0])}"
            )
    W = np.array(rows, dtype=np.float64)
    _check_shape(W, n)
    return W


def _entry(i: int, j: int, value: float) -> str:
    """Name one matrix entry for an error message."""
    return f"W[{i}, {j}] = {value:.6g}"


def check_mixing(W: np.ndarray, graph: nx.Graph | None = None, *, atol: float = 1e-8) -> None:
    """Raise TopologyError unless gossip with W provably converges to the average on ``graph``."""
    try:
        W = np.asarray(W, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TopologyError(f"mixing matrix is not a numeric array: {exc}") from None
    _check_shape(W, None if graph is None else _peer_count(graph))
    bad = np.argwhere(~np.isfinite(W))
    if bad.size:
        i, j = bad[0]
        raise TopologyError(f"mixing matrix has a non-finite entry: {_entry(i, j, W[i, j])}")
    bad = np.argwhere(np.less(W, -atol))
    if bad.size:
        i, j = bad[0]
        raise TopologyError(
            f"mixing matrix has a negative weight {_entry(i, j, W[i, j])}; weights must be >= 0"
        )
    asym = np.abs(W - W.T)
    i, j = np.unravel_index(int(np.argmax(asym)), asym.shape)
    if asym[i, j] > atol:
        raise TopologyError(
            f"mixing matrix is not symmetric: max |W - W^T| = {asym[i, j]:.3g} at ({i}, {j}) "
            f"(W[{i}, {j}] = {W[i, j]:.6g}, W[{j}, {i}] = {W[j, i]:.6g})"
        )
    for axis, name in ((1, "row"), (0, "column")):
        sums = W.sum(axis=axis)
        worst = int(np.argmax(np.abs(sums - 1.0)))
        if abs(sums[worst] - 1.0) > atol:
            raise TopologyError(
                f"mixing matrix is not doubly stochastic: {name} {worst} sums to "
                f"{sums[worst]:.6g}; every row and column must sum to 1"
            )
    if graph is not None:
        linked = _adjacency(graph) > 0
        np.fill_diagonal(linked, True)
        bad = np.argwhere(np.greater(W, atol) & ~linked)
        if bad.size:
            i, j = bad[0]
            raise TopologyError(
                f"mixing matrix gives weight {W[i, j]:.6g} between peers {i} and {j}, "
                "which are not neighbours in the graph; weights are only allowed on edges"
            )


def graph_from_matrix(W: np.ndarray) -> nx.Graph:
    """The communication graph a matrix implies: an edge wherever W_ij or W_ji is nonzero."""
    n = W.shape[0]
    support = np.triu((W != 0) | (W.T != 0), k=1)
    graph = nx.empty_graph(n)
    graph.add_edges_from((int(i), int(j)) for i, j in np.argwhere(support))
    return graph


# --------------------------------------------------------------------------- spectra


def _moduli(W: np.ndarray) -> np.ndarray:
    """Eigenvalue moduli, largest first; eigvalsh when W is symmetric (faster, exact reals)."""
    W = np.asarray(W, dtype=np.float64)
    eig = np.linalg.eigvalsh(W) if np.allclose(W, W.T) else np.linalg.eigvals(W)
    mods = np.sort(np.abs(eig))[::-1]
    mods[mods < _EIG_SNAP] = 0.0
    mods[np.abs(mods - 1.0) < _EIG_SNAP] = 1.0
    return mods


def second_eigenvalue_modulus(W: np.ndarray) -> float:
    """|lambda_2|: the factor by which gossip shrinks the disagreement per round (0 for n=1)."""
    mods = _moduli(W)
    return float(mods[1]) if mods.size > 1 else 0.0


def spectral_gap(W: np.ndarray) -> float:
    """1 - |lambda_2|: larger means faster consensus; 0 means gossip never mixes (n=1 -> 1)."""
    if np.asarray(W).shape[0] == 1:
        return 1.0
    return float(min(1.0, max(0.0, 1.0 - second_eigenvalue_modulus(W))))


def gossip_rounds_to(eps: float, gap: float) -> int | None:
    """Rounds for the disagreement to shrink by ``eps``; None if it never does (gap 0)."""
    if math.isnan(eps) or eps <= 0:
        raise TopologyError(f"the target shrink factor must be > 0; got {eps}")
    if gap <= 0:
        return None
    if gap >= 1 or eps >= 1:
        return 0
    return max(0, math.ceil(math.log(eps) / math.log(1.0 - gap) - 1e-9))


# --------------------------------------------------------------------------- topology


@dataclass(frozen=True, eq=False)
class Topology:
    """A checked graph with its mixing matrix; peers are the nodes 0..n-1."""

    graph: nx.Graph
    mixing: np.ndarray
    kind: str
    rule: str

    @property
    def n(self) -> int:
        """Number of peers."""
        return self.graph.number_of_nodes()

    @property
    def degrees(self) -> list[int]:
        """Number of neighbours of each peer, in peer order."""
        return [int(self.graph.degree(i)) for i in range(self.n)]

    @cached_property
    def second_eigenvalue_modulus(self) -> float:
        """|lambda_2| of the mixing matrix: the per-round contraction of disagreement."""
        return second_eigenvalue_modulus(self.mixing)

    @cached_property
    def spectral_gap(self) -> float:
        """1 - |lambda_2| of the mixing matrix."""
        return spectral_gap(self.mixing)

    @property
    def edges(self) -> list[tuple[int, int]]:
        """Undirected links as sorted (i, j) pairs with i < j."""
        return sorted((min(u, v), max(u, v)) for u, v in self.graph.edges())

    def neighbours(self, i: int) -> list[int]:
        """Peers that peer i exchanges adapters with, sorted."""
        if not 0 <= i < self.n:
            raise TopologyError(f"peer {i} does not exist; peers are 0..{self.n - 1}")
        return sorted(int(j) for j in self.graph.neighbors(i))

    def to_dict(self) -> dict[str, object]:
        """JSON-serialisable summary (for logs and `declora topology --json`)."""
        return {
            "kind": self.kind,
            "rule": self.rule,
            "peers": self.n,
            "edges": [[i, j] for i, j in self.edges],
            "degrees": self.degrees,
            "spectral_gap": float(self.spectral_gap),
            "second_eigenvalue_modulus": float(self.second_eigenvalue_modulus),
            "mixing": np.asarray(self.mixing, dtype=np.float64).tolist(),
        }


def _custom_topology(
    graph: nx.Graph | None, n: int, matrix_file: str
) -> tuple[nx.Graph, np.ndarray]:
    """Load a user matrix; its nonzeros define the graph when no graph was built."""
    W = load_matrix(matrix_file, n)
    if graph is None:
        check_mixing(W)  # symmetric etc. first, so the graph taken from W is meaningful
        graph = _canonical(graph_from_matrix(W), n)
    check_connected(graph)
    return graph, W


def build_topology(
    kind: str,
    n: int,
    rule: str = "laplacian",
    *,
    p: float | None = None,
    seed: int = 0,
    degree: int | None = None,
    edge_file: str | None = None,
    matrix_file: str | None = None,
) -> Topology:
    """Build and check a graph and its mixing matrix.

    ``identity`` (local-only training) accepts a disconnected graph; ``fedavg`` (server averaging)
    replaces the graph with the complete one, since every peer then hears every other. With
    ``matrix_file`` the matrix is read from the file and the topology's rule is ``"custom"``.
    """
    kind = _check_kind(kind)
    rule = _check_rule(rule)
    n = _check_n(n)
    from_matrix = matrix_file is not None and kind == "edges" and edge_file is None
    graph = (
        None
        if from_matrix
        else build_graph(kind, n, p=p, seed=seed, degree=degree, edge_file=edge_file)
    )
    if matrix_file is not None:
        graph, W = _custom_topology(graph, n, matrix_file)
        rule = CUSTOM_RULE
    elif rule == "fedavg":
        graph = _canonical(nx.complete_graph(n), n)
        W = mixing_matrix(graph, rule)
    else:
        assert graph is not None
        if rule != "identity":
            check_connected(graph)
        W = mixing_matrix(graph, rule)
    check_mixing(W, graph)
    topology = Topology(graph=graph, mixing=W, kind=kind, rule=rule)
    if rule != "identity" and topology.n > 1 and topology.spectral_gap <= 0.0:
        raise TopologyError(
            f"mixing matrix has spectral gap 0 (|lambda_2| = "
            f"{topology.second_eigenvalue_modulus:.6g}): gossip with it never reaches the "
            "average, e.g. [[0, 1], [1, 0]] only swaps the peers' values back and forth; give "
            "every peer a positive weight on itself (W_ii > 0), or use rule 'identity' for "
            "local-only training"
        )
    return topology


def format_topology(t: Topology, *, precision: int = 3) -> str:
    """Human-readable report for `declora topology`."""
    deg = t.degrees
    lines = [
        f"topology: {t.kind}, {t.n} peer{'s' if t.n != 1 else ''}, rule {t.rule}, "
        f"{len(t.edges)} edge{'s' if len(t.edges) != 1 else ''}",
        f"degrees: min {min(deg)}, mean {np.mean(deg):.2f}, max {max(deg)}",
    ]
    if t.n <= MAX_PRINTED_PEERS:
        lines.append(f"degree per peer: {deg}")
    rounds = gossip_rounds_to(1e-3, t.spectral_gap)
    lines.append(
        f"spectral gap: {t.spectral_gap:.{precision}f} "
        f"(|lambda_2| = {t.second_eigenvalue_modulus:.{precision}f}); "
        + (
            "gossip never mixes (gap 0)"
            if rounds is None
            else f"about {rounds} gossip round(s) shrink disagreement 1000x"
        )
    )
    if t.n <= MAX_PRINTED_PEERS:
        matrix = np.array2string(
            np.asarray(t.mixing), precision=precision, suppress_small=True, max_line_width=10_000
        )
        lines.append("mixing matrix:")
        lines.append(matrix)
    else:
        lines.append(
            f"mixing matrix: omitted for {t.n} peers (printed only up to {MAX_PRINTED_PEERS})"
        )
    return "\n".join(lines)
