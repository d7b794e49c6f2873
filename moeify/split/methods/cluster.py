"""Balanced grouping of neurons into equal-size experts: scikit-learn on the CPU, torch on a GPU.

On the CPU `balanced_kmeans` runs scikit-learn's k-means and a sequential greedy capacity-constrained
assignment (every quality figure in docs/quality.md was measured with it). On a GPU it runs the torch
version described below; bench/cluster_ab.py compares the two on SmolLM2.

Plain k-means gives clusters of any size; experts must be equal. We run k-means (k-means++ seeding,
Lloyd iterations) for the centroids, then alternate a capacity-constrained assignment with centroid
updates. The assignment is greedy by distance, done in parallel rounds: every unassigned neuron
proposes to its nearest cluster that still has room, and each cluster accepts its closest proposers
up to its remaining capacity. A round is a few tensor operations over the [neurons, clusters] distance
matrix (no Python loop over pairs, no O(n^3) Hungarian assignment), so a 14336-neuron layer into 64 or
128 experts takes a fraction of a second on a CPU and milliseconds on a GPU (bench/split_bench.py
--cluster). Features are randomly projected first so the cost does not grow with the hidden size.

Everything runs on the device of the features (a numpy array means the CPU); labels come back as a
numpy array because callers index neuron lists with them.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def _as_tensor(features: np.ndarray | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    t = features if isinstance(features, torch.Tensor) else torch.from_numpy(np.asarray(features))
    return t.to(device=device or t.device, dtype=torch.float32)


def reduce_features(features: np.ndarray | torch.Tensor, dims: int = 128, seed: int = 0
                    ) -> np.ndarray | torch.Tensor:
    """Gaussian random projection to `dims` columns when features are wider (Johnson-Lindenstrauss).

    Distances, which is all k-means looks at, survive up to a few percent; a randomized PCA gave the
    same groups on SmolLM2 but took seconds per layer instead of milliseconds. Returns the input's kind
    (a tensor stays on its device).
    """
    x = _as_tensor(features)
    if x.shape[1] > dims:
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x @ projection_matrix(x.shape[1], dims, seed, device=x.device)
    return x if isinstance(features, torch.Tensor) else x.cpu().numpy()


def projection_matrix(in_dim: int, dims: int, seed: int = 0, device: torch.device | str | None = None
                      ) -> torch.Tensor:
    """The same seeded projection on every device (drawn on the CPU, then moved)."""
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(in_dim, dims, generator=g) / dims**0.5
    return proj if device is None else proj.to(device)


def sq_distances(x: torch.Tensor, centroids: torch.Tensor, x_sq: torch.Tensor | None = None) -> torch.Tensor:
    """[n, k] squared Euclidean distances (float32, never below 0); `x_sq` may pass |x|^2 ([n, 1]) once."""
    x_sq = (x * x).sum(1, keepdim=True) if x_sq is None else x_sq
    d = torch.addmm(x_sq + (centroids * centroids).sum(1)[None, :], x, centroids.T, alpha=-2)
    return d.clamp_min_(0)


def balanced_assign(distances: np.ndarray | torch.Tensor, capacity: int) -> np.ndarray | torch.Tensor:
    """Assign each row (neuron) to a column (cluster), at most `capacity` per cluster, greedily by distance.

    Parallel rounds of proposals (see the module docstring); returns the input's kind.
    """
    d = _as_tensor(distances)
    n, k = d.shape
    if capacity * k < n:
        raise ValueError(f"{k} clusters of {capacity} cannot hold {n} items")
    device = d.device
    labels = torch.full((n,), -1, dtype=torch.long, device=device)
    room = torch.full((k,), capacity, dtype=torch.long, device=device)
    pending = torch.arange(n, device=device)
    positions = torch.arange(n, device=device)
    while pending.numel():
        sub = d[pending]
        sub = sub.masked_fill((room == 0)[None, :], math.inf)
        best, choice = sub.min(dim=1)
        # Proposers grouped by cluster, closest first; each cluster keeps as many as it has room for.
        order = torch.argsort(best, stable=True)
        order = order[torch.argsort(choice[order], stable=True)]
        c_sorted = choice[order]
        first = torch.searchsorted(c_sorted, c_sorted)  # index of each cluster's first proposer
        rank = positions[: len(order)] - first
        accepted = order[rank < room[c_sorted]]
        labels[pending[accepted]] = choice[accepted]
        room -= torch.bincount(choice[accepted], minlength=k)
        keep = torch.ones(len(pending), dtype=torch.bool, device=device)
        keep[accepted] = False
        pending = pending[keep]
    return labels if isinstance(distances, torch.Tensor) else labels.cpu().numpy()


def kmeans(x: torch.Tensor, k: int, seed: int = 0, max_iter: int = 50, tol: float = 1e-4) -> torch.Tensor:
    """[k, dims] centroids: greedy k-means++ seeding, then Lloyd iterations (what scikit-learn's KMeans does).

    Stops when the squared centroid shift falls under `tol` x the mean feature variance; a cluster that
    empties keeps its previous centroid.
    """
    n = x.shape[0]
    g = torch.Generator().manual_seed(seed)
    trials = 2 + int(math.log(k))
    x_sq = (x * x).sum(1, keepdim=True)
    sq_norms = x_sq[:, 0]
    first = int(torch.randint(n, (1,), generator=g))
    centroids = [x[first]]
    closest = sq_distances(x, x[first:first + 1], x_sq)[:, 0]
    for _ in range(1, k):
        weights = closest.double().cpu()
        if not float(weights.sum()) > 0:
            weights = torch.ones(n, dtype=torch.float64)
        candidates = torch.multinomial(weights, trials, replacement=True, generator=g).to(x.device)
        cand = x[candidates]
        d = (sq_norms[:, None] - 2 * x @ cand.T + (cand * cand).sum(1)[None, :]).clamp_min_(0)
        potentials = torch.minimum(closest[:, None], d)
        best = int(potentials.sum(0).argmin())
        closest = potentials[:, best]
        centroids.append(cand[best])
    c = torch.stack(centroids)
    threshold = tol * float(x.var(dim=0).mean())
    for _ in range(max_iter):
        labels = sq_distances(x, c, x_sq).argmin(dim=1)
        new = _means(x, labels, c)
        shift = float(((new - c) ** 2).sum())
        c = new
        if shift <= threshold:
            break
    return c


def _means(x: torch.Tensor, labels: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Cluster means as one [k, n] x [n, dims] product (index_add_ is serial and 10x slower on a CPU)."""
    k = previous.shape[0]
    onehot = torch.zeros(k, x.shape[0], dtype=x.dtype, device=x.device)
    onehot[labels, torch.arange(x.shape[0], device=x.device)] = 1
    sums = onehot @ x
    counts = onehot.sum(1, keepdim=True)
    return torch.where(counts > 0, sums / counts.clamp_min(1), previous)


def balanced_kmeans(features: np.ndarray | torch.Tensor, k: int, capacity: int | None = None, iters: int = 8,
                    seed: int = 0, device: torch.device | str | None = None) -> np.ndarray:
    """Labels in [0, k) with at most `capacity` (default ceil(n/k)) items per cluster.

    Runs on `device`, else on the features' device; always in float32 (distances decide the groups).
    """
    x = _as_tensor(features, device)
    n = x.shape[0]
    capacity = capacity or -(-n // k)
    if k == 1:
        return np.zeros(n, dtype=np.int64)
    if x.device.type == "cpu":
        # On the CPU the scikit-learn k-means that every quality figure in docs/quality.md was measured with;
        # the torch version (for GPUs, where it is much faster) is not yet shown to group as well
        # (bench/cluster_ab.py compares the two).
        return cpu_balanced_kmeans(x.numpy(), k, capacity, iters, seed)
    return torch_balanced_kmeans(x, k, capacity, iters, seed)


def torch_balanced_kmeans(x: torch.Tensor, k: int, capacity: int, iters: int = 8, seed: int = 0) -> np.ndarray:
    """k-means++ and Lloyd in torch on x's device, then balanced assignment rounds (GPU path)."""
    with torch.autocast(device_type=x.device.type, enabled=False):
        centroids = kmeans(x, k, seed=seed)
        x_sq = (x * x).sum(1, keepdim=True)
        labels = None
        for _ in range(iters):
            new = balanced_assign(sq_distances(x, centroids, x_sq), capacity)
            if labels is not None and torch.equal(new, labels):
                break
            labels = new
            centroids = _means(x, labels, centroids)
    return labels.cpu().numpy()


def cpu_balanced_kmeans(x: np.ndarray, k: int, capacity: int, iters: int = 8, seed: int = 0) -> np.ndarray:
    """scikit-learn's k-means for the centroids, then a greedy capacity-constrained assignment over all
    neuron-centroid pairs in order of distance (`greedy_assign`).

    On one thread: a layer's k-means is small (8192 x 128 features), and scikit-learn's OpenMP threads,
    next to torch's own pool, made it 10-20x slower on a busy 2-core machine (1.7 s against 0.09 s per
    layer, 2048x8192 shape, docs/benchmarks.md); the labels came out the same. It also makes the grouping
    independent of the core count (its threads sum the centroids in a thread-dependent order).
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        return _cpu_balanced_kmeans(x, k, capacity, iters, seed)


def _cpu_balanced_kmeans(x: np.ndarray, k: int, capacity: int, iters: int, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    x = np.ascontiguousarray(x, dtype=np.float32)
    centroids = KMeans(n_clusters=k, n_init=1, random_state=seed, max_iter=50).fit(x).cluster_centers_
    labels = None
    for _ in range(iters):
        d = (x * x).sum(1, keepdims=True) - 2 * x @ centroids.T + (centroids * centroids).sum(1)[None, :]
        new = greedy_assign(d, capacity)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        for c in range(k):
            members = x[labels == c]
            if len(members):
                centroids[c] = members.mean(axis=0)
    return labels


def greedy_assign(d: np.ndarray, capacity: int) -> np.ndarray:
    """Labels (-1: no room left) of the sequential greedy: walk all (row, cluster) pairs in stable order of
    distance and give a row its pair's cluster when the row is unassigned and the cluster has room.

    Done in at most k+1 vectorised rounds instead of a Python loop over up to n*k pairs (0.5 s of a layer
    of 8192 neurons into 8 experts, profiled; the pairs grow with the experts). Until the next cluster
    fills, every unassigned row takes its first pair whose cluster is not full: its nearest open cluster
    (lowest index on ties, as in the flat order). So each round gives every row that candidate, orders
    the candidates as the walk would (by distance, then row), and accepts them up to the one that fills
    a cluster; the rest wait for the next round, with that cluster closed.
    tests/test_weights_speed_assign.py checks it against the loop.
    """
    n, k = d.shape
    labels = np.full(n, -1, dtype=np.int64)
    counts = np.zeros(k, dtype=np.int64)
    pending = np.arange(n)
    while pending.size:
        open_ = counts < capacity
        if not open_.any():
            break
        sub = np.where(open_[None, :], d[pending], np.inf)
        choice = sub.argmin(axis=1)
        walk = np.argsort(sub[np.arange(pending.size), choice], kind="stable")  # ties: lower row first
        c_walk = choice[walk]
        # taken[i]: how many of the first i+1 walked candidates went to c_walk[i] (running count per cluster)
        onehot = np.zeros((walk.size, k), dtype=np.int64)
        onehot[np.arange(walk.size), c_walk] = 1
        taken = np.cumsum(onehot, axis=0)[np.arange(walk.size), c_walk]
        fills = np.flatnonzero(counts[c_walk] + taken == capacity)
        stop = fills[0] + 1 if fills.size else walk.size
        accepted = walk[:stop]
        labels[pending[accepted]] = choice[accepted]
        counts += np.bincount(choice[accepted], minlength=k)
        keep = np.ones(pending.size, dtype=bool)
        keep[accepted] = False
        pending = pending[keep]
    return labels
