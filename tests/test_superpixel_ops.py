"""Superpixel operators (wsss_core/superpixel/ops.py) against brute-force sums over pixels and cells."""
import pytest
import torch
import torch.nn.functional as F

from wsss_core.superpixel import ops

S = 4          # small cells keep the brute-force loops cheap; the operators take the cell size as an argument
H, W = 5, 6    # grid


def soft_q(b=2, h=H, w=W, cell=S, temp=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(b, 9, h * cell, w * cell, generator=g, dtype=torch.float64) * temp, 1)


def brute_asam(q, cell=S):
    """A(s, t) = sum_p Q(p->s) Q(p->t) / sum_p Q(p->s) over all pixels and all in-grid s, t (dense, (B, N, N))."""
    b, _, hh, ww = q.shape
    h, w = hh // cell, ww // cell
    n = h * w
    qd = q.new_zeros(b, hh * ww, n)        # Q(p -> s) as a dense pixel x superpixel matrix
    for y in range(hh):
        for x in range(ww):
            for k, (dy, dx) in enumerate(ops.OFFSETS9):
                sy, sx = y // cell + dy, x // cell + dx
                if 0 <= sy < h and 0 <= sx < w:
                    qd[:, y * ww + x, sy * w + sx] = q[:, k, y, x]
    num = qd.transpose(1, 2) @ qd
    return num / (qd.sum(1)[:, :, None] + 1e-8 * cell ** 2), qd   # eps 1e-8 in avg-pool units


def dense_to_25(a_dense, h=H, w=W):
    b = a_dense.shape[0]
    out = a_dense.new_zeros(b, 25, h, w)
    for sy in range(h):
        for sx in range(w):
            for j, (dy, dx) in enumerate(ops.OFFSETS25):
                ty, tx = sy + dy, sx + dx
                if 0 <= ty < h and 0 <= tx < w:
                    out[:, j, sy, sx] = a_dense[:, sy * w + sx, ty * w + tx]
    return out


def test_center_q_is_plain_grid_pooling():
    q = ops.center_q(2, H * S, W * S, dtype=torch.float64)
    f = torch.randn(2, 3, H * S, W * S, dtype=torch.float64)
    g = torch.randn(2, 3, H, W, dtype=torch.float64)
    torch.testing.assert_close(ops.pool(f, q, S), F.avg_pool2d(f, S), atol=1e-7, rtol=0)
    torch.testing.assert_close(ops.up(g, q, S), F.interpolate(g, scale_factor=S, mode="nearest"))
    torch.testing.assert_close(ops.pool(ops.up(g, q, S), q, S), g, atol=1e-7, rtol=0)
    a = ops.asam(q, S)
    assert torch.allclose(a[:, ops.CENTER25], torch.ones(()).double(), atol=1e-7)
    assert a[:, [j for j in range(25) if j != ops.CENTER25]].abs().max() == 0


def test_constants_are_preserved():
    q = soft_q()
    const = torch.full((2, 2, H * S, W * S), 3.5, dtype=torch.float64)
    torch.testing.assert_close(ops.pool(const, q, S), torch.full((2, 2, H, W), 3.5, dtype=torch.float64))
    # up: exact on pixels whose 3x3 candidate cells are all inside the grid
    upc = ops.up(torch.full((2, 2, H, W), 3.5, dtype=torch.float64), q, S)
    torch.testing.assert_close(upc[..., S:-S, S:-S], torch.full_like(upc[..., S:-S, S:-S], 3.5))
    assert (upc[..., :S, :] < 3.5).any()                         # the border loses what Q sends outside
    # a walk step keeps a constant on cells 2 away from the border (all their pairs are in the grid)
    a = ops.asam(q, S)
    x = torch.full((2, 1, H, W), 2.0, dtype=torch.float64)
    rw = ops.random_walk(x, a, 1)
    torch.testing.assert_close(rw[..., 2:-2, 2:-2], x[..., 2:-2, 2:-2])


def test_asam_matches_brute_force_double_sum():
    q = soft_q()
    a_dense, qd = brute_asam(q)
    a = ops.asam(q, S)
    torch.testing.assert_close(a, dense_to_25(a_dense), atol=1e-10, rtol=1e-9)
    # rows sum to 1 where no pixel of s can send mass outside the grid (cells 2 away from the border)
    torch.testing.assert_close(a.sum(1)[:, 2:-2, 2:-2], torch.ones(2, H - 4, W - 4, dtype=torch.float64))
    assert (a.sum(1)[:, 0, 0] < 1 - 1e-3).all()
    # detailed balance m(s) A(s, t) = m(t) A(t, s)
    m = qd.sum(1) + 1e-8 * S ** 2                               # the mass with the eps of the division
    lhs = m[:, :, None] * a_dense
    torch.testing.assert_close(lhs, lhs.transpose(1, 2), atol=1e-9, rtol=1e-9)


def test_asam_offset_convention():
    """Channel j = (dy + 2) * 5 + (dx + 2): a Q that splits the pixels of cell (2, 2) between it and its right
    neighbour puts the pair on channel 13 (e = (0, 1)) of (2, 2) and on channel 11 (e = (0, -1)) of (2, 3)."""
    q = ops.center_q(1, H * S, W * S, dtype=torch.float64)
    ys, xs = slice(2 * S, 3 * S), slice(2 * S, 3 * S)
    q[0, ops.CENTER9, ys, xs] = 0.5
    q[0, 5, ys, xs] = 0.5                                       # k = 5: d = (0, 1)
    a = ops.asam(q, S)
    assert a[0, 13, 2, 2] > 0.3 and a[0, 11, 2, 3] > 0
    nz = (a[0] > 0).nonzero().tolist()
    assert sorted(set((j, y, x) for j, y, x in nz if j != ops.CENTER25)) == [(11, 2, 3), (13, 2, 2)]


def test_hard_q_gives_identity_affinity():
    g = torch.Generator().manual_seed(1)
    k = torch.randint(0, 9, (1, H * S, W * S), generator=g)
    q = F.one_hot(k, 9).permute(0, 3, 1, 2).double()
    a = ops.asam(q, S)
    mass = ops.pool_mass(q, S)
    has = mass[:, 0] > 0
    torch.testing.assert_close(a[:, ops.CENTER25][has], torch.ones(int(has.sum()), dtype=torch.float64))
    x = torch.randn(1, 3, H, W, dtype=torch.float64)
    torch.testing.assert_close(ops.random_walk(x, a, 5) * has, x * has)


def test_random_walk_and_refine_with_q_paths():
    q = soft_q()
    a = ops.asam(q, S)
    x = torch.randn(2, 3, H, W, dtype=torch.float64)
    a_dense, _ = brute_asam(q)
    flat = x.flatten(2).transpose(1, 2)                          # (B, N, C)
    want = (a_dense @ (a_dense @ flat)).transpose(1, 2).reshape_as(x)
    torch.testing.assert_close(ops.random_walk(x, a, 2), want, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(ops.refine_with_q(x, q, 2, cell=S), want, atol=1e-10, rtol=1e-9)
    pix = torch.randn(2, 3, H * S, W * S, dtype=torch.float64)
    torch.testing.assert_close(ops.refine_with_q(pix, q, 3, cell=S),
                               ops.up(ops.random_walk(ops.pool(pix, q, S), a, 2), q, S))
    assert ops.refine_with_q(pix, q, 0, cell=S) is pix


def test_drm_identity_conservation_and_scatter_loop():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 3, 6, 7, generator=g, dtype=torch.float64)
    onehot = torch.zeros(2, 9, 6, 7, dtype=torch.float64)
    onehot[:, ops.CENTER9] = 1
    torch.testing.assert_close(ops.drm(z, onehot), z)
    w = torch.softmax(torch.randn(2, 9, 6, 7, generator=g, dtype=torch.float64), 1)
    zr = z.clone()
    zr[..., 0, :] = zr[..., -1, :] = zr[..., :, 0] = zr[..., :, -1] = 0
    torch.testing.assert_close(ops.drm(zr, w).sum((2, 3)), zr.sum((2, 3)))
    loop = torch.zeros_like(z)                                   # source q sends w_k(q) z(q) to q - d_k
    for y in range(6):
        for x in range(7):
            for k, (dy, dx) in enumerate(ops.OFFSETS9):
                ty, tx = y - dy, x - dx
                if 0 <= ty < 6 and 0 <= tx < 7:
                    loop[..., ty, tx] += w[:, k, None, y, x] * z[..., y, x]
    torch.testing.assert_close(ops.drm(z, w), loop, atol=1e-12, rtol=1e-12)


def test_dcr_gather_bounds():
    g = torch.Generator().manual_seed(3)
    w = torch.softmax(torch.randn(2, 9, 6, 7, generator=g, dtype=torch.float64), 1)
    const = torch.full((2, 2, 6, 7), -1.25, dtype=torch.float64)
    torch.testing.assert_close(ops.dcr(const, w)[..., 1:-1, 1:-1], const[..., 1:-1, 1:-1])
    onehot = torch.zeros_like(w)
    onehot[:, ops.CENTER9] = 1
    x = torch.randn(2, 2, 6, 7, generator=g, dtype=torch.float64)
    torch.testing.assert_close(ops.dcr(x, onehot), x)
    out = ops.dcr(x, w)[..., 1:-1, 1:-1]
    win = F.unfold(x.flatten(0, 1)[:, None], 3).reshape(4, 9, 4, 5)
    assert (out.flatten(0, 1) <= win.max(1).values + 1e-12).all()
    assert (out.flatten(0, 1) >= win.min(1).values - 1e-12).all()


def test_q_shape_errors():
    with pytest.raises(ValueError, match="multiples of the cell size 16"):
        ops.asam(torch.ones(1, 9, 40, 48) / 9)
    with pytest.raises(ValueError, match=r"\(B, 9, H, W\)"):
        ops.pool(torch.ones(1, 1, 32, 32), torch.ones(1, 8, 32, 32))
    with pytest.raises(ValueError, match="do not fit"):
        ops.up(torch.ones(1, 1, 2, 2), torch.ones(1, 9, 48, 32))


def test_hard_labels_follow_the_argmax():
    q = ops.center_q(1, 2 * S, 3 * S)
    q[0, :, 0, 0] = 0
    q[0, 8, 0, 0] = 1                                            # pixel (0, 0) of cell (0, 0) -> cell (1, 1)
    q[0, :, 0, 1] = 0
    q[0, 0, 0, 1] = 1                                            # top-left of (0, 0) is outside: clamped to (0, 0)
    lab = ops.hard_labels(q, S)
    assert lab[0, 0, 0] == 1 * 3 + 1 and lab[0, 0, 1] == 0 and lab[0, S, 2 * S] == 5
