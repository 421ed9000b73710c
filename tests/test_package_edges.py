"""MoFaSGD under misuse behaves like a torch.optim optimizer: sketch hooks tied to the optimizer's
life, parameters it cannot train refused up front (a refused group changes nothing), state_dicts
checked before anything is loaded, and an atomic step. Also: the package's torch range is the
supported one. (Issue 29; the math itself: tests/test_mofasgd.py.)"""

import copy
import gc
import io
import math
import os
import re
import weakref

import pytest
import torch

import mofasgd.optimizer as impl
from helpers import ROOT
from mofasgd import MoFaSGD

F64 = torch.float64


def weight(m, n, seed):
    return torch.nn.Parameter(torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=F64))


def gradient(p, seed):
    return torch.randn(p.shape, generator=torch.Generator().manual_seed(seed), dtype=p.dtype)


def backward(params, seed):
    """A backward pass whose gradient of each p is gradient(p, seed + i)."""
    loss = sum((p * gradient(p, seed + i)).sum() for i, p in enumerate(params))
    loss.backward()


def hooks_on(p) -> int:
    return len(p._post_accumulate_grad_hooks or {})


def snapshot(opt, params):
    """Everything a step may change: weights, state tensors, pending sketches, counters."""
    state = {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(params) if opt.state.get(p)}
    sketches = {i: [t.clone() for t in opt._sketches[p]] for i, p in enumerate(params) if p in opt._sketches}
    return ([p.detach().clone() for p in params], state, sketches, opt.cholesky_updates, opt.householder_updates,
            copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]))


def same(x, y) -> bool:
    return x.shape == y.shape and torch.allclose(x, y, rtol=0, atol=0, equal_nan=True)


def assert_same(a, b):
    weights_a, state_a, sketches_a, *rest_a = a
    weights_b, state_b, sketches_b, *rest_b = b
    assert all(torch.equal(x, y) for x, y in zip(weights_a, weights_b))
    assert state_a.keys() == state_b.keys()
    for i in state_a:
        assert state_a[i].keys() == state_b[i].keys() and all(torch.equal(state_a[i][k], state_b[i][k]) for k in state_a[i])
    assert sketches_a.keys() == sketches_b.keys()
    assert all(same(x, y) for i in sketches_a for x, y in zip(sketches_a[i], sketches_b[i]))
    assert rest_a == rest_b


def one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text, text
    return text


# ---------------------------------------------------------------------------------------------
# Hooks: tied to the optimizer's life


@pytest.mark.parametrize("collect", [False, True])
def test_a_discarded_sketch_optimizer_lets_the_next_optimizer_train(collect):
    """The issue's case: a replaced sketch-mode MoFaSGD must neither stay alive through its hooks
    nor go on deleting the gradients the next optimizer needs."""
    model = torch.nn.Linear(6, 8, bias=False).double()
    opt = MoFaSGD(model.parameters(), rank=2, memory_mode="sketch")
    gone = weakref.ref(opt)
    del opt
    if collect:
        gc.collect()
    assert gone() is None and hooks_on(model.weight) == 0  # freed at once: the hooks hold it weakly
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    before = model.weight.detach().clone()
    model(torch.randn(3, 6, dtype=F64)).square().sum().backward()
    assert model.weight.grad is not None
    opt.step()
    assert not torch.equal(model.weight.detach(), before)


def test_sketch_optimizers_one_after_another_and_side_by_side():
    """`opt = MoFaSGD(...)` twice keeps one optimizer's hooks; two live ones over one parameter
    each get its gradient (the last frees it) and each steps as a full-gradient MoFaSGD would."""
    p = weight(12, 8, 1)
    opt = MoFaSGD([p], rank=3, memory_mode="sketch")
    opt = MoFaSGD([p], rank=3, memory_mode="sketch")
    assert hooks_on(p) == 1
    backward([p], 10)
    assert p.grad is None and p in opt._sketches
    opt.step()

    first = MoFaSGD([p], lr=0.1, rank=3, memory_mode="sketch")
    second = MoFaSGD([p], lr=0.1, rank=3, memory_mode="sketch")
    reference_param = torch.nn.Parameter(p.detach().clone())
    reference = MoFaSGD([reference_param], lr=0.1, rank=3)
    backward([p], 20)
    assert p.grad is None  # freed by the last hook, after both folded it
    assert all(torch.allclose(a, b, rtol=0, atol=1e-12) for a, b in zip(first._sketches[p], second._sketches[p]))
    reference_param.grad = gradient(p, 20)
    first.step()
    reference.step()
    assert torch.allclose(p.detach(), reference_param.detach(), rtol=0, atol=1e-12)
    second.step()  # the second optimizer steps from the very same gradient
    assert (p.detach() - reference_param.detach()).abs().max() > 1e-4
    del first, second
    assert hooks_on(p) == 1  # opt's


def test_remove_hooks_and_the_context_hand_the_gradients_back():
    p, q = weight(10, 6, 2), torch.nn.Parameter(weight(10, 6, 2).detach().clone())
    reference = MoFaSGD([q], lr=0.1, rank=2)
    with pytest.raises(KeyError):
        with MoFaSGD([p], lr=0.1, rank=2, memory_mode="sketch") as opt:
            assert hooks_on(p) == 1
            raise KeyError("leaving the block by an exception removes them too")
    assert hooks_on(p) == 0 and opt.memory_mode == "full"
    opt = MoFaSGD([p], lr=0.1, rank=2, memory_mode="sketch")
    backward([p], 3)  # folded into a sketch by the hook
    opt.remove_hooks()
    assert hooks_on(p) == 0 and opt.memory_mode == "full"
    backward([p], 4)  # now a plain gradient
    assert p.grad is not None
    opt.step()  # the pending sketch plus p.grad's: the sketches are linear in G
    q.grad = gradient(q, 3) + gradient(q, 4)
    reference.step()
    assert torch.allclose(p.detach(), q.detach(), rtol=0, atol=1e-12)
    opt.remove_hooks()  # twice is fine


def test_sketch_groups_added_later_are_hooked_and_a_failed_constructor_leaves_no_hook():
    p, q, frozen = weight(8, 6, 3), weight(8, 6, 4), weight(8, 6, 5)
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="does not require grad"):
        MoFaSGD([{"params": [p]}, {"params": [frozen]}], rank=2, memory_mode="sketch")
    assert hooks_on(p) == 0
    opt = MoFaSGD([p], rank=2, memory_mode="sketch")
    opt.add_param_group({"params": [q], "lr": 0.01})
    backward([p, q], 5)
    assert p.grad is None and q.grad is None and q in opt._sketches


# ---------------------------------------------------------------------------------------------
# Parameters MoFaSGD cannot train: refused up front, in one line, changing nothing


def sparse_param():
    return torch.nn.Parameter(torch.eye(4, dtype=F64).to_sparse())


def int_param():
    return torch.nn.Parameter(torch.ones(4, 4, dtype=torch.int64), requires_grad=False)


@pytest.mark.parametrize("make, mode, needles", [
    (lambda: weight(0, 5, 0), "full", ["(0, 5)", "is empty", "leave it out"]),
    (lambda: weight(5, 0, 0), "sketch", ["(5, 0)", "is empty"]),
    (lambda: torch.nn.Parameter(torch.randn(4, 4, dtype=torch.complex64)), "full", ["complex", "torch.optim.AdamW"]),
    (int_param, "full", ["torch.int64", "floating-point"]),
    (sparse_param, "full", ["torch.sparse_coo", "SparseAdam"]),
    (lambda: weight(4, 4, 0).requires_grad_(False), "sketch", ["does not require grad", "requires_grad=True"]),
], ids=["empty-rows", "empty-cols", "complex", "integer", "sparse", "frozen-in-sketch"])
def test_untrainable_parameters_are_refused_in_one_line(make, mode, needles):
    good = weight(6, 4, 1)
    bad = make()
    with pytest.raises(ValueError) as error:
        MoFaSGD([good, bad], rank=2, memory_mode=mode)
    text = one_line(error)
    assert text.startswith("MoFaSGD: parameter #1 of its param group") or "sparse" in text, text
    for needle in needles:
        assert needle in text, (needle, text)
    assert hooks_on(good) == 0
    # the same parameter through add_param_group: refused, and the optimizer is as it was
    opt = MoFaSGD([good], lr=0.1, rank=2, memory_mode=mode)
    before = snapshot(opt, [good])
    with pytest.raises(ValueError):
        opt.add_param_group({"params": [bad]})
    assert len(opt.param_groups) == 1 and hooks_on(good) == (1 if mode == "sketch" else 0)
    assert_same(before, snapshot(opt, [good]))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors", "ignore:optimizer contains a parameter group with duplicate")
def test_errors_name_a_named_parameter_and_frozen_ones_are_fine_in_full_mode():
    model = torch.nn.Sequential(torch.nn.Linear(4, 0, bias=False))
    with pytest.raises(ValueError, match=r"^MoFaSGD: parameter '0.weight' of shape \(0, 4\) is empty"):
        MoFaSGD(model.named_parameters())
    frozen, live = weight(6, 4, 1).requires_grad_(False), weight(6, 4, 2)
    opt = MoFaSGD([frozen, live], lr=0.1, rank=2)  # as torch.optim: a frozen one has no gradient, no step
    live.grad = gradient(live, 3)
    opt.step()
    assert not opt.state.get(frozen) and opt.state[live]["step"].item() == 1
    with pytest.raises(ValueError, match="listed twice in one param group"):
        MoFaSGD([live, live])


@pytest.mark.parametrize("group, needle", [
    ({"lr": math.nan}, "lr must be a finite number > 0"),
    ({"lr": -1.0}, "lr must be a number > 0"),
    ({"rank": 0}, "rank must be an int >= 1"),
    ({"nesterov": "yes"}, "nesterov must be a bool"),
    ({"momentum": "adam"}, "momentum must be one of"),
    ({"eta2": 0.5, "sketch": True}, "memory_mode='sketch' needs eta2 == 0"),
])
def test_a_refused_param_group_leaves_the_optimizer_unchanged(group, needle):
    """The issue's case: the bad group stayed in place and the next step broke or ran with a NaN lr."""
    group = dict(group)
    mode = "sketch" if group.pop("sketch", False) else "full"
    p, q = weight(8, 6, 1), weight(8, 6, 2)
    opt = MoFaSGD([p], lr=0.1, rank=2, memory_mode=mode)
    with pytest.raises(ValueError, match=re.escape(needle)):
        opt.add_param_group({"params": [q], **group})
    assert len(opt.param_groups) == 1 and hooks_on(q) == 0
    backward([p, q], 7)
    opt.step()  # q is no part of it
    assert torch.isfinite(p).all() and not opt.state.get(q)


def test_sparse_gradients_are_refused_before_anything_changes():
    dense, embed = weight(8, 6, 1), weight(10, 4, 2)
    opt = MoFaSGD([dense, embed], lr=0.1, rank=2)
    dense.grad = gradient(dense, 3)
    torch.nn.functional.embedding(torch.tensor([1, 3]), embed, sparse=True).sum().backward()
    assert embed.grad.is_sparse
    before = snapshot(opt, [dense, embed])
    with pytest.raises(RuntimeError) as error:
        opt.step()
    assert "sparse=False" in one_line(error) and "10x4" in str(error.value)
    assert_same(before, snapshot(opt, [dense, embed]))
    hooked = weight(10, 4, 2)
    opt = MoFaSGD([hooked], rank=2, memory_mode="sketch")
    with pytest.raises(RuntimeError, match="MoFaSGD needs dense gradients"):
        torch.nn.functional.embedding(torch.tensor([1, 3]), hooked, sparse=True).sum().backward()
    assert hooked not in opt._sketches


# ---------------------------------------------------------------------------------------------
# load_state_dict: checked whole before anything changes


def trained(rank=2, shapes=((8, 6), (5, 7)), steps=2, **kw):
    params = [weight(m, n, 30 + i) for i, (m, n) in enumerate(shapes)]
    opt = MoFaSGD(params, lr=0.05, rank=rank, **kw)
    for s in range(steps):
        for i, p in enumerate(params):
            p.grad = gradient(p, 100 * s + i)
        opt.step()
    return opt, params


def edited(state_dict, edit):
    sd = {"state": {i: dict(st) for i, st in state_dict["state"].items()},
          "param_groups": [dict(g) for g in state_dict["param_groups"]]}
    edit(sd)
    return sd


def set_state(i, key, value):
    return lambda sd: sd["state"][i].__setitem__(key, value)


def adamw_state_dict():
    ps = [weight(8, 6, 1), weight(5, 7, 2)]
    adam = torch.optim.AdamW(ps)
    for p in ps:
        p.grad = torch.ones_like(p)
    adam.step()
    return adam.state_dict()


@pytest.mark.parametrize("make, needle", [
    (lambda sd: edited(sd, set_state(0, "U", sd["state"][0]["U"][:, :1])), "U of parameter #0 of its param group "
     "of shape (8, 6) has shape (8, 1), expected (8, 2)"),
    (lambda sd: edited(sd, lambda d: d["param_groups"][0].__setitem__("rank", 3)), "expected (8, 3) (rank 3"),
    (lambda sd: edited(sd, set_state(1, "V", torch.zeros(6, 2, dtype=F64))), "V of parameter #1 of its param group "
     "of shape (5, 7) has shape (6, 2), expected (7, 2)"),
    (lambda sd: edited(sd, lambda d: d["state"][0].pop("V")), "holds S, U, step; a MoFaSGD state holds U, S, V, step"),
    (lambda sd: edited(sd, set_state(0, "exp_avg", torch.zeros(8, 6))), "holds S, U, V, exp_avg, step"),
    (lambda sd: edited(sd, set_state(0, "S", torch.zeros(2, dtype=torch.complex128))), "S of parameter #0"),
    (lambda sd: edited(sd, set_state(0, "S", torch.ones(2, dtype=torch.int64))), "expected a real floating-point"),
    (lambda sd: edited(sd, set_state(0, "S", [1.0, 2.0])), "S of parameter #0 of its param group of shape (8, 6) is list"),
    (lambda sd: edited(sd, set_state(1, "U", torch.full((5, 2), math.nan, dtype=F64))), "holds NaN or inf"),
    (lambda sd: edited(sd, set_state(0, "step", torch.tensor(-1.0))), "step of parameter #0"),
    (lambda sd: edited(sd, set_state(0, "step", "2")), "must be a number >= 0"),
    (lambda sd: edited(sd, lambda d: d["state"].__setitem__(7, {})), "parameter id 7, which no param group lists"),
    (lambda sd: edited(sd, lambda d: d["param_groups"][0].__setitem__("params", [0])), "holds 1 parameters in the "
     "state_dict and 2 here"),
    (lambda sd: edited(sd, lambda d: d["param_groups"].append(dict(d["param_groups"][0]))), "2 param groups, this "
     "optimizer 1"),
    (lambda sd: edited(sd, lambda d: d["param_groups"][0].__setitem__("lr", math.inf)), "param group 0: lr must be"),
    (lambda sd: adamw_state_dict(), "param group 0 lacks MoFaSGD's rank, beta, eta1"),
    (lambda sd: {"state": {}}, "expected a dict with 'state' (a dict) and 'param_groups' (a list)"),
    (lambda sd: [sd], "got list"),
], ids=["rank-of-U", "rank-of-group", "other-model", "missing-key", "adam-key", "complex", "integer", "not-a-tensor",
        "nan", "negative-step", "string-step", "unknown-id", "group-size", "group-count", "bad-hyperparameter",
        "adamw", "no-groups", "not-a-dict"])
def test_load_state_dict_refuses_what_does_not_fit_in_one_line_and_changes_nothing(make, needle):
    source, _ = trained()
    target, params = trained(steps=1)
    bad = make(source.state_dict())
    before = snapshot(target, params)
    with pytest.raises(ValueError) as error:
        target.load_state_dict(bad)
    text = one_line(error)
    assert text.startswith("MoFaSGD.load_state_dict: ") and needle in text, text
    assert_same(before, snapshot(target, params))
    for i, p in enumerate(params):  # and it still trains
        p.grad = gradient(p, 500 + i)
    target.step()


def test_states_of_another_rank_load_as_torch_optim_does():
    """The saved groups' hyperparameters replace the current ones (torch.optim's rule), so a state
    of another rank loads with its rank, and the step continues exactly; a numeric step is stored
    as the 0-d float32 tensor state_dict gives."""
    source, source_params = trained(rank=3)
    target, params = trained(rank=2, steps=0)
    for p, q in zip(params, source_params):
        p.data.copy_(q.detach())
    sd = source.state_dict()
    sd["state"][0]["step"] = 2
    target.load_state_dict(sd)
    assert target.param_groups[0]["rank"] == 3 and target.state[params[0]]["step"].dtype == torch.float32
    assert target.state[params[0]]["step"].dim() == 0
    for i, (p, q) in enumerate(zip(params, source_params)):
        p.grad = q.grad = gradient(p, 900 + i)
    source.step()
    target.step()
    assert all(torch.equal(p, q) for p, q in zip(params, source_params))


def test_loading_twice_and_copies_of_the_optimizer():
    """torch.optim adds its own keys to `defaults` on a load (a second load must not ask for them);
    copy.deepcopy and torch.save/torch.load give a working optimizer, a sketch-mode one with its own
    hooks on its own parameters."""
    opt, params = trained()
    saved = opt.state_dict()
    opt.load_state_dict(saved)
    opt.load_state_dict(saved)
    for mode in ("full", "sketch"):
        p = weight(8, 6, 7)
        original = MoFaSGD([p], lr=0.1, rank=2, memory_mode=mode)
        backward([p], 8)
        original.step()
        original.zero_grad()
        copied = copy.deepcopy(original)
        q = copied.param_groups[0]["params"][0]
        assert q is not p and copied.memory_mode == mode and hooks_on(q) == (mode == "sketch")
        assert hooks_on(p) == (mode == "sketch")  # the original's hooks stay on its own parameter
        backward([p], 9)
        backward([q], 9)
        original.step()
        copied.step()
        assert torch.equal(p, q) and torch.equal(copied.state[q]["U"], original.state[p]["U"])
        with io.BytesIO() as buffer:
            torch.save(original, buffer)
            buffer.seek(0)
            loaded = torch.load(buffer, weights_only=False)
        assert loaded.memory_mode == mode and loaded.state[loaded.param_groups[0]["params"][0]]["step"].item() == 2


# ---------------------------------------------------------------------------------------------
# An atomic step


@pytest.mark.parametrize("bad_index", [0, 1])
@pytest.mark.parametrize("warm", [False, True], ids=["first-step", "later-step"])
def test_a_failing_matrix_leaves_every_matrix_unchanged(bad_index, warm):
    """The issue's case: an error in the middle of step() left some matrices moved and others not."""
    params = [weight(8, 6, 1), weight(5, 7, 2), weight(8, 6, 3)]  # two buckets, the bad one first or last
    opt = MoFaSGD(params, lr=0.1, rank=2, eta2=0.2)
    if warm:
        for i, p in enumerate(params):
            p.grad = gradient(p, i)
        opt.step()
    for i, p in enumerate(params):
        p.grad = gradient(p, 10 + i)
    params[bad_index].grad[2, 3] = math.nan
    before = snapshot(opt, params)
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step()
    assert_same(before, snapshot(opt, params))
    params[bad_index].grad[2, 3] = 0.0
    opt.step()  # the same step, repaired, goes through
    assert all(opt.state[p]["step"].item() == 1 + warm for p in params)


def test_atomic_across_chunks_and_with_failing_checks(monkeypatch):
    params = [weight(8, 6, i) for i in range(4)]
    opt = MoFaSGD(params, lr=0.1, rank=2, check_orthonormal=1e-8)
    monkeypatch.setattr(impl, "_MAX_BATCH_ELEMENTS", 1)  # one matrix per batch: four batches
    real, calls = impl._update_momentum_factors_impl, []

    def broken_third(*args):  # the third batch's factors lose orthonormality
        U, S, V, fast = real(*args)
        calls.append(1)
        return (2 * U if len(calls) == 3 else U), S, V, fast

    monkeypatch.setattr(impl, "_update_momentum_factors_impl", broken_third)
    for i, p in enumerate(params):
        p.grad = gradient(p, i)
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match="lost orthonormality"):
        opt.step()
    assert_same(before, snapshot(opt, params))


def test_sketch_mode_failures_keep_the_pending_sketches():
    params = [weight(8, 6, 1), weight(5, 7, 2)]
    opt = MoFaSGD(params, lr=0.1, rank=2, memory_mode="sketch")
    loss = (params[0] * gradient(params[0], 1)).sum() + (params[1] * gradient(params[1], 2) * math.inf).sum()
    loss.backward()
    before = snapshot(opt, params)
    assert len(before[2]) == 2
    with pytest.raises(FloatingPointError):
        opt.step()
    assert_same(before, snapshot(opt, params))
    opt.zero_grad()
    assert opt.sketch_bytes() == 0
    backward(params, 3)
    opt.step()
    assert opt.sketch_bytes() == 0 and all(opt.state[p]["step"].item() == 1 for p in params)


def test_a_non_finite_weight_fails_the_first_step_in_one_line():
    good, bad = weight(8, 6, 1), weight(6, 4, 2)
    with torch.no_grad():
        bad[0, 0] = math.inf
    opt = MoFaSGD([good, bad], rank=2)
    good.grad, bad.grad = gradient(good, 1), gradient(bad, 2)
    before = snapshot(opt, [good, bad])
    with pytest.raises(FloatingPointError) as error:
        opt.step()
    assert "non-finite weight (NaN/inf) in a 6x4 parameter" in one_line(error)
    assert_same(before, snapshot(opt, [good, bad]))


# ---------------------------------------------------------------------------------------------
# The package's torch range


def test_the_package_requires_the_supported_torch_versions():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    with open(os.path.join(ROOT, "docs", "environment.md")) as f:
        environment = f.read()
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        pyproject = f.read()
    with open(os.path.join(ROOT, "Makefile")) as f:
        makefile = f.read()
    low, high = re.search(r"Supported torch versions: (\d+\.\d+) .*? to (\d+\.\d+)\.", environment).groups()
    major, minor = high.split(".")
    assert f'dependencies = ["torch>={low},<{major}.{int(minor) + 1}"]' in pyproject
    pinned = re.search(r"^TORCH_VERSION := (\S+)", makefile, re.M).group(1)  # what make package-check installs
    assert tuple(map(int, low.split("."))) <= tuple(map(int, pinned.split(".")[:2])) <= (int(major), int(minor))
    section = readme[readme.index("## Using MoFaSGD in your own code"):]
    assert "--index-url https://download.pytorch.org/whl/cpu" in section[:section.index("```python")]
