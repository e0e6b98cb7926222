"""Inputs and tolerances shared by the kernel tests and bench/profile_kernel.py, so the
benchmark checks exactly what the tests check (no pytest import here)."""
import torch

# (rtol, atol per unit of sqrt(reduction length)); atol grows with the reduction length.
TOL = {torch.float32: (1e-5, 1e-6), torch.float16: (1e-3, 2e-4), torch.bfloat16: (1.6e-2, 2e-3)}
# dtypes the interpreter computes correctly; bf16 is checked on GPUs only
CPU_DTYPES = [torch.float32, torch.float16]


def assert_close(actual, expected, dtype, reduction_len, what):
    rtol, atol = TOL[dtype]
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.detach().double().cpu(), expected.detach().double().cpu(), rtol=rtol,
                               atol=atol * reduction_len ** 0.5 * scale, msg=lambda m: f"{what}: {m}")


def normalised(*shape, dtype, gen):
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    return (x / x.norm(dim=-1, keepdim=True)).to(dtype)


def random_csr(v, density, gen, duplicates=True, empty_rows=(1,), zero_values=False):
    dense = torch.rand(v, v, generator=gen) < density
    for r in empty_rows:
        if r < v:
            dense[r] = False
    rows, cols = dense.nonzero(as_tuple=True)
    if duplicates and len(rows):
        rows, cols = torch.cat([rows, rows[:3]]), torch.cat([cols, cols[:3]])
        order = torch.sort(rows, stable=True).indices
        rows, cols = rows[order], cols[order]
    indptr = torch.zeros(v + 1, dtype=torch.int64)
    indptr[1:] = torch.cumsum(torch.bincount(rows, minlength=v), 0)
    values = torch.zeros(len(cols)) if zero_values else torch.randn(len(cols), generator=gen)
    return indptr, cols, values




def separated_topk(b, n, d, o, k, dtype, gen, lead=1.0):
    """Patches [b, n, d] and prompts [o, d] (o <= d) whose every column's top-k similarities lead
    the rest by about `lead` - 0.4: the prompts are orthonormal, each patch is unit noise (its
    similarity to a prompt is at most ~0.2) plus `lead` times the prompts whose top-k it is drawn
    into. A summation order or a dtype's rounding then cannot change the selection, as it can
    with plain random inputs (fp16, 784 patches: the 16th and 17th values 4.7e-8 apart)."""
    prompts = torch.linalg.qr(torch.randn(d, o, generator=gen, dtype=torch.float64)).Q.t()
    noise = torch.randn(b, n, d, generator=gen, dtype=torch.float64)
    chosen = torch.rand(b, n, o, generator=gen).argsort(dim=1)[:, :k, :]           # k distinct patches per column
    member = torch.zeros(b, n, o, dtype=torch.float64).scatter_(1, chosen, 1.0)
    patches = noise / noise.norm(dim=-1, keepdim=True) + lead * member @ prompts
    return patches.to(dtype), prompts.to(dtype)
