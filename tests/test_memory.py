"""Weights on huge pages (``models._memory.on_huge_pages``, used by ``models.load`` on CPU):
the same values in one 2 MB-aligned mapping that JAX aliases, backed by 2 MB pages where the
kernel's transparent huge pages allow it, and a no-op when turned off or under tracing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdecode.models import _memory


def _thp_mode() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return "never"


def _huge_kb_at(address: int) -> int:
    """AnonHugePages (kB) of the mapping of this process that contains ``address``."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "AnonHugePages:":
                return int(line.split()[1])
    return 0


needs_linux = pytest.mark.skipif(not _memory.enabled(), reason="huge pages: Linux only")


@needs_linux
def test_same_values_in_one_aligned_mapping():
    rng = np.random.default_rng(0)
    tree = {"f": jnp.asarray(rng.standard_normal((300, 70)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal((33,)), jnp.bfloat16),
            "q": jnp.asarray(rng.integers(-127, 128, (5, 9)), jnp.int8),
            "empty": jnp.zeros((0, 4)), "n": 7, "none": None}
    placed = _memory.on_huge_pages(tree)
    assert placed["n"] == 7 and placed["none"] is None
    for k in ("f", "b", "q", "empty"):
        assert placed[k].dtype == tree[k].dtype and placed[k].shape == tree[k].shape
        np.testing.assert_array_equal(np.asarray(placed[k]), np.asarray(tree[k]))
    ptrs = sorted(placed[k].unsafe_buffer_pointer() for k in ("b", "f", "q"))  # flatten order
    assert ptrs[0] % _memory.HUGE_PAGE == 0  # the mapping's first array starts on a 2 MB page
    assert all(p % 64 == 0 for p in ptrs)
    assert ptrs[-1] - ptrs[0] < 300 * 70 * 4 + 33 * 2 + 3 * 64  # packed side by side
    assert float(jnp.sum(placed["f"] * 2)) == pytest.approx(float(jnp.sum(tree["f"] * 2)), rel=1e-6)


@needs_linux
@pytest.mark.skipif(_thp_mode() == "never", reason="transparent huge pages are disabled here")
def test_the_mapping_is_on_huge_pages():
    big = jnp.ones((3 * _memory.HUGE_PAGE // 4,), jnp.float32)  # 3 huge pages of data
    placed = _memory.on_huge_pages(big)
    assert _huge_kb_at(placed.unsafe_buffer_pointer()) >= 2048
    if _thp_mode() == "madvise":  # XLA does not ask for them: its own buffer stays on 4 KB pages
        assert _huge_kb_at(big.unsafe_buffer_pointer()) < 3 * 2048


def test_off_and_under_tracing_it_changes_nothing(monkeypatch):
    x = jnp.arange(6.0)
    assert jax.jit(_memory.on_huge_pages)(x).tolist() == x.tolist()  # tracers pass through
    monkeypatch.setenv("JAXDECODE_HUGE_PAGES", "0")
    assert not _memory.enabled()
    tree = {"x": x}
    assert _memory.on_huge_pages(tree) is tree


@needs_linux
@pytest.mark.skipif(_thp_mode() == "never", reason="transparent huge pages are disabled here")
def test_loaded_models_sit_on_huge_pages():
    from jaxdecode.models import load

    model, _ = load()
    leaves = jax.tree_util.tree_leaves(model)
    assert all(_huge_kb_at(a.unsafe_buffer_pointer()) > 0 for a in leaves)
    embed = model.params["embed"]
    assert _huge_kb_at(embed.unsafe_buffer_pointer()) * 1024 >= embed.nbytes // 2
