"""A plain Shampoo written straight from the algorithm's ten steps: per-block loops, float64.

It shares no code with the package, on purpose: it is what the package is checked against.
"""

from __future__ import annotations

import itertools

import torch

DEFAULTS = dict(
    lr=1e-3,
    betas=(0.9, 1.0),
    epsilon=1e-12,
    weight_decay=0.0,
    decoupled_weight_decay=True,
    momentum=0.0,
    dampening=0.0,
    nesterov=False,
    max_preconditioner_dim=1024,
    merge_dims="default",
    precondition_frequency=100,
    start_preconditioning_step=None,
    grafting="default",
    grafting_beta2=0.999,
    grafting_epsilon=1e-8,
    use_bias_correction=True,
    inverse_exponent_override=None,
    preconditioner="shampoo",
    eigenbasis="eigh",
    qr_iterations=1,
    qr_start="default",
    newton_iterations=None,
    eigenbasis_convention="reference",
    eigenbasis_tolerance=0.0,
    max_factor_ratio=None,
    refresh_delay=0,
    pseudo_inverse=False,
    rank_atol=0.0,
    rank_rtol=None,
    kl_shampoo=False,
    factor_source="gradient",
    first_moment_nesterov=False,
    newton_schulz="muon",
    newton_schulz_steps=5,
    symmetric_packing=True,  # storage only: nothing here
)
GRAFTING_BY_PRECONDITIONER = dict(
    shampoo="adam", eigenvalue_corrected=None, diagonal="adam", spectral="shape"
)
NS_MUON = [(3.4445, -4.7750, 2.0315)]
NS_POLAR_EXPRESS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]


def ref_powers(L, e, o, size=None):
    """Per eigenvalue: (max(L, 0) + epsilon) ** -e, or with pseudo_inverse 0 for those at most
    max(rank_atol, rank_rtol max(L)) (rank_rtol None: size (len(L)) x eps) and L ** -e."""
    L = L.flatten()
    if not o["pseudo_inverse"]:
        return (L.clamp_min(0) + o["epsilon"]) ** (-e)
    rtol = o["rank_rtol"]
    if rtol is None:
        rtol = (size or L.numel()) * torch.finfo(L.dtype).eps
    cutoff = max(o["rank_atol"], rtol * max(L.max().item(), 0.0))
    return torch.tensor([0.0 if x <= cutoff else x ** (-e) for x in L.tolist()], dtype=L.dtype)


def ref_matrix(X):
    """A block as rows x (the product of its other dims)."""
    return X.reshape(X.shape[0], -1) if X.dim() else X.reshape(1, 1)


def ref_polar(M, o):
    """Newton-Schulz on the block as a matrix (on its transpose when tall): X = M / ||M||_F
    (polar_express: / (1.02 ||M||_F + 1e-6)), then X <- a X + (b X X^T + c (X X^T)^2) X."""
    X = ref_matrix(M)
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    if o["newton_schulz"] == "muon":
        X = X / max(torch.linalg.norm(X).item(), 1e-7)
        schedule = NS_MUON * o["newton_schulz_steps"]
    else:
        X = X / (torch.linalg.norm(X) * 1.02 + 1e-6)
        schedule = NS_POLAR_EXPRESS[: o["newton_schulz_steps"]]
    for a, b, c in schedule:
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return (X.T if tall else X).reshape(M.shape)


def ref_multiplier(kind, shape):
    rows, cols = ref_matrix(torch.zeros(shape)).shape
    return max(1, rows / cols) ** 0.5 if kind == "shape" else 0.2 * max(rows, cols) ** 0.5


def ref_diagonal_enough(B, tol):
    """||B - diag(B)||_F <= tol ||B||_F, computed from the two norms (a negative difference of
    squares gives NaN: not diagonal enough), as facebookresearch/optimizers does."""
    norm = torch.linalg.norm(B)
    return bool(torch.sqrt(norm**2 - torch.linalg.norm(torch.diagonal(B)) ** 2) <= tol * norm)


def ref_tied(values):
    """Indices of the cluster of smallest eigenvalues: within 64 eps(float64) m x the largest
    magnitude of the smallest."""
    m = values.shape[0]
    spread = 64 * torch.finfo(values.dtype).eps * m * values.abs().max()
    return [j for j in range(m) if values[j] - values.min() <= spread]


def ref_sort(values, descending):
    """A stable sort of ``values`` in which the smallest's cluster counts as equal (it keeps
    its order)."""
    key = values.clone()
    key[ref_tied(values)] = values.min()
    return torch.argsort(key, descending=descending, stable=True)


def ref_canonical_ties(values, Q):
    """The columns N of the cluster of smallest eigenvalues replaced by N Q_c, Q_c R the QR
    decomposition (R's diagonal made non-negative) of N^T X[:, cluster], X an m x m standard
    normal draw seeded by m, in float64."""
    m = values.shape[0]
    cols = ref_tied(values)
    if len(cols) < 2:
        return Q
    N = Q[:, cols]
    X = torch.randn(m, m, generator=torch.Generator().manual_seed(m), dtype=torch.float64)
    Qc, R = torch.linalg.qr(N.T @ X[:, cols].to(Q.dtype))
    Qc = Qc * torch.where(torch.diagonal(R) < 0, -1.0, 1.0)
    Q = Q.clone()
    Q[:, cols] = N @ Qc
    return Q


def ref_qr_start(o):
    """QR's first basis: the identity with the reference convention's eigenvalue-corrected
    bases by default, else eigh's."""
    if o["qr_start"] != "default":
        return o["qr_start"]
    corrected = o["preconditioner"] == "eigenvalue_corrected"
    return "identity" if corrected and o["eigenbasis_convention"] == "reference" else "eigh"


def ref_eigenbasis(F, Q_old, o, t, first):
    """A factor's new eigenvectors, and (soap QR only) the permutation the corrected eigenvalues
    of its dim follow (see sharded_shampoo/algorithm/eigenbasis.py for the two conventions).
    ``first``: the first refresh, where QR starts from eigh's basis unless told otherwise."""
    beta2 = o["betas"][1]
    by_eigh = o["eigenbasis"] == "eigh" or (first and ref_qr_start(o) == "eigh")
    if o["eigenbasis_convention"] == "reference":
        c = 1 - beta2**t if (o["use_bias_correction"] and beta2 < 1) else 1.0
        A = F / c + o["epsilon"] * torch.eye(F.shape[0], dtype=F.dtype)
        tol = o["eigenbasis_tolerance"]
        if by_eigh:
            B = Q_old.T @ A @ Q_old
            if tol > 0 and ref_diagonal_enough(B, tol):
                return Q_old, None
            L, Q = torch.linalg.eigh(A)  # ascending
            return ref_canonical_ties(L, Q), None
        B, Q = Q_old.T @ A @ Q_old, Q_old
        for _ in range(o["qr_iterations"]):
            if ref_diagonal_enough(B, tol):
                break
            Qk, R = torch.linalg.qr(B)
            B, Q = R @ Qk, Q @ Qk
        order = ref_sort(torch.diagonal(B), descending=False)
        return ref_canonical_ties(torch.diagonal(B)[order], Q[:, order]), None
    if by_eigh:
        L, Q = torch.linalg.eigh(F)
        order = torch.argsort(L, descending=True, stable=True)
        return ref_canonical_ties(L[order], Q[:, order]), None
    estimates = torch.diagonal(Q_old.T @ F @ Q_old)
    perm = ref_sort(estimates, descending=True)
    Q = Q_old[:, perm]
    for _ in range(o["qr_iterations"]):
        Q, R = torch.linalg.qr(F @ Q)
    return ref_canonical_ties(torch.diagonal(R).abs(), Q), perm


def ref_newton_root(F, epsilon, p, iterations):
    """(F + s I) ** (-1/p), s = max(epsilon, d eps(float64) ||F||_F), by the coupled Newton
    iteration: X = z^(1/p) I, M = z A with z = (1 + p) / (2 ||A||_F); then
    T = ((p + 1) I - M) / p, X <- X T, M <- T^p M."""
    d = F.shape[0]
    eye = torch.eye(d, dtype=F.dtype)
    A = F + max(epsilon, d * torch.finfo(F.dtype).eps * torch.linalg.norm(F).item()) * eye
    z = (1 + p) / (2 * torch.linalg.norm(A))
    X, M = z ** (1 / p) * eye, z * A
    for _ in range(iterations):
        T = ((p + 1) * eye - M) / p
        X = X @ T
        M = torch.linalg.matrix_power(T, p) @ M
    return (X + X.T) / 2


def ref_merged_shape(shape, max_dim, merge):
    dims = list(shape) or [1]
    if not merge:
        return dims
    dims = [d for d in dims if d != 1] or [1]
    out = []
    current = dims[-1]
    for d in reversed(dims[:-1]):
        if current * d <= max_dim:
            current *= d
        else:
            out.append(current)
            current = d
    out.append(current)
    return out[::-1]


def ref_blocks(shape, max_dim, merge):
    """The block slices of a tensor of the merged shape, row-major over the chunk grid."""
    merged = ref_merged_shape(shape, max_dim, merge)
    per_dim = []
    for size in merged:
        cuts, lo = [], 0
        while lo < size:
            hi = min(lo + max_dim, size)
            cuts.append(slice(lo, hi))
            lo = hi
        per_dim.append(cuts)
    return merged, list(itertools.product(*per_dim))


class ReferenceShampoo:
    """Holds float64 copies of the parameters and updates them with per-block loops."""

    def __init__(self, groups, phases=None):
        # groups: list of dicts with "params" (tensors, copied to float64) and options.
        # phases: {(group, param, block): phase} for staggered roots (the schedule is given:
        # which phase a block gets is the package's choice, checked elsewhere).
        self.phases = phases or {}
        self.groups = []
        for g in groups:
            opts = {**DEFAULTS, **{k: v for k, v in g.items() if k != "params"}}
            if opts["start_preconditioning_step"] is None:
                opts["start_preconditioning_step"] = opts["precondition_frequency"]
            if opts["grafting"] == "default":
                opts["grafting"] = GRAFTING_BY_PRECONDITIONER[opts["preconditioner"]]
            if opts["merge_dims"] == "default":  # spectral's blocks are matrices
                opts["merge_dims"] = opts["preconditioner"] != "spectral"
            params = [p.detach().to(torch.float64).clone() for p in g["params"]]
            self.groups.append({"opts": opts, "params": params, "t": 0, "state": {}})

    def step(self, grads):
        """grads: per group, a list with a tensor or None per parameter."""
        for gi, (group, group_grads) in enumerate(zip(self.groups, grads, strict=True)):
            if all(g is None for g in group_grads):
                continue
            group["t"] += 1
            # Refreshes computed d steps ago are installed now, gradient or not.
            for st in group["state"].values():
                pending = st.pop("pending", None)
                if pending is None:
                    continue
                if pending[0] != group["t"]:
                    st["pending"] = pending
                elif group["opts"]["preconditioner"] == "eigenvalue_corrected":
                    st["Q"], perms = pending[1]
                    for i, perm in perms:  # corrected eigenvalues follow their eigenvectors
                        st["V"] = st["V"].index_select(i, perm)
                else:
                    st["P"], st["Q"] = pending[1]
            for pi, (w, g) in enumerate(zip(group["params"], group_grads, strict=True)):
                if g is not None:
                    self._step_param(gi, group, pi, w, g.to(torch.float64))

    def _step_param(self, gi, group, pi, w, g):
        o = group["opts"]
        t = group["t"]
        beta1, beta2 = o["betas"]
        merged, blocks = ref_blocks(w.shape, o["max_preconditioner_dim"], o["merge_dims"])
        wm = w.view(merged)
        gm = g.reshape(merged)
        for bid, sl in enumerate(blocks):
            G = gm[sl].clone()
            W = wm[sl].clone()
            k = G.dim()
            # The dims with a factor: d^2 <= ratio x the block's elements (all without a ratio);
            # the others keep P = Q = I, and the block's order for its exponent counts these.
            r = o["max_factor_ratio"]
            dims = [i for i in range(k) if r is None or G.shape[i] ** 2 <= r * G.numel()]
            if o["preconditioner"] in ("diagonal", "spectral"):
                dims = []
            st = group["state"].setdefault((pi, bid), {})
            if not st:
                st["F"] = [torch.zeros(d, d, dtype=torch.float64) for d in G.shape]
                st["P"] = [torch.eye(d, dtype=torch.float64) for d in G.shape]
                st["Q"] = [torch.eye(d, dtype=torch.float64) for d in G.shape]
                st["V"] = torch.zeros_like(G)
                st["v"] = torch.zeros_like(G)
                st["M"] = torch.zeros_like(G)
                st["B"] = torch.zeros_like(G)
            # 3. L2 weight decay
            if o["weight_decay"] > 0 and not o["decoupled_weight_decay"]:
                G = G + o["weight_decay"] * W
            # 6. filtered gradient (first: the factors may be built from it)
            if beta1 > 0:
                st["M"] = beta1 * st["M"] + (1 - beta1) * G
                M = st["M"] / (1 - beta1**t) if o["use_bias_correction"] else st["M"]
                if o["first_moment_nesterov"]:
                    M = (1 - beta1) * G + beta1 * M
            else:
                M = G

            def mode_product(X, mats, k=k):  # X x_1 mats[0] ... x_k mats[k-1]
                for i in range(k):
                    X = torch.tensordot(mats[i], X, dims=([1], [i])).movedim(0, i)
                return X

            # 4. factors and grafting state
            S = M if o["factor_source"] == "first_moment" else G
            kl = [
                mode_product(
                    S,
                    [
                        torch.eye(d, dtype=S.dtype) if j == i else st["P"][j]
                        for j, d in enumerate(S.shape)
                    ],
                )
                if o["kl_shampoo"]
                else S
                for i in range(k)
            ]
            for i in dims:
                Gi = kl[i].movedim(i, 0).reshape(G.shape[i], -1)
                gram = Gi @ Gi.T
                if beta2 == 1.0:
                    st["F"][i] = st["F"][i] + gram
                else:
                    st["F"][i] = beta2 * st["F"][i] + (1 - beta2) * gram
            g2 = o["grafting_beta2"]
            if o["grafting"] in ("adam", "rmsprop"):
                st["v"] = g2 * st["v"] + (1 - g2) * G * G
            elif o["grafting"] == "adagrad":
                st["v"] = st["v"] + G * G
            corrected = o["preconditioner"] == "eigenvalue_corrected"
            # 5. amortized roots: all blocks at start, then every f steps; or, staggered, each
            # block at the steps t > start with t % f == its phase
            start, f = o["start_preconditioning_step"], o["precondition_frequency"]
            phase = self.phases.get((gi, pi, bid), 0)
            # With a delay d, the refresh is computed from these factors and installed at
            # t + d (in step()); a block with one in flight skips the refreshes due meanwhile.
            delay = o["refresh_delay"]
            due = (t == start or (t > start and t % f == phase)) and "pending" not in st
            if corrected and due:
                new_Q, perms = list(st["Q"]), []
                for i in dims:
                    Q, perm = ref_eigenbasis(st["F"][i], st["Q"][i], o, t, t == start)
                    new_Q[i] = Q
                    if perm is not None:
                        perms.append((i, perm))
                if delay:
                    st["pending"] = (t + delay, (new_Q, perms))
                else:
                    st["Q"] = new_Q
                    for i, perm in perms:  # corrected eigenvalues follow their eigenvectors
                        st["V"] = st["V"].index_select(i, perm)
            if not corrected and due:
                c = 1 - beta2**t if (o["use_bias_correction"] and beta2 < 1) else 1.0
                kd = len(dims)
                e = (o["inverse_exponent_override"] or {}).get(kd, 1.0 / (2 * max(kd, 1)))
                new_P, new_Q = list(st["P"]), list(st["Q"])
                for i in dims:
                    if o["newton_iterations"] is not None:
                        new_P[i] = ref_newton_root(
                            st["F"][i] / c, o["epsilon"], round(1 / e), o["newton_iterations"]
                        )
                        continue
                    if o["eigenbasis"] == "qr":
                        # From the previous basis: simultaneous iteration on A + s I, then the
                        # eigenvalues diag(Q^T A Q) of the basis it ends with.
                        A = st["F"][i] / c
                        if t == start and ref_qr_start(o) == "eigh":  # eigh's, largest first
                            L, Q = torch.linalg.eigh(A)
                            Q = ref_canonical_ties(L, Q).flip(1)
                        else:  # columns by decreasing diag(Q^T A Q), then QR steps
                            u = torch.finfo(A.dtype).eps * A.shape[0] * torch.linalg.norm(A)
                            s = max(o["epsilon"], float(u))  # the shift: above A's rounding
                            Q = st["Q"][i]
                            key = torch.diagonal(Q.T @ A @ Q).clone()
                            key[key <= u] = 0.0  # rounding: tied, in their previous order
                            Q = Q[:, torch.argsort(key, descending=True, stable=True)]
                            for _ in range(o["qr_iterations"]):
                                Q, _ = torch.linalg.qr(
                                    (A + s * torch.eye(A.shape[0], dtype=A.dtype)) @ Q
                                )
                        L = torch.diagonal(Q.T @ A @ Q)
                        new_Q[i] = Q
                    else:
                        L, Q = torch.linalg.eigh(st["F"][i] / c)
                    # F is PSD: clamp rounding below zero, then add epsilon (or drop those
                    # below the cutoff: pseudo_inverse).
                    new_P[i] = Q @ torch.diag(ref_powers(L, e, o)) @ Q.T
                if delay:
                    st["pending"] = (t + delay, (new_P, new_Q))
                else:
                    st["P"], st["Q"] = new_P, new_Q
            # 7. direction

            def graft(M, st=st, g2=g2):
                eps = o["grafting_epsilon"]
                if o["grafting"] == "adam":
                    return M / (torch.sqrt(st["v"] / (1 - g2**t)) + eps)
                if o["grafting"] in ("rmsprop", "adagrad"):
                    return M / (torch.sqrt(st["v"]) + eps)
                if o["grafting"] in ("shape", "rms"):
                    rows, cols = ref_matrix(M).shape
                    norm = min(rows, cols) ** 0.5 * ref_multiplier(o["grafting"], M.shape)
                    return M * norm / (torch.linalg.norm(M) + 1e-16)
                return M

            if corrected:  # the second moment of G in the eigenbasis, every step
                Gq = mode_product(G, [Q.T for Q in st["Q"]])
                if beta2 == 1.0:
                    st["V"] = st["V"] + Gq * Gq
                else:
                    st["V"] = beta2 * st["V"] + (1 - beta2) * Gq * Gq
            if o["preconditioner"] == "spectral":
                D = ref_polar(M, o)
                if o["grafting"] in ("shape", "rms"):
                    D = D * ref_multiplier(o["grafting"], M.shape)
                elif o["grafting"] is not None:
                    D = D * torch.linalg.norm(graft(M)) / (torch.linalg.norm(D) + 1e-16)
            elif (t < start + delay or not dims) and (o["grafting"] is not None or not corrected):
                D = graft(M)  # no factor at all: the grafting (diagonal) direction
            elif corrected:
                c = 1 - beta2**t if (o["use_bias_correction"] and beta2 < 1) else 1.0
                e = (o["inverse_exponent_override"] or {}).get(k, 0.5)
                Mq = mode_product(M, [Q.T for Q in st["Q"]])
                if o["pseudo_inverse"]:
                    W = ref_powers(st["V"] / c, e, o, size=max(G.shape)).view(G.shape)
                    D = mode_product(Mq * W, st["Q"])
                else:
                    D = mode_product(Mq / ((st["V"] / c) ** e + o["epsilon"]), st["Q"])
                if o["grafting"] is not None:
                    D = D * torch.linalg.norm(graft(M)) / (torch.linalg.norm(D) + 1e-16)
            else:
                D = mode_product(M, st["P"])
                if o["grafting"] is not None:
                    D = D * torch.linalg.norm(graft(M)) / (torch.linalg.norm(D) + 1e-16)
            # 8. decoupled weight decay
            if o["weight_decay"] > 0 and o["decoupled_weight_decay"]:
                D = D + o["weight_decay"] * W
            # 9. momentum
            mom = o["momentum"]
            if mom > 0:
                st["B"] = mom * st["B"] + (1 - o["dampening"]) * D
                D = D + mom * st["B"] if o["nesterov"] else st["B"]
            # 10. update
            wm[sl] -= o["lr"] * D
